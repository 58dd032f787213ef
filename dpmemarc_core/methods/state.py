"""The trainable part of a model as a flat name → tensor dict: what a site saves and shares."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    # named_parameters lists a tied parameter once, under its first name.
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached CPU copies of every parameter with requires_grad, keyed by `named_parameters` names."""
    return {name: p.detach().to("cpu", copy=True) for name, p in _trainable(model).items()}


def load_trainable_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy `state` into `model`'s trainable parameters, in place.

    `state` must hold exactly the trainable names, each a tensor of the parameter's shape and dtype
    (any device). Everything is checked first: on any mismatch nothing is modified and a ValueError
    names every offending tensor.
    """
    if not isinstance(state, Mapping):
        raise ValueError(f"state must be a mapping of parameter name to tensor, got {type(state).__name__}")
    params = _trainable(model)
    problems = [f"missing '{name}'" for name in params if name not in state]
    problems += [f"unexpected '{name}'" for name in state if name not in params]
    for name, p in params.items():
        if name not in state:
            continue
        value = state[name]
        if not isinstance(value, torch.Tensor):
            problems.append(f"'{name}' is a {type(value).__name__}, not a tensor")
        elif value.shape != p.shape:
            problems.append(f"'{name}' has shape {tuple(value.shape)}, expected {tuple(p.shape)}")
        elif value.dtype != p.dtype:
            problems.append(f"'{name}' has dtype {value.dtype}, expected {p.dtype}")
    if problems:
        raise ValueError(f"load_trainable_state_dict: state does not fit the model's trainable parameters: "
                         f"{'; '.join(problems)}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name])
