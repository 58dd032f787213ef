"""From settings to a run: the device, the model (backbone → method, set up for its precision) and the trainer
of a method with its default learning rate. `dpmemarc train`, a federated run, `dpmemarc audit` and the
simulations build through here, so they cannot drift apart."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from dpmemarc_core.methods import METHODS, ModelSpec, apply
from dpmemarc_core.privacy import PrivacySettings
from dpmemarc_core.training.bk import PrivateTrainer
from dpmemarc_core.training.config import BK_DEFAULT_LR, ZO_PARAM_METHODS
from dpmemarc_core.training.loop import Collate
from dpmemarc_core.training.precision import (
    frozen_dtype,
    prepare_model,
    resolve_precision,
)


@dataclass
class Run:
    """A run's model (backbone + method, on `device`, set up for `precision`), its tokenizer, and the
    `ModelSpec` that rebuilds the model from its export. No data: each caller reads its own."""

    model: nn.Module
    tokenizer: object
    device: torch.device
    spec: ModelSpec
    precision: str  # resolved: bf16, fp16, amp-bf16 or fp32


def build_run(model: str, task_kind: str, method: str, *, num_labels: int = 0, labels: tuple[str, ...] = (),
              method_options: dict | None = None, zo_params: str = "full", precision: str | None = None,
              device: str | torch.device | None = None, seed: int = 0) -> Run:
    """The backbone `model` (its head fits `task_kind` and `num_labels`) with `method` applied, seeded by `seed`.

    The seed makes the randomly initialised parts (a new head, the method's modules) the same in every
    process that builds the run. `precision` None or "auto": bf16 on a CUDA GPU that has it, else fp32;
    `device` None: CUDA when available. DPZero (`method` "zo") trains, forward-only, the trainable part of
    another method (`zo_params`): that method is applied and is the export's.
    """
    if method not in (*METHODS, "zo"):
        raise ValueError(f"unknown method {method!r}; accepted: {', '.join((*METHODS, 'zo'))}")
    if method == "zo" and zo_params not in ZO_PARAM_METHODS:
        raise ValueError(f"zo_params must be one of {ZO_PARAM_METHODS}, got {zo_params!r}")
    from dpmemarc_core.models import load_backbone

    torch.manual_seed(seed)
    device = resolve_device(device)
    precision = resolve_precision(precision, device)
    # generation has 0 labels and ignores the argument
    backbone, tokenizer = load_backbone(model, task_kind, num_labels=max(num_labels, 2), dtype=frozen_dtype(precision))
    spec = ModelSpec(base_model=model, task_kind=task_kind, method=zo_params if method == "zo" else method,
                     num_labels=num_labels, labels=labels, method_options=dict(method_options or {}),
                     pad_token_id=backbone.config.pad_token_id)
    built = apply(backbone, spec.method, **spec.method_options).to(device)
    # Every trainer of the run uses this set-up (prepare_model is idempotent).
    prepare_model(built, precision, device, master_copies=method != "zo")
    return Run(model=built, tokenizer=tokenizer, device=device, spec=spec, precision=precision)


def make_trainer(method: str, model: torch.nn.Module, examples: Sequence[dict], collate: Collate,
                 privacy: PrivacySettings, sample_rate: float, noise_multiplier: float, lr: float | None = None,
                 head_lr: float | None = None, **kwargs) -> PrivateTrainer:
    """The trainer for a method: DPZero's forward-only `ZOTrainer` for "zo", BK `PrivateTrainer` otherwise.

    `lr` None: the method's default (DP-Adam's `BK_DEFAULT_LR`, DPZero's `zo.DEFAULT_LR`). `head_lr`, a
    classifier head's own rate (None: `lr`), is a BK setting: DPZero steps every coordinate alike.
    """
    if method == "zo":
        from dpmemarc_core.training.zo import DEFAULT_LR, ZOTrainer

        return ZOTrainer(model, examples, collate, privacy, sample_rate, noise_multiplier,
                         lr=DEFAULT_LR if lr is None else lr, **kwargs)
    return PrivateTrainer(model, examples, collate, privacy, sample_rate, noise_multiplier,
                          lr=BK_DEFAULT_LR if lr is None else lr, head_lr=head_lr, **kwargs)


def resolve_device(name: str | torch.device | None) -> torch.device:
    """`name` as a device, checked; None: CUDA when available, else the CPU."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device is 'cuda' but no CUDA GPU is available; use --device cpu")
    return device
