"""Federated private fine-tuning, transport-free: the run settings, what each process builds for a run,
and one site's round of local DP training against a budget that lasts the whole run.

The Flower apps (client/, server/) translate messages into these calls and back; nothing here imports
Flower, so every step can be driven and tested directly.

Privacy model: each site is its own DP unit. Its noise multiplier is fixed before the first round from
the planned total number of local steps (rounds × local steps) at its own sampling rate, and its
accountant (kept on the site's own disk, `site_budget`) composes every step it ever takes. A round that
would push the site past its (target ε, δ) is refused, not trained. The reply says only
`REPLY_METRIC_KEYS` about the round.
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import nn

from dpmemarc_core.data import TASKS, Task, num_labels_of, task_kind_of
from dpmemarc_core.memory_plan import parse_memory_size
from dpmemarc_core.precision import AUTO, autocast_context, frozen_dtype, prepare_model, resolve_precision
from dpmemarc_core.privacy import PrivacyAccountant, PrivacySettings, noise_multiplier_for
from dpmemarc_core.privacy.settings import check_count
from dpmemarc_core.train import ZO_PARAM_METHODS, evaluate, make_trainer, resolve_device, sample_rate_for

PARTITIONINGS = ("iid", "dirichlet")
STRATEGIES = ("fedavg", "fedprox", "fedadam")  # Flower's own strategies, chosen by the run config
# `task` values whose data is only the sites' own files (node config data-path), no public data set.
SITE_DATA_TASKS = ("classification", "generation")
# σ is searched so that the planned steps spend at most target ε; this slack only absorbs float noise in
# recomputing that ε piecewise (round by round) instead of in one go.
BUDGET_SLACK = 1e-9


@dataclass(frozen=True)
class FederatedConfig:
    """The run config of a federated run (`[tool.flwr.app.config]`, keys with dashes).

    Defaults equal pyproject.toml's (a test keeps them in step). Zero means "unset" where TOML has no
    null: ``delta = 0`` is 1/(10N) of each site (N its number of examples), ``physical-batch-size = 0`` is the whole
    batch at once (``"auto"``: the largest micro-batch the memory simulator fits in ``memory``, or on CUDA in the
    GPU's free memory; each site fits its own GPU with the same privacy), ``memory = ""`` gives no budget,
    ``precision = "auto"`` is bf16 on a CUDA GPU that supports it and fp32 elsewhere,
    ``max-train = 0`` / ``max-eval = 0`` keep every example, ``head-lr = 0`` trains a classifier head at ``lr``, ``client-dp-target-epsilon = 0`` sets no
    client-level budget, ``labels = ""`` takes the task's label indices, ``eval-path = ""`` names no
    evaluation file.
    """

    num_server_rounds: int = 3
    model: str = "minilm"
    task: str = "movie-sentiment"
    labels: str = ""
    text_column: str = "text"
    label_column: str = "label"
    prompt_column: str = "prompt"
    completion_column: str = "completion"
    eval_path: str = ""
    method: str = "lora"
    method_options: str = '{"r": 1}'
    zo_params: str = "lora"
    target_epsilon: float = 8.0
    delta: float = 0.0
    local_steps: int = 16
    batch_size: int = 64
    physical_batch_size: int | str = 0
    memory: str = ""
    precision: str = "auto"
    lr: float = 0.005
    head_lr: float = 0.02
    max_grad_norm: float = 1.0
    clipping_mode: str = "mixed"
    clip_fn: str = "abadi"
    accountant: str = "rdp"
    secure_mode: bool = False
    partitioning: str = "iid"
    dirichlet_alpha: float = 0.3
    max_length: int = 48
    max_train: int = 0
    max_eval: int = 0
    seed: int = 0
    device: str = "auto"
    output_dir: str = "runs/federated"
    max_update_norm: float = 100.0
    min_valid_replies: int = 2
    fraction_train: float = 1.0
    min_train_nodes: int = 2
    strategy: str = "fedavg"
    proximal_mu: float = 0.01
    server_lr: float = 0.01
    federated_eval: bool = False
    site_eval_fraction: float = 0.1
    site_eval_noise_multiplier: float = 10.0
    client_dp: bool = False
    client_dp_noise_multiplier: float = 1.0
    client_dp_clipping_norm: float = 1.0
    client_dp_target_epsilon: float = 0.0
    client_dp_delta: float = 1e-5
    round_timeout: float = 3600.0

    def __post_init__(self) -> None:
        for name in ("num_server_rounds", "local_steps", "batch_size", "max_length", "min_valid_replies",
                     "min_train_nodes"):
            check_count(getattr(self, name), _key(name), minimum=1)
        for name in ("max_train", "max_eval", "seed"):
            check_count(getattr(self, name), _key(name), minimum=0)
        if self.physical_batch_size != "auto":
            if isinstance(self.physical_batch_size, str):
                raise ValueError(f"physical-batch-size must be an integer >= 0 or \"auto\", "
                                 f"got {self.physical_batch_size!r}")
            check_count(self.physical_batch_size, "physical-batch-size", minimum=0)
        if self.memory:
            parse_memory_size(self.memory, "memory")
        if self.precision != AUTO:
            resolve_precision(self.precision, "cpu")
        for name in ("lr", "max_update_norm", "dirichlet_alpha", "client_dp_clipping_norm", "round_timeout",
                     "server_lr", "site_eval_noise_multiplier"):
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(f"{_key(name)} must satisfy 0 < value < inf, got {getattr(self, name)!r}")
        if not 0 <= self.head_lr < math.inf:
            raise ValueError(f"head-lr must be 0 (= lr) or satisfy 0 < value < inf, got {self.head_lr!r}")
        if not 0 <= self.client_dp_noise_multiplier < math.inf:
            raise ValueError(f"client-dp-noise-multiplier must satisfy 0 <= value < inf, "
                             f"got {self.client_dp_noise_multiplier!r}")
        if self.delta != 0 and not 0 < self.delta < 1:
            raise ValueError(f"delta must be 0 (= 1/(10N) of each site) or satisfy 0 < value < 1, got {self.delta!r}")
        for name, low in (("fraction_train", 0.0), ("site_eval_fraction", 0.0)):
            if not low < getattr(self, name) <= 1 or (name == "site_eval_fraction" and self.site_eval_fraction == 1):
                raise ValueError(f"{_key(name)} must satisfy 0 < value {'<' if 'eval' in name else '<='} 1, "
                                 f"got {getattr(self, name)!r}")
        if self.min_train_nodes < self.min_valid_replies:
            raise ValueError(f"min-train-nodes must be >= min-valid-replies ({self.min_valid_replies}): a round "
                             f"sampling fewer sites can never aggregate, got {self.min_train_nodes}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if not 0 <= self.proximal_mu < math.inf:
            raise ValueError(f"proximal-mu must satisfy 0 <= value < inf, got {self.proximal_mu!r}")
        if self.strategy == "fedprox" and self.method == "zo":
            raise ValueError("strategy 'fedprox' adds a proximal term to the gradient; method 'zo' has none")
        if self.strategy == "fedadam" and self.client_dp:
            # Flower's DP wrapper noises what the inner strategy returns; FedAdam returns an Adam step whose
            # sensitivity is not the clipped mean's, so that noise would not be calibrated.
            raise ValueError("client-dp noises the mean of the clipped updates; with strategy 'fedadam' the server "
                             "releases an Adam step of it instead: use fedavg or fedprox with client-dp")
        if not 0 < self.client_dp_delta < 1:
            raise ValueError(f"client-dp-delta must satisfy 0 < value < 1, got {self.client_dp_delta!r}")
        if not 0 <= self.client_dp_target_epsilon < math.inf:
            raise ValueError(f"client-dp-target-epsilon must be 0 (no budget) or a finite number > 0, "
                             f"got {self.client_dp_target_epsilon!r}")
        self.label_names()
        if self.task not in (*TASKS, *SITE_DATA_TASKS):
            raise ValueError(f"task must be one of {', '.join((*TASKS, *SITE_DATA_TASKS))} (the last two: data only "
                             f"from the sites' files), got {self.task!r}")
        if self.task == "classification" and not self.labels:
            raise ValueError("task 'classification' needs labels (e.g. labels = \"negative,positive\"): every site "
                             "must build the same head")
        if self.task in TASKS and self.labels and len(self.label_names()) != max(num_labels_of(self.task), 0):
            raise ValueError(f"labels names {len(self.label_names())} classes, task {self.task!r} has "
                             f"{num_labels_of(self.task)}")
        if self.federated_eval and self.task_kind() != "classification":
            raise ValueError("federated-eval releases a noised count of correct predictions: classification only")
        if self.zo_params not in ZO_PARAM_METHODS:
            raise ValueError(f"zo-params must be one of {ZO_PARAM_METHODS}, got {self.zo_params!r}")
        if self.partitioning not in PARTITIONINGS:
            raise ValueError(f"partitioning must be one of {PARTITIONINGS}, got {self.partitioning!r}")
        if self.device != "auto":
            resolve_device(self.device)
        self.method_kwargs()
        self.privacy_settings()

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, object]) -> FederatedConfig:
        """Parse Flower's run config; unknown keys and values of the wrong type raise ValueError naming the key."""
        types = {f.name: f.type for f in fields(cls)}
        values = {}
        for key, value in run_config.items():
            name = key.replace("-", "_")
            if name not in types:
                raise ValueError(f"unknown run-config key '{key}'; accepted: {', '.join(map(_key, types))}")
            values[name] = _typed(key, value, types[name])
        return cls(**values)

    def method_kwargs(self) -> dict:
        """``method-options`` is a JSON object of the method's keyword arguments (e.g. ``{"r": 8}``)."""
        try:
            options = json.loads(self.method_options)
        except json.JSONDecodeError as error:
            raise ValueError(f"method-options must be a JSON object, got {self.method_options!r}: {error}") from None
        if not isinstance(options, dict):
            raise ValueError(f"method-options must be a JSON object, got {self.method_options!r}")
        return options

    def label_names(self) -> tuple[str, ...]:
        """``labels = "negative,positive"``: the class names in head order (empty: none given)."""
        from dpmemarc_core.site_data import parse_labels

        return parse_labels(self.labels)

    def task_kind(self) -> str:
        return self.task if self.task in SITE_DATA_TASKS else task_kind_of(self.task)

    def num_labels(self) -> int:
        """Classes of the head: the named labels, else the task's; 0 for generation."""
        if self.task_kind() != "classification":
            return 0
        return len(self.label_names()) or num_labels_of(self.task)

    def site_columns(self):
        from dpmemarc_core.site_data import Columns

        return Columns(text=self.text_column, label=self.label_column, prompt=self.prompt_column,
                       completion=self.completion_column)

    def privacy_settings(self) -> PrivacySettings:
        return PrivacySettings(target_epsilon=self.target_epsilon, delta=self.delta or None,
                               max_grad_norm=self.max_grad_norm, clipping_mode=self.clipping_mode,
                               clip_fn=self.clip_fn, accountant=self.accountant, secure_mode=self.secure_mode)

    @property
    def planned_local_steps(self) -> int:
        return self.num_server_rounds * self.local_steps

    def torch_device(self) -> torch.device:
        return resolve_device(None if self.device == "auto" else self.device)

    def eval_batch_size(self) -> int:
        """Evaluation runs without autograd: the configured micro-batch when one is set, else 64."""
        size = self.physical_batch_size
        return size if isinstance(size, int) and size > 0 else 64


def _key(name: str) -> str:
    return name.replace("_", "-")


def _typed(key: str, value: object, kind: str) -> object:
    # Dataclass field types are strings under `from __future__ import annotations`.
    if kind == "bool":
        ok = isinstance(value, bool)
    elif kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif kind == "int | str":
        ok = isinstance(value, (int, str)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, str)
    if not ok:
        raise ValueError(f"run-config '{key}' must be a {kind}, got {value!r}")
    return value


# ---- what each process builds ---------------------------------------------------------------------------


@dataclass
class RunModel:
    """The model of a run (backbone + method), the same in every process of the run, and the `ModelSpec`
    that rebuilds it from its export. No data: each process reads only its own (`federated_data`)."""

    model: nn.Module
    tokenizer: object
    device: torch.device
    spec: object  # dpmemarc_core.methods.ModelSpec
    precision: str  # resolved: bf16, fp16, amp-bf16 or fp32


def build_run_model(cfg: FederatedConfig) -> RunModel:
    """The backbone (its head fits the task) with the method applied, seeded by ``cfg.seed``.

    Every process (server, each site) builds this; the seed makes the randomly initialised parts that
    stay frozen (if any) identical everywhere, and the server's initial trainable state is what every
    site starts from.
    """
    from dpmemarc_core.methods import ModelSpec, apply
    from dpmemarc_core.models import load_backbone

    torch.manual_seed(cfg.seed)
    device = cfg.torch_device()
    precision = resolve_precision(cfg.precision, device)
    # generation has 0 labels and ignores the argument
    backbone, tokenizer = load_backbone(cfg.model, cfg.task_kind(), num_labels=max(cfg.num_labels(), 2),
                                        dtype=frozen_dtype(precision))
    # DPZero (zo) trains, forward-only, the trainable part of another method: the export is that method's.
    spec = ModelSpec(base_model=cfg.model, task_kind=cfg.task_kind(), num_labels=cfg.num_labels(),
                     labels=cfg.label_names(), method=cfg.zo_params if cfg.method == "zo" else cfg.method,
                     method_options=cfg.method_kwargs(), pad_token_id=backbone.config.pad_token_id)
    model = apply(backbone, spec.method, **spec.method_options).to(device)
    # The trainers of every round use this set-up (precision.prepare_model is idempotent).
    prepare_model(model, precision, device, master_copies=cfg.method != "zo")
    return RunModel(model=model, tokenizer=tokenizer, device=device, spec=spec, precision=precision)


# ---- one site's privacy and rounds ------------------------------------------------------------------------


@dataclass(frozen=True)
class SitePlan:
    """A site's DP parameters for the whole run, fixed before its first step."""

    num_examples: int
    delta: float
    sample_rate: float
    noise_multiplier: float
    planned_steps: int


def plan_site(cfg: FederatedConfig, num_examples: int) -> SitePlan:
    """σ such that rounds × local steps at rate q = batch/N spend at most the target ε at δ."""
    privacy = cfg.privacy_settings()
    delta = privacy.resolved_delta(num_examples)
    q = sample_rate_for(cfg.batch_size, num_examples)
    steps = cfg.planned_local_steps
    sigma = noise_multiplier_for(target_epsilon=privacy.target_epsilon, delta=delta, sample_rate=q, steps=steps,
                                 accountant=privacy.accountant)
    return SitePlan(num_examples=num_examples, delta=delta, sample_rate=q, noise_multiplier=sigma,
                    planned_steps=steps)


@dataclass(frozen=True)
class SiteRound:
    """What one site did in one round. ``trained`` is False when the round was refused for the budget.

    ``local_diagnostics`` (mean training loss, realised batch sizes, peak memory, seconds) are computed from
    the private examples without noise: the site may log them, they never go into its reply.
    """

    trained: bool
    epsilon: float
    epsilon_if_trained: float
    steps: int
    total_steps: int
    local_diagnostics: dict

    def refusal_reason(self, target_epsilon: float, delta: float) -> str:
        return (f"budget exhausted: {self.total_steps} steps spent epsilon={self.epsilon:.4g}; another round "
                f"would reach epsilon={self.epsilon_if_trained:.4g} > target {target_epsilon:g} at delta={delta:.3g}")


# What a site's reply may say about its round: the privacy it has spent and the public facts of its plan.
# Each value follows from the run config, the site's N (the usual public count) and its accountant, never
# from which examples were sampled or what they contain (docs/FEDERATED.md, "What leaves a site").
REPLY_METRIC_KEYS = ("num-examples", "epsilon", "delta", "noise-multiplier", "sample-rate", "planned-steps",
                     "local-steps", "total-steps")


def reply_metrics(outcome: SiteRound, plan: SitePlan) -> dict[str, int | float]:
    """The reply's metrics, exactly ``REPLY_METRIC_KEYS``."""
    return {"num-examples": plan.num_examples, "epsilon": outcome.epsilon, "delta": plan.delta,
            "noise-multiplier": plan.noise_multiplier, "sample-rate": plan.sample_rate,
            "planned-steps": plan.planned_steps, "local-steps": outcome.steps, "total-steps": outcome.total_steps}


def run_site_round(model: nn.Module, task: Task, cfg: FederatedConfig, plan: SitePlan,
                   accountant: PrivacyAccountant, device: torch.device,
                   max_epsilon: float = math.inf, proximal_mu: float = 0.0) -> SiteRound:
    """``cfg.local_steps`` DP steps on the site's examples, recorded in ``accountant``; or none at all if
    they would take the site past its budget (then ``trained`` is False and nothing changes). The budget is
    the run's target ε, or the site's own ``max_epsilon`` if that is lower. ``proximal_mu`` > 0 adds FedProx's
    proximal term μ·(w − w_round_start) to every (already noised) gradient."""
    privacy = cfg.privacy_settings()
    if privacy.is_private:
        budget = min(privacy.target_epsilon, max_epsilon)
        epsilon_next = accountant.epsilon_if(plan.noise_multiplier, plan.sample_rate, cfg.local_steps, plan.delta)
        if epsilon_next > budget * (1 + BUDGET_SLACK):
            return SiteRound(trained=False, epsilon=accountant.get_epsilon(plan.delta),
                             epsilon_if_trained=epsilon_next, steps=0, total_steps=accountant.steps,
                             local_diagnostics={})
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # Batches and noise come from the trainer's OS-entropy streams: the run config (and any seed in it) is
    # known to every party, so nothing derived from it may choose them.
    precision = getattr(model, "_dpmemarc_precision", None) or resolve_precision(cfg.precision, device)
    physical = site_physical_batch_size(cfg, model, precision, device)
    head = {} if cfg.method == "zo" or not cfg.head_lr else {"head_lr": cfg.head_lr}
    trainer = make_trainer(cfg.method, model, task.train, task.collate, privacy, plan.sample_rate,
                           plan.noise_multiplier, lr=cfg.lr, **head, accountant=accountant,
                           physical_batch_size=physical, device=device, precision=precision)
    if proximal_mu > 0:
        add_proximal_term(trainer, proximal_mu)
    start = time.perf_counter()
    try:
        stats = trainer.run(cfg.local_steps, progress=False)
    finally:
        if getattr(trainer, "engine", None) is not None:
            trainer.engine.detach()  # the model is reused next round; a new trainer hooks it again
    epsilon = accountant.get_epsilon(plan.delta) if privacy.is_private else math.inf
    diagnostics = {"train_loss": stats["train_loss"], "examples_seen": stats["examples"],
                   "physical_batch_size": physical, "precision": precision,
                   "peak_memory_bytes": peak_memory_bytes(device), "seconds": time.perf_counter() - start}
    return SiteRound(trained=True, epsilon=epsilon, epsilon_if_trained=epsilon, steps=stats["steps"],
                     total_steps=accountant.steps, local_diagnostics=diagnostics)


def site_physical_batch_size(cfg: FederatedConfig, model: nn.Module, precision: str,
                             device: torch.device) -> int | None:
    """The site's micro-batch: ``physical-batch-size`` (0: None, the whole batch), or for "auto" the largest
    one whose simulated step fits this site's budget (``memory``, else the CUDA device's free memory plus what
    this process already holds there: the model, which the simulated step counts too). Simulations are cached
    on disk, so later rounds decide in milliseconds. Only the micro-batch depends on the site's GPU: the
    expected batch, the noise and the accounting are the run's."""
    if cfg.physical_batch_size != "auto":
        return cfg.physical_batch_size or None
    from dpmemarc_core.memory import MemorySpec
    from dpmemarc_core.memory_plan import auto_physical_batch_size, config_file, format_bytes, memory_budget

    budget = memory_budget(cfg.memory, device)
    if not cfg.memory and device.type == "cuda":
        budget += torch.cuda.memory_allocated(device)
    spec = MemorySpec(model=config_file(model.config), method=cfg.method, batch_size=cfg.batch_size,
                      seq_len=cfg.max_length, precision=precision, device="meta",
                      epsilon=cfg.target_epsilon, clipping_mode=cfg.clipping_mode, method_options=cfg.method_kwargs(),
                      zo_params=cfg.zo_params if cfg.method == "zo" else "full", task_kind=cfg.task_kind(),
                      num_labels=max(cfg.num_labels(), 2))
    option = auto_physical_batch_size(spec, budget)
    print(f"dpmemarc site: physical batch size auto: {option.physical_batch_size} ({option.steps_per_batch} "
          f"micro-batch(es) per expected batch of {cfg.batch_size}); simulated peak {format_bytes(option.peak_bytes)} "
          f"in a budget of {format_bytes(budget)}", flush=True)
    return option.physical_batch_size


def add_proximal_term(trainer, mu: float) -> None:
    """FedProx: before each optimizer step, grad += μ·(w − w₀), w₀ the weights the round started from.

    The term depends on no example (only on weights already released), so adding it after the noise is
    post-processing: the step's privacy is unchanged."""
    optimizer = getattr(trainer, "optimizer", None)
    if optimizer is None:
        raise ValueError(f"FedProx needs a gradient optimizer; {type(trainer).__name__} has none")
    anchors = [p.detach().clone() for p in trainer.params]

    def proximal(_optimizer, _args, _kwargs) -> None:
        with torch.no_grad():
            for param, anchor in zip(trainer.params, anchors):
                if param.grad is not None:
                    param.grad.add_(param - anchor, alpha=mu)

    optimizer.register_step_pre_hook(proximal)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak CUDA memory allocated since the last reset on a GPU; on CPU the process's peak resident set."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB, macOS bytes


# ---- the trainable state on the wire ---------------------------------------------------------------------


def to_numpy_state(state: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The trainable state as numpy arrays; bfloat16 (which numpy lacks) travels as float32."""
    return {name: (t.float() if t.dtype == torch.bfloat16 else t).detach().cpu().numpy() for name, t in state.items()}


def load_numpy_state(model: nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
    """Load arrays into the model's trainable parameters, cast to each parameter's dtype; names and shapes
    are checked by ``load_trainable_state_dict``."""
    from dpmemarc_core.methods import load_trainable_state_dict

    dtypes = {name: p.dtype for name, p in model.named_parameters() if p.requires_grad}
    state = {name: torch.from_numpy(np.array(a, copy=True)).to(dtypes.get(name, torch.float32))
             for name, a in arrays.items()}
    load_trainable_state_dict(model, state)


def trainable_numpy_state(model: nn.Module) -> dict[str, np.ndarray]:
    from dpmemarc_core.methods import trainable_state_dict

    return to_numpy_state(trainable_state_dict(model))


def evaluate_numpy_state(run: RunModel, task: Task | None, arrays: Mapping[str, np.ndarray], batch_size: int) -> dict:
    """Central evaluation of a global trainable state on ``task``'s evaluation split (the server's own data);
    without one, nothing ({})."""
    if task is None:
        return {}
    load_numpy_state(run.model, arrays)
    with autocast_context(run.precision, run.device.type):
        return evaluate(run.model, task, run.tokenizer, batch_size)
