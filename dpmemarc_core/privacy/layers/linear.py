"""Per-example gradients of `nn.Linear` and GPT-2's `Conv1D` (the same map, weight stored transposed)."""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from dpmemarc_core.privacy.layers.contributions import Factored, GhostRule, Instantiated, as_btd


class LinearHandler:
    types: tuple[type, ...] = (nn.Linear, Conv1D)
    param_names = ("weight", "bias")

    def check(self, module: nn.Module, path: str) -> None:
        return None

    def layer_input(self, module: nn.Module, args: tuple) -> torch.Tensor | None:
        # A bias's per-example gradient needs only g: keeping `a` for it would hold activations that
        # autograd itself frees when the weight is frozen (BiTFiT).
        return args[0] if module.weight.requires_grad else None

    def contributions(self, module: nn.Module, a: torch.Tensor, g: torch.Tensor,
                      ghost: GhostRule) -> list[tuple[nn.Parameter, object]]:
        g = as_btd(g)
        out = []
        weight = module.weight
        if weight.requires_grad:
            a = as_btd(a)
            # Linear stores W as (out, in): grad = Σ_t g_t a_tᵀ; Conv1D stores (in, out): Σ_t a_t g_tᵀ.
            left, right = (a, g) if isinstance(module, Conv1D) else (g, a)
            if ghost(weight, a, g):
                out.append((weight, Factored(left=left, right=right)))
            else:
                dt = torch.promote_types(weight.dtype, g.dtype)
                out.append((weight, Instantiated(torch.einsum("bti,btj->bij", left.to(dt), right.to(dt)))))
        bias = module.bias
        if bias is not None and bias.requires_grad:
            out.append((bias, Instantiated(g.sum(dim=1))))
        return out
