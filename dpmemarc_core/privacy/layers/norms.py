"""Per-example gradients of LayerNorm and RMSNorm (Llama-style) scales and shifts.

Both are elementwise: the scale's per-example gradient is Σ_t g_t ⊙ x̂_t and the shift's Σ_t g_t,
so they are always instantiated (B×d). x̂ is recomputed from the stored input, in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dpmemarc_core.privacy.layers.contributions import Instantiated, as_btd, norm_dtype


class LayerNormHandler:
    types: tuple[type, ...] = (nn.LayerNorm,)
    param_names = ("weight", "bias")

    def check(self, module: nn.Module, path: str) -> None:
        if len(module.normalized_shape) != 1:
            raise TypeError(f"BKEngine: LayerNorm '{path}' normalises over {module.normalized_shape}; "
                            "only the last dimension is supported")

    def layer_input(self, module: nn.Module, args: tuple) -> torch.Tensor | None:
        return args[0] if module.weight is not None and module.weight.requires_grad else None

    def contributions(self, module: nn.Module, a: torch.Tensor | None, g: torch.Tensor,
                      ghost: object) -> list[tuple[nn.Parameter, object]]:
        g = as_btd(g)
        out = []
        if module.weight is not None and module.weight.requires_grad:
            x = as_btd(a).to(norm_dtype(a.dtype))
            # x̂ by the fused kernel without scale or shift: ~6x faster on CPU than var_mean and two passes.
            x_hat = F.layer_norm(x, module.normalized_shape, eps=module.eps)
            out.append((module.weight, Instantiated((g.to(x_hat.dtype) * x_hat).sum(dim=1))))
        if module.bias is not None and module.bias.requires_grad:
            out.append((module.bias, Instantiated(g.sum(dim=1))))
        return out


def is_rms_norm(module: nn.Module) -> bool:
    """Llama/Mistral/Qwen-style RMSNorm classes and torch's nn.RMSNorm: a scale, no shift."""
    return (type(module).__name__.endswith("RMSNorm") and isinstance(getattr(module, "weight", None), nn.Parameter)
            and getattr(module, "bias", None) is None)


class RMSNormHandler:
    types: tuple[type, ...] = (nn.RMSNorm,)
    param_names = ("weight",)

    def check(self, module: nn.Module, path: str) -> None:
        if module.weight.dim() != 1:
            raise TypeError(f"BKEngine: RMSNorm '{path}' has a {module.weight.dim()}-D scale; only 1-D is supported")

    def layer_input(self, module: nn.Module, args: tuple) -> torch.Tensor:
        return args[0]

    @staticmethod
    def _eps(module: nn.Module, dtype: torch.dtype) -> float:
        eps = getattr(module, "variance_epsilon", None)
        if eps is None:
            eps = getattr(module, "eps", None)
        return torch.finfo(dtype).eps if eps is None else eps

    def contributions(self, module: nn.Module, a: torch.Tensor, g: torch.Tensor,
                      ghost: object) -> list[tuple[nn.Parameter, object]]:
        a, g = as_btd(a), as_btd(g)
        x = a.to(norm_dtype(a.dtype))
        x_hat = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self._eps(module, a.dtype))
        # The module scales x̂ after casting it back to the input dtype; use that same rounding.
        x_hat = x_hat.to(a.dtype).to(x.dtype)
        return [(module.weight, Instantiated((g.to(x.dtype) * x_hat).sum(dim=1)))]
