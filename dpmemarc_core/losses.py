"""Per-example losses: one scalar per example, the input BK clipping needs."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Cross-entropy over a vocabulary keeps an fp32 copy and a log-softmax of the logits for backward
# (2 × B·T·V floats: 1.6 GiB for GPT-2 at B=32, T=128). It runs in position chunks of about this
# many logits, each recomputed in backward, so only one chunk's intermediates exist at a time (three
# fp32 copies of a chunk at the peak: 48 MiB at 2²² logits; GPT-2 at B=32 then takes 2 positions a chunk).
CHUNK_LOGITS = 1 << 22


def _at_least_fp32(logits: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 logits are upcast for the softmax; float64 stays float64 (the reference tests need it)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per example, [B]; computed in at least fp32 whatever the logits' dtype."""
    return F.cross_entropy(_at_least_fp32(logits), labels, reduction="none")


def _summed_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    nll = F.cross_entropy(_at_least_fp32(logits).transpose(1, 2), targets, reduction="none", ignore_index=-100)
    return nll.sum(1)  # ignored positions contribute exactly 0


class _ChunkedSummedNLL(torch.autograd.Function):
    """Σ_t nll of each example, computed and differentiated a chunk of positions at a time.

    Saves only the logits. Backward recomputes each chunk's cross-entropy and writes its gradient into
    one logits-sized tensor, so at most the logits, their gradient and one chunk's intermediates are
    live. (Checkpointed chunks of a split would hold every chunk's gradient and their concatenation at
    once, and under a retained graph, as in two-pass BK clipping, the logits besides.)
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        ctx.save_for_backward(logits, targets)
        ctx.chunk = chunk
        return sum(_summed_nll(logits[:, s:s + chunk], targets[:, s:s + chunk])
                   for s in range(0, logits.shape[1], chunk))

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        logits, targets = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for s in range(0, logits.shape[1], ctx.chunk):
            with torch.enable_grad():
                piece = logits[:, s:s + ctx.chunk].detach().requires_grad_()
                part = _summed_nll(piece, targets[:, s:s + ctx.chunk])
            grad[:, s:s + ctx.chunk] = torch.autograd.grad(part, piece, grad_total)[0]
        return grad, None, None


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over each example's labelled tokens (labels -100 are ignored), [B]."""
    # Position t predicts label t + 1; the last position predicts nothing (-100), so the whole logits
    # tensor is used (no [:, :-1] slice, whose gradient would be a second logits-sized tensor).
    targets = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), -100)], dim=1)
    chunk = max(1, CHUNK_LOGITS // max(1, logits.shape[0] * logits.shape[-1]))
    total = _ChunkedSummedNLL.apply(logits, targets, chunk)
    counted = (targets != -100).sum(1).clamp(min=1)
    return total / counted.to(total.dtype)


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Dispatch on the label shape: [B] → classification, [B, T] → causal language modelling."""
    if labels.dim() == 1:
        return classification_loss(logits, labels)
    return causal_lm_loss(logits, labels)
