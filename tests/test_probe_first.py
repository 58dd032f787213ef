"""DP linear probing, then fine-tuning (training/probe_first.py): what each phase trains, and one accountant."""

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

from dpmemarc_core.methods import apply
from dpmemarc_core.privacy import PrivacyAccountant, PrivacySettings, epsilon
from dpmemarc_core.privacy.engine import _ATTACHED
from dpmemarc_core.single_site import checked_probe_steps
from dpmemarc_core.training.bk import PrivateTrainer, split_head
from dpmemarc_core.training.config import TrainConfig
from dpmemarc_core.training.probe_first import (
    combined_stats,
    head_only,
    probe_steps_of,
    run_probe_then_tune,
)

CONFIG = dict(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
              max_position_embeddings=32, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def side_classifier() -> torch.nn.Module:
    torch.manual_seed(0)
    return apply(BertForSequenceClassification(BertConfig(**CONFIG)), "side", reduction=2)


def examples(n: int = 32) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 50, (n, 6), generator=g)
    return [{"input_ids": row, "label": int(row[0] > 25)} for row in ids]


def collate(batch: list[dict]) -> dict[str, torch.Tensor]:
    ids = torch.stack([b["input_ids"] for b in batch])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "labels": torch.tensor([b["label"] for b in batch])}


def test_probe_steps_round_the_fraction_and_leave_a_step_of_fine_tuning():
    assert [probe_steps_of(f, 10) for f in (0, 0.25, 0.5, 0.99)] == [0, 2, 5, 9]
    assert probe_steps_of(0.9, 1) == 0
    for bad in (1, 1.5, -0.1, True, "0.5", float("nan")):
        with pytest.raises(ValueError, match=r"probe_fraction must be a number in \[0, 1\)"):
            probe_steps_of(bad, 10)


def test_head_only_freezes_the_rest_and_gives_it_back():
    model = side_classifier()
    rest, head = split_head(model)
    with head_only(model):
        assert all(p.requires_grad for p in head) and not any(p.requires_grad for p in rest)
    assert all(p.requires_grad for p in rest + head)
    with pytest.raises(ValueError, match="needs a trainable classifier head"):
        with head_only(apply(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=31)), "lora")):
            pass


def test_the_probe_phase_moves_only_the_head_and_one_accountant_counts_every_step():
    model = side_classifier()
    rest, head = split_head(model)
    start = [p.detach().clone() for p in rest + head]
    privacy = PrivacySettings(target_epsilon=8.0, delta=1e-3, max_grad_norm=1.0)
    accountant = PrivacyAccountant()
    built: list[tuple[bool, PrivateTrainer, list[torch.Tensor]]] = []

    def make(head_alone: bool) -> PrivateTrainer:
        trainer = PrivateTrainer(model, examples(), collate, privacy, sample_rate=0.25, noise_multiplier=1.0,
                                 lr=1e-2, accountant=accountant)
        built.append((head_alone, trainer, [p.detach().clone() for p in rest + head]))
        return trainer

    trainer, stats = run_probe_then_tune(make, model, steps=6, probe_steps=4, progress=False)
    (probe_alone, probe, _), (tune_alone, tune, at_switch) = built
    assert (probe_alone, tune_alone) == (True, False) and trainer is tune
    assert len(probe.params) == len(head) and len(tune.params) == len(rest + head)
    n_rest = len(rest)
    assert all(torch.equal(a, b) for a, b in zip(start[:n_rest], at_switch[:n_rest])), "the probe moved the rest"
    assert not any(torch.equal(a, b) for a, b in zip(start[n_rest:], at_switch[n_rest:])), "the probe left the head"
    assert not any(torch.equal(a, p) for a, p in zip(at_switch[:n_rest], rest)), "fine-tuning left the rest"
    assert probe.engine not in _ATTACHED and tune.engine in _ATTACHED  # the probe's hooks are gone: one engine books a step
    assert accountant.steps == 6 and stats["steps"] == 6 and [p["steps"] for p in stats["phases"]] == [4, 2]
    assert accountant.get_epsilon(1e-3) == pytest.approx(epsilon(noise_multiplier=1.0, sample_rate=0.25, steps=6,
                                                                 delta=1e-3))
    tune.close()


def test_combined_stats_weigh_each_phase_by_its_examples():
    a = {"steps": 2, "examples": 10, "train_loss": 1.0, "clipped_fraction": 1.0}
    b = {"steps": 3, "examples": 30, "train_loss": 0.5, "clipped_fraction": 0.0}
    assert combined_stats([a]) == a
    both = combined_stats([a, b])
    assert (both["steps"], both["examples"]) == (5, 40) and both["phases"] == [a, b]
    assert both["train_loss"] == pytest.approx(0.625) and both["clipped_fraction"] == pytest.approx(0.25)


def test_probe_fraction_needs_a_classifier_and_a_bk_method():
    assert checked_probe_steps(TrainConfig(method="side", probe_fraction=0.5), "classification", 10) == 5
    with pytest.raises(ValueError, match="needs a classification task and a BK method"):
        checked_probe_steps(TrainConfig(task="snli-generation", probe_fraction=0.5), "generation", 10)
    with pytest.raises(ValueError, match="needs a classification task and a BK method"):
        checked_probe_steps(TrainConfig(method="zo", probe_fraction=0.5), "classification", 10)
