"""The randomness a DP guarantee rests on: which examples each Poisson batch holds, and the Gaussian noise.

Both must be unknown to everyone but the site. Anything derived from a public value (the run's `seed`,
written into summary.json and the Flower run config) is not: who knows the seed knows the batches, so
amplification by subsampling no longer holds, and noise drawn from a known seed can be subtracted again.
So every generator here starts from the operating system's entropy, with far more than 64 bits of it:

- CPU: torch's Mersenne Twister keeps only 32 bits of a `manual_seed` (seeds s and s + 2**32 draw the
  same numbers), so the generator's whole 624-word state is filled from `os.urandom` instead.
- CUDA: the Philox generator's key is the full 64-bit seed, drawn with `secrets`.

`secure=True` goes further, as Opacus's `secure_mode` does: the numbers come from the kernel's
cryptographically secure generator (`os.urandom`), and each Gaussian is the sum of 4 draws divided by 2,
so that the floating-point attack on Gaussian samplers (Mironov 2012; Holohan & Braghin 2021, Sec. 5.1,
with n = 2) does not apply. It is much slower (BENCHMARKS.md, "Secure mode").

`seed=` fixes the stream and so BREAKS PRIVACY: it exists for tests and debugging only.
"""

from __future__ import annotations

import math
import os
import secrets
from concurrent.futures import ThreadPoolExecutor
from functools import cache

import numpy as np
import torch

from dpmemarc_core.privacy.settings import check_count

# torch's CPU generator state (`CPUGeneratorImplStateLegacy`): a 24-byte header, then the Mersenne Twister's
# 624 words, one per 8-byte slot of which the generator reads the low 32 bits, then the normal-sample cache.
_MT_STATE_BYTES = 5056
_MT_WORDS_OFFSET, _MT_WORDS = 24, 624
# CPU noise is drawn by NOISE_STREAMS generators in parallel threads: torch's CPU normal_ runs on one thread,
# which made noise a large share of a full fine-tuning step (BENCHMARKS.md, "Step time (CPU)").
# Fixed, not the machine's thread count, so that a seeded test stream draws the same numbers everywhere.
# Each stream works through its share of a tensor in NOISE_CHUNK pieces via one small buffer: no
# tensor-sized noise buffer is allocated (fresh large buffers cost page faults as well as memory).
NOISE_STREAMS = 4
NOISE_CHUNK = 1 << 18
# Holohan & Braghin's defence sums 2n Gaussian draws and rescales by 1/sqrt(2n); Opacus uses n = 2.
_SECURE_DRAWS = 4


def entropy_generator(device: torch.device | str) -> torch.Generator:
    """A torch generator on `device` whose whole state comes from OS entropy (see the module docstring)."""
    device = torch.device(device)
    generator = torch.Generator(device)
    if device.type != "cpu":
        return generator.manual_seed(secrets.randbits(64))
    state = bytearray(generator.get_state().numpy().tobytes())
    if len(state) != _MT_STATE_BYTES:  # a torch whose generator layout changed: refuse rather than under-seed
        raise RuntimeError(f"torch's CPU generator state is {len(state)} bytes, expected {_MT_STATE_BYTES}; "
                           "cannot fill it from OS entropy")
    end = _MT_WORDS_OFFSET + 8 * _MT_WORDS
    state[_MT_WORDS_OFFSET:end] = os.urandom(end - _MT_WORDS_OFFSET)
    generator.set_state(torch.frombuffer(state, dtype=torch.uint8).clone())
    return generator


class PrivateRandomness:
    """Uniforms for Poisson sampling and standard normals for noise, from OS entropy unless `seed` is given.

    `device` is where the normals are drawn (the gradients' device); uniforms are always drawn on the CPU,
    where the sampler needs them. On the meta device (memory simulation) normals are shape-only.
    """

    def __init__(self, device: torch.device | str = "cpu", seed: int | None = None, secure: bool = False) -> None:
        self.device = torch.device(device)
        self.secure = bool(secure)
        if self.secure and seed is not None:
            raise ValueError("seed must be None in secure mode: a seeded stream is not secure")
        self._cpu: torch.Generator | None = None
        self._device: torch.Generator | None = None
        self._noise_streams: list[torch.Generator] = []
        if self.secure:
            return
        if seed is None:
            self._cpu = entropy_generator("cpu")
            self._noise_streams = [entropy_generator("cpu") for _ in range(NOISE_STREAMS)]
            if self.device.type not in ("cpu", "meta"):
                self._device = entropy_generator(self.device)
        else:
            seed = check_count(seed, "seed", minimum=0)
            self._cpu = torch.Generator("cpu").manual_seed(seed)
            self._noise_streams = [torch.Generator("cpu").manual_seed(seed * NOISE_STREAMS + k + 1)
                                   for k in range(NOISE_STREAMS)]
            if self.device.type not in ("cpu", "meta"):
                self._device = torch.Generator(self.device).manual_seed(seed)

    def uniform(self, n: int) -> torch.Tensor:
        """n independent uniforms in [0, 1) on the CPU (float64 in secure mode, float32 otherwise)."""
        if self.secure:
            return torch.from_numpy(_secure_uniform(n))
        return torch.rand(n, generator=self._cpu)

    def normal(self, shape: torch.Size | tuple[int, ...], dtype: torch.dtype,
               device: torch.device | str | None = None) -> torch.Tensor:
        """Standard normal draws of `shape` on `device` (default: this object's device)."""
        device = self.device if device is None else torch.device(device)
        if device.type == "meta":
            return torch.empty(shape, dtype=dtype, device=device)
        if self.secure:
            draws = sum(_secure_normal(int(np.prod(shape, dtype=np.int64))) for _ in range(_SECURE_DRAWS))
            draws /= np.sqrt(_SECURE_DRAWS)
            return torch.from_numpy(draws).reshape(shape).to(device=device, dtype=dtype)
        generator = self._cpu if device.type == "cpu" else self._device
        return torch.randn(shape, generator=generator, dtype=dtype, device=device)

    def add_normal_(self, tensor: torch.Tensor, std: float) -> torch.Tensor:
        """`tensor += std · N(0, I)`, in place; returns `tensor`.

        On the CPU the draws come from the noise streams in parallel (module constants); elsewhere, and in
        secure mode, from `normal` (on the meta device that is the tensor-sized buffer a GPU would hold).
        """
        if tensor.device.type != "cpu" or self.secure or not tensor.is_contiguous():
            return tensor.add_(self.normal(tensor.shape, tensor.dtype, tensor.device), alpha=std)
        flat = tensor.view(-1)
        chunks = math.ceil(flat.numel() / NOISE_CHUNK)
        shares = [range(k * chunks // NOISE_STREAMS, (k + 1) * chunks // NOISE_STREAMS)
                  for k in range(NOISE_STREAMS)]
        workers = min(NOISE_STREAMS, torch.get_num_threads())
        if chunks <= 1 or workers == 1:  # the same streams and pieces, one after the other
            for share, stream in zip(shares, self._noise_streams):
                _add_normal_chunks(flat, share, stream, std)
            return tensor
        futures = [_noise_pool(workers).submit(_add_normal_chunks, flat, share, stream, std)
                   for share, stream in zip(shares, self._noise_streams)]
        for future in futures:
            future.result()
        return tensor


@cache
def _noise_pool(workers: int) -> ThreadPoolExecutor:
    # torch ops release the GIL, so plain threads draw in parallel; as many as torch may use (its threads).
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dpmemarc-noise")


def _add_normal_chunks(flat: torch.Tensor, share: range, stream: torch.Generator, std: float) -> None:
    """Add std·N(0, 1) to the NOISE_CHUNK pieces `share` of `flat`, drawn in order from `stream`."""
    if not share:
        return
    buffer = torch.empty(min(NOISE_CHUNK, flat.numel()), dtype=flat.dtype)
    for i in share:
        piece = flat[i * NOISE_CHUNK:(i + 1) * NOISE_CHUNK]
        draws = buffer[:piece.numel()]
        piece.add_(draws.normal_(0.0, std, generator=stream))


def _secure_uniform(n: int) -> np.ndarray:
    """n uniforms in (0, 1) with 53 random bits each, from the kernel's CSPRNG; never exactly 0 (log-safe)."""
    words = np.frombuffer(os.urandom(8 * n), dtype=np.uint64) >> np.uint64(11)
    return (words.astype(np.float64) + 0.5) * 2.0 ** -53


def _secure_normal(n: int) -> np.ndarray:
    """n standard normals by Box-Muller from CSPRNG uniforms (float64)."""
    pairs = (n + 1) // 2
    radius = np.sqrt(-2.0 * np.log(_secure_uniform(pairs)))
    angle = 2.0 * np.pi * _secure_uniform(pairs)
    return np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:n]
