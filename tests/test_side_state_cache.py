"""The side network's cache of frozen backbone states: same losses, gradients and training as computing them."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch
from test_side import LABELS, PAD, VOCAB, _is_generation, _side

from dpmemarc_core.methods.side.state_cache import (
    DEFAULT_MAX_BYTES,
    BackboneStateCache,
    cached_backbone_states,
    default_max_bytes,
)
from dpmemarc_core.privacy import PrivacySettings
from dpmemarc_core.training import loop
from dpmemarc_core.training.bk import PrivateTrainer


def _examples(name: str, lengths: list[int], seed: int) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        ids = torch.randint(2, VOCAB, (n,), generator=generator)
        label = ids.clone() if _is_generation(name) else torch.randint(0, LABELS, (), generator=generator)
        rows.append({"input_ids": ids, "labels": label})
    return rows


def _collate(rows: list[dict]) -> dict:
    """Right padding to the batch's longest row (as dpmemarc_core.data.Task.collate)."""
    length = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), length), PAD)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r["input_ids"])] = r["input_ids"]
        mask[i, :len(r["input_ids"])] = 1
    if rows[0]["labels"].dim():
        labels = torch.full((len(rows), length), -100)
        for i, r in enumerate(rows):
            labels[i, :len(r["labels"])] = r["labels"]
    else:
        labels = torch.stack([r["labels"] for r in rows])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _losses_and_grads(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad()
    losses = model(**batch, reduction="none").loss
    losses.sum().backward()
    return losses.detach(), [p.grad.clone() for p in model.side.parameters()]


@pytest.mark.parametrize("name", ["bert", "roberta", "gpt2-cls", "gpt2", "llama"])
def test_cached_states_give_the_computed_losses_and_gradients(name):
    model = _side(name)
    data = _examples(name, [3, 6, 4, 7, 2], seed=0)
    first = _collate(data[:3])  # padded to 6
    mixed = _collate([data[2], data[3], data[0], data[4]])  # padded to 7: two rows seen, two new
    expected = [_losses_and_grads(model, b) for b in (first, mixed)]
    with cached_backbone_states(model) as cache:
        got = [_losses_and_grads(model, b) for b in (first, mixed)]
        assert (cache.hits, cache.misses) == (2, 5)
        again = _losses_and_grads(model, mixed)
        assert cache.hits == 6
    assert model.state_cache is None
    for (losses, grads), (want_losses, want_grads) in zip([*got, again], [*expected, expected[1]]):
        torch.testing.assert_close(losses, want_losses, rtol=1e-12, atol=1e-12)
        for g, w in zip(grads, want_grads):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_left_padding_and_a_full_cache_are_computed():
    model = _side("gpt2-cls")
    batch = _collate(_examples("gpt2-cls", [3, 5], seed=1))
    left = {"input_ids": batch["input_ids"].flip(1), "attention_mask": batch["attention_mask"].flip(1),
            "labels": batch["labels"]}
    with cached_backbone_states(model) as cache:
        model(**left)
        assert cache.bytes == 0 and cache.hits == cache.misses == 0  # not cached at all
    with cached_backbone_states(model, max_bytes=0) as cache:
        want = model(**batch).logits
        torch.testing.assert_close(model(**batch).logits, want)
        assert cache.bytes == 0 and cache.hits == 0 and cache.misses == 4
    with pytest.raises(ValueError, match="max_bytes must be >= 0"):
        BackboneStateCache(-1)


@pytest.mark.parametrize(("available_gib", "want_gib"), [(64, DEFAULT_MAX_BYTES / 2**30), (8, 2)])
def test_default_budget_is_a_quarter_of_available_ram_capped(monkeypatch, available_gib, want_gib) -> None:
    # The same RAM figure `physical batch size auto` plans a CPU run against (host_memory), not a second one.
    monkeypatch.setattr("psutil.virtual_memory", lambda: SimpleNamespace(available=available_gib * 2**30))
    assert default_max_bytes() == want_gib * 2**30


def _count_rows(model: torch.nn.Module) -> list[int]:
    """Rows that went through the backbone, counted by wrapping this model's computation."""
    counted = [0]
    compute = model._compute_backbone_states

    def counting(input_ids, attention_mask, **kwargs):
        counted[0] += input_ids.shape[0]
        return compute(input_ids, attention_mask, **kwargs)

    model._compute_backbone_states = counting
    return counted


def _train(name: str, steps: int, cached: bool, monkeypatch) -> tuple[list[torch.Tensor], int]:
    model = _side(name).float()  # the trainer's fp32
    counted = _count_rows(model)
    if not cached:
        monkeypatch.setattr(loop, "cached_backbone_states", lambda model: contextlib.nullcontext())
    data = _examples(name, [2, 5, 3, 6, 4, 3, 5, 2], seed=2)
    trainer = PrivateTrainer(model, data, _collate, PrivacySettings(max_grad_norm=0.5), sample_rate=0.5,
                             noise_multiplier=0.7, lr=1e-2, sampling_seed=3, noise_seed=4)
    trainer.run(steps, progress=False)
    assert model.state_cache is None  # dropped with the run
    return [p.detach().clone() for p in model.side.parameters()], counted[0]


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_training_over_epochs_reuses_states_and_matches(name, monkeypatch):
    cached, rows_cached = _train(name, 8, True, monkeypatch)
    plain, rows_plain = _train(name, 8, False, monkeypatch)
    assert rows_cached <= 8 < rows_plain  # each of the 8 examples went through the backbone once
    for a, b in zip(cached, plain):
        # fp32: a sub-batch of new rows sums in another order than the whole batch (~1e-7 relative)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_one_epoch_runs_without_a_cache(monkeypatch):
    model = _side("bert").float()
    seen = []
    monkeypatch.setattr(loop, "cached_backbone_states", lambda m: seen.append(m) or contextlib.nullcontext())
    data = _examples("bert", [2, 3, 4, 5], seed=5)
    trainer = PrivateTrainer(model, data, _collate, PrivacySettings(), sample_rate=0.5, noise_multiplier=1.0)
    trainer.run(2, progress=False)  # 2 × 0.5: each example drawn once in expectation
    assert seen == []
    trainer.run(3, progress=False)
    assert seen == [model]
