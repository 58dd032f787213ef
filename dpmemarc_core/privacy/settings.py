"""Validation of privacy parameters, and the privacy settings of one training run.

Every check returns the value as a plain Python number and raises a ValueError
that names the field and the accepted range, so a bad value is caught where it
enters (CLI, run config, Flower message) rather than deep inside the accountant.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from dpmemarc_core.privacy.clip import CLIP_FNS, CLIP_GROUPS, CLIPPING_MODES

ACCOUNTANTS = ("rdp", "prv")
# δ as a rule of the number N of training examples. δ must be well below 1/N (a mechanism that publishes one
# random example whole is (0, 1/N)-DP), so the default is 1/(10N); "1/N" is the paper's choice.
DELTA_RULES = {"1/(10N)": 0.1, "1/N": 1.0}
DEFAULT_DELTA_RULE = "1/(10N)"


def _as_float(value: object, name: str) -> float:
    # bool is a numbers.Real; a True where a float belongs is always a bug.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{name} must be a number, got nan")
    return value


def check_real(value: object, name: str, low: float = -math.inf, high: float = math.inf, ends: str = "[]") -> float:
    """A real number between `low` and `high`; `ends` says which bounds belong to the range: "[]" both, "()"
    neither, "[)" or "(]" one (so "(0, inf)" with `ends="()"` is "finite and > 0")."""
    value = _as_float(value, name)
    above = value >= low if ends[0] == "[" else value > low
    below = value <= high if ends[1] == "]" else value < high
    if not (above and below):
        accepted = f"{low:g} {'<=' if ends[0] == '[' else '<'} value {'<=' if ends[1] == ']' else '<'} {high:g}"
        raise ValueError(f"{name} must satisfy {accepted}, got {value!r}")
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
    return check_real(value, name, 0, 1, "()")


def check_sample_rate(value: object, name: str = "sample_rate") -> float:
    """Poisson sampling rate q: 0 < q <= 1."""
    return check_real(value, name, 0, 1, "(]")


def check_noise_multiplier(value: object, name: str = "noise_multiplier") -> float:
    """σ (noise std / clipping norm): finite and >= 0; 0 means no privacy."""
    return check_real(value, name, 0, math.inf, "[)")


def check_max_grad_norm(value: object, name: str = "max_grad_norm") -> float:
    """Clipping norm C: finite and > 0."""
    return check_real(value, name, 0, math.inf, "()")


def check_count(value: object, name: str, minimum: int = 0, maximum: int | None = None) -> int:
    """An integer count (steps, examples, sizes) >= minimum, and <= maximum when one is given."""
    accepted = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum \
            or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be an integer {accepted}, got {value!r}")
    return int(value)


def check_bool(value: object, name: str) -> bool:
    """True or False (not 1, 0 or a string)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def check_choice(value: object, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


@dataclass(frozen=True)
class PrivacySettings:
    """What a site asks of one private run: the budget and how gradients are clipped.

    target_epsilon = math.inf means non-private training (clipping without noise).
    delta is a number in (0, 1) or a rule of the number N of training examples (`DELTA_RULES`);
    None is the default rule δ = 1/(10N), strictly below 1/N.
    secure_mode draws batches and noise from a CSPRNG, robust to the floating-point attack
    (`privacy.randomness`); slower.
    clip_groups (`clip.CLIP_GROUPS`): "head" clips a classifier head and the rest of the trainable part
    separately, each to C/√2 (the same sensitivity C, so the same noise and ε).
    """

    target_epsilon: float = 8.0
    delta: float | str | None = None
    max_grad_norm: float = 1.0
    clipping_mode: str = "mixed"
    clip_fn: str = "abadi"
    accountant: str = "rdp"
    secure_mode: bool = False
    clip_groups: str = "all"

    def __post_init__(self) -> None:
        # Frozen: normalise ints to floats through object.__setattr__.
        object.__setattr__(
            self, "target_epsilon", check_epsilon(self.target_epsilon, "target_epsilon", allow_inf=True)
        )
        if isinstance(self.delta, str):
            check_choice(self.delta, "delta", tuple(DELTA_RULES))
        elif self.delta is not None:
            object.__setattr__(self, "delta", check_delta(self.delta, "delta"))
        check_bool(self.secure_mode, "secure_mode")
        object.__setattr__(self, "max_grad_norm", check_max_grad_norm(self.max_grad_norm, "max_grad_norm"))
        check_choice(self.clipping_mode, "clipping_mode", CLIPPING_MODES)
        check_choice(self.clip_fn, "clip_fn", CLIP_FNS)
        check_choice(self.clip_groups, "clip_groups", CLIP_GROUPS)
        check_choice(self.accountant, "accountant", ACCOUNTANTS)

    @property
    def is_private(self) -> bool:
        return self.target_epsilon != math.inf

    def resolved_delta(self, num_examples: int) -> float:
        """δ as set, or its rule applied to N (default 1/(10N))."""
        if isinstance(self.delta, float):
            return self.delta
        rule = self.delta or DEFAULT_DELTA_RULE
        # N = 1 under "1/N" would give δ = 1, which promises nothing; ask for an explicit δ instead.
        num_examples = check_count(num_examples, "num_examples", minimum=1)
        delta = DELTA_RULES[rule] / num_examples
        if delta >= 1:
            raise ValueError(f"num_examples must be >= 2 for delta = {rule} (delta must be < 1), got "
                             f"{num_examples}; set delta explicitly")
        return delta
