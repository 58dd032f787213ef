"""Seeded random directions for zeroth-order training: never stored, regenerated from a seed (MeZO style).

A direction z is one standard normal draw per trainable parameter, made in `model.parameters()` order
by one `torch.Generator` seeded with the step's seed. Perturbing in place (θ ← θ + s·z) then needs one
parameter-sized buffer at a time instead of a copy of θ, and a step's update is fully described by
(seed, projected gradient): `apply_zo_updates` replays such pairs on another copy of the model.

Which device draws z decides who can replay it. CPU draws are the same on every machine (up to the
last bit of the vectorised Box-Muller). CUDA draws are not portable: the element-to-thread mapping
of torch's Philox kernels depends on the GPU's number of SMs, so another GPU model can produce a
different z from the same seed. Replay across machines therefore needs `direction_device="cpu"` on
both ends; drawing on the parameters' own device is faster and fine for single-site training.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence

import torch

from dpmemarc_core.privacy.settings import check_count, check_real

# torch's CPU generator keeps only the low 32 bits of a seed; larger seeds would alias.
SEED_BOUND = 2**32


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters a zeroth-order step perturbs: those with requires_grad, in `parameters()` order."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("zo: the model has no parameter with requires_grad=True; apply a method "
                         "(full, lora, bitfit) first")
    return params


def check_seed(seed: object, name: str = "seed") -> int:
    """A direction seed: below `SEED_BOUND`, the bits torch's CPU generator keeps."""
    return check_count(seed, name, minimum=0, maximum=SEED_BOUND - 1)


def resolve_direction_device(params: Sequence[torch.Tensor],
                             direction_device: torch.device | str | None) -> torch.device:
    """The device that draws z: the one asked for, else the first parameter's device."""
    if direction_device is None:
        return params[0].device
    device = torch.device(direction_device)
    if params[0].device.type == "meta" and device.type != "meta":
        # Meta tensors have no values to perturb; drawing real numbers for them would only cost time.
        return params[0].device
    return device


def directions(params: Sequence[torch.Tensor], seed: int, device: torch.device) -> Iterator[torch.Tensor]:
    """Yield z for each parameter in turn, each on its parameter's device and in its dtype."""
    generator = None if device.type == "meta" else torch.Generator(device).manual_seed(check_seed(seed))
    for p in params:
        if generator is None:
            yield torch.randn_like(p)
        else:
            z = torch.randn(p.shape, generator=generator, device=device, dtype=p.dtype)
            yield z.to(p.device)


@torch.no_grad()
def perturb_(params: Sequence[torch.Tensor], seed: int, scale: float | torch.Tensor,
             device: torch.device) -> None:
    """θ ← θ + scale·z(seed), in place. `scale` may be a 0-d tensor (no host sync on the device)."""
    for p, z in zip(params, directions(params, seed, device)):
        if isinstance(scale, torch.Tensor):
            p.add_(z.mul_(scale.to(device=p.device, dtype=p.dtype)))
        else:
            p.add_(z, alpha=scale)


def apply_zo_updates(model: torch.nn.Module, pairs: Iterable[tuple[int, float]], lr: float,
                     direction_device: torch.device | str | None = None) -> None:
    """Replay zeroth-order SGD steps on `model`, in place: θ ← θ − lr·ĝ·z(seed) for each (seed, ĝ).

    `pairs` is `ZOTrainer.history` of the sender; `lr` its learning rate and `direction_device` its
    direction device. `model` must start where the sender's model started, with the same trainable
    parameters (same method and options) in the same order. Each update is linear in its z and z
    does not depend on θ, so replays compose: FedAvg of K sites' runs from a common start is replaying
    every site's pairs with lr·w_k (w_k the site's weight, Σ w_k = 1).

    The result equals the sender's parameters up to float rounding (about 1e-7 relative per step in
    fp32: the sender's perturb-and-restore round trips are not bit-exact).
    """
    check_real(lr, "lr", 0, math.inf, "[)")
    params = trainable_parameters(model)
    device = resolve_direction_device(params, direction_device)
    for i, pair in enumerate(pairs):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"pairs[{i}] must be (seed, projected_grad), got {pair!r}")
        seed, projected_grad = pair
        seed = check_seed(seed, f"pairs[{i}].seed")
        projected_grad = check_real(projected_grad, f"pairs[{i}].projected_grad", -math.inf, math.inf, "()")
        perturb_(params, seed, -lr * projected_grad, device)
