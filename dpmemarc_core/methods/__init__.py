"""Fine-tuning methods (full, LoRA, adapter, BiTFiT, side network, reversible network) and their state.

`apply(model, method, **options)` sets a Hugging Face model up for one method; the trainable part
moves between sites as `trainable_state_dict` / `load_trainable_state_dict`.
"""

from dpmemarc_core.methods.registry import METHODS, apply
from dpmemarc_core.methods.state import load_trainable_state_dict, trainable_state_dict

__all__ = ["METHODS", "apply", "load_trainable_state_dict", "trainable_state_dict"]
