"""One site of a federated run, transport-free: the model it builds, its privacy plan, and its round of
local DP training against a budget that lasts the whole run.

Privacy model: each site is its own DP unit. Its noise multiplier is fixed before the first round from
the planned total number of local steps (rounds × local steps) at its own sampling rate, and its
accountant (kept on the site's own disk, `federated.budget`) composes every step it ever takes. A round
that would push the site past its (target ε, δ) is refused, not trained. The reply says only
`REPLY_METRIC_KEYS` about the round.
"""

from __future__ import annotations

import math
import resource
import sys
import time
from dataclasses import dataclass

import torch
from torch import nn

from dpmemarc_core.data import Task
from dpmemarc_core.federated.config import FederatedConfig
from dpmemarc_core.privacy import PrivacyAccountant, noise_multiplier_for
from dpmemarc_core.training.build import Run, build_run, make_trainer
from dpmemarc_core.training.config import sample_rate_for
from dpmemarc_core.training.precision import resolve_precision

# σ is searched so that the planned steps spend at most target ε; this slack only absorbs float noise in
# recomputing that ε piecewise (round by round) instead of in one go.
BUDGET_SLACK = 1e-9


def build_run_model(cfg: FederatedConfig) -> Run:
    """The run's model, the same in every process of the run (server, each site): built with ``cfg.seed``, so
    the randomly initialised parts that stay frozen (if any) are identical everywhere, and the server's
    initial trainable state is what every site starts from. No data: each process reads only its own
    (`federated.data`)."""
    return build_run(cfg.model, cfg.task_kind(), cfg.method, num_labels=cfg.num_labels(), labels=cfg.label_names(),
                     method_options=cfg.method_kwargs(), zo_params=cfg.zo_params, precision=cfg.precision,
                     device=cfg.torch_device(), seed=cfg.seed)


@dataclass(frozen=True)
class SitePlan:
    """A site's DP parameters for the whole run, fixed before its first step."""

    num_examples: int
    delta: float
    sample_rate: float
    noise_multiplier: float
    planned_steps: int


def plan_site(cfg: FederatedConfig, num_examples: int) -> SitePlan:
    """σ such that rounds × local steps at rate q = batch/N spend at most the target ε at δ."""
    privacy = cfg.privacy_settings()
    delta = privacy.resolved_delta(num_examples)
    q = sample_rate_for(cfg.batch_size, num_examples)
    steps = cfg.planned_local_steps
    sigma = noise_multiplier_for(target_epsilon=privacy.target_epsilon, delta=delta, sample_rate=q, steps=steps,
                                 accountant=privacy.accountant)
    return SitePlan(num_examples=num_examples, delta=delta, sample_rate=q, noise_multiplier=sigma,
                    planned_steps=steps)


@dataclass(frozen=True)
class SiteRound:
    """What one site did in one round. ``trained`` is False when the round was refused for the budget.

    ``local_diagnostics`` (mean training loss, realised batch sizes, peak memory, seconds) are computed from
    the private examples without noise: the site may log them, they never go into its reply.
    """

    trained: bool
    epsilon: float
    epsilon_if_trained: float
    steps: int
    total_steps: int
    local_diagnostics: dict

    def refusal_reason(self, target_epsilon: float, delta: float) -> str:
        return (f"budget exhausted: {self.total_steps} steps spent epsilon={self.epsilon:.4g}; another round "
                f"would reach epsilon={self.epsilon_if_trained:.4g} > target {target_epsilon:g} at delta={delta:.3g}")


# What a site's reply may say about its round: the privacy it has spent and the public facts of its plan.
# Each value follows from the run config, the site's N (the usual public count) and its accountant, never
# from which examples were sampled or what they contain (docs/FEDERATED.md, "What leaves a site").
REPLY_METRIC_KEYS = ("num-examples", "epsilon", "delta", "noise-multiplier", "sample-rate", "planned-steps",
                     "local-steps", "total-steps")


def reply_metrics(outcome: SiteRound, plan: SitePlan) -> dict[str, int | float]:
    """The reply's metrics, exactly ``REPLY_METRIC_KEYS``."""
    return {"num-examples": plan.num_examples, "epsilon": outcome.epsilon, "delta": plan.delta,
            "noise-multiplier": plan.noise_multiplier, "sample-rate": plan.sample_rate,
            "planned-steps": plan.planned_steps, "local-steps": outcome.steps, "total-steps": outcome.total_steps}


def run_site_round(model: nn.Module, task: Task, cfg: FederatedConfig, plan: SitePlan,
                   accountant: PrivacyAccountant, device: torch.device,
                   max_epsilon: float = math.inf, proximal_mu: float = 0.0) -> SiteRound:
    """``cfg.local_steps`` DP steps on the site's examples, recorded in ``accountant``; or none at all if
    they would take the site past its budget (then ``trained`` is False and nothing changes). The budget is
    the run's target ε, or the site's own ``max_epsilon`` if that is lower. ``proximal_mu`` > 0 adds FedProx's
    proximal term μ·(w − w_round_start) to every (already noised) gradient."""
    privacy = cfg.privacy_settings()
    if privacy.is_private:
        budget = min(privacy.target_epsilon, max_epsilon)
        epsilon_next = accountant.epsilon_if(plan.noise_multiplier, plan.sample_rate, cfg.local_steps, plan.delta)
        if epsilon_next > budget * (1 + BUDGET_SLACK):
            return SiteRound(trained=False, epsilon=accountant.get_epsilon(plan.delta),
                             epsilon_if_trained=epsilon_next, steps=0, total_steps=accountant.steps,
                             local_diagnostics={})
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # Batches and noise come from the trainer's OS-entropy streams: the run config (and any seed in it) is
    # known to every party, so nothing derived from it may choose them.
    precision = getattr(model, "_dpmemarc_precision", None) or resolve_precision(cfg.precision, device)
    physical = site_physical_batch_size(cfg, model, precision, device)
    trainer = make_trainer(cfg.method, model, task.train, task.collate, privacy, plan.sample_rate,
                           plan.noise_multiplier, lr=cfg.lr, head_lr=cfg.head_lr or None, accountant=accountant,
                           physical_batch_size=physical, device=device, precision=precision)
    if proximal_mu > 0:
        add_proximal_term(trainer, proximal_mu)
    start = time.perf_counter()
    try:
        stats = trainer.run(cfg.local_steps, progress=False)
    finally:
        if getattr(trainer, "engine", None) is not None:
            trainer.engine.detach()  # the model is reused next round; a new trainer hooks it again
    epsilon = accountant.get_epsilon(plan.delta) if privacy.is_private else math.inf
    diagnostics = {"train_loss": stats["train_loss"], "examples_seen": stats["examples"],
                   "physical_batch_size": physical, "precision": precision,
                   "peak_memory_bytes": peak_memory_bytes(device), "seconds": time.perf_counter() - start}
    return SiteRound(trained=True, epsilon=epsilon, epsilon_if_trained=epsilon, steps=stats["steps"],
                     total_steps=accountant.steps, local_diagnostics=diagnostics)


def site_physical_batch_size(cfg: FederatedConfig, model: nn.Module, precision: str,
                             device: torch.device) -> int | None:
    """The site's micro-batch: ``physical-batch-size`` (0: None, the whole batch), or for "auto" the largest
    one whose simulated step fits this site's budget (``memory``, else the CUDA device's free memory plus what
    this process already holds there: the model, which the simulated step counts too; on the CPU the available
    RAM). Simulations are cached on disk, so later rounds decide in milliseconds. Only the micro-batch depends on
    the site's GPU: the expected batch, the noise and the accounting are the run's."""
    if cfg.physical_batch_size != "auto":
        return cfg.physical_batch_size or None
    from dpmemarc_core.memory.plan import (
        auto_physical_batch_size,
        config_file,
        format_bytes,
        memory_budget,
    )
    from dpmemarc_core.memory.step import MemorySpec

    budget = memory_budget(cfg.memory, device)
    spec = MemorySpec(model=config_file(model.config), method=cfg.method, batch_size=cfg.batch_size,
                      seq_len=cfg.max_length, precision=precision, device="meta",
                      epsilon=cfg.target_epsilon, clipping_mode=cfg.clipping_mode, method_options=cfg.method_kwargs(),
                      zo_params=cfg.zo_params if cfg.method == "zo" else "full", task_kind=cfg.task_kind(),
                      num_labels=max(cfg.num_labels(), 2))
    option = auto_physical_batch_size(spec, budget)
    print(f"dpmemarc site: physical batch size auto: {option.physical_batch_size} ({option.steps_per_batch} "
          f"micro-batch(es) per expected batch of {cfg.batch_size}); simulated peak {format_bytes(option.peak_bytes)} "
          f"in a budget of {format_bytes(budget)}", flush=True)
    return option.physical_batch_size


def add_proximal_term(trainer, mu: float) -> None:
    """FedProx: before each optimizer step, grad += μ·(w − w₀), w₀ the weights the round started from.

    The term depends on no example (only on weights already released), so adding it after the noise is
    post-processing: the step's privacy is unchanged."""
    optimizer = getattr(trainer, "optimizer", None)
    if optimizer is None:
        raise ValueError(f"FedProx needs a gradient optimizer; {type(trainer).__name__} has none")
    anchors = [p.detach().clone() for p in trainer.params]

    def proximal(_optimizer, _args, _kwargs) -> None:
        with torch.no_grad():
            for param, anchor in zip(trainer.params, anchors):
                if param.grad is not None:
                    param.grad.add_(param - anchor, alpha=mu)

    optimizer.register_step_pre_hook(proximal)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak CUDA memory allocated since the last reset on a GPU; on CPU the process's peak resident set."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB, macOS bytes
