"""The run config of a federated run (`[tool.flwr.app.config]`), parsed and checked."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields

import torch

from dpmemarc_core.data import TASKS, num_labels_of, task_kind_of
from dpmemarc_core.memory.plan import parse_memory_size
from dpmemarc_core.privacy import PrivacySettings
from dpmemarc_core.privacy.settings import check_count, check_delta, check_real
from dpmemarc_core.training.build import resolve_device
from dpmemarc_core.training.config import ZO_PARAM_METHODS
from dpmemarc_core.training.precision import AUTO, resolve_precision

PARTITIONINGS = ("iid", "dirichlet")


STRATEGIES = ("fedavg", "fedprox", "fedadam")  # Flower's own strategies, chosen by the run config


# `task` values whose data is only the sites' own files (node config data-path), no public data set.
SITE_DATA_TASKS = ("classification", "generation")


@dataclass(frozen=True)
class FederatedConfig:
    """The run config of a federated run (`[tool.flwr.app.config]`, keys with dashes).

    Defaults equal pyproject.toml's (a test keeps them in step). Zero means "unset" where TOML has no
    null: ``delta = 0`` is 1/(10N) of each site (N its number of examples), ``physical-batch-size = 0`` is the whole
    batch at once (``"auto"``: the largest micro-batch the memory simulator fits in ``memory``, or without it in the
    GPU's free memory or the CPU's available RAM; each site fits its own GPU with the same privacy),
    ``memory = ""`` gives no budget,
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
    clip_groups: str = "all"
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
            try:
                check_count(self.physical_batch_size, "physical-batch-size", minimum=0)
            except ValueError:
                raise ValueError(f"physical-batch-size must be an integer >= 0 or \"auto\", "
                                 f"got {self.physical_batch_size!r}") from None
        if self.memory:
            parse_memory_size(self.memory, "memory")
        if self.precision != AUTO:
            resolve_precision(self.precision, "cpu")
        for name in ("lr", "max_update_norm", "dirichlet_alpha", "client_dp_clipping_norm", "round_timeout",
                     "server_lr", "site_eval_noise_multiplier"):
            check_real(getattr(self, name), _key(name), 0, math.inf, "()")
        for name in ("head_lr", "client_dp_noise_multiplier", "proximal_mu"):  # head-lr 0: lr
            check_real(getattr(self, name), _key(name), 0, math.inf, "[)")
        if self.delta != 0 and not 0 < self.delta < 1:
            raise ValueError(f"delta must be 0 (= 1/(10N) of each site) or satisfy 0 < value < 1, got {self.delta!r}")
        check_real(self.fraction_train, "fraction-train", 0, 1, "(]")
        check_real(self.site_eval_fraction, "site-eval-fraction", 0, 1, "()")
        if self.min_train_nodes < self.min_valid_replies:
            raise ValueError(f"min-train-nodes must be >= min-valid-replies ({self.min_valid_replies}): a round "
                             f"sampling fewer sites can never aggregate, got {self.min_train_nodes}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.strategy == "fedprox" and self.method == "zo":
            raise ValueError("strategy 'fedprox' adds a proximal term to the gradient; method 'zo' has none")
        if self.strategy == "fedadam" and self.client_dp:
            # Flower's DP wrapper noises what the inner strategy returns; FedAdam returns an Adam step whose
            # sensitivity is not the clipped mean's, so that noise would not be calibrated.
            raise ValueError("client-dp noises the mean of the clipped updates; with strategy 'fedadam' the server "
                             "releases an Adam step of it instead: use fedavg or fedprox with client-dp")
        check_delta(self.client_dp_delta, "client-dp-delta")
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
                               clip_fn=self.clip_fn, accountant=self.accountant, secure_mode=self.secure_mode,
                               clip_groups=self.clip_groups)

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


# The run config's value types by field annotation (strings under `from __future__ import annotations`).
# bool is a subclass of int: a true/false where a number belongs is refused.
_RUN_CONFIG_TYPES = {"bool": (bool,), "int": (int,), "float": (int, float), "int | str": (int, str), "str": (str,)}


def _typed(key: str, value: object, kind: str) -> object:
    if not isinstance(value, _RUN_CONFIG_TYPES[kind]) or (kind != "bool" and isinstance(value, bool)):
        raise ValueError(f"run-config '{key}' must be a {kind}, got {value!r}")
    return float(value) if kind == "float" else value
