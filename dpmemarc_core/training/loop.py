"""The step loop every trainer shares: secret Poisson batches, running statistics, progress."""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from dpmemarc_core.privacy import PoissonBatchSampler, PrivacySettings
from dpmemarc_core.privacy.randomness import PrivateRandomness

Collate = Callable[[list[dict]], dict[str, torch.Tensor]]


class StepStats:
    """Running sums kept as tensors on the training device: no host sync per step (and none on meta)."""

    def __init__(self) -> None:
        self.steps = 0
        self.examples = 0
        self.loss_sum: torch.Tensor | float = 0.0
        self.clipped: torch.Tensor | int = 0

    def as_dict(self) -> dict:
        seen = max(self.examples, 1)
        return {"steps": self.steps, "examples": self.examples, "train_loss": float(self.loss_sum) / seen,
                "clipped_fraction": int(self.clipped) / seen}


def private_randomness(privacy: PrivacySettings, device: torch.device, sampling_seed: int | None = None,
                       noise_seed: int | None = None) -> tuple[PrivateRandomness, PrivateRandomness]:
    """A trainer's two secret streams: Poisson sampling (CPU) and noise (on the training device). Kept for
    the trainer's life, so that successive `run` calls continue them rather than repeat them."""
    return (PrivateRandomness("cpu", sampling_seed, secure=privacy.secure_mode),
            PrivateRandomness(device, noise_seed, secure=privacy.secure_mode))


def run_steps(trainer, steps: int, progress: bool = True, on_step: Callable[[int], None] | None = None,
              description: str = "train") -> dict:
    """The step loop shared by every trainer (`PrivateTrainer`, `ZOTrainer`): Poisson batches drawn from the
    trainer's secret sampling stream (`trainer.sampling`), progress bar."""
    sampler = PoissonBatchSampler(len(trainer.examples), trainer.sample_rate, steps, randomness=trainer.sampling)
    stats = StepStats()
    bar = tqdm(sampler, total=steps, desc=description, disable=not progress, dynamic_ncols=True)
    for indices in bar:
        trainer.step(indices, stats)
        if stats.steps % 10 == 0 or stats.steps == steps:
            bar.set_postfix(loss=f"{float(stats.loss_sum) / max(stats.examples, 1):.3f}")
        if on_step is not None:
            on_step(stats.steps)
    return stats.as_dict()
