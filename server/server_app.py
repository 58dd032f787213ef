"""Flower ServerApp: rounds of a validated Flower strategy over the sites' trainable states, a checkpoint and a
metrics line after each round, central evaluation on data the server owns (never training data), resumption
from the last checkpoint of ``output-dir``, and the final model exported to ``<output-dir>/final/``.

The round loop is written out here (rather than `Strategy.start`) so that a resumed run keeps its round
numbers and every round's outcome — including rejected updates and skipped rounds — lands in metrics.jsonl.
"""

from __future__ import annotations

import dataclasses
import math
import time
from logging import INFO
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from dpmemarc_core.federated.budget import RUN_LINEAGE_KEY
from dpmemarc_core.federated.client_level import ClientLevelBudget
from dpmemarc_core.federated.config import FederatedConfig
from dpmemarc_core.federated.data import server_eval_task
from dpmemarc_core.federated.evaluation import evaluate_numpy_state
from dpmemarc_core.federated.site import build_run_model
from dpmemarc_core.federated.site_evaluation import EVAL_METRIC_KEYS, pooled_accuracy
from dpmemarc_core.federated.wire import load_numpy_state, trainable_numpy_state
from dpmemarc_core.methods import save_pretrained
from dpmemarc_core.training.export import FINAL_DIR, federated_privacy, write_run_record
from server.checkpoint import (
    append_metrics,
    drop_metrics_after,
    latest_checkpoint,
    read_metrics,
    run_lineage,
    save_round,
)
from server.strategy import build_strategy
from server.validation import update_problem

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_rounds(grid, FederatedConfig.from_run_config(context.run_config))


def run_rounds(grid: Grid, cfg: FederatedConfig) -> None:
    """Run (or resume) the federated run described by ``cfg`` on ``grid``, then export its final model."""
    output_dir = Path(cfg.output_dir).expanduser().resolve()
    run = build_run_model(cfg)
    # Central evaluation only on data the server owns (eval-path) or a public test split: never training data.
    eval_task = server_eval_task(cfg, run.tokenizer)
    reference = trainable_numpy_state(run.model)
    eval_batch = cfg.eval_batch_size()
    update_bytes = sum(a.nbytes for a in reference.values())
    log(INFO, "dpmemarc: %s on %s / %s; %d trainable tensors, %.3f MB per update; central evaluation on %s; "
        "output in %s", cfg.method, cfg.model, cfg.task, len(reference), update_bytes / 1e6,
        f"{len(eval_task.eval)} examples" if eval_task else "nothing (no eval-path, no public test split)",
        output_dir)

    checkpoint = latest_checkpoint(output_dir)
    if checkpoint is None:
        state, first_round = reference, 1
        output_dir.mkdir(parents=True, exist_ok=True)
        drop_metrics_after(output_dir, -1)  # lines of a run killed before its first checkpoint
        start = evaluate_numpy_state(run, eval_task, state, eval_batch)
        log(INFO, "round 0 (starting model): %s", start)
        append_metrics(output_dir, {"round": 0, "eval": start, "accuracy": start.get("accuracy")})
    else:
        problem = update_problem(checkpoint.state, reference, max_update_norm=float("inf"))
        if problem is not None:
            raise ValueError(f"{output_dir} holds round-{checkpoint.round} of a run whose trainable state does not "
                             f"fit this run's model ({problem}); choose another output-dir")
        state, first_round = checkpoint.state, checkpoint.round + 1
        drop_metrics_after(output_dir, checkpoint.round)
        log(INFO, "resuming after round %d from %s (the sites resume their own privacy records)", checkpoint.round,
            output_dir)
    if first_round > cfg.num_server_rounds:
        log(INFO, "all %d rounds are already done in %s", cfg.num_server_rounds, output_dir)
    write_run_record(output_dir, run.spec, run_config_of(cfg))
    client_level = client_level_budget(cfg, read_metrics(output_dir))

    lineage = run_lineage(output_dir)
    strategy = build_strategy(cfg)
    strategy.summary()
    skipped, rounds_run = [], 0
    for server_round in range(first_round, cfg.num_server_rounds + 1):
        if client_level is not None and not client_level.allows_another_round():
            log(INFO, "stopping before round %d: it would take client-level epsilon to %.4g > "
                "client-dp-target-epsilon %g", server_round, client_level.epsilon_after_next_round(),
                cfg.client_dp_target_epsilon)
            break
        log(INFO, "[ROUND %d/%d]", server_round, cfg.num_server_rounds)
        rounds_run += 1
        started = time.perf_counter()
        arrays = ArrayRecord({name: Array(value) for name, value in state.items()})
        # Each site gets the same config, and nothing about other sites (nor any privacy history: a site's
        # budget is kept by the site alone).
        config = ConfigRecord({RUN_LINEAGE_KEY: lineage})
        replies = grid.send_and_receive(strategy.configure_train(server_round, arrays, config, grid),
                                        timeout=cfg.round_timeout)
        aggregated, _ = strategy.aggregate_train(server_round, replies)
        report = strategy.reports.pop(server_round)
        if aggregated is not None:
            state = {name: np.asarray(array.numpy()) for name, array in aggregated.items()}
            if client_level is not None:
                client_level.record_round()
        evaluation = evaluate_numpy_state(run, eval_task, state, eval_batch)
        record = {
            "round": server_round, "skipped": report.skipped, "accepted": report.accepted,
            "accuracy": evaluation.get("accuracy"), "eval": evaluation,
            "epsilon": {str(c["node"]): c.get("epsilon") for c in report.clients if "epsilon" in c},
            "clients": report.clients, "rejected": report.rejected, "dropped": report.dropped,
            "update-bytes": update_bytes,
        }
        if client_level is not None:
            record["client-dp"] = client_level.record()
        if cfg.federated_eval:
            record["federated-eval"] = federated_evaluation(grid, strategy, server_round, state, config, cfg)
        record["seconds"] = time.perf_counter() - started
        save_round(output_dir, server_round, state, record)
        if report.skipped:
            skipped.append(report)
        log(INFO, "round %d: %d accepted, %d rejected, %d dropped%s; eval %s; epsilon by node %s", server_round,
            report.accepted, len(report.rejected), len(report.dropped), " (skipped)" if report.skipped else "",
            evaluation, record["epsilon"])
    if rounds_run and len(skipped) == rounds_run:
        # Every round ended without an update: report the run as failed rather than "completed" unchanged.
        reasons = "; ".join(f"node {r['node']}: {r['reason']}" for r in skipped[-1].rejected) or "no valid replies"
        raise RuntimeError(f"no round produced a global update (min-valid-replies={cfg.min_valid_replies}); "
                           f"last round: {reasons}")
    final = export_final(output_dir, run, state, run_config_of(cfg))
    log(INFO, "final model in %s (%s)", final, ", ".join(sorted(p.name for p in final.iterdir())))


def run_config_of(cfg: FederatedConfig) -> dict:
    return {name.replace("_", "-"): value for name, value in dataclasses.asdict(cfg).items()}


def client_level_budget(cfg: FederatedConfig, metrics: list[dict]) -> ClientLevelBudget | None:
    """The run's client-level accountant (with ``client-dp``), resumed from the rounds metrics.jsonl records."""
    if not cfg.client_dp:
        return None
    rounds = max((m["client-dp"]["rounds"] for m in metrics if "client-dp" in m), default=0)
    return ClientLevelBudget(cfg.client_dp_noise_multiplier, cfg.client_dp_delta,
                             cfg.client_dp_target_epsilon or math.inf, cfg.accountant, rounds=rounds)


def federated_evaluation(grid: Grid, strategy, server_round: int, state: dict, config: ConfigRecord,
                         cfg: FederatedConfig) -> dict | None:
    """Ask the sites to evaluate ``state`` on their held-out rows; pool their noised counts."""
    arrays = ArrayRecord({name: Array(value) for name, value in state.items()})
    replies = grid.send_and_receive(strategy.configure_evaluate(server_round, arrays, config, grid),
                                    timeout=cfg.round_timeout)
    released = [{key: r.content["metrics"][key] for key in EVAL_METRIC_KEYS}
                for r in replies if not r.has_error() and "metrics" in r.content.metric_records]
    return pooled_accuracy(released)


def export_final(output_dir: Path, run, state: dict, run_config: dict) -> Path:
    """The global model in the export format (a peft adapter for LoRA) with the sites' privacy record."""
    load_numpy_state(run.model, state)
    privacy = federated_privacy(run_config, read_metrics(output_dir))
    return save_pretrained(run.model, run.spec, output_dir / FINAL_DIR, privacy, run.tokenizer)
