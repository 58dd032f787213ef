"""Per-example clipping, defined once for every engine (BK's gradients, DPZero's scalars).

A clip function turns an example's gradient norm ‖g_i‖ into the factor c_i its gradient is scaled by, with
c_i·‖g_i‖ ≤ C (the sensitivity the noise is calibrated to):
- "abadi" (Abadi et al. 2016): c_i = min(1, C/‖g_i‖);
- "automatic" (Bu et al. 2023): c_i = C/(‖g_i‖ + γ), γ = `AUTOMATIC_GAMMA`.
"""

from __future__ import annotations

import torch

CLIP_FNS = ("abadi", "automatic")
# How a trainer splits the trainable parameters into clipping groups (`BKEngine(clip_groups=...)`): "all", one
# norm over every parameter (the paper's); "head", a classifier head apart from the rest, each at C/√2.
CLIP_GROUPS = ("all", "head")
# How the BK engine forms per-example norms (`privacy.layers.contributions.GhostRule`).
CLIPPING_MODES = ("mixed", "ghost", "instantiate")
AUTOMATIC_GAMMA = 0.01


def clip_factors(norms: torch.Tensor, max_norm: float, clip_fn: str, gamma: float = AUTOMATIC_GAMMA) -> torch.Tensor:
    """c_i for each norm (a norm of 0 gives C/0 = inf, clamped to 1: no NaN, no branch on values)."""
    if clip_fn == "automatic":
        return max_norm / (norms + gamma)
    if clip_fn == "abadi":
        return (max_norm / norms).clamp(max=1.0)
    raise ValueError(f"clip_fn must be one of {CLIP_FNS}, got {clip_fn!r}")


def clip_scalars(values: torch.Tensor, max_norm: float, clip_fn: str = "abadi") -> torch.Tensor:
    """Per-example scalars (DPZero's directional derivatives, whose norm is |v|) clipped to [−C, C]."""
    if clip_fn == "abadi":
        return values.clamp(-max_norm, max_norm)  # exactly ±C at the bound, which v·C/|v| may round past
    return values * clip_factors(values.abs(), max_norm, clip_fn)
