"""Poisson sampling of batches, the sampling that DP-SGD's accounting assumes."""

from __future__ import annotations

from collections.abc import Iterator

from dpmemarc_core.privacy.randomness import PrivateRandomness
from dpmemarc_core.privacy.settings import check_count, check_sample_rate


class PoissonBatchSampler:
    """Yields `steps` batches of dataset indices; each example joins each batch
    independently with probability `sample_rate`.

    Batch sizes vary and a batch may be empty: it is yielded all the same,
    because the step still adds noise and counts for accounting. Use it as a
    DataLoader's `batch_sampler`. The draws come from `randomness` (by default a
    new `PrivateRandomness` from OS entropy: the batches must be secret for the
    accountant's amplification by subsampling to hold), and iterating twice
    continues the stream instead of repeating it (repeated batches would void
    the analysis).
    """

    def __init__(self, num_examples: int, sample_rate: float, steps: int,
                 randomness: PrivateRandomness | None = None) -> None:
        self.num_examples = check_count(num_examples, "num_examples", minimum=1)
        self.sample_rate = check_sample_rate(sample_rate)
        self.steps = check_count(steps, "steps", minimum=0)
        self.randomness = randomness if randomness is not None else PrivateRandomness("cpu")

    @property
    def expected_batch_size(self) -> float:
        """q·N: what the noisy gradient sum is divided by, whatever the realised size."""
        return self.sample_rate * self.num_examples

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            included = self.randomness.uniform(self.num_examples) < self.sample_rate
            yield included.nonzero().flatten().tolist()
