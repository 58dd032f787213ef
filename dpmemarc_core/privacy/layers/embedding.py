"""Per-example gradients of `nn.Embedding`: token, position and token-type tables, tied or not.

The weight's per-example gradient is Σ_t e_{x_t} g_tᵀ (V×d); it is never formed, only kept factored
with one-hot rows. Rows at `padding_idx` get no gradient in PyTorch, so their g is zeroed here.
"""

from __future__ import annotations

import torch
from torch import nn

from dpmemarc_core.privacy.layers.contributions import Factored


class EmbeddingHandler:
    types: tuple[type, ...] = (nn.Embedding,)
    param_names = ("weight",)

    def check(self, module: nn.Module, path: str) -> None:
        if module.max_norm is not None or module.scale_grad_by_freq or module.sparse:
            raise TypeError(f"BKEngine: embedding '{path}' uses max_norm/scale_grad_by_freq/sparse, "
                            "whose gradients BK does not reproduce; unset them or freeze the module")

    def layer_input(self, module: nn.Module, args: tuple) -> torch.Tensor:
        return args[0]

    def contributions(self, module: nn.Module, ids: torch.Tensor, g: torch.Tensor,
                      ghost: object) -> list[tuple[nn.Parameter, object]]:
        ids = ids.reshape(ids.shape[0], -1)
        g = g.reshape(g.shape[0], -1, g.shape[-1])
        if module.padding_idx is not None:
            g = g * (ids != module.padding_idx).unsqueeze(-1).to(g.dtype)
        return [(module.weight, Factored(right=g, left_ids=ids))]
