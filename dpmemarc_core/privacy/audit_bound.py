"""The ε lower bound of a one-run privacy audit (Steinke, Nasr & Jagielski 2023, "Privacy auditing with one (1)
training run", Theorem 5.2 and their Algorithm 2).

The game: m canaries, each included in training independently with probability 1/2; the auditor guesses
"in" or "out" for r of them and abstains on the rest; v guesses are right. If training is (ε, δ)-DP with respect
to each canary, then for every v

    P[V ≥ v] ≤ P[Binomial(r, p) ≥ v] + 2mδ · max_{i = 1..v} (1/i) · P[v − i ≤ Binomial(r, p) < v],
    p = e^ε / (1 + e^ε),

p being the accuracy of ε-DP randomized response. The right side is the p-value of the observed count under
the hypothesis "the training is (ε, δ)-DP"; every ε whose p-value is below β is rejected at confidence 1 − β,
and the largest rejected ε is the audit's lower bound.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import expit
from scipy.stats import binom

from dpmemarc_core.privacy.settings import check_count, check_real

_BISECTION_STEPS = 60


def _check_counts(canaries: int, guesses: int, correct: int) -> tuple[int, int, int]:
    canaries = check_count(canaries, "canaries", minimum=1)
    guesses = check_count(guesses, "guesses", minimum=0, maximum=canaries)
    return canaries, guesses, check_count(correct, "correct", minimum=0, maximum=guesses)


def audit_p_value(canaries: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """Probability of `correct` or more right guesses out of `guesses` if training were (ε, δ)-DP.

    An upper bound on that probability, from the theorem in the module docstring; capped at 1.
    """
    m, r, v = _check_counts(canaries, guesses, correct)
    delta = check_real(delta, "delta", 0, 1, "[)")
    epsilon = check_real(epsilon, "epsilon", 0, math.inf)
    if v == 0:
        return 1.0
    p = float(expit(epsilon))
    tail = float(binom.sf(v - 1, r, p))
    # below[i - 1] = P[v - i <= Binomial(r, p) < v] for i = 1..v: the mass just under v, widened one count at a time.
    below = np.cumsum(binom.pmf(np.arange(v - 1, -1, -1), r, p))
    worst_share = float(np.max(below / np.arange(1, v + 1)))
    return min(1.0, tail + 2 * m * delta * worst_share)


def epsilon_lower_bound(canaries: int, guesses: int, correct: int, delta: float, beta: float = 0.05) -> float:
    """The largest ε that `correct` right guesses out of `guesses` reject at confidence 1 − β.

    0.0 when even ε = 0 is not rejected. Bisection keeps p-value(lo) < β <= p-value(hi), as the paper's
    Algorithm 2 does; the p-value grows with ε (a more accurate randomized response makes the count likelier).
    """
    m, r, v = _check_counts(canaries, guesses, correct)
    delta = check_real(delta, "delta", 0, 1, "[)")
    beta = check_real(beta, "beta", 0, 1, "()")
    if audit_p_value(m, r, v, 0.0, delta) >= beta:
        return 0.0
    lo, hi = 0.0, 1.0
    # Ends by ε = 64 at the latest: e^ε / (1 + e^ε) rounds to 1 from ε ≈ 37, where the p-value is 1.
    while audit_p_value(m, r, v, hi, delta) < beta:
        lo, hi = hi, 2 * hi
    for _ in range(_BISECTION_STEPS):
        mid = (lo + hi) / 2
        if audit_p_value(m, r, v, mid, delta) < beta:
            lo = mid
        else:
            hi = mid
    return lo
