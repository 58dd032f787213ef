"""Settings of a single-site run (`TrainConfig`) and what follows from them alone."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from dpmemarc_core.privacy.settings import check_count, check_sample_rate


def sample_rate_for(batch_size: int, num_examples: int) -> float:
    """Poisson rate q = B/N giving the requested *expected* batch size."""
    check_count(batch_size, "batch_size", minimum=1)
    check_count(num_examples, "num_examples", minimum=1)
    return check_sample_rate(min(1.0, batch_size / num_examples), "batch_size / num_examples")


@dataclass
class TrainConfig:
    """Settings of one single-site run. Defaults follow the paper where they make sense."""

    model: str = "minilm"
    task: str = "movie-sentiment"
    method: str = "lora"
    epsilon: float = 8.0
    delta: float | str | None = None  # a number, or a rule of N: "1/(10N)" (None, the default) or "1/N"
    epochs: float | None = None
    max_steps: int | None = None
    batch_size: int = 32
    # Micro-batch size; "auto": the largest the memory simulator fits in `memory` (or, without it, in the GPU's
    # free memory, on the CPU in the available RAM). It never changes the expected batch, the noise or the
    # accounting.
    physical_batch_size: int | str | None = None
    memory: str | None = None  # budget of physical_batch_size "auto", e.g. "8GiB"
    precision: str | None = None  # bf16 | fp16 | amp-bf16 | fp32; None: bf16 on a CUDA GPU that has it, else fp32
    lr: float | None = None  # None: 5e-4 (the paper's DP-Adam) for BK methods, DPZero's 1e-5 for zo
    head_lr: float | None = None  # a classifier head's learning rate (BK methods); None: lr
    max_grad_norm: float = 1.0
    clipping_mode: str = "mixed"
    clip_fn: str = "abadi"
    clip_groups: str = "all"  # "head": clip a classifier head and the rest separately (PrivacySettings)
    # The first fraction of the steps train the classifier head alone (DP linear probing, then fine-tuning:
    # training/probe_first.py); same noise and accounting. 0: every trainable part from the first step.
    probe_fraction: float = 0.0
    accountant: str = "rdp"
    max_length: int = 128
    max_train: int | None = None
    max_eval: int | None = None
    validation: bool = False  # evaluate on a tenth of the training split, not on the test split (data.load_task)
    seed: int = 0  # public: fixes initialisation, data splits and DPZero's directions, never batches or noise
    secure_mode: bool = False
    # Fix the Poisson batches / the noise: BREAKS PRIVACY (anyone who knows them can undo the DP); tests only.
    sampling_seed: int | None = None
    noise_seed: int | None = None
    device: str | None = None
    output: str | None = None
    method_options: dict = field(default_factory=dict)
    zo_params: str = "full"  # method zo perturbs the trainable part of this method: full, lora or bitfit
    progress: bool = True


BK_DEFAULT_LR = 5e-4


ZO_PARAM_METHODS = ("full", "lora", "bitfit")


def planned_steps(cfg: TrainConfig, num_examples: int) -> int:
    if cfg.max_steps is not None:
        return check_count(cfg.max_steps, "max_steps", minimum=1)
    epochs = 1.0 if cfg.epochs is None else cfg.epochs
    if not (isinstance(epochs, (int, float)) and 0 < epochs < math.inf):
        raise ValueError(f"epochs must be a finite number > 0, got {epochs!r}")
    return max(1, round(epochs * num_examples / cfg.batch_size))


def check_physical_batch_size(value: object, name: str = "physical_batch_size") -> None:
    """None (the whole batch at once), an integer >= 1, or "auto"."""
    if value is None or value == "auto":
        return
    try:
        check_count(value, name, minimum=1)
    except ValueError:
        raise ValueError(f"{name} must be an integer >= 1 or 'auto', got {value!r}") from None
