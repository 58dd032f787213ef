"""DPZero: the clipped estimator against a by-hand computation, in-place perturbation round trips,
reproducibility from seeds, replay of (seed, scalar) pairs, accounting, empty batches, learning."""

import copy
import math

import pytest
import torch
from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

from dpmemarc_core.losses import per_example_loss
from dpmemarc_core.privacy import PrivacySettings, epsilon
from dpmemarc_core.privacy.clip import clip_scalars
from dpmemarc_core.training.bk import PrivateTrainer
from dpmemarc_core.training.loop import StepStats
from dpmemarc_core.training.zo import ZOTrainer, apply_zo_updates
from dpmemarc_core.training.zo_directions import perturb_

DELTA = 1e-3


def tiny_classifier(dtype: torch.dtype = torch.float32) -> GPT2ForSequenceClassification:
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=31, n_positions=16, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=0, num_labels=2)
    return GPT2ForSequenceClassification(cfg).to(dtype)


def examples(n: int = 64, length: int = 6) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 31, (n, length), generator=g)
    # Learnable: the class is whether the last token (the one the head reads) is in the upper half.
    return [{"input_ids": row, "labels": int(row[-1] > 15)} for row in ids]


def collate(batch: list[dict]) -> dict[str, torch.Tensor]:
    ids = torch.stack([b["input_ids"] for b in batch])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "labels": torch.tensor([b["labels"] for b in batch], dtype=torch.long)}


def make_trainer(model, data, sigma=0.0, q=0.25, max_grad_norm=1.0, clip_fn="abadi", **kw) -> ZOTrainer:
    privacy = PrivacySettings(target_epsilon=8.0, delta=DELTA, max_grad_norm=max_grad_norm, clip_fn=clip_fn)
    return ZOTrainer(model, data, collate, privacy, sample_rate=q, noise_multiplier=sigma, **kw)


def trainable(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters() if p.requires_grad]


def directional_derivatives(model, data, indices, seed, scale) -> torch.Tensor:
    """Reference: θ ± λz built out of place from a generator seeded by hand, losses by plain forwards."""
    g = torch.Generator().manual_seed(seed)
    z = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in model.parameters()]
    batch = collate([data[i] for i in indices])
    labels = batch.pop("labels")
    losses = []
    for sign in (1.0, -1.0):
        shifted = copy.deepcopy(model).eval()
        with torch.no_grad():
            for p, zp in zip(shifted.parameters(), z):
                p.copy_(p + sign * scale * zp)
            losses.append(per_example_loss(shifted(**batch).logits, labels))
    return (losses[0] - losses[1]) / (2 * scale)


@pytest.mark.parametrize("clip_fn", ["abadi", "automatic"])
def test_clipped_estimator_equals_direct_computation(clip_fn):
    # In float64 the in-place (θ+λz)−2λz and the reference's θ−λz differ by ~1e-16, so the d_i agree to
    # ~1e-16/λ; atol 1e-9 against d_i ~ 0.1-1.
    start, data, indices, scale = tiny_classifier(torch.float64), examples(), list(range(10)), 1e-3
    probe = make_trainer(copy.deepcopy(start), data, lr=0.0, perturbation_scale=scale)
    probe.step(indices, StepStats())
    seed = probe.history[0][0]
    d = directional_derivatives(start, data, indices, seed, scale)
    max_norm = d.abs().median().item()  # some examples clipped, some not
    if clip_fn == "abadi":
        reference = (d.sign() * d.abs().clamp(max=max_norm)).sum()
    else:
        reference = (d * max_norm / (d.abs() + 0.01)).sum()

    trainer = make_trainer(copy.deepcopy(start), data, sigma=0.0, max_grad_norm=max_norm, clip_fn=clip_fn,
                           lr=0.0, perturbation_scale=scale, physical_batch_size=3)
    stats = StepStats()
    trainer.step(indices, stats)
    assert trainer.history[0][0] == seed
    assert trainer.history[0][1] * trainer.expected_batch_size == pytest.approx(reference.item(), abs=1e-9)
    assert int(stats.clipped) == int((d.abs() > max_norm).sum()) > 0
    assert int(stats.clipped) < len(indices)
    assert clip_scalars(d, max_norm, clip_fn).abs().max() <= max_norm


@pytest.mark.parametrize("dtype, rtol, atol", [(torch.float32, 1e-6, 1e-9), (torch.float64, 1e-14, 1e-17)])
def test_perturbation_round_trip_restores_parameters(dtype, rtol, atol):
    # +λz, −2λz, +λz is three roundings away from θ: a few ulps, |Δ| <= rtol·|θ| + atol.
    model = tiny_classifier(dtype)
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    for scale in (1e-3, -2e-3, 1e-3):
        perturb_(params, 1234, scale, torch.device("cpu"))
    moved = [p.detach().clone() for p in params]
    perturb_(params, 1234, 1e-3, torch.device("cpu"))
    assert any(not torch.allclose(b, p) for b, p in zip(before, params)), "z must not be zero"
    for b, p in zip(before, moved):
        torch.testing.assert_close(p, b, rtol=rtol, atol=atol)


def test_step_touches_only_trainable_parameters_and_restores_them_at_lr_zero():
    model = tiny_classifier()
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith("bias") or name.startswith("score"))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    start = trainable(model)
    make_trainer(model, examples(), sigma=1.0, lr=0.0).run(3, progress=False)
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[n]), n
    for b, p in zip(start, trainable(model)):
        torch.testing.assert_close(p, b, rtol=1e-6, atol=1e-9)
    make_trainer(model, examples(), sigma=1.0, lr=1e-2).run(3, progress=False)
    assert all(not torch.allclose(b, p) for b, p in zip(start, trainable(model)))


def test_steps_are_reproducible_from_the_seed():
    runs = []
    for seed in (5, 5, 6):
        model = tiny_classifier()
        trainer = make_trainer(model, examples(), sigma=0.5, lr=1e-2, seed=seed, sampling_seed=seed, noise_seed=seed)
        trainer.run(4, progress=False)
        runs.append((trainable(model), trainer.history))
    (params_a, history_a), (params_b, history_b), (params_c, history_c) = runs
    assert history_a == history_b
    assert all(torch.equal(a, b) for a, b in zip(params_a, params_b))
    assert [s for s, _ in history_a] != [s for s, _ in history_c]


def test_the_public_seed_fixes_directions_but_not_batches_or_noise():
    histories = []
    for _ in range(2):
        trainer = make_trainer(tiny_classifier(), examples(), sigma=0.5, lr=1e-2, seed=5)
        trainer.run(3, progress=False)
        histories.append(trainer.history)
    assert [s for s, _ in histories[0]] == [s for s, _ in histories[1]]
    assert [g for _, g in histories[0]] != [g for _, g in histories[1]]


def test_replaying_seed_scalar_pairs_reproduces_the_trained_model():
    start = tiny_classifier()
    model = copy.deepcopy(start)
    trainer = make_trainer(model, examples(), sigma=0.5, lr=2e-2, direction_device="cpu")
    trainer.run(15, progress=False)
    pairs = trainer.history
    assert len(pairs) == 15 and all(isinstance(s, int) and isinstance(g, float) for s, g in pairs)
    replica = copy.deepcopy(start)
    apply_zo_updates(replica, pairs, trainer.lr, direction_device="cpu")
    moved = max((a - b).abs().max().item() for a, b in zip(start.parameters(), model.parameters()))
    assert moved > 1e-3
    # The trainer's perturbation round trips drift by a few ulps per step; the replay has none.
    for a, b in zip(replica.parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    trainer.reset_history()
    assert trainer.history == []
    trainer.run(2, progress=False)
    assert len(trainer.history) == 2


def test_replay_rejects_malformed_pairs():
    model = tiny_classifier()
    with pytest.raises(ValueError, match=r"pairs\[0\].seed"):
        apply_zo_updates(model, [(-1, 0.5)], 1e-3)
    with pytest.raises(ValueError, match=r"pairs\[1\].projected_grad"):
        apply_zo_updates(model, [(1, 0.5), (2, float("nan"))], 1e-3)
    with pytest.raises(ValueError, match="lr"):
        apply_zo_updates(model, [], -1.0)


def test_accounting_equals_the_dp_sgd_accountant():
    data = examples()
    zo = make_trainer(tiny_classifier(), data, sigma=1.1, q=0.25)
    zo.run(6, progress=False)
    privacy = PrivacySettings(target_epsilon=8.0, delta=DELTA, max_grad_norm=1.0)
    sgd = PrivateTrainer(tiny_classifier(), data, collate, privacy, sample_rate=0.25, noise_multiplier=1.1)
    sgd.run(6, progress=False)
    assert zo.accountant.state_dict() == sgd.accountant.state_dict()
    expected = epsilon(noise_multiplier=1.1, sample_rate=0.25, steps=6, delta=DELTA)
    assert zo.accountant.get_epsilon(DELTA) == pytest.approx(expected)
    assert sgd.accountant.get_epsilon(DELTA) == pytest.approx(expected)


def test_empty_batches_are_pure_noise_and_accounted():
    sigma, max_norm = 2.0, 0.5
    trainer = make_trainer(tiny_classifier(), examples(), sigma=sigma, max_grad_norm=max_norm, lr=0.0)
    stats = StepStats()
    for _ in range(400):
        trainer.step([], stats)
    assert trainer.accountant.steps == 400 and stats.steps == 400 and stats.examples == 0
    standardized = torch.tensor([g for _, g in trainer.history]) * trainer.expected_batch_size / (sigma * max_norm)
    assert standardized.std().item() == pytest.approx(1.0, abs=0.12)
    assert abs(standardized.mean().item()) < 0.2


def test_non_private_settings_skip_clipping_noise_and_accounting():
    model, data = tiny_classifier(), examples()
    privacy = PrivacySettings(target_epsilon=math.inf)
    trainer = ZOTrainer(model, data, collate, privacy, sample_rate=0.25, noise_multiplier=0.0, lr=0.0)
    trainer.step(list(range(10)), StepStats())
    seed, projected = trainer.history[0]
    d = directional_derivatives(tiny_classifier(), data, list(range(10)), seed, trainer.perturbation_scale)
    assert projected * trainer.expected_batch_size == pytest.approx(d.sum().item(), rel=1e-3, abs=1e-3)
    assert trainer.accountant.steps == 0


def test_small_noise_run_learns_the_task():
    trainer = make_trainer(tiny_classifier(), examples(), sigma=0.05, q=0.5, lr=3e-2)
    first = trainer.run(30, progress=False)["train_loss"]
    for _ in range(8):
        last = trainer.run(30, progress=False)
    assert last["train_loss"] < 0.8 * first


def test_a_step_runs_on_the_meta_device():
    # As the memory simulator does: a causal LM on unpadded rows with no mask, whose checks HF does on the host.
    cfg = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=31, n_positions=16)
    with torch.device("meta"):
        model = GPT2LMHeadModel(cfg)
    rows = [{"input_ids": e["input_ids"], "labels": e["input_ids"]} for e in examples()]
    privacy = PrivacySettings(target_epsilon=8.0, delta=DELTA, max_grad_norm=1.0)
    stack = lambda batch: {k: torch.stack([e[k] for e in batch]) for k in batch[0]}  # noqa: E731
    trainer = ZOTrainer(model, rows, stack, privacy, sample_rate=0.25, noise_multiplier=1.0, lr=1e-3,
                        physical_batch_size=2)
    stats = StepStats()
    trainer.step([0, 1, 2], stats)
    trainer.step([], stats)
    assert trainer.accountant.steps == 2 and stats.examples == 3
    assert all(p.device.type == "meta" for p in model.parameters())


def test_bad_settings_name_the_field():
    with pytest.raises(ValueError, match="perturbation_scale"):
        make_trainer(tiny_classifier(), examples(), perturbation_scale=0.0)
    with pytest.raises(ValueError, match="lr"):
        make_trainer(tiny_classifier(), examples(), lr=float("inf"))
    with pytest.raises(ValueError, match="physical_batch_size"):
        make_trainer(tiny_classifier(), examples(), physical_batch_size=0)
    frozen = tiny_classifier().requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad"):
        make_trainer(frozen, examples())
