"""Flower ClientApp of a site: local DP training of the trainable part, with a budget kept across rounds.

Per round: load the global trainable state into the (process-cached) model, restore the site's
accountant (node Context.state; after a restart, the copy the server checkpointed), refuse if the
round would pass the site's (ε, δ), else run the local DP steps and reply with only the trainable state,
the number of examples, ε spent so far, the step counts and peak memory.
"""

from __future__ import annotations

import json

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.task import site_for
from dpmemarc_core.federated import (
    FederatedConfig,
    load_numpy_state,
    restore_accountant,
    run_site_round,
    trainable_numpy_state,
)

ACCOUNTANT_STATE_KEY = "dpmemarc-accountant"  # Context.state record holding the site's accountant (JSON)

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = FederatedConfig.from_run_config(context.run_config)
    partition_id, num_partitions = site_partition(context.node_config)
    site = site_for(cfg, partition_id, num_partitions)
    config = msg.content["config"]
    accountant = restore_accountant(cfg.accountant, _own_accountant(context),
                                    _server_copy(config, partition_id))
    load_numpy_state(site.run.model, {name: array.numpy() for name, array in msg.content["arrays"].items()})
    outcome = run_site_round(site.run.model, site.task, cfg, site.plan, accountant, site.run.device)
    state = json.dumps(accountant.state_dict())
    context.state[ACCOUNTANT_STATE_KEY] = ConfigRecord({"state": state})
    metrics = MetricRecord({
        "partition-id": partition_id,
        "num-examples": len(site.task.train),
        "epsilon": outcome.epsilon,
        "delta": site.plan.delta,
        "noise-multiplier": site.plan.noise_multiplier,
        "local-steps": outcome.steps,
        "total-steps": outcome.total_steps,
        "examples-seen": outcome.examples_seen,
        "train-loss": outcome.train_loss,
        "peak-memory-bytes": outcome.peak_memory_bytes,
        "seconds": outcome.seconds,
    })
    site_record = {"accountant": state, "status": "trained" if outcome.trained else "budget-exhausted"}
    content = RecordDict({"metrics": metrics})
    if outcome.trained:
        content["arrays"] = ArrayRecord({n: Array(a) for n, a in trainable_numpy_state(site.run.model).items()})
    else:
        site_record["reason"] = outcome.refusal_reason(cfg.target_epsilon, site.plan.delta)
    content["site"] = ConfigRecord(site_record)
    return Message(content, reply_to=msg)


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


def _own_accountant(context: Context) -> str | None:
    record = context.state.config_records.get(ACCOUNTANT_STATE_KEY)
    return None if record is None else record["state"]


def _server_copy(config: ConfigRecord, partition_id: int) -> str | None:
    """The server sends every site's checkpointed accountant as one JSON object keyed by partition-id."""
    copies = json.loads(config.get("accountants", "{}"))
    return copies.get(str(partition_id))
