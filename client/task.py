"""What a site process keeps between rounds: the run's model (loaded once per process) and each site's
share of the data with its privacy plan.

A simulation runs several sites in one process; they share one model, because every round starts by
loading the global trainable state into it, so nothing of one site's round survives into another's.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass

from dpmemarc_core.data import Task
from dpmemarc_core.federated import FederatedConfig, RunModel, SitePlan, build_run_model, plan_site, site_task


@dataclass
class Site:
    run: RunModel
    task: Task
    plan: SitePlan


_RUN_MODELS: dict[tuple, RunModel] = {}
_SITES: dict[tuple, Site] = {}


def model_key(cfg: FederatedConfig) -> tuple:
    """The settings that decide the model and the task (not the training or privacy settings)."""
    return (cfg.model, cfg.task, cfg.method, cfg.method_options, cfg.zo_params, cfg.max_length, cfg.max_train,
            cfg.max_eval, cfg.seed, cfg.device)


def site_for(cfg: FederatedConfig, partition_id: int, num_partitions: int) -> Site:
    """The cached site of this process for ``cfg``, built on first use."""
    key = (astuple(cfg), partition_id, num_partitions)
    if key not in _SITES:
        if model_key(cfg) not in _RUN_MODELS:
            _RUN_MODELS.clear()  # a new run config replaces the previous run's model, not adds to it
            _SITES.clear()
            _RUN_MODELS[model_key(cfg)] = build_run_model(cfg)
        run = _RUN_MODELS[model_key(cfg)]
        task = site_task(run.task, cfg, partition_id, num_partitions)
        _SITES[key] = Site(run=run, task=task, plan=plan_site(cfg, len(task.train)))
    return _SITES[key]
