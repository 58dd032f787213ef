"""Peak memory of one DP training step of an exact published model config, with or without a GPU.

`step_memory(MemorySpec(...))` builds the model (random weights) with the fine-tuning method, runs
two full training steps (the second is the steady state: Adam's moments exist from the first) and
returns the peak live bytes with a breakdown by role.

Precision: the model is built in `precision.frozen_dtype` and the trainers set it up themselves
(`precision.prepare_model`: fp32 master copies of the trainable weights, autocast around each forward),
so the step measured here is `dpmemarc train`'s and the Flower client's, in the same set-up: bf16/fp16
frozen weights in that dtype; amp-bf16 every weight fp32, autocast bf16; fp32 no autocast.

- device "meta": nothing is allocated. The model lives on the meta device and `StorageTracker`
  counts live storage bytes (see tracker.py); CUDA autocast and the fused attention kernel
  are emulated (emulation.py). Figures read 5–15 % low (`SIMULATION_NOTE`).
- device "cuda": real tensors under `torch.autocast`; the peak is `torch.cuda.max_memory_allocated`,
  the breakdown comes from the same tracker.
- device "cpu": real tensors, counted by the tracker; what the tests hold the simulation against.

The breakdown (bytes live at the peak, summing to the tracked peak): frozen weights and buffers,
trainable parameters, their gradients, optimizer state and its temporaries, activations (autograd's
saved tensors included; vocabulary-wide tensors such as B·T·V logits separately as `logits`), and
DP engine buffers (what the engine's code allocated, or kept alive until it released it).

Engines: "bk" (our PrivateTrainer step: BK clipping, noise, Adam), "nondp" (the same loop without
clipping or noise) and "opacus" (GradSampleModule hooks + DPOptimizer, as an Opacus user would).

Method "zo" is DPZero (`zo.ZOTrainer`): two perturbed forwards without autograd, clipped per-example
scalars, noise ("bk": the private step; "nondp": MeZO, no clipping or noise), an in-place SGD update
along z. It perturbs the trainable part of `zo_params` (full, lora, bitfit), and under bf16/fp16 those
weights stay in that dtype: with no optimizer there is no fp32 master copy to keep (MeZO's and
DPZero's half-precision recipe perturbs the loaded model in place). `inference_memory` is the forward
it is compared with.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from transformers import PretrainedConfig

import dpmemarc_core.privacy as privacy_package
from dpmemarc_core.memory.tracker import ROLES, StorageTracker
from dpmemarc_core.methods.families import ENCODER_MODEL_TYPES
from dpmemarc_core.models import TASK_KINDS, build_from_config, published_config
from dpmemarc_core.privacy import PrivacySettings
from dpmemarc_core.privacy.engine import BACKWARD_PASSES
from dpmemarc_core.privacy.settings import check_count, check_epsilon
from dpmemarc_core.training.bk import PrivateTrainer
from dpmemarc_core.training.config import ZO_PARAM_METHODS
from dpmemarc_core.training.loop import StepStats
from dpmemarc_core.training.precision import (
    PRECISIONS,
    autocast_context,
    frozen_dtype,
    prepare_model,
)

ENGINES = ("bk", "opacus", "nondp")
DEVICES = ("meta", "cuda", "cpu")
SIMULATION_NOTE = ("meta-device figures are simulated and read 5-15 % low: the CUDA caching allocator "
                   "(block rounding, fragmentation) and library workspaces are not modelled")
STEPS = 2  # the first creates the optimizer state, the second is the steady state a long run sees
NOISE_MULTIPLIER = 1.0  # its value moves no byte; only whether noise is drawn (finite ε) matters
MAX_GRAD_NORM = 1.0
LR = 5e-4
GIB = 1024 ** 3


@dataclass(frozen=True)
class MemorySpec:
    """One memory measurement. `model`: a name from models.PUBLISHED_CONFIGS or a path to a config.json."""

    model: str
    method: str
    batch_size: int = 32
    seq_len: int = 128
    precision: str = "bf16"
    device: str | None = None  # None: cuda when available, else meta
    engine: str = "bk"
    epsilon: float = 8.0
    clipping_mode: str = "mixed"
    backward_passes: int | str | None = None  # BK's 1, 2 or "auto"; None: the method's choice
    # (model.recommended_backward_passes)
    method_options: dict = field(default_factory=dict)
    attn_implementation: str | None = None  # None: the model's default (sdpa)
    seed: int = 0
    zo_params: str = "full"  # method "zo" perturbs the trainable part of this method: full, lora or bitfit
    task_kind: str | None = None  # None: classification (2 labels) for encoder families, generation otherwise
    num_labels: int = 2  # classification only

    def __post_init__(self) -> None:
        for name in ("batch_size", "seq_len"):
            check_count(getattr(self, name), name, minimum=1)
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.task_kind is not None and self.task_kind not in TASK_KINDS:
            raise ValueError(f"task_kind must be one of {', '.join(TASK_KINDS)} or None, got {self.task_kind!r}")
        check_count(self.num_labels, "num_labels", minimum=2)
        if self.device is not None and self.device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        check_epsilon(self.epsilon, "epsilon", allow_inf=True)  # inf: no noise
        if self.backward_passes is not None:  # None: the method's choice
            if isinstance(self.backward_passes, bool) or self.backward_passes not in BACKWARD_PASSES:
                raise ValueError(f"backward_passes must be one of 1, 2, 'auto' (or None: the method's choice), "
                                 f"got {self.backward_passes!r}")
            if self.engine != "bk":
                raise ValueError(f"backward_passes is a setting of engine 'bk', not of {self.engine!r}")
        if self.method == "zo":
            if self.zo_params not in ZO_PARAM_METHODS:
                raise ValueError(f"zo_params must be one of {', '.join(ZO_PARAM_METHODS)}, got {self.zo_params!r}")
            if self.engine == "opacus":
                raise ValueError("engine 'opacus' cannot run method 'zo': DPZero has no backward pass for Opacus's "
                                 "hooks; use engine 'bk' (DPZero's clipped, noised step) or 'nondp' (MeZO)")
            if self.backward_passes is not None:
                raise ValueError("backward_passes must be None for method 'zo': it runs no backward pass")
        elif self.zo_params != "full":
            raise ValueError(f"zo_params is a setting of method 'zo', not of {self.method!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device is 'cuda' but no CUDA GPU is available; use device 'meta' to simulate")

    @property
    def resolved_device(self) -> str:
        return self.device or ("cuda" if torch.cuda.is_available() else "meta")


def task_kind_of(config: PretrainedConfig) -> str:
    return "classification" if config.model_type in ENCODER_MODEL_TYPES else "generation"


def step_memory(spec: MemorySpec) -> dict:
    """Peak bytes of a training step of `spec`, with the breakdown by role (bytes live at the peak)."""
    config, kind, device, model, trainable, (engine_dirs, step, optimizer) = _prepared(spec)
    zo = spec.method == "zo"
    tracker = StorageTracker(device.type, engine_dirs, vocab_size=config.vocab_size if kind == "generation" else None)
    tracker.register([p for p in model.parameters() if not p.requires_grad] + list(model.buffers()), "weights")
    tracker.register(trainable, "trainable_params")
    _watch_phases(model, optimizer, tracker, trainable)

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with tracker, _kernels(device):
        for _ in range(STEPS):
            step()
    report = tracker.report()
    peak = report.peak_bytes
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()

    breakdown = {f"{role}_bytes": report.by_role[role] for role in ROLES}
    return {
        "model": spec.model, "method": spec.method, "engine": spec.engine, "batch_size": spec.batch_size,
        "seq_len": spec.seq_len, "precision": spec.precision, "device": device.type,
        "simulated": device.type == "meta", "epsilon": spec.epsilon if math.isfinite(spec.epsilon) else "inf",
        "clipping_mode": spec.clipping_mode,
        "backward_passes": 0 if zo else getattr(model, "recommended_backward_passes", 1),
        "method_options": spec.method_options, "task_kind": kind, **({"zo_params": spec.zo_params} if zo else {}),
        "peak_bytes": peak, "peak_gib": peak / GIB, "tracked_peak_bytes": report.peak_bytes,
        "peak_phase": report.phase, "peak_by_phase": report.peak_by_phase, "breakdown": breakdown,
        "trainable_parameters": sum(p.numel() for p in trainable),
        "total_parameters": sum(p.numel() for p in model.parameters()),
        "note": SIMULATION_NOTE if device.type == "meta" else None,
    }


def step_seconds(spec: MemorySpec, steps: int = 5, warmup: int = 2) -> float:
    """Mean wall-clock seconds of the step `step_memory` measures, on a real device, after `warmup` steps."""
    if spec.resolved_device == "meta":
        raise ValueError("step_seconds needs a real device (cuda or cpu), not meta")
    _, _, device, _, _, (_, step, _) = _prepared(spec)
    with _kernels(device):
        for _ in range(warmup):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def _prepared(spec: MemorySpec):
    """(config, task kind, device, model with the method applied, its trainable parameters, `_stepper`'s triple)."""
    from dpmemarc_core.methods import apply

    config, kind, device, model = _backbone(spec)
    with device:
        model = apply(model, spec.zo_params if spec.method == "zo" else spec.method, **spec.method_options)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(f"method {spec.method!r} left no trainable parameter in {spec.model}")
    # The trainers set the model up for spec.precision (precision.prepare_model), as in `dpmemarc train`.
    return config, kind, device, model, trainable, _stepper(model, spec, _random_batch(config, kind, spec))


def inference_memory(spec: MemorySpec) -> dict:
    """Peak bytes of one forward of `spec`'s backbone without autograd (no method applied; the batch, the
    precision and the device of `spec`): what serving the model takes, the floor a training step is held to."""
    config, kind, device, model = _backbone(spec)
    model.eval()
    inputs = {k: v.to(device) for k, v in _random_batch(config, kind, spec).items() if k != "labels"}
    tracker = StorageTracker(device.type, vocab_size=config.vocab_size if kind == "generation" else None)
    tracker.register(list(model.parameters()) + list(model.buffers()), "weights")
    tracker.phase = "forward"
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad(), tracker, _kernels(device), autocast_context(spec.precision, device.type):
        model(**inputs)
    report = tracker.report()
    peak = report.peak_bytes
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    return {
        "model": spec.model, "method": "inference", "batch_size": spec.batch_size, "seq_len": spec.seq_len,
        "precision": spec.precision, "device": device.type, "simulated": device.type == "meta", "task_kind": kind,
        "peak_bytes": peak, "peak_gib": peak / GIB, "tracked_peak_bytes": report.peak_bytes,
        "peak_phase": report.phase, "breakdown": {f"{role}_bytes": report.by_role[role] for role in ROLES},
        "trainable_parameters": 0, "total_parameters": sum(p.numel() for p in model.parameters()),
        "note": SIMULATION_NOTE if device.type == "meta" else None,
    }


def _backbone(spec: MemorySpec) -> tuple[PretrainedConfig, str, torch.device, torch.nn.Module]:
    """The config, task kind, device and randomly initialised backbone of `spec` (weights in the precision's dtype)."""
    config = published_config(spec.model)
    if spec.attn_implementation is not None:
        config._attn_implementation = spec.attn_implementation
    kind = spec.task_kind or task_kind_of(config)
    device = torch.device(spec.resolved_device)
    torch.manual_seed(spec.seed)
    model = build_from_config(config, kind, num_labels=spec.num_labels, device=device,
                              dtype=frozen_dtype(spec.precision))
    return config, kind, device, model


def _random_batch(config: PretrainedConfig, kind: str, spec: MemorySpec) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(spec.seed)
    ids = torch.randint(0, config.vocab_size, (spec.batch_size, spec.seq_len), generator=g)
    labels = torch.zeros(spec.batch_size, dtype=torch.long) if kind == "classification" else ids.clone()
    # No attention mask: the rows are unpadded, and HF drops an all-ones mask on a GPU anyway.
    return {"input_ids": ids, "labels": labels}


def _stepper(model: torch.nn.Module, spec: MemorySpec, batch: dict[str, torch.Tensor]):
    """(engine source dirs or files, a no-argument step, the torch optimizer whose step hooks tell the phase;
    None for zo, which has none)."""
    if spec.engine == "opacus":
        from dpmemarc_core.memory.opacus_step import OpacusStep, opacus_dir

        if "position_ids" not in batch and batch["labels"].dim() == 2:  # a causal LM's batch
            # HF builds position ids with batch size 1; Opacus needs one row per example.
            batch = {**batch, "position_ids": torch.arange(spec.seq_len).expand(spec.batch_size, -1)}
        device = next(model.parameters()).device
        on_device = {k: v.to(device) for k, v in batch.items()}
        sigma = NOISE_MULTIPLIER if math.isfinite(spec.epsilon) else 0.0
        prepare_model(model, spec.precision, device)  # Opacus steps its own way, in our precision set-up
        opacus_step = OpacusStep(model, sigma, MAX_GRAD_NORM, spec.batch_size, LR)
        return [opacus_dir()], lambda: opacus_step(on_device), opacus_step.inner_optimizer

    if spec.method == "zo":
        import dpmemarc_core.training.zo as zo_module
        import dpmemarc_core.training.zo_directions as directions_module

        sigma = NOISE_MULTIPLIER if spec.engine != "nondp" and math.isfinite(spec.epsilon) else 0.0
        privacy = PrivacySettings(target_epsilon=spec.epsilon if spec.engine != "nondp" else math.inf, delta=1e-5,
                                  max_grad_norm=MAX_GRAD_NORM)
        examples = [{k: v[i] for k, v in batch.items()} for i in range(spec.batch_size)]
        trainer = zo_module.ZOTrainer(model, examples, _stack, privacy, sample_rate=1.0, noise_multiplier=sigma,
                                      seed=spec.seed, device=next(model.parameters()).device,
                                      precision=spec.precision)
        indices = list(range(spec.batch_size))
        stats = StepStats()
        # Only z's code is the engine: training/zo.py releases the logits of each forward, which the tracker's rule
        # "released last by the engine" would misname as engine buffers.
        return [directions_module.__file__], lambda: trainer.step(indices, stats), None

    if spec.backward_passes is not None:
        model.recommended_backward_passes = spec.backward_passes  # what PrivateTrainer hands to BKEngine
    epsilon = math.inf if spec.engine == "nondp" else spec.epsilon
    privacy = PrivacySettings(target_epsilon=epsilon, delta=1e-5, max_grad_norm=MAX_GRAD_NORM,
                              clipping_mode=spec.clipping_mode)
    examples = [{k: v[i] for k, v in batch.items()} for i in range(spec.batch_size)]
    sigma = NOISE_MULTIPLIER if math.isfinite(epsilon) else 0.0
    trainer = PrivateTrainer(model, examples, _stack, privacy, sample_rate=1.0, noise_multiplier=sigma, lr=LR,
                             device=next(model.parameters()).device, precision=spec.precision)
    indices = list(range(spec.batch_size))
    stats = StepStats()
    return [os.path.dirname(privacy_package.__file__)], lambda: trainer.step(indices, stats), trainer.optimizer


def _stack(examples: list[dict]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([e[k] for e in examples]) for k in examples[0]}


def _watch_phases(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, tracker: StorageTracker,
                  trainable: list[torch.Tensor]) -> None:
    """Name the phase for the peak report, and the gradients and optimizer state once they exist.

    Without an optimizer (zo) there are two phases: a forward, and what runs between forwards (the
    per-example loss, the perturbation of θ, clipping, noise and the update)."""
    model.register_forward_pre_hook(lambda *_: setattr(tracker, "phase", "forward"))
    if optimizer is None:
        model.register_forward_hook(lambda *_: setattr(tracker, "phase", "loss+perturb/update"))
        return

    def before_step(*_):
        tracker.mark([p.grad for p in trainable if p.grad is not None], "grads")
        tracker.phase = "optimizer"

    def after_step(*_):
        tracker.mark([t for state in optimizer.state.values() for t in state.values()
                      if isinstance(t, torch.Tensor)], "optimizer_state")
        tracker.phase = "before forward"

    model.register_forward_hook(lambda *_: setattr(tracker, "phase", "loss+backward"))
    optimizer.register_step_pre_hook(before_step)
    optimizer.register_step_post_hook(after_step)


@contextmanager
def _kernels(device: torch.device) -> Iterator[None]:
    """On meta, the emulation of what a CUDA GPU runs: autocast (behind `torch.autocast("meta", ...)`, which
    the trainers' precision set-up enters around each forward) and the fused attention kernel."""
    if device.type != "meta":
        yield
        return
    from dpmemarc_core.memory.emulation import (
        FusedAttention,
        meta_autocast_queries,
        meta_values_unknown,
    )

    with meta_values_unknown(), meta_autocast_queries(), FusedAttention():
        yield


def format_report(result: dict) -> str:
    """Human-readable lines: the peak, then the breakdown (GiB, or MiB for peaks under 1 GiB)."""
    unit, scale = ("GiB", GIB) if result["peak_bytes"] >= GIB else ("MiB", 1024 ** 2)
    size = {k.removesuffix("_bytes"): v / scale for k, v in result["breakdown"].items()}
    how = "simulated on meta" if result["simulated"] else f"measured on {result['device']}"
    lines = [
        (f"{result['model']} / {result['method']} / engine {result['engine']}: B={result['batch_size']} "
         f"T={result['seq_len']} {result['precision']}, {how}"),
        f"  peak {result['peak_bytes'] / scale:.3f} {unit} (during {result['peak_phase']})",
        f"  weights (frozen)          {size['weights']:.3f} {unit}",
        f"  trainable params          {size['trainable_params']:.3f} {unit}",
        f"  grads                     {size['grads']:.3f} {unit}",
        (f"  optimizer state           {size['optimizer_state']:.3f} {unit} "
         f"(+ {size['optimizer_temporaries']:.3f} temporaries)"),
        (f"  activations (+ saved)     {size['activations'] + size['logits']:.3f} {unit} "
         f"(of which vocabulary-wide logits {size['logits']:.3f})"),
        f"  DP engine buffers         {size['engine_buffers']:.3f} {unit}",
    ]
    if result["note"]:
        lines.append(f"note: {result['note']}")
    return "\n".join(lines)
