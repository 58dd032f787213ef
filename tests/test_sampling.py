"""Poisson sampling: batch sizes follow Binomial(N, q), empty batches are yielded, a test seed reproduces,
and without one (every real run) the batches come from OS entropy."""

import math

import pytest

from dpmemarc_core.privacy.randomness import PrivateRandomness
from dpmemarc_core.privacy.sampling import PoissonBatchSampler


def seeded(seed: int) -> PrivateRandomness:
    return PrivateRandomness("cpu", seed=seed)  # breaks privacy: tests only


def test_batch_sizes_follow_binomial():
    n, q, steps = 1000, 0.05, 400
    sampler = PoissonBatchSampler(n, q, steps, randomness=seeded(0))
    sizes = [len(batch) for batch in sampler]
    mean = sum(sizes) / steps
    variance = sum((s - mean) ** 2 for s in sizes) / (steps - 1)
    binomial_variance = n * q * (1 - q)
    assert sampler.expected_batch_size == pytest.approx(n * q)
    # 5 standard errors of the mean; the sample variance has ~7 % relative error here.
    assert abs(mean - n * q) < 5 * math.sqrt(binomial_variance / steps)
    assert variance == pytest.approx(binomial_variance, rel=0.3)


def test_every_example_is_sampled_at_rate_q():
    n, q, steps = 20, 0.3, 500
    counts = [0] * n
    for batch in PoissonBatchSampler(n, q, steps, randomness=seeded(1)):
        for index in batch:
            counts[index] += 1
    standard_error = math.sqrt(steps * q * (1 - q))
    assert all(abs(c - steps * q) < 5 * standard_error for c in counts)


def test_empty_batches_are_yielded():
    n, q, steps = 10, 0.01, 300
    batches = list(PoissonBatchSampler(n, q, steps, randomness=seeded(2)))
    assert len(batches) == steps
    empty = sum(1 for batch in batches if batch == [])
    p_empty = (1 - q) ** n
    assert abs(empty - steps * p_empty) < 5 * math.sqrt(steps * p_empty * (1 - p_empty))
    assert empty < steps  # some batches were not empty either


def test_indices_are_unique_sorted_and_in_range():
    n = 37
    for batch in PoissonBatchSampler(n, 0.4, 50, randomness=seeded(3)):
        assert batch == sorted(set(batch))
        assert all(isinstance(i, int) and 0 <= i < n for i in batch)


def test_rate_one_takes_everything():
    assert list(PoissonBatchSampler(5, 1.0, 3, randomness=seeded(4))) == [list(range(5))] * 3


def test_seed_reproduces_and_stream_continues():
    first = list(PoissonBatchSampler(100, 0.1, 20, randomness=seeded(5)))
    assert list(PoissonBatchSampler(100, 0.1, 20, randomness=seeded(5))) == first
    assert list(PoissonBatchSampler(100, 0.1, 20, randomness=seeded(6))) != first

    sampler = PoissonBatchSampler(100, 0.1, 20, randomness=seeded(5))
    assert list(sampler) == first
    # A second pass draws new batches: repeating the first pass would break independence.
    assert list(sampler) != first


def test_without_a_seed_two_samplers_draw_different_batches():
    assert list(PoissonBatchSampler(1000, 0.1, 5)) != list(PoissonBatchSampler(1000, 0.1, 5))


def test_len_is_steps():
    assert len(PoissonBatchSampler(10, 0.5, 7)) == 7
    assert list(PoissonBatchSampler(10, 0.5, 0)) == []


@pytest.mark.parametrize(
    "args,field",
    [
        ((0, 0.1, 5), "num_examples"),
        ((10, 0.0, 5), "sample_rate"),
        ((10, 1.2, 5), "sample_rate"),
        ((10, float("nan"), 5), "sample_rate"),
        ((10, 0.1, -1), "steps"),
        ((10, 0.1, 2.0), "steps"),
    ],
)
def test_rejects_bad_input(args, field):
    with pytest.raises(ValueError, match=field):
        PoissonBatchSampler(*args)
