"""The one private training loop: Poisson batches, BK clipping, Gaussian noise, DP-Adam, accounting.

`PrivateTrainer` runs steps on one site's data and leaves the accountant to its owner, so the CLI
(one run) and a Flower client (many rounds, accountant kept across them) share every line of it.
`train(TrainConfig)` is the single-site run behind `dpmemarc train`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from dpmemarc_core.losses import model_per_example_loss
from dpmemarc_core.precision import LossScaler, autocast_context, frozen_dtype, prepare_model, resolve_precision
from dpmemarc_core.privacy import BKEngine, PoissonBatchSampler, PrivacyAccountant, PrivacySettings, noise_multiplier_for
from dpmemarc_core.privacy.noise import privatize_gradients
from dpmemarc_core.privacy.randomness import PrivateRandomness
from dpmemarc_core.privacy.settings import check_count, check_sample_rate

Collate = Callable[[list[dict]], dict[str, torch.Tensor]]


def sample_rate_for(batch_size: int, num_examples: int) -> float:
    """Poisson rate q = B/N giving the requested *expected* batch size."""
    check_count(batch_size, "batch_size", minimum=1)
    check_count(num_examples, "num_examples", minimum=1)
    return check_sample_rate(min(1.0, batch_size / num_examples), "batch_size / num_examples")


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


class PrivateTrainer:
    """Runs private (or, at ε = ∞, ordinary) optimisation steps of `model` on `examples`.

    Each step samples a Poisson batch (rate `sample_rate`, possibly empty), splits it into physical
    micro-batches of at most `physical_batch_size` (the clipped sums accumulate in `.grad`), adds
    σ·C·N(0, I), divides by the expected batch size, steps Adam and records the step in `accountant`.

    Batches and noise come from OS entropy (`privacy.secure_mode`: from a CSPRNG). `sampling_seed` and
    `noise_seed` fix them and so BREAK PRIVACY: tests and debugging only.

    `head_lr`: the learning rate of a classifier head (`parameter_groups`); None: `lr`.

    `precision` (see `dpmemarc_core.precision`): the model is set up for it here (fp32 master copies of the
    trainable weights, autocast around each forward); fp16 adds a `LossScaler`, whose docstring says what
    happens on a step with inf/NaN.
    """

    def __init__(self, model: torch.nn.Module, examples: Sequence[dict], collate: Collate,
                 privacy: PrivacySettings, sample_rate: float, noise_multiplier: float, lr: float = 5e-4,
                 accountant: PrivacyAccountant | None = None, physical_batch_size: int | None = None,
                 device: torch.device | str | None = None, *, sampling_seed: int | None = None,
                 noise_seed: int | None = None, precision: str = "fp32", head_lr: float | None = None) -> None:
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        prepare_model(model, precision, self.device)
        self.scaler = LossScaler() if precision == "fp16" else None
        self.model = model
        self.examples = examples
        self.collate = collate
        self.privacy = privacy
        self.sample_rate = check_sample_rate(sample_rate)
        self.noise_multiplier = float(noise_multiplier)
        self.accountant = accountant if accountant is not None else PrivacyAccountant(privacy.accountant)
        self.physical_batch_size = physical_batch_size
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(parameter_groups(model, lr, head_lr), lr=lr)
        self.sampling, self.noise = private_randomness(privacy, self.device, sampling_seed, noise_seed)
        self.engine = None
        if privacy.is_private:
            self.engine = BKEngine(model, max_grad_norm=privacy.max_grad_norm, clipping_mode=privacy.clipping_mode,
                                   clip_fn=privacy.clip_fn,
                                   backward_passes=getattr(model, "recommended_backward_passes", 1))

    @property
    def expected_batch_size(self) -> float:
        return self.sample_rate * len(self.examples)

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
                stats.clipped = stats.clipped + (norms > self.privacy.max_grad_norm).sum()
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

    def run(self, steps: int, progress: bool = True, on_step: Callable[[int], None] | None = None,
            description: str = "train") -> dict:
        """Run `steps` steps; returns loss/examples/clipping statistics. Batches differ from call to call."""
        return run_steps(self, steps, progress, on_step, description)


def parameter_groups(model: torch.nn.Module, lr: float, head_lr: float | None = None) -> list[dict]:
    """Adam's parameter groups: the trainable parameters of a classifier head (a module named as in
    `methods.placement.CLASSIFIER_HEADS` anywhere in the model: HF's, peft's copy, the side network's) at
    `head_lr`, the rest at `lr`. A head that starts from scratch on features that already solve much of the
    task learns best at a larger rate than the backbone's small trainable part can take under DP noise
    (BENCHMARKS.md, "Private recipe"); choosing rates per group is post-processing and costs no privacy."""
    from dpmemarc_core.methods.placement import CLASSIFIER_HEADS

    head, rest = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (head if head_lr is not None and set(name.split(".")) & set(CLASSIFIER_HEADS) else rest).append(param)
    return [group for group in ({"params": rest, "lr": lr}, {"params": head, "lr": head_lr}) if group["params"]]


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
    # Micro-batch size; "auto": the largest the memory simulator fits in `memory` (or, on CUDA without it, in
    # the GPU's free memory). It never changes the expected batch, the noise or the accounting.
    physical_batch_size: int | str | None = None
    memory: str | None = None  # budget of physical_batch_size "auto", e.g. "8GiB"
    precision: str | None = None  # bf16 | fp16 | amp-bf16 | fp32; None: bf16 on a CUDA GPU that has it, else fp32
    lr: float | None = None  # None: 5e-4 (the paper's DP-Adam) for BK methods, DPZero's 1e-5 for zo
    head_lr: float | None = None  # a classifier head's learning rate (BK methods); None: lr
    max_grad_norm: float = 1.0
    clipping_mode: str = "mixed"
    clip_fn: str = "abadi"
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


def make_trainer(method: str, model: torch.nn.Module, examples: Sequence[dict], collate: Collate,
                 privacy: PrivacySettings, sample_rate: float, noise_multiplier: float, lr: float | None = None,
                 **kwargs) -> PrivateTrainer:
    """The trainer for a method: DPZero's forward-only `ZOTrainer` for "zo", BK `PrivateTrainer` otherwise."""
    if method == "zo":
        from dpmemarc_core.zo import DEFAULT_LR, ZOTrainer

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


def planned_steps(cfg: TrainConfig, num_examples: int) -> int:
    if cfg.max_steps is not None:
        return check_count(cfg.max_steps, "max_steps", minimum=1)
    epochs = 1.0 if cfg.epochs is None else cfg.epochs
    if not (isinstance(epochs, (int, float)) and 0 < epochs < math.inf):
        raise ValueError(f"epochs must be a finite number > 0, got {epochs!r}")
    return max(1, round(epochs * num_examples / cfg.batch_size))


def evaluate(model: torch.nn.Module, task, tokenizer, batch_size: int) -> dict:
    from dpmemarc_core.metrics import evaluate_classification, evaluate_generation

    if task.kind == "classification":
        return evaluate_classification(model, task, batch_size=batch_size)
    return evaluate_generation(model, tokenizer, task)


def check_physical_batch_size(value: object, name: str = "physical_batch_size") -> None:
    """None (the whole batch at once), an integer >= 1, or "auto"."""
    if value is None or value == "auto":
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1 or 'auto', got {value!r}")


def choose_physical_batch_size(cfg: TrainConfig, config, kind: str, device: torch.device) -> int:
    """`physical_batch_size = "auto"`: the largest micro-batch whose simulated step (this run's model config,
    method, precision, expected batch and max length) fits the budget (`memory_plan.memory_budget`)."""
    from dpmemarc_core.data import num_labels_of
    from dpmemarc_core.memory import MemorySpec
    from dpmemarc_core.memory_plan import auto_physical_batch_size, config_file, format_bytes, memory_budget

    budget = memory_budget(cfg.memory, device)
    spec = MemorySpec(model=config_file(config), method=cfg.method, batch_size=cfg.batch_size, seq_len=cfg.max_length,
                      precision=cfg.precision, device="meta", epsilon=cfg.epsilon, clipping_mode=cfg.clipping_mode,
                      method_options=dict(cfg.method_options),
                      zo_params=cfg.zo_params if cfg.method == "zo" else "full", task_kind=kind, num_labels=max(num_labels_of(cfg.task), 2))
    option = auto_physical_batch_size(spec, budget)
    print(f"dpmemarc: physical batch size auto: {option.physical_batch_size} ({option.steps_per_batch} micro-batch(es) "
          f"per expected batch of {cfg.batch_size}); simulated peak {format_bytes(option.peak_bytes)} in a budget of "
          f"{format_bytes(budget)} ({'--memory' if cfg.memory else 'free CUDA memory'}); the expected batch, "
          "the noise and the accounting are unchanged", flush=True)
    return option.physical_batch_size


def train(cfg: TrainConfig) -> dict:
    """One private fine-tuning run: evaluate, train, evaluate, write summary.json, the trainable state and the
    export folder ``final/`` (see `dpmemarc_core.methods.save_pretrained`)."""
    from dpmemarc_core.data import load_task, num_labels_of, task_kind_of
    from dpmemarc_core.export import FINAL_DIR, single_site_privacy
    from dpmemarc_core.methods import METHODS, ModelSpec, apply, save_pretrained, trainable_state_dict
    from dpmemarc_core.models import load_backbone

    if cfg.method not in (*METHODS, "zo"):
        raise ValueError(f"unknown method {cfg.method!r}; accepted: {', '.join((*METHODS, 'zo'))}")
    if cfg.method == "zo" and cfg.zo_params not in ZO_PARAM_METHODS:
        raise ValueError(f"zo_params must be one of {ZO_PARAM_METHODS}, got {cfg.zo_params!r}")
    privacy = PrivacySettings(target_epsilon=cfg.epsilon, delta=cfg.delta, max_grad_norm=cfg.max_grad_norm,
                              clipping_mode=cfg.clipping_mode, clip_fn=cfg.clip_fn, accountant=cfg.accountant,
                              secure_mode=cfg.secure_mode)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    # summary.json records the precision and micro-batch that ran, not "default" or "auto".
    cfg = replace(cfg, precision=resolve_precision(cfg.precision, device))
    check_physical_batch_size(cfg.physical_batch_size)
    kind = task_kind_of(cfg.task)
    backbone, tokenizer = load_backbone(cfg.model, kind, num_labels=max(num_labels_of(cfg.task), 2),
                                        dtype=frozen_dtype(cfg.precision))
    task = load_task(cfg.task, tokenizer, max_length=cfg.max_length, max_train=cfg.max_train,
                     max_eval=cfg.max_eval, seed=cfg.seed, validation=cfg.validation)
    # DPZero (zo) trains, forward-only, another method's trainable part: the export is that method's.
    spec = ModelSpec(base_model=cfg.model, task_kind=kind, method=cfg.zo_params if cfg.method == "zo" else cfg.method,
                     num_labels=num_labels_of(cfg.task), method_options=cfg.method_options,
                     pad_token_id=backbone.config.pad_token_id)
    if cfg.physical_batch_size == "auto":
        cfg = replace(cfg, physical_batch_size=choose_physical_batch_size(cfg, backbone.config, kind, device))
    model = apply(backbone, spec.method, **cfg.method_options).to(device)
    prepare_model(model, cfg.precision, device, master_copies=cfg.method != "zo")
    n = len(task.train)
    delta = privacy.resolved_delta(n)
    q = sample_rate_for(cfg.batch_size, n)
    steps = planned_steps(cfg, n)
    sigma = noise_multiplier_for(target_epsilon=privacy.target_epsilon, delta=delta, sample_rate=q, steps=steps,
                                 accountant=privacy.accountant)
    print(f"dpmemarc: {cfg.method} on {cfg.model} / {cfg.task}: {n} training examples, {steps} steps at expected "
          f"batch {cfg.batch_size} (q={q:.4g}), epsilon={privacy.target_epsilon} delta={delta:.3g} -> noise "
          f"multiplier {sigma:.4g}; precision {cfg.precision}", flush=True)
    eval_batch = cfg.physical_batch_size or max(cfg.batch_size, 32)
    with autocast_context(cfg.precision, device.type):
        before = evaluate(model, task, tokenizer, eval_batch)
    print(f"before training: {json.dumps(before)}", flush=True)
    head = {} if cfg.method == "zo" else {"head_lr": cfg.head_lr}  # DPZero steps all coordinates alike
    trainer = make_trainer(cfg.method, model, task.train, task.collate, privacy, q, sigma, lr=cfg.lr, **head,
                           physical_batch_size=cfg.physical_batch_size, device=device,
                           sampling_seed=cfg.sampling_seed, noise_seed=cfg.noise_seed, precision=cfg.precision)
    start = time.perf_counter()
    train_stats = trainer.run(steps, progress=cfg.progress)
    seconds = time.perf_counter() - start
    with autocast_context(cfg.precision, device.type):
        after = evaluate(model, task, tokenizer, eval_batch)
    print(f"after training:  {json.dumps(after)}", flush=True)
    spent = trainer.accountant.get_epsilon(delta) if privacy.is_private else math.inf
    summary = {
        "model": cfg.model, "task": cfg.task, "method": cfg.method,
        "epsilon": spent, "target_epsilon": privacy.target_epsilon, "delta": delta,
        "noise_multiplier": sigma, "sample_rate": q, "steps": steps, "train_examples": n,
        "eval_examples": len(task.eval),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "metrics_before": before, "metrics": after,
        # Statistics of the private training examples, released without noise: they stay with the data owner
        # and are outside the (epsilon, delta) above. Nothing else in this file is computed from those examples.
        "non_private_diagnostics": {**train_stats, "train_seconds": seconds},
        "config": asdict(cfg),
        "export": spec.to_dict(),
    }
    if cfg.output:
        out = Path(cfg.output)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in trainable_state_dict(model).items()},
                  str(out / "trainable.safetensors"))
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        save_pretrained(model, spec, out / FINAL_DIR, single_site_privacy(summary), tokenizer)
        print(f"wrote {out / 'summary.json'}, {out / 'trainable.safetensors'} and {out / FINAL_DIR}/", flush=True)
    return summary
