"""DPZero (Zhang et al., ICML 2024): private zeroth-order fine-tuning with forward passes only.

One step, for a Poisson batch of examples i and a fresh seed s:
    z = z(s) ~ N(0, I) over the trainable parameters (regenerated from s, never stored)
    d_i = (L_i(θ + λz) − L_i(θ − λz)) / (2λ)            each example's directional derivative
    ĝ = (Σ_i clip(d_i, [−C, C]) + σC·N(0, 1)) / (qN)      clipped, noised, over the expected batch
    θ ← θ − η·ĝ·z                                         plain SGD along z (DPZero has no Adam)
Adding or removing one example moves the clipped sum by at most C, so the step is the Gaussian
mechanism with sensitivity C on a Poisson sample: the DP-SGD accountant applies unchanged.

Memory is inference memory: no autograd graph, no gradients, no optimizer state; θ is perturbed in
place (+λz, −2λz, then +λz fused with the update) so only one parameter-sized z exists at a time.
The authors' code (built on MeZO) adds noise of std 2σC/B, which is the replace-one neighbouring
relation; this project accounts add/remove neighbours, as Opacus does, where the sensitivity is C.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from dpmemarc_core.losses import per_example_loss
from dpmemarc_core.privacy import PrivacyAccountant, PrivacySettings
from dpmemarc_core.privacy.clip import clip_scalars
from dpmemarc_core.privacy.settings import check_count, check_real
from dpmemarc_core.training.loop import Collate, StepStats, StepTrainer
from dpmemarc_core.training.precision import prepare_model
from dpmemarc_core.training.zo_directions import (
    SEED_BOUND,
    apply_zo_updates,
    perturb_,
    resolve_direction_device,
    trainable_parameters,
)

__all__ = ["DEFAULT_LR", "DEFAULT_PERTURBATION_SCALE", "ZOTrainer", "apply_zo_updates"]

# λ of DPZero's and MeZO's scripts (RoBERTa-large and OPT alike).
DEFAULT_PERTURBATION_SCALE = 1e-3
# DPZero's OPT full fine-tuning learning rate (their RoBERTa-large runs use 1e-6).
DEFAULT_LR = 1e-5
# Salt of the stream of published direction seeds (derived from the public seed; batches and noise are not).
_DIRECTION_STREAM = 0x7A6F


class ZOTrainer(StepTrainer):
    """Runs DPZero steps of `model` on `examples`; the same surface as `PrivateTrainer`.

    Perturbs exactly the parameters with requires_grad (set by `methods.apply(model, "full" | "lora" |
    "bitfit")`). At ε = ∞ (`privacy.is_private` false) it is MeZO: no clipping, no noise, no accounting.
    `perturbation_scale` is λ; `lr` the SGD step size η; C is `privacy.max_grad_norm` (clipping the
    scalar d_i, whose scale is the per-example gradient norm: E[d_i²] = ‖∇L_i‖²).
    `direction_device` draws z (see `zo_directions`: "cpu" makes `history` replayable anywhere).

    Forwards run in eval mode: with dropout on, L(θ+λz) and L(θ−λz) would see different masks and
    their difference would be dominated by the mask, not by z. The loss `run` reports is the mean of
    L(θ+λz) and L(θ−λz), which is L(θ) up to O(λ²).

    For a Flower client: send `history` (with `lr`, `direction_device`), not the trainable state,
    when the server holds the same starting model and both draw z on the CPU. It is 2 numbers per
    step instead of the whole trainable part, it is as private as the state (the seeds are
    data-independent, the scalars are the privatized outputs), and `apply_zo_updates` turns it into
    the state on the server; FedAvg is replaying each site's pairs with its weight times lr.
    Otherwise send the state, as the other methods do.
    """

    def __init__(self, model: torch.nn.Module, examples: Sequence[dict], collate: Collate,
                 privacy: PrivacySettings, sample_rate: float, noise_multiplier: float, lr: float = DEFAULT_LR,
                 accountant: PrivacyAccountant | None = None, physical_batch_size: int | None = None,
                 seed: int = 0, device: torch.device | str | None = None, *,
                 perturbation_scale: float = DEFAULT_PERTURBATION_SCALE,
                 direction_device: torch.device | str | None = None, sampling_seed: int | None = None,
                 noise_seed: int | None = None, precision: str = "fp32") -> None:
        self.params = trainable_parameters(model)
        device = torch.device(device) if device is not None else self.params[0].device
        # The same set-up as PrivateTrainer's, without fp32 master copies: no optimizer keeps state for them,
        # and the perturbation is applied to the weights the forward reads.
        prepare_model(model, precision, device, master_copies=False)
        if physical_batch_size is not None:
            check_count(physical_batch_size, "physical_batch_size", minimum=1)
        super().__init__(model, examples, collate, privacy, sample_rate, noise_multiplier, accountant,
                         physical_batch_size, device, sampling_seed, noise_seed)
        self.lr = check_real(lr, "lr", 0, math.inf, "[)")
        self.perturbation_scale = check_real(perturbation_scale, "perturbation_scale", 0, math.inf, "()")
        self.direction_device = resolve_direction_device(self.params, direction_device)
        # `seed` is public and fixes only the directions, which are published anyway (history); batches and
        # noise come from the secret streams (`sampling_seed`/`noise_seed` fix them: BREAKS PRIVACY, tests only).
        check_count(seed, "seed", minimum=0)
        self._direction_seeds = np.random.default_rng([seed, _DIRECTION_STREAM])
        self._seeds: list[int] = []
        self._projected: list[torch.Tensor] = []

    @property
    def history(self) -> list[tuple[int, float]]:
        """(seed, projected gradient ĝ) of each step since the last `reset_history()`; one host sync."""
        if not self._seeds:
            return []
        return list(zip(self._seeds, torch.stack(self._projected).tolist()))

    def reset_history(self) -> None:
        self._seeds.clear()
        self._projected.clear()

    def _micro_batches(self, indices: list[int]) -> list[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        size = self.physical_batch_size or max(len(indices), 1)
        batches = []
        for start in range(0, len(indices), size):
            batch = self.collate([self.examples[i] for i in indices[start:start + size]])
            batch = {k: v.to(self.device) for k, v in batch.items()}
            batches.append((batch, batch.pop("labels")))
        return batches

    def _losses(self, batches: list[tuple[dict[str, torch.Tensor], torch.Tensor]]) -> torch.Tensor:
        if not batches:
            return torch.zeros(0, device=self.device)
        return torch.cat([per_example_loss(self.model(**inputs).logits, labels) for inputs, labels in batches])

    def _privatize(self, differences: torch.Tensor, stats: StepStats) -> torch.Tensor:
        """ĝ from the per-example directional derivatives; records the step with the accountant."""
        if not self.privacy.is_private:
            return differences.sum() / self.expected_batch_size
        max_norm = self.privacy.max_grad_norm
        total = clip_scalars(differences, max_norm, self.privacy.clip_fn).sum()
        stats.clipped = stats.clipped + (differences.abs() > max_norm).sum()
        if self.noise_multiplier > 0:
            noise = self.noise.normal((), torch.float32, self.device)
            total = total + self.noise_multiplier * max_norm * noise
        self.accountant.step(self.noise_multiplier, self.sample_rate)
        return total / self.expected_batch_size

    @torch.no_grad()
    def step(self, indices: list[int], stats: StepStats) -> None:
        seed = int(self._direction_seeds.integers(SEED_BOUND))
        batches = self._micro_batches(indices)
        scale, device = self.perturbation_scale, self.direction_device
        was_training = self.model.training
        self.model.eval()
        perturb_(self.params, seed, scale, device)
        plus = self._losses(batches)
        perturb_(self.params, seed, -2 * scale, device)
        minus = self._losses(batches)
        projected = self._privatize((plus - minus) / (2 * scale), stats)
        # Restoring θ (+λz) and the SGD step (−ηĝz) share one regeneration of z.
        perturb_(self.params, seed, scale - self.lr * projected, device)
        self.model.train(was_training)
        self._seeds.append(seed)
        self._projected.append(projected)
        stats.loss_sum = stats.loss_sum + (plus + minus).sum() / 2
        stats.examples += len(indices)
        stats.steps += 1
