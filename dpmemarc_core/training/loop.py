"""What every trainer shares: its run state, secret Poisson batches, running statistics, the step loop."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext

import torch
from tqdm.auto import tqdm

from dpmemarc_core.methods.side.state_cache import cached_backbone_states
from dpmemarc_core.privacy import (
    PoissonBatchSampler,
    PrivacyAccountant,
    PrivacySettings,
)
from dpmemarc_core.privacy.randomness import PrivateRandomness
from dpmemarc_core.privacy.settings import check_noise_multiplier, check_sample_rate

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


class StepTrainer:
    """What every trainer (`PrivateTrainer`, `ZOTrainer`) shares: the model and its examples, the Poisson rate
    and noise multiplier of its steps, the accountant that records them, the micro-batch size, and two secret
    random streams (Poisson sampling on the CPU, noise on the training device) kept for the trainer's life, so
    that successive `run` calls continue them rather than repeat them. A trainer defines `step`."""

    def __init__(self, model: torch.nn.Module, examples: Sequence[dict], collate: Collate, privacy: PrivacySettings,
                 sample_rate: float, noise_multiplier: float, accountant: PrivacyAccountant | None,
                 physical_batch_size: int | None, device: torch.device, sampling_seed: int | None,
                 noise_seed: int | None) -> None:
        self.model = model
        self.examples = examples
        self.collate = collate
        self.privacy = privacy
        self.sample_rate = check_sample_rate(sample_rate)
        self.noise_multiplier = check_noise_multiplier(noise_multiplier)
        self.accountant = accountant if accountant is not None else PrivacyAccountant(privacy.accountant)
        self.physical_batch_size = physical_batch_size
        self.device = device
        self.sampling = PrivateRandomness("cpu", sampling_seed, secure=privacy.secure_mode)
        self.noise = PrivateRandomness(device, noise_seed, secure=privacy.secure_mode)

    @property
    def expected_batch_size(self) -> float:
        return self.sample_rate * len(self.examples)

    def step(self, indices: list[int], stats: StepStats) -> None:
        """One step on the examples at `indices` (a Poisson batch, possibly empty), counted in `stats`."""
        raise NotImplementedError

    def run(self, steps: int, progress: bool = True, on_step: Callable[[int], None] | None = None,
            description: str = "train") -> dict:
        """Run `steps` steps on Poisson batches from the secret sampling stream; returns loss/examples/clipping
        statistics. Batches differ from call to call."""
        sampler = PoissonBatchSampler(len(self.examples), self.sample_rate, steps, randomness=self.sampling)
        stats = StepStats()
        bar = tqdm(sampler, total=steps, desc=description, disable=not progress, dynamic_ncols=True)
        # A side network's frozen backbone states are kept for examples drawn again, when the run draws each
        # example more than once in expectation (more than one epoch); other models are left alone.
        reused = steps * self.sample_rate > 1
        with cached_backbone_states(self.model) if reused else nullcontext():
            for indices in bar:
                self.step(indices, stats)
                if stats.steps % 10 == 0 or stats.steps == steps:
                    bar.set_postfix(loss=f"{float(stats.loss_sum) / max(stats.examples, 1):.3f}")
                if on_step is not None:
                    on_step(stats.steps)
        return stats.as_dict()
