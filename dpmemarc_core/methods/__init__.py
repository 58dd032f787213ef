"""Fine-tuning methods (full, LoRA, adapter, BiTFiT, side network, reversible network) and their state.

`apply(model, method, **options)` sets a Hugging Face model up for one method; the trainable part
moves between sites as `trainable_state_dict` / `load_trainable_state_dict`. `save_pretrained` writes a
fine-tuned model as a folder usable outside dpmemarc (a peft adapter for LoRA), `load_pretrained(DIR)`
reads any such folder back.
"""

from dpmemarc_core.methods.pretrained import ModelSpec, load_pretrained, save_pretrained
from dpmemarc_core.methods.registry import METHODS, apply
from dpmemarc_core.methods.state import load_trainable_state_dict, trainable_state_dict

__all__ = ["METHODS", "ModelSpec", "apply", "load_pretrained", "load_trainable_state_dict", "save_pretrained",
           "trainable_state_dict"]
