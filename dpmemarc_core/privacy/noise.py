"""The Gaussian mechanism on a clipped gradient sum: add σ·C·N(0, I), divide by the expected batch size."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from dpmemarc_core.privacy.randomness import PrivateRandomness


def privatize_gradients(params: Iterable[torch.nn.Parameter], noise_multiplier: float, max_grad_norm: float,
                        expected_batch_size: float, randomness: PrivateRandomness | None = None) -> None:
    """Turn each `.grad` (a clipped per-example sum) into a noisy mean, in place.

    Dividing by the *expected* batch size (q·N under Poisson sampling), not the realised one, keeps
    the sensitivity analysis valid; an empty batch still gets noise (a parameter without `.grad` is
    treated as a zero sum). `randomness` defaults to a new one from OS entropy; a trainer passes its own
    so that one well-seeded stream serves every step.
    """
    if not expected_batch_size > 0:
        raise ValueError(f"expected_batch_size must be > 0, got {expected_batch_size!r}")
    std = noise_multiplier * max_grad_norm
    params = list(params)
    if std > 0 and randomness is None:
        randomness = PrivateRandomness(params[0].device if params else "cpu")
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        # (sum + std·z) / B as sum / B + (std / B)·z: the noise is drawn at its final scale, one pass fewer.
        p.grad.div_(expected_batch_size)
        if std > 0:
            randomness.add_normal_(p.grad, std / expected_batch_size)
