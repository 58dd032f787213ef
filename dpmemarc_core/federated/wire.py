"""The trainable state on the wire: numpy arrays in, numpy arrays out."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn


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
