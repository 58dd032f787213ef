"""Full fine-tuning: every parameter is trainable (the tied LM head with its embedding)."""

from __future__ import annotations

from torch import nn


def apply_full(model: nn.Module) -> nn.Module:
    """Make every parameter of `model` trainable, in place; the classifier head or LM head included."""
    model.requires_grad_(True)
    return model
