"""Flower ClientApp of a site: local DP training of the trainable part, with a budget the site owns.

Per round: load the global trainable state into the (process-cached) model, read the site's accountant
from the site's own disk (`dpmemarc_core.site_budget`; nothing the server sends is taken as a history),
refuse if the round would pass the site's (ε, δ), else run the local DP steps, write the accountant back
(atomically, before the reply leaves) and reply with only the trainable state, the allow-listed privacy
facts (`REPLY_METRIC_KEYS`) and a status. Statistics of the private examples stay in the site's log.
"""

from __future__ import annotations

import math
from logging import INFO

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import log

from client.task import site_for
from dpmemarc_core.federated import FederatedConfig, load_numpy_state, reply_metrics, run_site_round, trainable_numpy_state
from dpmemarc_core.privacy.settings import check_epsilon
from dpmemarc_core.site_budget import RUN_LINEAGE_KEY, SiteBudgetRecord, site_identity, state_dir

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = FederatedConfig.from_run_config(context.run_config)
    partition_id, num_partitions = site_partition(context.node_config)
    site = site_for(cfg, partition_id, num_partitions)
    config = msg.content["config"]
    record = SiteBudgetRecord(state_dir(context.node_config),
                              site_identity(context.node_config, str(config.get(RUN_LINEAGE_KEY, ""))))
    accountant = record.load(cfg.accountant)
    load_numpy_state(site.run.model, {name: array.numpy() for name, array in msg.content["arrays"].items()})
    outcome = run_site_round(site.run.model, site.task, cfg, site.plan, accountant, site.run.device,
                             max_epsilon=site_max_epsilon(context.node_config))
    record.save(accountant)  # durable before anything of this round leaves the site
    if outcome.local_diagnostics:
        log(INFO, "site round (stays on this site): %s", outcome.local_diagnostics)
    status = {"status": "trained" if outcome.trained else "budget-exhausted"}
    content = RecordDict({"metrics": MetricRecord(reply_metrics(outcome, site.plan))})
    if outcome.trained:
        content["arrays"] = ArrayRecord({n: Array(a) for n, a in trainable_numpy_state(site.run.model).items()})
    else:
        status["reason"] = outcome.refusal_reason(min(cfg.target_epsilon, site_max_epsilon(context.node_config)),
                                                  site.plan.delta)
    content["site"] = ConfigRecord(status)
    return Message(content, reply_to=msg)


def site_max_epsilon(node_config: dict) -> float:
    """The site's own cap on ε (node config ``max-epsilon``), below any run's target; default none."""
    value = node_config.get("max-epsilon")
    return math.inf if value is None else check_epsilon(value, "node config 'max-epsilon'")


def site_partition(node_config: dict) -> tuple[int, int]:
    """(partition-id, num-partitions) from the node config; the simulation sets both, a SuperNode gets them
    from ``--node-config "partition-id=0 num-partitions=2"``."""
    values = []
    for key in ("partition-id", "num-partitions"):
        value = node_config.get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"node config '{key}' must be an integer, got {value!r}; start the SuperNode with "
                             f"--node-config \"partition-id=<i> num-partitions=<n>\"")
        values.append(value)
    partition_id, num_partitions = values
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"node config partition-id must be in [0, num-partitions - 1 = {num_partitions - 1}], "
                         f"got {partition_id}")
    return partition_id, num_partitions
