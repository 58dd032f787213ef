"""Checks an incoming trainable state must pass before it may touch the global model.

Pure numpy: the strategy decodes a reply's arrays and asks `update_problem` what, if anything, is wrong.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def update_problem(update: Mapping[str, np.ndarray], global_state: Mapping[str, np.ndarray],
                   max_update_norm: float) -> str | None:
    """Why ``update`` (a site's new trainable state) is unacceptable, or None if it is fine.

    It must hold exactly the global state's names, each with the same shape and dtype, only finite
    values, and differ from the global state by an L2 norm (over all tensors) of at most ``max_update_norm``.
    """
    missing = sorted(set(global_state) - set(update))
    unexpected = sorted(set(update) - set(global_state))
    if missing or unexpected:
        parts = ([f"missing tensors {missing}"] if missing else []) + (
            [f"unexpected tensors {unexpected}"] if unexpected else [])
        return "; ".join(parts)
    for name, reference in global_state.items():
        value = update[name]
        if not isinstance(value, np.ndarray):
            return f"'{name}' is a {type(value).__name__}, not an array"
        if value.shape != reference.shape:
            return f"'{name}' has shape {value.shape}, expected {reference.shape}"
        if value.dtype != reference.dtype:
            return f"'{name}' has dtype {value.dtype}, expected {reference.dtype}"
        if not np.issubdtype(value.dtype, np.number):
            return f"'{name}' has non-numeric dtype {value.dtype}"
        if not np.all(np.isfinite(value)):
            return f"'{name}' holds {int(np.size(value) - np.isfinite(value).sum())} non-finite values (NaN/Inf)"
    norm = update_norm(update, global_state)
    if not norm <= max_update_norm:
        return f"update norm {norm:.4g} exceeds max-update-norm {max_update_norm:g}"
    return None


def update_norm(update: Mapping[str, np.ndarray], global_state: Mapping[str, np.ndarray]) -> float:
    """L2 norm of the update (new state minus global state) over all tensors, in float64."""
    squares = sum(float(np.sum((update[n].astype(np.float64) - g.astype(np.float64)) ** 2))
                  for n, g in global_state.items())
    return float(np.sqrt(squares))
