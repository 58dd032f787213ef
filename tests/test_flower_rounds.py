"""The Flower apps end to end in one process: the real ClientApp and the ServerApp's round loop, joined by
a Grid that hands each message to the ClientApp with one Context per node (as a SuperNode would), on a
tiny BERT and the synthetic task. Budget refusal, the site's own record on its own disk (which nothing the
server sends can lower), what leaves a site, a crashing and a silent site, and resumption after a killed run."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity
from safetensors.numpy import load_file
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from client.client_app import app as client_app
from client.task import site_for
from dpmemarc_core.federated.budget import SiteBudgetRecord, site_identity, state_dir
from dpmemarc_core.federated.config import FederatedConfig
from dpmemarc_core.federated.site import REPLY_METRIC_KEYS, build_run_model
from dpmemarc_core.federated.wire import trainable_numpy_state
from dpmemarc_core.offline import minilm_path
from dpmemarc_core.privacy import epsilon
from server.checkpoint import read_metrics, run_lineage
from server.local_grid import InProcessGrid
from server.server_app import run_rounds

LOCAL_STEPS = 2
ROUNDS = 2


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> str:
    """A 2-layer BERT of hidden size 32 with MiniLM's (offline) tokenizer, saved like a pretrained model."""
    path = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=2)
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(autouse=True)
def server_identity():
    """Messages take their sender from the process's task identity, which a ServerApp process has set."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def run_config(model_dir: str, output_dir, **overrides) -> dict:
    config = {"model": model_dir, "task": "synthetic", "method": "lora", "method-options": '{"r": 2}',
              "num-server-rounds": ROUNDS, "local-steps": LOCAL_STEPS, "batch-size": 8, "lr": 0.01,
              "max-train": 64, "max-eval": 32, "max-length": 16, "device": "cpu", "min-valid-replies": 2,
              "output-dir": str(output_dir)}
    return config | overrides


class FaultyGrid(InProcessGrid):
    """``crash`` nodes reply with an error (as Flower does for a ClientApp exception), ``silent`` nodes never
    reply, and ``die_in_round`` makes the grid raise after that round's sites trained, as if the server
    process were killed. Records the global state each round sent out."""

    def __init__(self, run_config: dict, num_nodes: int = 3, crash: Iterable[int] = (),
                 silent: Iterable[int] = (), die_in_round: int | None = None) -> None:
        super().__init__(client_app, run_config, num_nodes)
        self.crash, self.silent, self.die_in_round = set(crash), set(silent), die_in_round
        self.sent: dict[int, dict[str, np.ndarray]] = {}

    def deliver(self, message: Message) -> Message | None:
        self.sent[message.content["config"]["server-round"]] = {
            k: a.numpy() for k, a in message.content["arrays"].items()}
        node = message.metadata.dst_node_id
        if node in self.silent:
            return None
        if node in self.crash:
            return Message(Error(code=0, reason="RuntimeError: CUDA out of memory"), reply_to=message)
        return super().deliver(message)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        replies = super().send_and_receive(messages, timeout=timeout)
        if messages and messages[0].content["config"]["server-round"] == self.die_in_round:
            raise KeyboardInterrupt("server killed")
        return replies


def site_epsilon(cfg: FederatedConfig, partition_id: int, num_nodes: int, steps: int) -> float:
    """Reference: ε of a fresh accountant given ``steps`` steps of the site's planned σ and rate q."""
    plan = site_for(cfg, {"partition-id": partition_id, "num-partitions": num_nodes}).plan
    return epsilon(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate, steps=steps,
                   delta=plan.delta)


def train_message(arrays: ArrayRecord, server_round: int, **config) -> Message:
    config = ConfigRecord({"server-round": server_round, "run-lineage": "lineage-1", **config})
    return Message(RecordDict({"arrays": arrays, "config": config}), dst_node_id=100, message_type=MessageType.TRAIN)


def site_context(config: dict, state: str, partition_id: int = 0) -> Context:
    """A SuperNode's Context as after a (re)start: empty state; the site's records live in ``state``."""
    node_config = {"partition-id": partition_id, "num-partitions": 2, "state-dir": state}
    return Context(run_id=1, node_id=100, node_config=node_config, state=RecordDict(), run_config=config)


def site_record(context: Context) -> SiteBudgetRecord:
    return SiteBudgetRecord(state_dir(context.node_config), site_identity(context.node_config, "lineage-1"))


def global_arrays(cfg: FederatedConfig) -> ArrayRecord:
    return ArrayRecord({n: Array(a) for n, a in trainable_numpy_state(build_run_model(cfg).model).items()})


@pytest.mark.parametrize("method", [{"method": "lora"}, {"method": "zo", "zo-params": "lora", "lr": 1e-4}],
                         ids=["lora", "zo"])
def test_site_refuses_the_round_past_its_budget_and_composes_every_round(tiny_model_dir, tmp_path, method):
    config = run_config(tiny_model_dir, tmp_path, **method)
    cfg = FederatedConfig.from_run_config(config)
    context = site_context(config, str(tmp_path / "site-state"))
    model = build_run_model(cfg).model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    arrays = ArrayRecord({n: Array(a) for n, a in trainable_numpy_state(model).items()})

    for server_round in range(1, ROUNDS + 1):
        reply = client_app(train_message(arrays, server_round), context)
        assert not reply.has_error()
        metrics = reply.content["metrics"]
        assert reply.content["site"]["status"] == "trained"
        assert metrics["total-steps"] == server_round * LOCAL_STEPS
        assert metrics["epsilon"] == pytest.approx(site_epsilon(cfg, 0, 2, server_round * LOCAL_STEPS), rel=1e-9)
        # Only the trainable tensors leave the site: one ArrayRecord with exactly their names and sizes.
        assert list(reply.content.array_records) == ["arrays"]
        sent = reply.content["arrays"]
        assert set(sent) == trainable
        assert sent.count_bytes() < sum(p.numel() * p.element_size() for p in model.parameters()) / 50
        assert sum(a.numpy().nbytes for a in sent.values()) == sum(
            p.numel() * 4 for n, p in model.named_parameters() if n in trainable)
        assert all(isinstance(v, (int, float)) for v in metrics.values())
        assert tuple(metrics) == REPLY_METRIC_KEYS  # the documented allow-list, nothing computed from examples

    plan = site_for(cfg, {"partition-id": 0, "num-partitions": 2}).plan
    assert epsilon(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate,
                   steps=plan.planned_steps, delta=plan.delta) <= cfg.target_epsilon
    spent = site_record(context).path.read_text()
    refused = client_app(train_message(arrays, ROUNDS + 1), context)
    assert refused.content["site"]["status"] == "budget-exhausted"
    assert "budget exhausted" in refused.content["site"]["reason"]
    assert list(refused.content.array_records) == []
    assert refused.content["metrics"]["local-steps"] == 0
    assert tuple(refused.content["metrics"]) == REPLY_METRIC_KEYS
    assert site_record(context).path.read_text() == spent


def test_nothing_the_server_sends_lowers_a_sites_epsilon_and_a_restart_resumes_from_disk(tiny_model_dir, tmp_path):
    """The attack that reset a site at ε = 8.000 to ε = 0.035: a forged history [[1e4, 1e-6, 49]] in the train
    message. The site's own record is the authority: a restarted SuperNode (empty Context.state, same disk)
    resumes its count and refuses past its budget whatever the server sends."""
    config = run_config(tiny_model_dir, tmp_path, **{"target-epsilon": 8.0})
    cfg = FederatedConfig.from_run_config(config)
    arrays, state = global_arrays(cfg), str(tmp_path / "site-state")
    forged = '{"kind": "rdp", "history": [[10000.0, 1e-06, 49]]}'
    forgeries = {"accountants": '{"0": ' + repr(forged).replace("'", '"') + "}", "accountant": forged}

    first = client_app(train_message(arrays, 1), site_context(config, state))
    assert first.content["metrics"]["total-steps"] == LOCAL_STEPS
    # A restart after round 1, and a server sending a forged (or stale) history: the count goes on from disk.
    second = client_app(train_message(arrays, 2, **forgeries), site_context(config, state))
    assert second.content["site"]["status"] == "trained"
    assert second.content["metrics"]["total-steps"] == 2 * LOCAL_STEPS
    spent = site_epsilon(cfg, 0, 2, 2 * LOCAL_STEPS)
    assert second.content["metrics"]["epsilon"] == pytest.approx(spent, rel=1e-9)
    assert spent > 0.9 * cfg.target_epsilon  # the whole budget is spent (σ was planned for these rounds)

    for _ in range(2):  # restarted again, and sent the forgery again: still refused, ε unchanged
        refused = client_app(train_message(arrays, 3, **forgeries), site_context(config, state))
        assert refused.content["site"]["status"] == "budget-exhausted"
        assert refused.content["metrics"]["epsilon"] == pytest.approx(spent, rel=1e-9)
    assert site_record(site_context(config, state)).load("rdp").steps == 2 * LOCAL_STEPS

    # The record is the site's own: another site (partition) and another state dir have none and start fresh.
    other = client_app(train_message(arrays, 3), site_context(config, str(tmp_path / "elsewhere")))
    assert other.content["metrics"]["total-steps"] == LOCAL_STEPS


def test_an_unreadable_record_refuses_rather_than_starting_over(tiny_model_dir, tmp_path):
    config = run_config(tiny_model_dir, tmp_path)
    context = site_context(config, str(tmp_path / "site-state"))
    record = site_record(context)
    record.path.parent.mkdir(parents=True)
    record.path.write_text("{not json")
    with pytest.raises(ValueError, match="refusing to train"):  # Flower turns it into an error reply
        client_app(train_message(global_arrays(FederatedConfig.from_run_config(config)), 1), context)
    assert record.path.read_text() == "{not json"


def test_a_crashing_and_a_silent_site_do_not_stop_the_round(tiny_model_dir, tmp_path):
    config = run_config(tiny_model_dir, tmp_path / "run", **{"num-server-rounds": 1})
    grid = FaultyGrid(config, num_nodes=4, crash=[100], silent=[101])
    run_rounds(grid, FederatedConfig.from_run_config(config))

    record = read_metrics(tmp_path / "run")[-1]
    assert record["round"] == 1 and not record["skipped"] and record["accepted"] == 2
    assert record["dropped"] == [101]
    assert record["rejected"] == [{"node": 100, "reason": "client error: RuntimeError: CUDA out of memory"}]
    assert sorted(record["epsilon"]) == ["102", "103"]  # keyed by node: sites send no partition or identity
    final = load_file(str(tmp_path / "run" / "round-1.safetensors"))
    assert any(not np.array_equal(final[n], grid.sent[1][n]) for n in final)


def test_a_killed_run_resumes_from_its_last_checkpoint_and_the_sites_from_their_records(tiny_model_dir, tmp_path):
    config = run_config(tiny_model_dir, tmp_path / "run", **{"num-server-rounds": 3})
    cfg = FederatedConfig.from_run_config(config)
    killed = FaultyGrid(config, num_nodes=2, die_in_round=2)
    with pytest.raises(KeyboardInterrupt):
        run_rounds(killed, cfg)
    assert not (tmp_path / "run" / "round-2.safetensors").exists()

    # A restarted run: new processes, so every site's Context.state is empty again.
    resumed = FaultyGrid(config, num_nodes=2)
    run_rounds(resumed, cfg)

    metrics = read_metrics(tmp_path / "run")
    assert [m["round"] for m in metrics] == [0, 1, 2, 3]
    assert 1 not in resumed.sent  # round 1 was not run again
    round_1 = load_file(str(tmp_path / "run" / "round-1.safetensors"))
    for name, value in round_1.items():
        np.testing.assert_array_equal(value, resumed.sent[2][name])
    # Each site's count lives on its own disk (named by the run's lineage token, kept in the output dir, so the
    # same records after the restart). The killed round 2 was trained and its replies sent: it stays counted,
    # so the re-run round 2 is the sites' third, and the planned three rounds are spent before round 3.
    lineage = run_lineage(tmp_path / "run")
    for partition_id in range(2):
        node = str(100 + partition_id)
        assert metrics[1]["epsilon"][node] == pytest.approx(site_epsilon(cfg, partition_id, 2, LOCAL_STEPS), rel=1e-9)
        assert metrics[2]["epsilon"][node] == pytest.approx(site_epsilon(cfg, partition_id, 2, 3 * LOCAL_STEPS),
                                                            rel=1e-9)
        identity = site_identity({"partition-id": partition_id, "num-partitions": 2}, lineage)
        assert SiteBudgetRecord(state_dir({}), identity).load("rdp").steps == 3 * LOCAL_STEPS
    assert metrics[3]["skipped"] and {c["status"] for c in metrics[3]["clients"]} == {"budget-exhausted"}
