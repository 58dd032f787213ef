"""Validation of privacy parameters, and the privacy settings of one training run.

Every check returns the value as a plain Python number and raises a ValueError
that names the field and the accepted range, so a bad value is caught where it
enters (CLI, run config, Flower message) rather than deep inside the accountant.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

CLIPPING_MODES = ("mixed", "ghost", "instantiate")
CLIP_FNS = ("abadi", "automatic")
ACCOUNTANTS = ("rdp", "prv")


def _as_float(value: object, name: str) -> float:
    # bool is a numbers.Real; a True where a float belongs is always a bug.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{name} must be a number, got nan")
    return value


def check_epsilon(value: object, name: str = "epsilon", allow_inf: bool = False) -> float:
    """ε: finite and > 0; math.inf (non-private) only when the caller allows it."""
    value = _as_float(value, name)
    if value == math.inf and allow_inf:
        return value
    accepted = "0 < value <= inf (inf = non-private)" if allow_inf else "0 < value < inf"
    if not (0.0 < value < math.inf):
        raise ValueError(f"{name} must satisfy {accepted}, got {value!r}")
    return value


def check_delta(value: object, name: str = "delta") -> float:
    """δ: 0 < δ < 1."""
    value = _as_float(value, name)
    if not (0.0 < value < 1.0):
        raise ValueError(f"{name} must satisfy 0 < value < 1, got {value!r}")
    return value


def check_sample_rate(value: object, name: str = "sample_rate") -> float:
    """Poisson sampling rate q: 0 < q <= 1."""
    value = _as_float(value, name)
    if not (0.0 < value <= 1.0):
        raise ValueError(f"{name} must satisfy 0 < value <= 1, got {value!r}")
    return value


def check_noise_multiplier(value: object, name: str = "noise_multiplier") -> float:
    """σ (noise std / clipping norm): finite and >= 0; 0 means no privacy."""
    value = _as_float(value, name)
    if not (0.0 <= value < math.inf):
        raise ValueError(f"{name} must satisfy 0 <= value < inf, got {value!r}")
    return value


def check_max_grad_norm(value: object, name: str = "max_grad_norm") -> float:
    """Clipping norm C: finite and > 0."""
    value = _as_float(value, name)
    if not (0.0 < value < math.inf):
        raise ValueError(f"{name} must satisfy 0 < value < inf, got {value!r}")
    return value


def check_count(value: object, name: str, minimum: int = 0) -> int:
    """An integer count (steps, examples) >= minimum."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_choice(value: object, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


@dataclass(frozen=True)
class PrivacySettings:
    """What a site asks of one private run: the budget and how gradients are clipped.

    target_epsilon = math.inf means non-private training (clipping without noise).
    delta = None means the paper's default δ = 1/N, N = number of training examples.
    """

    target_epsilon: float = 8.0
    delta: float | None = None
    max_grad_norm: float = 1.0
    clipping_mode: str = "mixed"
    clip_fn: str = "abadi"
    accountant: str = "rdp"

    def __post_init__(self) -> None:
        # Frozen: normalise ints to floats through object.__setattr__.
        object.__setattr__(
            self, "target_epsilon", check_epsilon(self.target_epsilon, "target_epsilon", allow_inf=True)
        )
        if self.delta is not None:
            object.__setattr__(self, "delta", check_delta(self.delta, "delta"))
        object.__setattr__(self, "max_grad_norm", check_max_grad_norm(self.max_grad_norm, "max_grad_norm"))
        check_choice(self.clipping_mode, "clipping_mode", CLIPPING_MODES)
        check_choice(self.clip_fn, "clip_fn", CLIP_FNS)
        check_choice(self.accountant, "accountant", ACCOUNTANTS)

    @property
    def is_private(self) -> bool:
        return self.target_epsilon != math.inf

    def resolved_delta(self, num_examples: int) -> float:
        """δ as set, or 1/N (the paper's choice) when unset."""
        if self.delta is not None:
            return self.delta
        # N = 1 would give δ = 1, which promises nothing; ask for an explicit δ instead.
        num_examples = check_count(num_examples, "num_examples", minimum=1)
        if num_examples < 2:
            raise ValueError(
                "num_examples must be >= 2 for the default delta = 1/num_examples "
                f"(delta must be < 1), got {num_examples}; set delta explicitly"
            )
        return 1.0 / num_examples
