"""Per-example losses: one scalar per example, the input BK clipping needs."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _at_least_fp32(logits: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 logits are upcast for the softmax; float64 stays float64 (the reference tests need it)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per example, [B]; computed in at least fp32 whatever the logits' dtype."""
    return F.cross_entropy(_at_least_fp32(logits), labels, reduction="none")


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over each example's labelled tokens (labels -100 are ignored), [B]."""
    shifted = _at_least_fp32(logits[:, :-1])
    targets = labels[:, 1:]
    nll = F.cross_entropy(shifted.transpose(1, 2), targets, reduction="none", ignore_index=-100)
    counted = (targets != -100).to(nll.dtype)
    return (nll * counted).sum(1) / counted.sum(1).clamp(min=1)


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Dispatch on the label shape: [B] → classification, [B, T] → causal language modelling."""
    if labels.dim() == 1:
        return classification_loss(logits, labels)
    return causal_lm_loss(logits, labels)
