"""DP-MemArc's reversible network (`rev`, MemDPT_rev): pretrained blocks made reversible after MEFT.

Each block is one coupling of two streams (see `coupling`): F is the block's attention sub-layer
with LoRA on its query/value projections (or another trainable part: `f_module`, see `f_modules`),
G its MLP sub-layer with a Houlsby adapter after the output projection, the arrangement of MEFT's
third variant (F = attention, G = MLP, λ = β = 0.1, streams not swapped). The forward keeps no
graph; the backward replays the stack segment by segment from stream pairs stored every ~√L
blocks and recomputes one sub-layer at a time (no block is inverted: see `coupling`).

Memory and time, under BK clipping (`BKEngine`):
- backward_passes=2: the first pass reduces each layer's per-example contribution to squared norms
  as soon as its g arrives, the second back-propagates Σ c_i L_i through the stack again. Autograd
  keeps about 4·√L hidden-state tensors (stored pairs plus one replayed segment) and one sub-layer's
  graph, and BK keeps no per-layer buffer; the price is time: per pass, a replay of the blocks that
  do not start a segment, a recompute and a backward of every block, after the step's one forward.
- backward_passes=1: one pass of the same, but the engine keeps every layer's BK buffer
  (factored a, g or instantiated per-example gradients) until the backward ends: linear in depth
  again, though smaller than the activations when the LoRA/adapter gradients are instantiated.
- backward_passes="auto" (recommended, `model.recommended_backward_passes`): one pass while the kept
  buffers stay within two of the pass's largest activation tensors, else the rest as two passes
  (`BKEngine`): one pass for small trainable parts (LoRA r=1 on MiniLM), two for the paper's r=64, and
  BK buffers O(1) in depth either way (the simulated peaks at the paper's setting equal two passes').
Figures: BENCHMARKS.md ("Reversible network").
"""

from __future__ import annotations

import math

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from dpmemarc_core.methods.adapter import AdaptedOutput, BottleneckAdapter
from dpmemarc_core.methods.families import FamilyLayout, layout_of
from dpmemarc_core.methods.placement import freeze_all_but_head
from dpmemarc_core.methods.rev.coupling import ReversibleStack, Sublayer, cache_argument
from dpmemarc_core.methods.rev.f_modules import (
    LORA_MODULES,
    ParallelPrefix,
    check_f_module,
    install_f_module,
)
from dpmemarc_core.privacy.settings import check_count, check_real

# Arguments a rotary block (Llama) receives and passes to its attention; a call dict holds only those of the
# installed block's own signature, so GPT-2's and BERT's never see them.
_POSITION_ARGUMENTS = ("position_ids", "position_embeddings")


def sublayers(layout: FamilyLayout) -> tuple[Sublayer, Sublayer]:
    """F and G of a block of `layout`'s family: its attention and its MLP sub-layer, each with its residual
    (and, post-norm, its norm), called as the block itself calls them."""
    if not layout.pre_norm:
        def post_norm_attention(block: nn.Module, x: torch.Tensor, call: dict) -> torch.Tensor:
            # BERT's attention module already holds the residual and the post-norm: LN(x + Attn(x)).
            return block.get_submodule(layout.attention)(x, call["attention_mask"], **cache_argument(call),
                                                         **call["kwargs"])[0]

        def post_norm_mlp(block: nn.Module, y: torch.Tensor, call: dict) -> torch.Tensor:
            return block.feed_forward_chunk(y)  # LN(y + MLP(y)), BERT's two MLP modules

        return post_norm_attention, post_norm_mlp

    def pre_norm_attention(block: nn.Module, x: torch.Tensor, call: dict) -> torch.Tensor:
        positions = {name: call[name] for name in _POSITION_ARGUMENTS if name in call}
        out, _ = block.get_submodule(layout.attention)(
            block.get_submodule(layout.attention_norm)(x), attention_mask=call["attention_mask"],
            **cache_argument(call), use_cache=call["use_cache"], **positions, **call["kwargs"])
        return x + out

    def pre_norm_mlp(block: nn.Module, y: torch.Tensor, call: dict) -> torch.Tensor:
        return y + block.get_submodule(layout.mlp)(block.get_submodule(layout.mlp_norm)(y))

    return pre_norm_attention, pre_norm_mlp


def apply_rev(model: nn.Module, r: int = 64, *, lora_alpha: float | None = None, adapter_size: int | None = None,
              x1_factor: float = 0.1, x2_factor: float = 0.1, segment_size: int | None = None,
              f_module: str = "lora") -> nn.Module:
    """Make `model` (modified in place and returned) a reversible network; only F's module (LoRA by
    default), G's adapters and a classification head are trainable.

    Supported: GPT2LMHeadModel, BertForSequenceClassification, RobertaForSequenceClassification,
    LlamaForCausalLM (any model of those four model types with their block layout). Options: LoRA rank
    `r` and `lora_alpha` (default r, scale 1); `adapter_size`, the adapter bottleneck (default r);
    `x1_factor` λ and `x2_factor` β in [0, 1], MEFT's 0.1 each; `segment_size` k, blocks per replayed
    segment (default None: about √L, `coupling.default_segment_size`); `f_module`, F's trainable
    part: "lora" (default), "parallel_adapter", "prefix" or "dylora", each sized by `r` (designs and
    departures from the original methods in `f_modules`); `lora_alpha` only with "lora" and "dylora".

    `segment_size`: the forward stores both streams at the first block of every segment of k blocks,
    the backward replays one segment at a time. Live hidden-state tensors: about 2·⌈L/k⌉ + 2·k, least
    at k ≈ √L (the default); a backward pass re-runs L − ⌈L/k⌉ blocks, so k=1 (every block's input
    pair stored, nothing replayed) is the fastest and linear in depth. Gradients equal plain
    autograd's on the same forward at every k, in any precision.

    Choosing λ and β. They no longer affect exactness (nothing is inverted), only where training
    starts and how the streams mix. With LoRA B (or the zero-initialised half of F's other modules)
    and the adapters' up-projections at zero, the model differs from the pretrained one by the
    coupling's λ·(x¹ − x²) and β·(x² − y¹) terms: O(λ + β), shrinking linearly with them, and at
    λ = β = 0 it is the pretrained model exactly (the first stream is then unused, and the stack is
    the pretrained network with activation replay). The default keeps MEFT's 0.1, the setting the
    quickstart recipes and the paper's tables were run with. Start-point distances per model:
    BENCHMARKS.md ("Reversible network").

    The backbone's block list is replaced by a one-element list holding a `ReversibleStack` (block i
    is then `<backbone>.<list>.0.blocks.i`); generation with a KV cache works through it, hidden
    states per block are not reported. Use `BKEngine(model, backward_passes=model.recommended_backward_passes)`.
    """
    r = check_count(r, "rev: r", minimum=1)
    f_module = check_f_module(f_module)
    if lora_alpha is not None and f_module not in LORA_MODULES:
        raise ValueError(f"rev: lora_alpha applies to f_module {' or '.join(map(repr, LORA_MODULES))} only, "
                         f"not {f_module!r}")
    adapter_size = check_count(r if adapter_size is None else adapter_size, "rev: adapter_size", minimum=1)
    alpha = r if lora_alpha is None else lora_alpha
    check_real(alpha, "rev: lora_alpha", 0, math.inf, "()")  # checked, passed on as given (int or float)
    # Nothing divides by λ or β (the backward replays, it does not invert): 0 is allowed. Above 1 a stream
    # would grow geometrically with depth; no use for that was found, so it is refused.
    lam, beta = check_real(x1_factor, "rev: x1_factor", 0, 1), check_real(x2_factor, "rev: x2_factor", 0, 1)
    if segment_size is not None:
        check_count(segment_size, "rev: segment_size", minimum=1)
    layout = layout_of(model, "rev")
    if getattr(model.config, "add_cross_attention", False):
        raise ValueError("rev: models with cross-attention (config.add_cross_attention=True) are not supported")
    if any(isinstance(m, ReversibleStack) for m in model.modules()):
        raise ValueError("rev: the model is already reversible (apply_rev was applied before)")
    blocks = model.base_model.get_submodule(layout.blocks)
    attention, mlp = sublayers(layout)
    attention = install_f_module(model, blocks, f_module, attention, layout=layout, r=r, lora_alpha=alpha)
    hidden = model.config.hidden_size
    for block in blocks:
        projection = block.get_submodule(layout.mlp_output)
        adapter = BottleneckAdapter(hidden, adapter_size, layout.activation, next(projection.parameters()))
        block.set_submodule(layout.mlp_output, AdaptedOutput(projection, adapter))

    freeze_all_but_head(model)
    for module in blocks.modules():
        if isinstance(module, LoraLayer):
            module.lora_A.requires_grad_(True)
            module.lora_B.requires_grad_(True)
        elif isinstance(module, (BottleneckAdapter, ParallelPrefix)):  # G's adapters, F's parallel module
            module.requires_grad_(True)

    parent_path, _, name = layout.blocks.rpartition(".")
    parent = model.base_model.get_submodule(parent_path) if parent_path else model.base_model
    setattr(parent, name, nn.ModuleList([ReversibleStack(blocks, attention, mlp, lam, beta, segment_size)]))
    model.recommended_backward_passes = "auto"
    return model
