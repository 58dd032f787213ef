"""Federated evaluation on the sites (run config ``federated-eval``, off by default), inside each site's guarantee.

A site counts the global model's correct predictions on its held-out rows and releases that count plus
Gaussian noise of std σ_eval (``site-eval-noise-multiplier``; adding or removing one row changes the count by
at most 1), each release accounted as one Gaussian mechanism at sample rate 1 and refused when it would take
the held-out rows past the site's budget. The held-out rows never train, and whether a row is held out depends
on that row alone (`site_data.hold_out`), so training and evaluation compose in parallel: each has its own
accountant on the site's disk, and the site's guarantee is the larger of the two ε, each at most its budget.
The number of held-out rows is released with the count (like N, a count the deployment treats as public).
Classification only: a count has sensitivity 1, a generation score has no such simple bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from dpmemarc_core.data import Task
from dpmemarc_core.federated.config import FederatedConfig
from dpmemarc_core.federated.site import BUDGET_SLACK, SitePlan
from dpmemarc_core.privacy import PrivacyAccountant
from dpmemarc_core.privacy.randomness import PrivateRandomness

EVAL_METRIC_KEYS = ("noisy-correct", "eval-examples", "epsilon", "delta", "noise-multiplier")
EVAL_RELEASE = "federated-eval"  # names the held-out rows' privacy record beside the site's training record


@dataclass(frozen=True)
class SiteEvaluation:
    released: bool
    noisy_correct: float
    examples: int
    epsilon: float
    epsilon_if_released: float

    def metrics(self, cfg: FederatedConfig, plan: SitePlan) -> dict[str, float | int]:
        """The reply's metrics, exactly ``EVAL_METRIC_KEYS``: the noised count and public facts."""
        return {"noisy-correct": self.noisy_correct, "eval-examples": self.examples, "epsilon": self.epsilon,
                "delta": plan.delta, "noise-multiplier": cfg.site_eval_noise_multiplier}


def evaluate_site(model: nn.Module, task: Task, cfg: FederatedConfig, plan: SitePlan, accountant: PrivacyAccountant,
                  max_epsilon: float = math.inf) -> SiteEvaluation:
    """Release the noised number of correct predictions on ``task.eval``, charged to ``accountant``; or release
    nothing (``released`` False) when the charge would pass the site's budget."""
    from dpmemarc_core.metrics import evaluate_classification

    sigma = cfg.site_eval_noise_multiplier
    budget = min(cfg.target_epsilon, max_epsilon)
    epsilon_next = accountant.epsilon_if(sigma, 1.0, 1, plan.delta)
    if epsilon_next > budget * (1 + BUDGET_SLACK):
        return SiteEvaluation(released=False, noisy_correct=math.nan, examples=len(task.eval),
                              epsilon=accountant.get_epsilon(plan.delta), epsilon_if_released=epsilon_next)
    correct = round(evaluate_classification(model, task)["accuracy"] * len(task.eval))
    noise = PrivateRandomness("cpu", secure=cfg.secure_mode).normal((1,), torch.float64).item()
    accountant.step(sigma, 1.0)
    return SiteEvaluation(released=True, noisy_correct=correct + sigma * noise, examples=len(task.eval),
                          epsilon=accountant.get_epsilon(plan.delta), epsilon_if_released=epsilon_next)


def pooled_accuracy(replies: list[dict]) -> dict | None:
    """The sites' noised counts pooled: Σ noisy-correct / Σ eval-examples (None without any release)."""
    released = [r for r in replies if "noisy-correct" in r and math.isfinite(r["noisy-correct"])]
    examples = sum(r["eval-examples"] for r in released)
    if not examples:
        return None
    return {"accuracy": sum(r["noisy-correct"] for r in released) / examples, "examples": examples,
            "sites": len(released)}
