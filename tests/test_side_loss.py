"""The side network's LM head inside the loss chunks: the same losses and gradients as the logits path
(float64 and under bf16 autocast), BK against the float64 per-example reference, and no B·T·V tensor."""

from __future__ import annotations

import pytest
import torch
from bk_reference import assert_bk_matches_reference, clipped_reference
from test_side import _batch, _side
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from dpmemarc_core import losses
from dpmemarc_core.losses import model_per_example_loss, per_example_loss

GENERATION = ["gpt2", "llama"]


def _split(batch: dict) -> tuple[dict, torch.Tensor]:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return inputs, batch["labels"]


def logits_path(model, batch):
    inputs, labels = _split(batch)
    return per_example_loss(model(**inputs).logits, labels)


def chunked_head_path(model, batch):
    inputs, labels = _split(batch)
    return model_per_example_loss(model, inputs, labels)


@pytest.fixture
def two_positions_a_chunk(monkeypatch):
    monkeypatch.setattr(losses, "CHUNK_LOGITS", 3 * 61 * 2)  # B=3, V=61: several chunks per sequence


@pytest.mark.parametrize("name", GENERATION)
def test_losses_and_gradients_equal_the_logits_path(name, two_positions_a_chunk):
    model = _side(name)
    batch = _batch(name)
    weights = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    params = [p for p in model.parameters() if p.requires_grad]
    expected = logits_path(model, batch)
    expected_grads = torch.autograd.grad((expected * weights).sum(), params)
    got = chunked_head_path(model, batch)
    grads = torch.autograd.grad((got * weights).sum(), params)
    assert got.shape == (3,) and got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("name", GENERATION)
@pytest.mark.parametrize("mode", ["mixed", "ghost"])
def test_bk_matches_float64_reference(name, mode, two_positions_a_chunk):
    model = _side(name)
    batch = _batch(name)
    norms, _ = clipped_reference(model, batch, chunked_head_path, 1.0)
    reference_norms, _ = clipped_reference(model, batch, logits_path, 1.0)
    torch.testing.assert_close(norms, reference_norms, rtol=1e-10, atol=0)
    assert_bk_matches_reference(model, batch, chunked_head_path, rtol=1e-6, clipping_mode=mode,
                                max_grad_norm=norms.median().item())


def test_bf16_autocast_recomputes_in_bf16(two_positions_a_chunk):
    # Backward recomputes each chunk's logits under the autocast state of the forward: the gradients are
    # those of the logits path under the same autocast, not of an fp32 recomputation.
    model = _side("gpt2").float()
    inputs, labels = _split(_batch("gpt2"))
    params = [p for p in model.parameters() if p.requires_grad]
    results = []
    for path in (lambda: per_example_loss(model(**inputs).logits, labels),
                 lambda: model_per_example_loss(model, inputs, labels)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = path()
        results.append((loss, torch.autograd.grad(loss.sum(), params)))
    (expected, expected_grads), (got, grads) = results
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


class OutputShapes(TorchDispatchMode):
    """Records the shape of every tensor an op returns (forward and backward alike)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.shapes += [tuple(t.shape) for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out


def test_no_vocabulary_wide_tensor_is_formed(two_positions_a_chunk):
    model = _side("gpt2").float()
    batch = _batch("gpt2", batch=3, length=12)
    seen = []
    for path in (logits_path, chunked_head_path):
        with OutputShapes() as mode:
            path(model, batch).sum().backward()
        seen.append([shape for shape in mode.shapes if shape[-1:] == (61,) and shape[:1] == (3,)])
    assert (3, 12, 61) in seen[0]  # the logits path forms the logits and their gradient
    assert (3, 2, 61) in seen[1] and (3, 12, 61) not in seen[1]  # the chunked head: two positions at a time
