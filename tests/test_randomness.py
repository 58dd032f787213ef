"""The secret streams behind batches and noise: OS entropy with far more than 32 bits, a test seed that
reproduces, and secure mode (CSPRNG, sum of 4 Gaussians) with the right distribution."""

import math

import pytest
import torch

from dpmemarc_core.privacy.randomness import PrivateRandomness, entropy_generator


def test_torch_keeps_only_32_bits_of_a_seed_so_seeding_is_not_enough():
    # Why `entropy_generator` fills the whole state: with manual_seed, s and s + 2**32 draw the same numbers.
    a = torch.randn(8, generator=torch.Generator().manual_seed(12345))
    b = torch.randn(8, generator=torch.Generator().manual_seed(12345 + 2**32))
    assert torch.equal(a, b)


def test_entropy_generators_fill_the_whole_twister_state():
    states = [entropy_generator("cpu").get_state()[24:24 + 8 * 624] for _ in range(2)]
    words = [s.view(torch.int64) & 0xFFFFFFFF for s in states]  # the generator reads each slot's low 32 bits
    assert not torch.equal(words[0], words[1])
    # Far more than 32 bits of entropy: the 624 words are (almost) all distinct and not a seed's expansion.
    assert len(set(words[0].tolist())) > 600
    draws = [torch.randn(1000, generator=entropy_generator("cpu")) for _ in range(2)]
    assert not torch.equal(*draws)
    assert abs(float(draws[0].std()) - 1) < 0.1


def test_a_test_seed_reproduces_and_no_seed_never_repeats():
    assert torch.equal(PrivateRandomness(seed=3).uniform(50), PrivateRandomness(seed=3).uniform(50))
    assert not torch.equal(PrivateRandomness().uniform(50), PrivateRandomness().uniform(50))
    assert not torch.equal(PrivateRandomness().normal((50,), torch.float32), PrivateRandomness().normal((50,), torch.float32))


def test_secure_mode_draws_standard_normals_and_uniforms():
    rng = PrivateRandomness(secure=True)
    z = rng.normal((200_000,), torch.float64)
    assert z.dtype == torch.float64
    assert abs(float(z.mean())) < 5 / math.sqrt(z.numel())
    assert float(z.std()) == pytest.approx(1.0, abs=0.01)
    # Tails of a standard normal: P(|z| > 2) = 0.0455.
    assert float((z.abs() > 2).double().mean()) == pytest.approx(0.0455, abs=0.003)
    u = rng.uniform(100_000)
    assert 0 < float(u.min()) and float(u.max()) < 1
    assert float(u.mean()) == pytest.approx(0.5, abs=0.005)
    assert not torch.equal(rng.normal((4, 3), torch.float32), rng.normal((4, 3), torch.float32))


def test_secure_mode_cannot_be_seeded_and_meta_is_shape_only():
    with pytest.raises(ValueError, match="seed must be None in secure mode"):
        PrivateRandomness(seed=1, secure=True)
    out = PrivateRandomness("meta").normal((3, 2), torch.bfloat16)
    assert out.device.type == "meta" and out.shape == (3, 2) and out.dtype == torch.bfloat16


def test_secure_mode_runs_through_the_trainer():
    from dpmemarc_core.privacy import PrivacySettings
    from dpmemarc_core.training.bk import PrivateTrainer
    model = torch.nn.Linear(3, 2)
    examples = [{"x": torch.randn(3), "labels": torch.tensor(i % 2)} for i in range(16)]

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = model

        def forward(self, x):
            return type("Out", (), {"logits": self.linear(x)})()

    collate = lambda rows: {"x": torch.stack([r["x"] for r in rows]), "labels": torch.stack([r["labels"] for r in rows])}  # noqa: E731
    privacy = PrivacySettings(delta=1e-3, secure_mode=True)
    trainer = PrivateTrainer(Wrapped(), examples, collate, privacy, sample_rate=0.5, noise_multiplier=1.0)
    assert trainer.sampling.secure and trainer.noise.secure
    before = model.weight.detach().clone()
    trainer.run(2, progress=False)
    assert trainer.accountant.steps == 2 and not torch.equal(before, model.weight)
    with pytest.raises(ValueError, match="seed must be None in secure mode"):
        PrivateTrainer(Wrapped(), examples, collate, privacy, sample_rate=0.5, noise_multiplier=1.0, noise_seed=1)


@pytest.mark.parametrize("threads", [1, 2])
def test_parallel_cpu_noise_is_one_seeded_stream_whatever_the_thread_count(threads):
    from dpmemarc_core.privacy.randomness import NOISE_CHUNK
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        reference = PrivateRandomness(seed=5).add_normal_(torch.zeros(5 * NOISE_CHUNK + 3), 0.5)
        torch.set_num_threads(threads)
        again = PrivateRandomness(seed=5).add_normal_(torch.zeros(5 * NOISE_CHUNK + 3), 0.5)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(reference, again)
    assert float(reference.std()) == pytest.approx(0.5, rel=0.01)
    assert abs(float(reference.mean())) < 5 * 0.5 / math.sqrt(reference.numel())
    # Every piece is drawn (no chunk left at zero) and the pieces are not copies of each other.
    pieces = reference[:5 * NOISE_CHUNK].view(5, NOISE_CHUNK)
    assert bool((pieces != 0).all())
    assert len({round(float(p.std()), 6) for p in pieces}) == 5
    assert not torch.equal(pieces[0], pieces[1])


def test_noise_adds_to_what_is_there_and_entropy_streams_differ():
    base = torch.arange(10.0)
    noisy = PrivateRandomness(seed=1).add_normal_(base.clone(), 1e-3)
    assert torch.allclose(noisy, base, atol=0.01) and not torch.equal(noisy, base)
    big = 3 * 2**18
    assert not torch.equal(PrivateRandomness().add_normal_(torch.zeros(big), 1.0),
                           PrivateRandomness().add_normal_(torch.zeros(big), 1.0))
    meta = PrivateRandomness("meta").add_normal_(torch.empty(4, device="meta"), 1.0)
    assert meta.device.type == "meta"
