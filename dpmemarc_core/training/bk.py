"""`PrivateTrainer`: Poisson batches, BK clipping, Gaussian noise, DP-Adam, accounting.

It runs steps on one site's data and leaves the accountant to its owner, so the CLI (one run)
and a Flower client (many rounds, accountant kept across them) share every line of it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dpmemarc_core.losses import model_per_example_loss
from dpmemarc_core.privacy import BKEngine, PrivacyAccountant, PrivacySettings
from dpmemarc_core.privacy.noise import privatize_gradients
from dpmemarc_core.training.config import BK_DEFAULT_LR
from dpmemarc_core.training.loop import Collate, StepStats, StepTrainer
from dpmemarc_core.training.precision import LossScaler, prepare_model


class PrivateTrainer(StepTrainer):
    """Runs private (or, at ε = ∞, ordinary) optimisation steps of `model` on `examples`.

    Each step samples a Poisson batch (rate `sample_rate`, possibly empty), splits it into physical
    micro-batches of at most `physical_batch_size` (the clipped sums accumulate in `.grad`), adds
    σ·C·N(0, I), divides by the expected batch size, steps Adam and records the step in `accountant`.

    Batches and noise come from OS entropy (`privacy.secure_mode`: from a CSPRNG). `sampling_seed` and
    `noise_seed` fix them and so BREAK PRIVACY: tests and debugging only.

    `head_lr`: the learning rate of a classifier head (`parameter_groups`); None: `lr`.

    `precision` (see `dpmemarc_core.training.precision`): the model is set up for it here (fp32 master copies of the
    trainable weights, autocast around each forward); fp16 adds a `LossScaler`, whose docstring says what
    happens on a step with inf/NaN.
    """

    def __init__(self, model: torch.nn.Module, examples: Sequence[dict], collate: Collate,
                 privacy: PrivacySettings, sample_rate: float, noise_multiplier: float, lr: float = BK_DEFAULT_LR,
                 accountant: PrivacyAccountant | None = None, physical_batch_size: int | None = None,
                 device: torch.device | str | None = None, *, sampling_seed: int | None = None,
                 noise_seed: int | None = None, precision: str = "fp32", head_lr: float | None = None) -> None:
        device = torch.device(device) if device is not None else next(model.parameters()).device
        prepare_model(model, precision, device)
        super().__init__(model, examples, collate, privacy, sample_rate, noise_multiplier, accountant,
                         physical_batch_size, device, sampling_seed, noise_seed)
        self.scaler = LossScaler() if precision == "fp16" else None
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(parameter_groups(model, lr, head_lr), lr=lr)
        self.engine = None
        if privacy.is_private:
            self.engine = BKEngine(model, max_grad_norm=privacy.max_grad_norm, clipping_mode=privacy.clipping_mode,
                                   clip_fn=privacy.clip_fn,
                                   backward_passes=getattr(model, "recommended_backward_passes", 1),
                                   clip_groups=clip_groups(model, privacy.clip_groups))

    def close(self) -> None:
        """Detach the BK engine's hooks, so that a later trainer of the same model (`probe_first`) books alone."""
        if self.engine is not None:
            self.engine.detach()

    def _micro_batches(self, indices: list[int]) -> list[list[int]]:
        size = self.physical_batch_size or max(len(indices), 1)
        return [indices[i:i + size] for i in range(0, len(indices), size)]

    def step(self, indices: list[int], stats: StepStats) -> None:
        self.model.train()
        scale = self.scaler.scale if self.scaler is not None else 1.0
        overflowed: torch.Tensor | bool = False  # some example's scaled gradient was not finite (fp16 only)
        for chunk in self._micro_batches(indices):
            batch = {k: v.to(self.device) for k, v in self.collate([self.examples[i] for i in chunk]).items()}
            labels = batch.pop("labels")
            losses = model_per_example_loss(self.model, batch, labels)
            if self.engine is not None:
                norms = self.engine.clipped_backward(losses, loss_scale=scale)
                stats.clipped = stats.clipped + self.engine.last_clipped.sum()
                if self.scaler is not None:
                    overflowed = overflowed | ~torch.isfinite(norms).all()
            else:
                (losses.sum() * (scale / self.expected_batch_size)).backward()
            stats.loss_sum = stats.loss_sum + losses.detach().sum()
            stats.examples += len(chunk)
        if self.scaler is not None and not self.scaler.unscale_(self.params, overflowed):
            # Skipped, and still counted: see LossScaler.
            self.optimizer.zero_grad(set_to_none=True)
            if self.engine is not None:
                self.accountant.step(self.noise_multiplier, self.sample_rate)
            stats.steps += 1
            return
        if self.engine is not None:
            privatize_gradients(self.params, self.noise_multiplier, self.privacy.max_grad_norm,
                                self.expected_batch_size, self.noise)
            self.accountant.step(self.noise_multiplier, self.sample_rate)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        stats.steps += 1


def split_head(model: torch.nn.Module) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """(the rest, the head): the trainable parameters outside and inside a classifier head (a module named as
    in `methods.placement.CLASSIFIER_HEADS` anywhere in the model: HF's, peft's copy, the side network's)."""
    from dpmemarc_core.methods.placement import CLASSIFIER_HEADS

    head, rest = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (head if set(name.split(".")) & set(CLASSIFIER_HEADS) else rest).append(param)
    return rest, head


def split_head_required(model: torch.nn.Module, needed_by: str) -> tuple[list[torch.nn.Parameter],
                                                                          list[torch.nn.Parameter]]:
    """`split_head`, for a setting (`needed_by`, named in the error) that needs both parts non-empty."""
    from dpmemarc_core.methods.placement import CLASSIFIER_HEADS

    rest, head = split_head(model)
    if not head or not rest:
        raise ValueError(f"{needed_by} needs a trainable classifier head (a module named "
                         f"{' or '.join(CLASSIFIER_HEADS)}) "
                         f"and other trainable parameters; this model has {len(head)} head and {len(rest)} other "
                         "trainable tensors")
    return rest, head


def parameter_groups(model: torch.nn.Module, lr: float, head_lr: float | None = None) -> list[dict]:
    """Adam's parameter groups: a classifier head's trainable parameters (`split_head`) at `head_lr`, the rest
    at `lr`. A head that starts from scratch on features that already solve much of the task learns best at a
    larger rate than the backbone's small trainable part can take under DP noise (BENCHMARKS.md, "Private
    recipe"); choosing rates per group is post-processing and costs no privacy."""
    if head_lr is None:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr}]
    rest, head = split_head(model)
    return [group for group in ({"params": rest, "lr": lr}, {"params": head, "lr": head_lr}) if group["params"]]


def clip_groups(model: torch.nn.Module, choice: str) -> list[list[torch.nn.Parameter]] | None:
    """The BK engine's clipping groups for `PrivacySettings.clip_groups`: None (one group) for "all"; for
    "head", [the rest, the head], so that the head keeps a share C/√2 of the clipping budget however large
    the rest's gradients grow (BENCHMARKS.md, "Clipping the head apart")."""
    if choice == "all":
        return None
    return list(split_head_required(model, "clip_groups='head'"))
