"""Privacy accounting of DP-SGD/DP-Adam (Poisson-subsampled Gaussian mechanism).

The maths is Opacus's: `RDPAccountant` (Rényi DP, Mironov et al.; conversion of
Balle et al. 2020, orders `RDPAccountant.DEFAULT_ALPHAS`) and `PRVAccountant`
(numerical composition of privacy loss random variables, Gopi et al. 2021;
returns the upper bound). This module adds what a federated site needs around
them: multi-step records, a JSON-safe state that survives Flower's
`Context.state`, "what if" queries, and explicit answers where Opacus has none
(no steps, no noise).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
from opacus.accountants import IAccountant, create_accountant
from opacus.accountants.utils import MAX_SIGMA, get_noise_multiplier

from dpmemarc_core.privacy.settings import (
    ACCOUNTANTS,
    check_choice,
    check_count,
    check_delta,
    check_epsilon,
    check_noise_multiplier,
    check_sample_rate,
)


class PrivacyAccountant:
    """Tracks the ε spent by a sequence of noisy steps, possibly with changing σ and q.

    The history is a list of (noise_multiplier, sample_rate, num_steps) runs, the
    format of Opacus's accountants; consecutive steps with equal σ and q are merged.
    """

    def __init__(self, kind: str = "rdp") -> None:
        self.kind = check_choice(kind, "accountant", ACCOUNTANTS)
        self._accountant: IAccountant = create_accountant(mechanism=self.kind)

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self._accountant.history)

    def step(self, noise_multiplier: float, sample_rate: float, num_steps: int = 1) -> None:
        """Record num_steps steps of noise_multiplier σ at Poisson rate sample_rate."""
        noise_multiplier = check_noise_multiplier(noise_multiplier)
        sample_rate = check_sample_rate(sample_rate)
        num_steps = check_count(num_steps, "num_steps", minimum=0)
        if num_steps == 0:
            return
        history = self._accountant.history
        if history and history[-1][0] == noise_multiplier and history[-1][1] == sample_rate:
            history[-1] = (noise_multiplier, sample_rate, history[-1][2] + num_steps)
        else:
            history.append((noise_multiplier, sample_rate, num_steps))

    def get_epsilon(self, delta: float) -> float:
        """ε spent so far at the given δ: 0 before any step, inf once a step had no noise."""
        delta = check_delta(delta)
        history = self._accountant.history
        if not history:
            return 0.0
        if any(sigma == 0.0 for sigma, _, _ in history):
            return math.inf
        # PRV takes log(1 - q) = log(0) at q = 1 on purpose; numpy's warning is noise.
        with np.errstate(divide="ignore"):
            return float(self._accountant.get_epsilon(delta=delta))

    def epsilon_if(self, noise_multiplier: float, sample_rate: float, extra_steps: int, delta: float) -> float:
        """ε that would be spent after extra_steps more steps; this accountant is unchanged."""
        future = PrivacyAccountant.from_state_dict(self.state_dict())
        future.step(noise_multiplier, sample_rate, extra_steps)
        return future.get_epsilon(delta)

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state: the accountant kind and the step history."""
        return {
            "kind": self.kind,
            "history": [[sigma, q, n] for sigma, q, n in self._accountant.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace the history with the one in state (from state_dict, possibly via JSON)."""
        if not isinstance(state, dict) or set(state) != {"kind", "history"}:
            raise ValueError(f"accountant state must be a dict with keys 'kind' and 'history', got {state!r}")
        if state["kind"] != self.kind:
            raise ValueError(f"accountant state has kind {state['kind']!r}, this accountant is {self.kind!r}")
        history = []
        for i, entry in enumerate(state["history"]):
            if not isinstance(entry, (list, tuple)) or len(entry) != 3:
                raise ValueError(
                    f"history[{i}] must be [noise_multiplier, sample_rate, num_steps], got {entry!r}"
                )
            history.append(
                (
                    check_noise_multiplier(entry[0], f"history[{i}].noise_multiplier"),
                    check_sample_rate(entry[1], f"history[{i}].sample_rate"),
                    check_count(entry[2], f"history[{i}].num_steps", minimum=1),
                )
            )
        self._accountant.history = history

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> PrivacyAccountant:
        if not isinstance(state, dict) or "kind" not in state:
            raise ValueError(f"accountant state must be a dict with keys 'kind' and 'history', got {state!r}")
        accountant = cls(state["kind"])
        accountant.load_state_dict(state)
        return accountant


def epsilon(
    *, noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str = "rdp"
) -> float:
    """ε after `steps` steps of Poisson rate `sample_rate` with noise multiplier σ, at δ."""
    tracker = PrivacyAccountant(accountant)
    tracker.step(noise_multiplier, sample_rate, steps)
    return tracker.get_epsilon(delta)


def noise_multiplier_for(
    *, target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp"
) -> float:
    """σ whose ε after `steps` steps lies in [target_epsilon - 0.01, target_epsilon] (Opacus's search).

    target_epsilon = inf (non-private) and steps = 0 need no noise: σ = 0.
    """
    target_epsilon = check_epsilon(target_epsilon, "target_epsilon", allow_inf=True)
    delta = check_delta(delta)
    sample_rate = check_sample_rate(sample_rate)
    steps = check_count(steps, "steps", minimum=0)
    check_choice(accountant, "accountant", ACCOUNTANTS)
    if target_epsilon == math.inf or steps == 0:
        return 0.0
    # The search probes extreme σ, where Opacus warns about the RDP order range
    # and numpy about log(0); neither concerns the answer.
    with warnings.catch_warnings(), np.errstate(divide="ignore"):
        warnings.simplefilter("ignore")
        try:
            return float(
                get_noise_multiplier(
                    target_epsilon=target_epsilon,
                    target_delta=delta,
                    sample_rate=sample_rate,
                    steps=steps,
                    accountant=accountant,
                )
            )
        except ValueError as error:
            if "budget is too low" not in str(error):
                raise
            floor = epsilon(
                noise_multiplier=MAX_SIGMA, sample_rate=sample_rate, steps=steps, delta=delta, accountant=accountant
            )
    raise ValueError(
        f"target_epsilon={target_epsilon} is unreachable with the {accountant!r} accountant at "
        f"delta={delta}, sample_rate={sample_rate}, steps={steps}: even noise_multiplier={MAX_SIGMA:g} "
        f"spends epsilon={floor:.4g}; raise target_epsilon or delta, or lower sample_rate or steps"
    )
