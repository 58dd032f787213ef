"""Central evaluation of a global trainable state, on data the server owns."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from dpmemarc_core.data import Task
from dpmemarc_core.federated.wire import load_numpy_state
from dpmemarc_core.single_site import evaluate
from dpmemarc_core.training.build import Run
from dpmemarc_core.training.precision import autocast_context


def evaluate_numpy_state(run: Run, task: Task | None, arrays: Mapping[str, np.ndarray], batch_size: int) -> dict:
    """Central evaluation of a global trainable state on ``task``'s evaluation split (the server's own data);
    without one, nothing ({})."""
    if task is None:
        return {}
    load_numpy_state(run.model, arrays)
    with autocast_context(run.precision, run.device.type):
        return evaluate(run.model, task, run.tokenizer, batch_size)
