"""Per-example losses: one scalar per example, the input BK clipping needs."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per example, [B]; computed in fp32 whatever the logits' dtype."""
    return F.cross_entropy(logits.float(), labels, reduction="none")


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over each example's labelled tokens (labels -100 are ignored), [B]."""
    shifted = logits[:, :-1].float()
    targets = labels[:, 1:]
    nll = F.cross_entropy(shifted.transpose(1, 2), targets, reduction="none", ignore_index=-100)
    counted = (targets != -100).to(nll.dtype)
    return (nll * counted).sum(1) / counted.sum(1).clamp(min=1)


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Dispatch on the label shape: [B] → classification, [B, T] → causal language modelling."""
    if labels.dim() == 1:
        return classification_loss(logits, labels)
    return causal_lm_loss(logits, labels)
