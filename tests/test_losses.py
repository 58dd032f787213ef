"""Per-example losses: the chunked causal-LM loss equals the plain one, in value and gradient."""

import torch
import torch.nn.functional as F

from dpmemarc_core import losses


def plain_causal_loss(logits, labels):
    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none", ignore_index=-100)
    counted = (labels[:, 1:] != -100).to(nll.dtype)
    return (nll * counted).sum(1) / counted.sum(1).clamp(min=1)


def test_chunked_causal_loss_matches_plain(monkeypatch):
    torch.manual_seed(0)
    labels = torch.randint(0, 11, (3, 9))
    labels[0, 6:] = -100  # right padding
    labels[1, :3] = -100  # prompt without loss
    reference_logits = torch.randn(3, 9, 11, dtype=torch.float64, requires_grad=True)
    expected = plain_causal_loss(reference_logits, labels)
    expected_grad, = torch.autograd.grad(expected.sum() * 1.0 + expected[0], reference_logits)
    monkeypatch.setattr(losses, "CHUNK_LOGITS", 3 * 11 * 2)  # two positions per chunk: four chunks
    logits = reference_logits.detach().clone().requires_grad_()
    got = losses.causal_lm_loss(logits, labels)
    grad, = torch.autograd.grad(got.sum() + got[0], logits)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-15)
    assert got.dtype == torch.float64


def test_bf16_logits_are_upcast_and_classification_is_per_example():
    logits = torch.randn(4, 3).to(torch.bfloat16)
    loss = losses.per_example_loss(logits, torch.tensor([0, 1, 2, 0]))
    assert loss.shape == (4,) and loss.dtype == torch.float32
    torch.testing.assert_close(loss, F.cross_entropy(logits.float(), torch.tensor([0, 1, 2, 0]), reduction="none"))


def test_chunked_loss_backward_holds_one_logits_gradient(monkeypatch):
    # Under a retained graph (two-pass BK clipping) the logits stay alive during backward; beside them
    # only one logits-sized gradient and one chunk's intermediates may exist, never every chunk's
    # gradient plus their concatenation.
    from dpmemarc_core.memory.tracker import StorageTracker

    batch, length, vocab = 4, 16, 1000
    monkeypatch.setattr(losses, "CHUNK_LOGITS", batch * vocab)  # one position per chunk
    hidden = torch.randn(batch, length, 8, requires_grad=True)
    head = torch.randn(vocab, 8)
    labels = torch.randint(0, vocab, (batch, length))
    logits_bytes = batch * length * vocab * 4
    tracker = StorageTracker("cpu")
    with tracker:
        loss = losses.causal_lm_loss(hidden @ head.t(), labels)
        loss.sum().backward(retain_graph=True)
    report = tracker.report()
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all()
    assert logits_bytes * 2 <= report.peak_bytes - report.baseline_bytes < logits_bytes * 2.5
