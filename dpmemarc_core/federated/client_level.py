"""Client-level DP of a federated run: what the server's noisy aggregation spends per round, and its budget.

With client-level DP the server clips each site's update to C and adds Gaussian noise of std σ·C/m to the
mean of the round's n ≥ m updates (m = min-valid-replies): on the sum of the clipped updates that is noise
σ·C·n/m ≥ σ·C against a sensitivity of C (one site added or removed), so each aggregated round is accounted
as one release of the Gaussian mechanism with noise multiplier σ (as DP-FedAvg, McMahan et al. 2018, with
the mean's denominator treated as fixed). Site sampling is not credited (sample rate 1): Flower samples a
fixed number of sites without replacement, which the Poisson analysis does not cover, so the bound is
conservative. A round whose aggregation was skipped released nothing and costs nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from dpmemarc_core.privacy import PrivacyAccountant

# The budget's slack absorbs float noise only (ε is recomputed from the history every round).
BUDGET_SLACK = 1e-9


@dataclass
class ClientLevelBudget:
    """The client-level accountant of one run. ``target_epsilon`` inf: account, never stop."""

    noise_multiplier: float
    delta: float
    target_epsilon: float = math.inf
    kind: str = "rdp"
    rounds: int = 0
    accountant: PrivacyAccountant = field(init=False)

    def __post_init__(self) -> None:
        if not 0 < self.delta < 1:
            raise ValueError(f"client-dp-delta must satisfy 0 < value < 1, got {self.delta!r}")
        if not self.target_epsilon > 0:
            raise ValueError(f"client-dp-target-epsilon must be > 0 (or 0 in the run config: no budget), "
                             f"got {self.target_epsilon!r}")
        self.accountant = PrivacyAccountant(self.kind)
        if self.rounds:
            self.accountant.step(self.noise_multiplier, 1.0, self.rounds)

    @property
    def epsilon(self) -> float:
        return self.accountant.get_epsilon(self.delta)

    def epsilon_after_next_round(self) -> float:
        return self.accountant.epsilon_if(self.noise_multiplier, 1.0, 1, self.delta)

    def allows_another_round(self) -> bool:
        return self.epsilon_after_next_round() <= self.target_epsilon * (1 + BUDGET_SLACK)

    def record_round(self) -> None:
        """One aggregated (noised) round."""
        self.accountant.step(self.noise_multiplier, 1.0)
        self.rounds += 1

    def record(self) -> dict:
        """The metrics.jsonl entry: enough to resume the accountant (``rounds``) and to state the guarantee."""
        return {"epsilon": self.epsilon, "delta": self.delta, "noise-multiplier": self.noise_multiplier,
                "rounds": self.rounds, "target-epsilon": self.target_epsilon, "accountant": self.kind,
                "sample-rate": 1.0}
