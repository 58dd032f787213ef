"""Houlsby bottleneck adapters (Houlsby et al. 2019), one after each block's attention and MLP outputs."""

from __future__ import annotations

import re

import torch
from torch import nn

from dpmemarc_core.methods.families import layout_of
from dpmemarc_core.methods.placement import block_regex, freeze_all_but_head
from dpmemarc_core.privacy.settings import check_count

ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh}


class BottleneckAdapter(nn.Module):
    """x + up(act(down(x))). `up` starts at zero, so an adapter starts as the identity.

    Its parameters are at least fp32 even on a bf16/fp16 backbone (as peft does for LoRA): updates of
    small trainable tensors get lost in half precision. It computes in its own dtype and returns x's.
    """

    def __init__(self, dim: int, bottleneck: int, activation: str, like: nn.Parameter) -> None:
        super().__init__()
        dtype = torch.promote_types(like.dtype, torch.float32)
        self.down = nn.Linear(dim, bottleneck, device=like.device, dtype=dtype)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck, dim, device=like.device, dtype=dtype)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(self.act(self.down(x.to(self.down.weight.dtype)))).to(x.dtype)


class AdaptedOutput(nn.Module):
    """A projection followed by its adapter, called exactly like the projection alone."""

    def __init__(self, base: nn.Module, adapter: BottleneckAdapter) -> None:
        super().__init__()
        self.base = base
        self.adapter = adapter

    def forward(self, *args, **kwargs):
        return self.adapter(self.base(*args, **kwargs))


def _output_dim(module: nn.Module) -> int:
    # nn.Linear knows out_features; GPT-2's Conv1D calls it nf.
    dim = getattr(module, "out_features", None) or getattr(module, "nf", None)
    if dim is None:
        raise ValueError(f"adapter: cannot place an adapter after a {type(module).__name__}; "
                         "expected nn.Linear or Conv1D")
    return dim


def apply_adapter(model: nn.Module, *, bottleneck: int = 64, activation: str = "gelu") -> nn.Module:
    """Insert adapters in place after every block's attention output and MLP output projections.

    Each adapter sits on the sub-layer's output before the residual sum (and before BERT's post-norm),
    as in Houlsby et al. Defaults: bottleneck 64 (the DP-MemArc paper's r=64 for its adapter baseline,
    whatever the width d), GELU. Only the adapters are trainable, plus a classification model's head;
    a causal LM's head stays frozen. The adapted projections' own weights keep their values under
    `<path>.base`.
    """
    bottleneck = check_count(bottleneck, "adapter: bottleneck", minimum=1)
    if activation not in ACTIVATIONS:
        raise ValueError(f"adapter: activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    layout = layout_of(model, "adapter")
    pattern = block_regex(layout, (layout.attention_output, layout.mlp_output))
    paths = [name for name, _ in model.named_modules() if re.fullmatch(pattern, name)]
    if not paths:
        raise ValueError(f"adapter: no module of {type(model).__name__} matches {pattern!r}")
    freeze_all_but_head(model)
    for path in paths:
        base = model.get_submodule(path)
        weight = next(base.parameters())
        model.set_submodule(path, AdaptedOutput(base, BottleneckAdapter(_output_dim(base), bottleneck, activation,
                                                                          weight)))
    return model
