"""Per-layer book-keeping rules, one file per layer kind (after Opacus's grad_sample/ table).

`handler_for(module)` returns the rule for a module that owns trainable parameters, or None.
"""

from __future__ import annotations

from torch import nn

from dpmemarc_core.privacy.layers.contributions import GhostRule
from dpmemarc_core.privacy.layers.embedding import EmbeddingHandler
from dpmemarc_core.privacy.layers.linear import LinearHandler
from dpmemarc_core.privacy.layers.norms import LayerNormHandler, RMSNormHandler, is_rms_norm

HANDLERS = (LinearHandler(), EmbeddingHandler(), LayerNormHandler(), RMSNormHandler())
SUPPORTED = "nn.Linear, transformers Conv1D, nn.Embedding, nn.LayerNorm, RMSNorm (incl. peft LoRA's Linear factors)"


def handler_for(module: nn.Module) -> object | None:
    for handler in HANDLERS:
        if isinstance(module, handler.types):
            return handler
    if is_rms_norm(module):
        return HANDLERS[3]
    return None


__all__ = ["GhostRule", "handler_for", "HANDLERS", "SUPPORTED"]
