"""From settings to a trainer: the device, and the trainer class of a method."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dpmemarc_core.privacy import PrivacySettings
from dpmemarc_core.training.bk import PrivateTrainer
from dpmemarc_core.training.config import BK_DEFAULT_LR
from dpmemarc_core.training.loop import Collate


def make_trainer(method: str, model: torch.nn.Module, examples: Sequence[dict], collate: Collate,
                 privacy: PrivacySettings, sample_rate: float, noise_multiplier: float, lr: float | None = None,
                 **kwargs) -> PrivateTrainer:
    """The trainer for a method: DPZero's forward-only `ZOTrainer` for "zo", BK `PrivateTrainer` otherwise."""
    if method == "zo":
        from dpmemarc_core.training.zo import DEFAULT_LR, ZOTrainer

        return ZOTrainer(model, examples, collate, privacy, sample_rate, noise_multiplier,
                         lr=DEFAULT_LR if lr is None else lr, **kwargs)
    return PrivateTrainer(model, examples, collate, privacy, sample_rate, noise_multiplier,
                          lr=BK_DEFAULT_LR if lr is None else lr, **kwargs)


def resolve_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device is 'cuda' but no CUDA GPU is available; use --device cpu")
    return device
