"""A fine-tuned model as a folder people can use outside dpmemarc, and `load_pretrained`, which reads it back.

Folder layout by method (every folder also holds ``dpmemarc.json``, the `ModelSpec`, and, when known,
``privacy.json``, the privacy record of the training):
- ``lora``: a peft adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``):
  ``PeftModel.from_pretrained(base, DIR)`` loads it onto the base model (with the head of ``dpmemarc.json``:
  ``num_labels`` for classification).
- ``full``, ``bitfit``: ``save_pretrained`` of the whole model; ``AutoModelFor...from_pretrained(DIR)`` loads
  it. (Both change only the backbone's own tensors, so the folder is a plain model of the same architecture.)
- ``adapter``, ``side``, ``rev``: ``trainable.safetensors`` (the trainable state) beside ``dpmemarc.json``. These
  methods add modules no standard architecture has (Houlsby adapters are non-linear and cannot be merged into
  the backbone's weights), so only `load_pretrained` rebuilds them: base model, method, then the state.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dpmemarc_core.methods.registry import METHODS, apply
from dpmemarc_core.methods.state import load_trainable_state_dict, trainable_state_dict

SPEC_FILE = "dpmemarc.json"
PRIVACY_FILE = "privacy.json"
TRAINABLE_FILE = "trainable.safetensors"
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
MERGED_METHODS = ("full", "bitfit")  # the folder is a plain save_pretrained model
STATE_METHODS = ("adapter", "side", "rev")  # the folder holds the trainable state only


@dataclass(frozen=True)
class ModelSpec:
    """What rebuilds a run's model: the base model, its head, and the method with its options.

    ``base_model``: a hub name, a local directory or an offline alias. ``task_kind``: ``classification`` or
    ``generation``. ``labels``: the class names in head order, when the run named them. ``pad_token_id``:
    the id the run padded with (sequence classification reads the last non-pad token).
    """

    base_model: str
    task_kind: str
    method: str
    num_labels: int = 0
    labels: tuple[str, ...] = ()
    method_options: dict = field(default_factory=dict)
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.task_kind not in ("classification", "generation"):
            raise ValueError(f"task_kind must be 'classification' or 'generation', got {self.task_kind!r}")
        if self.task_kind == "classification" and self.num_labels < 2:
            raise ValueError(f"num_labels must be >= 2 for classification, got {self.num_labels}")
        if self.labels and len(self.labels) != self.num_labels:
            raise ValueError(f"labels {list(self.labels)} do not give one name per class ({self.num_labels})")

    @classmethod
    def from_dict(cls, values: Mapping) -> ModelSpec:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: (tuple(v) if k == "labels" else v) for k, v in values.items() if k in known})

    def to_dict(self) -> dict:
        return {**asdict(self), "labels": list(self.labels)}


def build_model(spec: ModelSpec, base_model: str | None = None, dtype: torch.dtype | None = None) -> nn.Module:
    """The base model with the spec's head and method applied (trainable parts at their initial values)."""
    return apply(_base(spec, base_model or spec.base_model, dtype), spec.method, **spec.method_options)


def _base(spec: ModelSpec, source: str, dtype: torch.dtype | None) -> nn.Module:
    from dpmemarc_core.models import load_model

    model = load_model(source, spec.task_kind, max(spec.num_labels, 2), dtype)
    if spec.pad_token_id is not None:
        model.config.pad_token_id = spec.pad_token_id
    if spec.labels:
        model.config.id2label = dict(enumerate(spec.labels))
        model.config.label2id = {name: i for i, name in enumerate(spec.labels)}
    return model


def save_pretrained(model: nn.Module, spec: ModelSpec, directory: str | Path, privacy: Mapping | None = None,
                    tokenizer=None) -> Path:
    """Write ``model`` (set up by ``spec``'s method) to ``directory`` in its method's format (module docstring).

    ``directory`` is replaced as a whole, and only if it is absent, empty, or an earlier export (a folder
    holding ``dpmemarc.json``). ``tokenizer``, when given, is saved beside a full/bitfit model.
    """
    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()) and not (directory / SPEC_FILE).is_file():
        raise ValueError(f"{directory} exists and is not an earlier export (no {SPEC_FILE}); choose another folder")
    staging = directory.with_name(directory.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    if spec.method == "lora":
        from dpmemarc_core.models import resolve

        # Where peft's AutoPeftModel looks for the base; dpmemarc.json keeps the name as the run gave it.
        model.peft_config["default"].base_model_name_or_path = resolve(spec.base_model)
        model.save_pretrained(str(staging))
    elif spec.method in MERGED_METHODS:
        if spec.labels:
            model.config.id2label = dict(enumerate(spec.labels))
            model.config.label2id = {name: i for i, name in enumerate(spec.labels)}
        model.save_pretrained(str(staging))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
    else:
        save_file({k: v.contiguous() for k, v in trainable_state_dict(model).items()}, str(staging / TRAINABLE_FILE))
    (staging / SPEC_FILE).write_text(json.dumps(spec.to_dict(), indent=2) + "\n")
    if privacy is not None:
        (staging / PRIVACY_FILE).write_text(json.dumps(privacy, indent=2, allow_nan=False) + "\n")
    shutil.rmtree(directory, ignore_errors=True)
    staging.rename(directory)
    return directory


def export_state(state: Mapping[str, torch.Tensor], spec: ModelSpec, directory: str | Path,
                 privacy: Mapping | None = None, tokenizer=None) -> Path:
    """Rebuild the spec's model, load a trainable ``state`` (as a run saved it) into it, and `save_pretrained`."""
    model = build_model(spec)
    dtypes = {name: p.dtype for name, p in model.named_parameters() if p.requires_grad}
    load_trainable_state_dict(model, {n: torch.as_tensor(t).to(dtypes.get(n, torch.float32)) for n, t in state.items()})
    return save_pretrained(model, spec, directory, privacy, tokenizer)


def read_spec(directory: str | Path) -> ModelSpec:
    path = Path(directory) / SPEC_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a dpmemarc export: no {SPEC_FILE}")
    return ModelSpec.from_dict(json.loads(path.read_text()))


def load_pretrained(directory: str | Path, base_model: str | None = None,
                    dtype: torch.dtype | None = None) -> nn.Module:
    """The model an export folder describes, in eval mode, with outputs equal to the model that was exported.

    ``base_model`` replaces the base named in ``dpmemarc.json`` (a local copy of the same weights, say).
    ``dtype`` defaults to float32.
    """
    directory = Path(directory)
    spec = read_spec(directory)
    if spec.method in MERGED_METHODS:
        model = _base(spec, str(directory), dtype)
    elif spec.method == "lora":
        from peft import PeftModel

        model = PeftModel.from_pretrained(_base(spec, base_model or spec.base_model, dtype), str(directory))
    else:
        model = build_model(spec, base_model, dtype)
        dtypes = {name: p.dtype for name, p in model.named_parameters() if p.requires_grad}
        state = load_file(str(directory / TRAINABLE_FILE))
        load_trainable_state_dict(model, {n: t.to(dtypes.get(n, t.dtype)) for n, t in state.items()})
    return model.eval()
