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

import os
import secrets

import numpy as np
import torch

from dpmemarc_core.privacy.settings import check_count

# torch's CPU generator state (`CPUGeneratorImplStateLegacy`): a 24-byte header, then the Mersenne Twister's
# 624 words, one per 8-byte slot of which the generator reads the low 32 bits, then the normal-sample cache.
_MT_STATE_BYTES = 5056
_MT_WORDS_OFFSET, _MT_WORDS = 24, 624
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
        if self.secure:
            return
        if seed is None:
            self._cpu = entropy_generator("cpu")
            if self.device.type not in ("cpu", "meta"):
                self._device = entropy_generator(self.device)
        else:
            seed = check_count(seed, "seed", minimum=0)
            self._cpu = torch.Generator("cpu").manual_seed(seed)
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
