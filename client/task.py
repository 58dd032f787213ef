"""What a site process keeps between rounds: the run's model (loaded once per process) and each site's data
with its privacy plan.

A real site's data is its own file (node config ``data-path``); a simulated site's is its ``partition-id``
share of a public data set. A simulation runs several sites in one process; they share one model, because
every round starts by loading the global trainable state into it, so nothing of one site's round survives
into another's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import astuple, dataclass

from dpmemarc_core.data import Task
from dpmemarc_core.federated.config import FederatedConfig
from dpmemarc_core.federated.data import file_task, partition_task, pooled_task
from dpmemarc_core.federated.site import SitePlan, build_run_model, plan_site
from dpmemarc_core.training.build import Run


@dataclass
class Site:
    run: Run
    task: Task
    plan: SitePlan


_RUN_MODELS: dict[tuple, Run] = {}
_POOLED: dict[tuple, Task] = {}
_SITES: dict[tuple, Site] = {}


def model_key(cfg: FederatedConfig) -> tuple:
    """The settings that decide the model (not the data, training or privacy settings)."""
    return (cfg.model, cfg.task, cfg.labels, cfg.method, cfg.method_options, cfg.zo_params, cfg.seed, cfg.device,
            cfg.precision)


def site_for(cfg: FederatedConfig, node_config: Mapping[str, object]) -> Site:
    """The cached site of this process for ``cfg`` and its node config, built on first use. A site whose file
    has bad rows raises `SiteDataError` (and is not cached: a corrected file is read again next round)."""
    data_path = site_data_path(node_config)
    where = data_path if data_path else site_partition(node_config)
    key = (astuple(cfg), where)
    if key not in _SITES:
        if model_key(cfg) not in _RUN_MODELS:
            _RUN_MODELS.clear()  # a new run config replaces the previous run's model, not adds to it
            _POOLED.clear()
            _SITES.clear()
            _RUN_MODELS[model_key(cfg)] = build_run_model(cfg)
        run = _RUN_MODELS[model_key(cfg)]
        if data_path:
            task = file_task(cfg, run.tokenizer, data_path)
        else:
            if key[0] not in _POOLED:
                _POOLED[key[0]] = pooled_task(cfg, run.tokenizer)
            task = partition_task(_POOLED[key[0]], cfg, *where)
        _SITES[key] = Site(run=run, task=task, plan=plan_site(cfg, len(task.train)))
    return _SITES[key]


def site_data_path(node_config: Mapping[str, object]) -> str | None:
    """The node config's ``data-path`` (the site's own file), or None for a simulated site."""
    value = node_config.get("data-path")
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ValueError(f"node config 'data-path' must be a path (a string), got {value!r}; start the SuperNode "
                         "with --node-config 'data-path=\"/path/to/data.jsonl\"'")
    return value


def site_partition(node_config: Mapping[str, object]) -> tuple[int, int]:
    """(partition-id, num-partitions) of a simulated site; the simulation sets both, a SuperNode without its own
    file gets them from ``--node-config "partition-id=0 num-partitions=2"``."""
    values = []
    for key in ("partition-id", "num-partitions"):
        value = node_config.get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"node config '{key}' must be an integer, got {value!r}; start the SuperNode with its "
                             f"own file, --node-config 'data-path=\"/path/to/data.jsonl\"', or with a share of the "
                             f"run's public data set, --node-config \"partition-id=<i> num-partitions=<n>\"")
        values.append(value)
    partition_id, num_partitions = values
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"node config partition-id must be in [0, num-partitions - 1 = {num_partitions - 1}], "
                         f"got {partition_id}")
    return partition_id, num_partitions
