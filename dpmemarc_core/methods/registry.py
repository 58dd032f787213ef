"""The fine-tuning methods by name, and `apply`, the one entry point that sets a model up for one.

Each method lives in its own module, imported when first used, so a method's dependencies (and
files still being written) never stand in the way of the others.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable

from torch import nn

METHODS: dict[str, str] = {
    "full": "dpmemarc_core.methods.full:apply_full",
    "lora": "dpmemarc_core.methods.lora:apply_lora",
    "adapter": "dpmemarc_core.methods.adapter:apply_adapter",
    "bitfit": "dpmemarc_core.methods.bitfit:apply_bitfit",
    "side": "dpmemarc_core.methods.side.model:apply_side",
    "rev": "dpmemarc_core.methods.rev.stack:apply_rev",
}


def method_function(method: str) -> Callable[..., nn.Module]:
    """The `apply_<method>(model, **options)` function registered under `method`."""
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"unknown method {method!r}; accepted: {', '.join(METHODS)}")
    module, function = METHODS[method].split(":")
    return getattr(importlib.import_module(module), function)


def accepted_options(function: Callable[..., nn.Module]) -> tuple[str, ...] | None:
    """Option names a method function takes after the model; None when it takes **options itself."""
    params = list(inspect.signature(function).parameters.values())[1:]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return tuple(p.name for p in params
                 if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD))


def apply(model: nn.Module, method: str, **options) -> nn.Module:
    """Set `model` (a Hugging Face model, modified in place) up for fine-tuning with `method`.

    Methods: "full", "lora", "adapter", "bitfit", "side", "rev". The result is called like the original
    (input_ids, attention_mask, labels → output with .logits and .loss) and its parameters with
    requires_grad are exactly the method's trainable ones. A classification model's head is trainable
    in every method; a causal LM's head is trainable only in "full". Options are the method function's
    keyword arguments (e.g. lora: r, lora_alpha, lora_dropout, target_modules, include_mlp; adapter:
    bottleneck, activation). Unknown methods or options raise ValueError listing the accepted ones.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"apply: model must be a torch.nn.Module, got {type(model).__name__}")
    function = method_function(method)
    accepted = accepted_options(function)
    if accepted is not None:
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise ValueError(f"{method}: unknown option(s) {unknown}; accepted: "
                             f"{', '.join(accepted) if accepted else 'none'}")
    return function(model, **options)
