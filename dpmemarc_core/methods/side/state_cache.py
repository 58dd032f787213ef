"""A cache of the frozen backbone's states for `side` training over several epochs.

The backbone of a side-tuned model is frozen and runs under no_grad, so an example's layer outputs are the
same every time it is drawn; on the offline MiniLM + movie snippets that forward is most of a side step
(benchmarks/side_backbone_share.py). The cache keeps, per distinct input, the states of its real tokens
(right padding: the first `length` positions) on the CPU and rebuilds a batch from them, with zeros at padded
positions: those are masked out of the side network's attention and of pooling, so nothing reads them. The
rebuilt states equal the computed ones up to float summation order (a batch's shape changes BLAS blocking).

Nothing leaves the process: the cache lives in the training run's memory and is dropped when it ends.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from dpmemarc_core.host_memory import available_ram_bytes

Row = tuple[torch.Tensor, torch.Tensor]
# Enough for ~9.5k MiniLM examples of 48 tokens in fp32; past it, new inputs are computed and not stored.
DEFAULT_MAX_BYTES = 6 * 2**30


class BackboneStateCache:
    """States of the backbone's layers and final hidden state per input (keyed by its real tokens)."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_bytes < 0:
            raise ValueError(f"side state cache: max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._rows: dict[bytes, Row] = {}

    @staticmethod
    def lengths(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """Each row's real length when the batch is right-padded ([B]); None when it is not (left padding)."""
        length = input_ids.shape[1]
        if attention_mask is None:
            return torch.full((input_ids.shape[0],), length, dtype=torch.long)
        mask = attention_mask.to("cpu", torch.long)
        real = mask.sum(1)
        if not torch.equal(mask, (torch.arange(length) < real[:, None]).long()):
            return None
        return real

    @staticmethod
    def keys(lengths: torch.Tensor, inputs: list[torch.Tensor]) -> list[bytes]:
        """One key per row: the bytes of every [B, T] input (ids, token types) over the row's real tokens."""
        cpu = [t.to("cpu") for t in inputs]
        return [b"".join(t[row, :n].numpy().tobytes() + b"|" for t in cpu)
                for row, n in enumerate(lengths.tolist())]

    def rows(self, keys: list[bytes]) -> list[Row | None]:
        """The cached (states [L+1, n, d], final hidden [n, d]) of each key, None where not cached."""
        found = [self._rows.get(key) for key in keys]
        hits = sum(row is not None for row in found)
        self.hits += hits
        self.misses += len(found) - hits
        return found

    def store(self, keys: list[bytes], lengths: torch.Tensor, states: list[torch.Tensor],
              last_hidden: torch.Tensor) -> list[Row]:
        """Each row's real part of a computed batch, kept while the cache has room; returned either way."""
        stacked = torch.stack(states).to("cpu")
        last = last_hidden.to("cpu")
        rows = []
        for i, (key, n) in enumerate(zip(keys, lengths.tolist())):
            # clone: a slice would keep the whole batch's storage alive
            row = (stacked[:, i, :n].clone(), last[i, :n].clone())
            size = sum(t.numel() * t.element_size() for t in row)
            if key not in self._rows and self.bytes + size <= self.max_bytes:
                self._rows[key] = row
                self.bytes += size
            rows.append(row)
        return rows


def assemble(rows: list[Row], padded: int, device: torch.device) -> tuple[list[torch.Tensor], torch.Tensor]:
    """A batch's states [(B, padded, d) per layer] and final hidden state from its rows, zeros where padded."""
    layers, width = rows[0][0].shape[0], rows[0][0].shape[-1]
    states = torch.zeros(layers, len(rows), padded, width, dtype=rows[0][0].dtype)
    last = torch.zeros(len(rows), padded, rows[0][1].shape[-1], dtype=rows[0][1].dtype)
    for i, (row_states, row_last) in enumerate(rows):
        n = row_states.shape[1]
        states[:, i, :n] = row_states
        last[i, :n] = row_last
    return list(states.to(device).unbind(0)), last.to(device)


def default_max_bytes() -> int:
    """DEFAULT_MAX_BYTES, or a quarter of the RAM available now where that is less (the rest is the run's)."""
    return min(DEFAULT_MAX_BYTES, available_ram_bytes() // 4)


@contextmanager
def cached_backbone_states(model: torch.nn.Module, max_bytes: int | None = None) -> Iterator[
        BackboneStateCache | None]:
    """Within the block, a side-tuned `model` reuses its backbone's states for inputs it has seen; any other
    model is left alone (yields None). `max_bytes` None: `default_max_bytes()`. The cache is dropped on exit."""
    if not hasattr(model, "state_cache"):
        yield None
        return
    cache = BackboneStateCache(default_max_bytes() if max_bytes is None else max_bytes)
    model.state_cache = cache
    try:
        yield cache
    finally:
        model.state_cache = None
