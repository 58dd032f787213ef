"""Per-example losses: one scalar per example, the input BK clipping needs."""

from __future__ import annotations

from contextlib import nullcontext

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
    # Rows of a (B·t, V) matrix: the (B, V, t) layout cross_entropy takes for sequences is a transposed view
    # that it copies with a strided gather, most of the loss's time on a CPU.
    batch, length, vocab = logits.shape
    nll = F.cross_entropy(_at_least_fp32(logits).reshape(batch * length, vocab), targets.reshape(-1),
                          reduction="none", ignore_index=-100)
    return nll.view(batch, length).sum(1)  # ignored positions contribute exactly 0


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


def _autocast_state(device_type: str) -> tuple[str, bool, torch.dtype | None]:
    """Autocast as it is now for `device_type`, to be re-entered when backward recomputes."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return device_type, True, torch.get_autocast_dtype(device_type)
    return device_type, False, None


def _autocast(state: tuple[str, bool, torch.dtype | None]):
    device_type, enabled, dtype = state
    return torch.autocast(device_type, dtype=dtype) if enabled else nullcontext()


def _head_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The LM head over a (B, t, d) chunk as one (B·t, d) matmul: given the 3-D slice, F.linear runs a bmm with
    the V×d head expanded per example (B thin GEMMs of t rows, several times slower on a CPU)."""
    batch, length, dim = hidden.shape
    return F.linear(hidden.reshape(batch * length, dim), weight, bias).view(batch, length, -1)


class _ChunkedHeadSummedNLL(torch.autograd.Function):
    """Σ_t nll of each example with the (frozen) LM head applied inside each chunk of positions.

    Saves only the hidden states (B·T·d, not B·T·V): the logits of one chunk exist at a time, in forward
    and again when backward recomputes them under the autocast state the forward ran in, and the
    gradient that leaves is the hidden states', so neither the logits nor their gradient is ever whole.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                chunk: int) -> torch.Tensor:
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.chunk = chunk
        ctx.autocast = _autocast_state(hidden.device.type)
        return sum(_summed_nll(_head_logits(hidden[:, s:s + chunk], weight, bias), targets[:, s:s + chunk])
                   for s in range(0, hidden.shape[1], chunk))

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        hidden, weight, bias, targets = ctx.saved_tensors
        grad = torch.empty_like(hidden)
        for s in range(0, hidden.shape[1], ctx.chunk):
            with torch.enable_grad(), _autocast(ctx.autocast):
                piece = hidden[:, s:s + ctx.chunk].detach().requires_grad_()
                part = _summed_nll(_head_logits(piece, weight, bias), targets[:, s:s + ctx.chunk])
            grad[:, s:s + ctx.chunk] = torch.autograd.grad(part, piece, grad_total)[0]
        return grad, None, None, None, None


def causal_lm_loss_from_hidden(hidden: torch.Tensor, head: torch.nn.Linear, labels: torch.Tensor) -> torch.Tensor:
    """`causal_lm_loss(head(hidden), labels)` without the B·T·V logits or their gradient: the head runs inside
    the loss chunks. The head must be frozen (its weight gradient is not formed), e.g. a side network's LM head."""
    if head.weight.requires_grad or (head.bias is not None and head.bias.requires_grad):
        raise ValueError("causal_lm_loss_from_hidden: the LM head must be frozen (requires_grad False)")
    targets = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), -100)], dim=1)
    chunk = max(1, CHUNK_LOGITS // max(1, hidden.shape[0] * head.out_features))
    total = _ChunkedHeadSummedNLL.apply(hidden, head.weight, head.bias, targets, chunk)
    counted = (targets != -100).sum(1).clamp(min=1)
    return total / counted.to(total.dtype)


def model_per_example_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                           labels: torch.Tensor) -> torch.Tensor:
    """Per-example losses [B] of `model` on `batch` (inputs without the labels).

    A model that sets `computes_per_example_loss` (the side network) computes them in its forward
    (`labels=..., reduction="none"`), where it can keep vocabulary-wide logits from existing; every
    other model's logits go through `per_example_loss`. Either way the call goes through the model's
    `__call__`, so its forward hooks (BK, autocast) see it.
    """
    if getattr(model, "computes_per_example_loss", False):
        return model(**batch, labels=labels, reduction="none").loss
    return per_example_loss(model(**batch).logits, labels)
