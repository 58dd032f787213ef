"""The trainable part of the reversible network's F (the attention sub-layer): the DP-MemArc paper's Figure 2.

`apply_rev(..., f_module=...)` picks one; G (the MLP sub-layer with its Houlsby adapter) is the same in all.
`r` sizes every variant. Each variant starts as the pretrained sub-layer (its zero-initialised half
is at zero), so every variant starts at the same point as "lora".

- "lora" (Hu et al. 2021): peft LoRA on the attention query/value projections, rank r, scale α/r.
- "parallel_adapter" (He et al. 2022, "Towards a unified view of parameter-efficient transfer learning"):
  a bottleneck adapter (size r, the family's activation, `up` zero-initialised) in parallel with the
  attention sub-layer: F(x) = attn_sublayer(x) + up(act(down(x))) − λx. It reads the stream x the
  sub-layer reads and its output is added to the sub-layer's output. Departure from He et al.: their
  adapter output joins the attention output inside the block (before the residual sum, and before the
  post-norm in BERT/RoBERTa); here it is added after them (after BERT's layer norm too), and on the
  pre-norm families (GPT-2, Llama) it reads the un-normalised stream, not the layer norm's output.
- "prefix": prefix tuning in He et al.'s unified-view form, a parallel attention of every token over
  P = r trainable prefix key/value vectors: P_v(softmax(P_k(x)/sqrt(d))), P_k, P_v bias-free Linears
  (so BK's nn.Linear rule clips them per example), P_v zero-initialised, added to the sub-layer's
  output like the parallel adapter. This is the unified view's approximation, not peft's
  past_key_values prefix tuning (Li and Liang 2021): one head instead of the model's heads, and the
  prefix attention is not normalised jointly with the real keys (no gating of the prefix share by
  the tokens' own attention scores); no reparametrisation MLP.
- "dylora" (Valipour et al. 2023): "lora", but in training mode each F forward samples one rank
  b ~ U{1..r} from torch's global RNG (shared by the block's query and value LoRA) and uses only the
  first b rank components, with the truncated product scaled α/b instead of α/r (the paper's scale,
  which at b = r is LoRA's); eval mode uses all r at α/r. Every component up to b is updated (not
  the paper's "frozen" variant, which updates only the b-th). The mask is applied to lora_B's input by a
  forward pre-hook, outside the Linear modules, so BK's per-example rule sees the masked input and stays
  exact. The reversible backward replays the RNG state F's forward saw (`coupling._replayed_rng`),
  so its recomputation samples the same b.
"""

from __future__ import annotations

import math

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

from dpmemarc_core.methods.adapter import BottleneckAdapter
from dpmemarc_core.methods.families import FamilyLayout
from dpmemarc_core.methods.placement import block_regex
from dpmemarc_core.methods.rev.coupling import Sublayer

F_MODULES = ("lora", "parallel_adapter", "prefix", "dylora")
LORA_MODULES = ("lora", "dylora")  # the variants that take lora_alpha


def check_f_module(f_module: object) -> str:
    if f_module not in F_MODULES:
        raise ValueError(f"rev: f_module must be one of {', '.join(map(repr, F_MODULES))}, got {f_module!r}")
    return f_module


class ParallelAdapter(BottleneckAdapter):
    """A bottleneck adapter's added term alone, up(act(down(x))), for use beside a sub-layer.

    Not x + adapter(x) − x: subtracting x again would round the small added term away."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(x.to(self.down.weight.dtype)))).to(x.dtype)


class ParallelPrefix(nn.Module):
    """P_v(softmax(P_k(x)/sqrt(d))): one-head attention of each token over `prefixes` trainable vectors.

    P_k's rows are the prefix keys, P_v's columns the prefix values (zero at the start). Parameters are
    at least fp32, like `BottleneckAdapter`'s; it computes in its own dtype and returns x's."""

    def __init__(self, dim: int, prefixes: int, like: nn.Parameter) -> None:
        super().__init__()
        dtype = torch.promote_types(like.dtype, torch.float32)
        self.key = nn.Linear(dim, prefixes, bias=False, device=like.device, dtype=dtype)
        self.value = nn.Linear(prefixes, dim, bias=False, device=like.device, dtype=dtype)
        nn.init.zeros_(self.value.weight)
        self.scale = 1.0 / math.sqrt(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.key(x.to(self.key.weight.dtype)) * self.scale
        return self.value(torch.softmax(scores, dim=-1)).to(x.dtype)


class RankSampler(nn.Module):
    """DyLoRA's rank: drawn per F forward in training mode, applied as a mask on lora_B's input.

    `rank` is None outside F's forward and in eval mode: lora_B then sees its whole input."""

    def __init__(self, r: int) -> None:
        super().__init__()
        self.r = r
        self.rank: int | None = None

    def sample(self) -> None:
        # The global CPU generator: its state is what the reversible backward replays before F.
        self.rank = int(torch.randint(1, self.r + 1, ())) if self.training else None

    def mask_lora_b_input(self, module: nn.Module, args: tuple) -> tuple | None:
        if self.rank is None:
            return None
        x = args[0]
        # Components beyond b are cut; the kept ones rescaled so peft's α/r becomes α/b.
        keep = (torch.arange(self.r, device=x.device) < self.rank).to(x.dtype) * (self.r / self.rank)
        return (x * keep, *args[1:])


def _with_parallel(attention: Sublayer, name: str) -> Sublayer:
    def attention_plus_parallel(block: nn.Module, x: torch.Tensor, call: dict) -> torch.Tensor:
        return attention(block, x, call) + block.get_submodule(name)(x)

    return attention_plus_parallel


def _with_rank_sampling(attention: Sublayer) -> Sublayer:
    def attention_at_sampled_rank(block: nn.Module, x: torch.Tensor, call: dict) -> torch.Tensor:
        sampler = block.f_rank
        sampler.sample()
        try:
            return attention(block, x, call)
        finally:
            sampler.rank = None

    return attention_at_sampled_rank


def install_f_module(model: nn.Module, blocks: nn.ModuleList, f_module: str, attention: Sublayer, *,
                     layout: FamilyLayout, r: int, lora_alpha: float) -> Sublayer:
    """Add `f_module`'s trainable part to every block of `model` (in place); return F's sub-layer.

    New modules sit on each block as `f_adapter` (parallel_adapter), `f_prefix` (prefix) or `f_rank`
    (dylora's sampler, no parameters); LoRA factors inside the query/value projections as peft puts
    them. Trainability is left to the caller (apply_rev freezes everything, then re-enables them)."""
    if f_module in LORA_MODULES:
        inject_adapter_in_model(LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=0.0, bias="none",
                                           target_modules=block_regex(layout, layout.query_value),
                                           fan_in_fan_out=layout.conv1d), model)
        if f_module == "lora":
            return attention
        for block in blocks:
            block.f_rank = RankSampler(r)
            for layer in block.modules():
                if isinstance(layer, LoraLayer):
                    for lora_b in layer.lora_B.values():
                        lora_b.register_forward_pre_hook(block.f_rank.mask_lora_b_input)
        return _with_rank_sampling(attention)
    hidden = model.config.hidden_size
    for block in blocks:
        like = next(block.parameters())
        if f_module == "parallel_adapter":
            block.f_adapter = ParallelAdapter(hidden, r, layout.activation, like)
        else:
            block.f_prefix = ParallelPrefix(hidden, r, like)
    return _with_parallel(attention, "f_adapter" if f_module == "parallel_adapter" else "f_prefix")
