"""Backbone loading: pretrained weights through ``from_pretrained``, or exact published configs with random
weights (for memory and speed studies of models whose weights are not at hand)."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import torch
from huggingface_hub import constants as hub_constants
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from dpmemarc_core import offline
from dpmemarc_core.pooling import POOLING_KEY, declares_mean_pooling, use_mean_pooling

TASK_KINDS = ("classification", "generation")
OFFLINE_ALIASES: dict[str, Callable[[], Path]] = {
    "minilm": offline.minilm_path,
    "smollm2-135m": offline.smollm2_path,
}
# The same function as one fused kernel (equal to ~1e-12 in float64). Hugging Face writes GPT-2's gelu_new
# out of elementwise ops, and under autocast its pow runs in fp32: autograd keeps three fp32 copies of
# every block's MLP state where the fused kernel keeps one in the compute dtype.
FUSED_ACTIVATIONS = {"gelu_new": "gelu_pytorch_tanh"}
PUBLISHED_CONFIGS = tuple(
    sorted(entry.name.removesuffix(".json") for entry in resources.files("dpmemarc_core.configs").iterdir()
           if entry.name.endswith(".json"))
)


# transformers 5.24 renamed the KV-cache argument of its models and blocks from past_key_values to cache.
KV_CACHE_ARGUMENTS = ("cache", "past_key_values")


def kv_cache_argument(module: torch.nn.Module) -> str:
    """The name `module.forward` takes its KV cache under, in the installed transformers."""
    parameters = inspect.signature(module.forward).parameters
    for name in KV_CACHE_ARGUMENTS:
        if name in parameters:
            return name
    raise ValueError(f"{type(module).__name__}.forward takes none of {KV_CACHE_ARGUMENTS} (a transformers version "
                     "this code does not know)")


def load_backbone(
    name_or_path: str,
    task_kind: str,
    num_labels: int = 2,
    dtype: torch.dtype | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Pretrained model and tokenizer, with a pad token set on both.

    ``name_or_path``: an offline alias (``minilm``, ``smollm2-135m``), a local directory, or a hub name.
    ``task_kind``: ``classification`` (a new sequence-classification head with ``num_labels`` outputs) or
    ``generation`` (causal LM); a BERT-style classifier of a mean-pooling sentence encoder (its folder says so,
    as all-MiniLM-L6-v2's does, or its config has ``classifier_pooling = "mean"``) classifies from the mean of
    its token states (`dpmemarc_core.pooling`). ``dtype`` defaults to float32, the precision DP training on CPU needs; pass
    ``torch.bfloat16`` to keep large frozen backbones small on a GPU. GPT-2's ``gelu_new`` runs as its fused
    kernel (``with_fused_activation``).
    """
    model = load_model(name_or_path, task_kind, num_labels, dtype)
    tokenizer = _from_pretrained(AutoTokenizer, resolve(name_or_path))
    set_pad_token(model, tokenizer)
    return model, tokenizer


def load_model(name_or_path: str, task_kind: str, num_labels: int = 2,
               dtype: torch.dtype | None = None) -> PreTrainedModel:
    """The pretrained model of ``load_backbone`` without its tokenizer (a backbone saved on its own has none)."""
    model_class = _model_class(task_kind)
    if task_kind == "classification" and num_labels < 2:
        raise ValueError(f"num_labels must be >= 2 for classification, got {num_labels}")
    source = resolve(name_or_path)
    config = with_fused_activation(_from_pretrained(AutoConfig, source))
    if task_kind == "classification":
        config.num_labels = num_labels
    model = _from_pretrained(model_class, source, config=config, dtype=dtype or torch.float32)
    if task_kind == "classification" and getattr(model.base_model, "pooler", None) is not None and (
            getattr(config, POOLING_KEY, None) == "mean" or declares_mean_pooling(Path(source).expanduser())):
        use_mean_pooling(model)  # the pooling the encoder was trained with (see dpmemarc_core.pooling)
    return model


def resolve(name_or_path: str) -> str:
    """A local path for offline aliases; local paths and hub names unchanged."""
    if name_or_path in OFFLINE_ALIASES:
        return str(OFFLINE_ALIASES[name_or_path]())
    return name_or_path


def set_pad_token(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """GPT-2 and Llama ship without a pad token; padding with EOS is safe because padded positions are masked
    (attention mask, labels -100) and sequence classification reads the last non-pad token."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("tokenizer has neither a pad token nor an EOS token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def with_fused_activation(config: PretrainedConfig) -> PretrainedConfig:
    """`config` with its GPT-2-style ``activation_function`` swapped for the fused kernel of the same function."""
    activation = getattr(config, "activation_function", None)
    if activation in FUSED_ACTIVATIONS:
        config.activation_function = FUSED_ACTIVATIONS[activation]
    return config


def published_config(name_or_path: str) -> PretrainedConfig:
    """The published config of a model: a name from ``PUBLISHED_CONFIGS`` (shipped with the package, exact
    values of the hub's config.json), or a path to a config.json or to a directory holding one."""
    if name_or_path in PUBLISHED_CONFIGS:
        path = resources.files("dpmemarc_core.configs") / f"{name_or_path}.json"
        return AutoConfig.from_pretrained(str(path))
    path = Path(name_or_path)
    if path.is_file() or (path.is_dir() and (path / "config.json").is_file()):
        return AutoConfig.from_pretrained(str(path))
    raise ValueError(
        f"unknown config '{name_or_path}': expected one of {', '.join(PUBLISHED_CONFIGS)}, "
        "or a path to a config.json or a directory holding one"
    )


def build_from_config(
    config: PretrainedConfig,
    task_kind: str,
    num_labels: int = 2,
    device: str | torch.device = "meta",
    dtype: torch.dtype = torch.float32,
) -> PreTrainedModel:
    """A randomly initialised model of ``config``. On ``device="meta"`` no memory is allocated: the model has
    exact shapes for parameter counting and memory simulation. Configs without a pad token pad with EOS, as
    ``set_pad_token`` does for pretrained ones (pair GPT-2 shapes with ``offline.gpt2_tokenizer()``). GPT-2's
    ``gelu_new`` runs as its fused kernel (``with_fused_activation``)."""
    model_class = _model_class(task_kind)
    config = with_fused_activation(copy.deepcopy(config))
    if task_kind == "classification":
        config.num_labels = num_labels
    if config.pad_token_id is None and isinstance(config.eos_token_id, int):
        config.pad_token_id = config.eos_token_id  # the same EOS-padding convention as set_pad_token
    with torch.device(device):
        return model_class.from_config(config, dtype=dtype)


def _model_class(task_kind: str):
    if task_kind == "classification":
        return AutoModelForSequenceClassification
    if task_kind == "generation":
        return AutoModelForCausalLM
    raise ValueError(f"task_kind must be one of {TASK_KINDS}, got '{task_kind}'")


def _from_pretrained(loader, source: str, **kwargs):
    """``loader.from_pretrained`` that fails in seconds, not after half a minute of retries, when a hub name is
    asked for and the hub cannot be reached; files already in the local hub cache are still used."""
    if Path(source).expanduser().exists():
        return loader.from_pretrained(source, **kwargs)
    if source.startswith(("/", ".", "~")):
        raise FileNotFoundError(f"model path '{source}' does not exist")
    if offline.hub_reachable():
        return loader.from_pretrained(source, **kwargs)
    try:
        return loader.from_pretrained(source, local_files_only=True, **kwargs)
    except OSError as error:
        raise OSError(
            f"cannot load '{source}': the model hub ({hub_constants.ENDPOINT}) is unreachable (or HF_HUB_OFFLINE "
            f"is set) and the model is not in the local cache. Use a local directory, or an offline model: "
            f"{', '.join(OFFLINE_ALIASES)}; for GPT-2/RoBERTa/Llama-2 shapes without weights use "
            f"build_from_config(published_config(name), ...) with one of {', '.join(PUBLISHED_CONFIGS)}."
        ) from error
