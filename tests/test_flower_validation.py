"""Server side without a model: update validation, validated FedAvg (with and without client-level DP),
checkpoints and the run config. Replies are built by hand, as a site (or an attacker) would send them."""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from dpmemarc_core.federated.config import FederatedConfig
from server.checkpoint import drop_metrics_after, latest_checkpoint, read_metrics, run_lineage, save_round
from server.strategy import build_strategy
from server.validation import update_norm, update_problem

ROOT = Path(__file__).resolve().parents[1]
GLOBAL = {"lora_A": np.full((4, 8), 0.5, np.float32), "lora_B": np.zeros((8, 4), np.float32),
          "head.bias": np.array([0.1, -0.1], np.float32)}


@pytest.fixture(autouse=True)
def server_identity():
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


class NodesGrid(Grid):
    """Just enough Grid for a strategy to sample nodes."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self):
        return list(self.nodes)

    def set_run(self, run):
        raise NotImplementedError

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        raise NotImplementedError

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):
        raise NotImplementedError


def shifted(delta: float, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (v + delta * rng.standard_normal(v.shape)).astype(v.dtype) for k, v in GLOBAL.items()}


def reply(instruction: Message, arrays: dict[str, np.ndarray] | None, examples: int = 10,
          status: str = "trained") -> Message:
    content = RecordDict({"metrics": MetricRecord({"num-examples": examples, "epsilon": 1.5}),
                          "site": ConfigRecord({"status": status})})
    if arrays is not None:
        content["arrays"] = ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})
    return Message(content, reply_to=instruction)


def start_round(strategy, nodes: list[int]) -> dict[int, Message]:
    arrays = ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})
    messages = strategy.configure_train(1, arrays, ConfigRecord(), NodesGrid(nodes))
    return {m.metadata.dst_node_id: m for m in messages}


def config(**overrides) -> FederatedConfig:
    return dataclasses.replace(FederatedConfig(), **overrides)


MALFORMED = {
    "wrong name": lambda s: {("lora_C" if k == "lora_A" else k): v for k, v in s.items()},
    "missing tensor": lambda s: {k: v for k, v in s.items() if k != "lora_B"},
    "extra tensor": lambda s: {**s, "backbone.embeddings": np.zeros(3, np.float32)},
    "shape": lambda s: {**s, "lora_A": np.zeros((8, 4), np.float32)},
    "dtype": lambda s: {**s, "lora_A": s["lora_A"].astype(np.float64)},
    "NaN": lambda s: {**s, "lora_B": np.where(np.eye(8, 4) > 0, np.nan, s["lora_B"]).astype(np.float32)},
    "Inf": lambda s: {**s, "head.bias": np.array([np.inf, 0], np.float32)},
    "huge norm": lambda s: {**s, "lora_B": s["lora_B"] + np.float32(1e3)},
}
REASONS = {"wrong name": "missing tensors ['lora_A']; unexpected tensors ['lora_C']",
           "missing tensor": "missing tensors ['lora_B']", "extra tensor": "unexpected tensors",
           "shape": "shape (8, 4), expected (4, 8)", "dtype": "dtype float64, expected float32",
           "NaN": "non-finite", "Inf": "non-finite", "huge norm": "exceeds max-update-norm"}


@pytest.mark.parametrize("kind", MALFORMED)
def test_update_problem_names_each_malformation(kind):
    assert update_problem(shifted(0.1, 0), GLOBAL, max_update_norm=10.0) is None
    problem = update_problem(MALFORMED[kind](shifted(0.1, 0)), GLOBAL, max_update_norm=10.0)
    assert problem is not None and REASONS[kind] in problem


def test_update_norm_is_the_l2_norm_of_the_difference():
    update = shifted(0.3, 1)
    flat = np.concatenate([(update[k].astype(np.float64) - GLOBAL[k]).ravel() for k in GLOBAL])
    assert update_norm(update, GLOBAL) == pytest.approx(np.linalg.norm(flat), rel=1e-12)


@pytest.mark.parametrize("kind", MALFORMED)
def test_a_malformed_update_is_rejected_and_fedavg_runs_on_the_rest(kind, caplog):
    strategy = build_strategy(config(max_update_norm=10.0, min_valid_replies=2))
    sent = start_round(strategy, [11, 12, 13])
    good = {11: (shifted(0.1, 1), 30), 12: (shifted(0.1, 2), 10)}
    replies = [reply(sent[n], arrays, examples) for n, (arrays, examples) in good.items()]
    replies.append(reply(sent[13], MALFORMED[kind](shifted(0.1, 3)), 1000))

    arrays, _ = strategy.aggregate_train(1, replies)

    for name in GLOBAL:  # FedAvg weighted by examples, over the two valid updates only
        expected = (30 * good[11][0][name] + 10 * good[12][0][name]) / 40
        np.testing.assert_allclose(arrays[name].numpy(), expected, rtol=1e-6)
        assert arrays[name].numpy().dtype == GLOBAL[name].dtype
    report = strategy.reports[1]
    assert [r["node"] for r in report.rejected] == [13] and REASONS[kind] in report.rejected[0]["reason"]
    assert "node 13" in caplog.text and REASONS[kind] in caplog.text


@pytest.mark.parametrize("kind", MALFORMED)
def test_too_few_valid_updates_skip_the_round(kind, caplog):
    strategy = build_strategy(config(max_update_norm=10.0, min_valid_replies=2))
    sent = start_round(strategy, [11, 12])
    replies = [reply(sent[11], shifted(0.1, 1)), reply(sent[12], MALFORMED[kind](shifted(0.1, 2)))]

    assert strategy.aggregate_train(1, replies) == (None, None)  # the global model stays as it was
    assert strategy.reports[1].skipped and "round 1 skipped" in caplog.text


def test_a_failed_reply_and_a_missing_one_leave_the_others_aggregated():
    strategy = build_strategy(config(min_valid_replies=2))
    sent = start_round(strategy, [11, 12, 13, 14])
    replies = [reply(sent[11], shifted(0.1, 1)), reply(sent[12], shifted(0.1, 2)),
               Message(Error(code=0, reason="ClientApp raised MemoryError"), reply_to=sent[13])]

    arrays, _ = strategy.aggregate_train(1, replies)

    np.testing.assert_allclose(arrays["lora_A"].numpy(), (shifted(0.1, 1)["lora_A"] + shifted(0.1, 2)["lora_A"]) / 2,
                               rtol=1e-6)
    report = strategy.reports[1]
    assert report.dropped == [14] and report.accepted == 2
    assert report.rejected == [{"node": 13, "reason": "client error: ClientApp raised MemoryError"}]


def test_a_site_out_of_budget_is_left_out_and_its_epsilon_recorded():
    strategy = build_strategy(config(min_valid_replies=1))
    sent = start_round(strategy, [11, 12])
    replies = [reply(sent[11], shifted(0.1, 1)), reply(sent[12], None, status="budget-exhausted")]

    arrays, _ = strategy.aggregate_train(1, replies)

    np.testing.assert_allclose(arrays["lora_A"].numpy(), shifted(0.1, 1)["lora_A"], rtol=1e-6)
    report = strategy.reports[1]
    assert [c["status"] for c in report.clients] == ["accepted", "budget-exhausted"]
    assert report.rejected == [] and [c["epsilon"] for c in report.clients] == [1.5, 1.5]


def test_client_level_dp_clips_each_update_and_weights_sites_equally():
    clip = 0.05
    strategy = build_strategy(config(client_dp=True, client_dp_noise_multiplier=0.0, client_dp_clipping_norm=clip,
                                     min_valid_replies=2))
    sent = start_round(strategy, [11, 12])
    updates = {11: (shifted(0.2, 1), 100), 12: (shifted(0.001, 2), 1)}
    replies = [reply(sent[n], a, examples) for n, (a, examples) in updates.items()]

    arrays, _ = strategy.aggregate_train(1, replies)

    clipped = []
    for update, _ in updates.values():
        scale = min(1.0, clip / update_norm(update, GLOBAL))
        clipped.append({k: GLOBAL[k] + scale * (update[k] - GLOBAL[k]) for k in GLOBAL})
    for name in GLOBAL:
        np.testing.assert_allclose(arrays[name].numpy(), (clipped[0][name] + clipped[1][name]) / 2, atol=1e-7)


def test_client_level_dp_noise_has_the_calibrated_scale():
    sigma, clip, min_valid = 0.7, 0.5, 2
    zero = np.zeros(40_000, np.float32)
    strategy = build_strategy(config(client_dp=True, client_dp_noise_multiplier=sigma, client_dp_clipping_norm=clip,
                                     min_valid_replies=min_valid))
    sent = strategy.configure_train(1, ArrayRecord({"w": Array(zero)}), ConfigRecord(), NodesGrid([11, 12, 13]))
    updates = [np.full_like(zero, 1e-6), np.full_like(zero, -1e-6), zero]
    arrays, _ = strategy.aggregate_train(1, [reply(m, {"w": u}) for m, u in zip(sent, updates)])
    # Updates far below C pass unclipped and average to 0: what is left is noise of std σ·C/min-valid-replies.
    assert arrays["w"].numpy().std() == pytest.approx(sigma * clip / min_valid, rel=0.03)
    # Flower's clipping would divide by a zero update's norm; it is rejected instead of crashing the round.
    assert [r["node"] for r in strategy.reports[1].rejected] == [sent[2].metadata.dst_node_id]
    assert "zero update" in strategy.reports[1].rejected[0]["reason"]


def test_checkpoints_resume_from_the_last_complete_round(tmp_path):
    first, second = shifted(0.1, 1), shifted(0.1, 2)
    lineage = run_lineage(tmp_path)
    save_round(tmp_path, 1, first, {"round": 1, "epsilon": {"0": math.inf}})
    save_round(tmp_path, 2, second, {"round": 2, "accuracy": 0.5})
    # A run killed after writing round 3's metrics line but before its checkpoint.
    with open(tmp_path / "metrics.jsonl", "a") as out:
        out.write(json.dumps({"round": 3}) + "\n")

    checkpoint = latest_checkpoint(tmp_path)
    assert checkpoint.round == 2
    assert run_lineage(tmp_path) == lineage and len(lineage) == 32 and lineage != run_lineage(tmp_path / "other")
    for name in GLOBAL:
        np.testing.assert_array_equal(checkpoint.state[name], second[name])
    drop_metrics_after(tmp_path, checkpoint.round)
    assert read_metrics(tmp_path) == [{"round": 1, "epsilon": {"0": None}}, {"round": 2, "accuracy": 0.5}]
    assert latest_checkpoint(tmp_path / "absent") is None


def test_pyproject_run_config_is_complete_and_matches_the_defaults():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    app = pyproject["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "server.server_app:app", "clientapp": "client.client_app:app"}
    assert FederatedConfig.from_run_config(app["config"]) == FederatedConfig()
    assert {f.name.replace("_", "-") for f in dataclasses.fields(FederatedConfig)} == set(app["config"])


@pytest.mark.parametrize("run_config, message", [
    ({"rounds": 3}, "unknown run-config key 'rounds'"),
    ({"num-server-rounds": 2.5}, "'num-server-rounds' must be a int"),
    ({"client-dp": 1}, "'client-dp' must be a bool"),
    ({"partitioning": "shards"}, "partitioning must be one of"),
    ({"delta": 1.5}, "delta must be 0"),
    ({"method-options": "r=8"}, "method-options must be a JSON object"),
    ({"target-epsilon": -1.0}, "target_epsilon must satisfy"),
    ({"max-update-norm": 0.0}, "max-update-norm must satisfy"),
    ({"task": "notes"}, "task must be one of"),
    ({"task": "classification"}, "needs labels"),
    ({"labels": "a,b,c"}, "labels names 3 classes, task 'movie-sentiment' has 2"),
    ({"labels": "a,a"}, "labels must be two or more distinct"),
    ({"fraction-train": 0.0}, "fraction-train must satisfy 0 < value <= 1"),
    ({"min-train-nodes": 1}, "min-train-nodes must be >= min-valid-replies"),
    ({"strategy": "fedyogi"}, "strategy must be one of"),
    ({"strategy": "fedprox", "method": "zo"}, "method 'zo' has none"),
    ({"strategy": "fedadam", "client-dp": True}, "use fedavg or fedprox with client-dp"),
    ({"federated-eval": True, "task": "generation"}, "classification only"),
    ({"site-eval-fraction": 1.0}, "site-eval-fraction must satisfy 0 < value < 1"),
    ({"client-dp-delta": 0.0}, "client-dp-delta must satisfy"),
    ({"client-dp-target-epsilon": -1.0}, "client-dp-target-epsilon must be 0"),
])
def test_bad_run_config_values_name_the_key(run_config, message):
    with pytest.raises(ValueError, match=message):
        FederatedConfig.from_run_config(run_config)
