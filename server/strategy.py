"""Flower's strategies (FedAvg, FedProx, FedAdam) over validated updates, with optional client-level DP.

`ValidatedUpdates` wraps a Flower strategy (as Flower ships it, possibly inside Flower's server-side
fixed-clipping DP wrapper) and sorts every training reply before the inner strategy sees it: failed replies,
sites out of budget or with unusable data, and updates that fail `update_problem` are logged with the node and
left out; the rest are
aggregated. With fewer than `min_valid_replies` valid updates the round is skipped and the global model
stays as it was. It sits outside the DP wrapper because that wrapper abandons a round on any failed reply.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAdam, FedAvg, FedProx, Strategy

from dpmemarc_core.federated.config import FederatedConfig
from dpmemarc_core.federated.site import REPLY_METRIC_KEYS
from server.validation import update_norm, update_problem

WEIGHT_KEY = "aggregation-weight"  # set by the server on each valid reply, never taken from a site
ARRAYS_KEY, METRICS_KEY, SITE_KEY = "arrays", "metrics", "site"


@dataclass
class RoundReport:
    """Who took part in a round and what became of each reply."""

    round: int
    clients: list[dict] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)
    skipped: bool = False

    @property
    def accepted(self) -> int:
        return sum(c["status"] == "accepted" for c in self.clients)


class ValidatedUpdates(Strategy):
    """Validate each training reply against the current global state, then let ``inner`` aggregate."""

    def __init__(self, inner: Strategy, max_update_norm: float, min_valid_replies: int,
                 client_dp: bool = False) -> None:
        self.inner = inner
        self.max_update_norm = max_update_norm
        self.min_valid_replies = min_valid_replies
        # Client-level DP: noise is calibrated to a mean of equally weighted, clipped updates, and Flower's
        # clipping divides by the update's norm (a zero update would crash the round).
        self.client_dp = client_dp
        self.global_state: dict[str, np.ndarray] = {}
        self.sent_to: dict[int, set[int]] = {}
        self.reports: dict[int, RoundReport] = {}

    def summary(self) -> None:
        log(INFO, "\t├──> Update validation: max update norm %g, at least %d valid replies per round",
            self.max_update_norm, self.min_valid_replies)
        self.inner.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.global_state = {name: array.numpy() for name, array in arrays.items()}
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        self.sent_to[server_round] = {m.metadata.dst_node_id for m in messages}
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        report = RoundReport(round=server_round)
        self.reports[server_round] = report
        answered = {m.metadata.src_node_id for m in replies}
        report.dropped = sorted(self.sent_to.pop(server_round, set()) - answered)
        for node in report.dropped:
            log(WARNING, "round %d: node %d did not reply (dropped out or timed out)", server_round, node)
        valid = [m for m in replies if self._admit(m, report)]
        if len(valid) < self.min_valid_replies:
            report.skipped = True
            log(WARNING, "round %d skipped: %d valid update(s), min-valid-replies is %d; global model unchanged",
                server_round, len(valid), self.min_valid_replies)
            return None, None
        arrays, metrics = self.inner.aggregate_train(server_round, valid)
        if arrays is None:
            report.skipped = True
            log(WARNING, "round %d skipped: the aggregation returned nothing; global model unchanged", server_round)
            return None, metrics
        # Aggregation may promote dtypes (float32 * weight); the global state keeps the reference dtypes.
        return ArrayRecord({n: Array(np.asarray(arrays[n].numpy(), dtype=g.dtype))
                            for n, g in self.global_state.items()}), metrics

    def _admit(self, message: Message, report: RoundReport) -> bool:
        """Record the reply in ``report``; True when its update may be aggregated."""
        node = message.metadata.src_node_id
        if message.has_error():
            report.clients.append({"node": node, "status": "failed"})
            report.rejected.append({"node": node, "reason": f"client error: {message.error.reason}"})
            log(WARNING, "round %d: node %d failed: %s", report.round, node, message.error.reason)
            return False
        content = message.content
        metrics = content.metric_records.get(METRICS_KEY)
        site = content.config_records.get(SITE_KEY)
        entry = {"node": node, **_site_fields(metrics)}
        report.clients.append(entry)
        if site is not None and site.get("status") == "budget-exhausted":
            entry["status"] = "budget-exhausted"
            log(INFO, "round %d: node %d is out of privacy budget: %s", report.round, node, site.get("reason"))
            return False
        if site is not None and site.get("status") == "data-error":
            # The site's file has bad rows (named by row and field, no value): that site sits the round out.
            entry["status"] = "data-error"
            report.rejected.append({"node": node, "reason": f"site data: {site.get('reason')}"})
            log(WARNING, "round %d: node %d cannot use its data: %s", report.round, node, site.get("reason"))
            return False
        problem, arrays = self._problem(content, metrics)
        if problem is not None:
            entry["status"] = "rejected"
            report.rejected.append({"node": node, "reason": problem})
            log(WARNING, "round %d: rejected the update of node %d: %s", report.round, node, problem)
            return False
        entry["status"] = "accepted"
        # Re-pack in the global state's order: Flower's DP clipping pairs tensors by position.
        content[ARRAYS_KEY] = ArrayRecord({n: Array(arrays[n]) for n in self.global_state})
        metrics[WEIGHT_KEY] = 1.0 if self.client_dp else float(metrics["num-examples"])
        return True

    def _problem(self, content, metrics: MetricRecord | None) -> tuple[str | None, dict[str, np.ndarray]]:
        if metrics is None:
            return f"no '{METRICS_KEY}' MetricRecord in the reply", {}
        examples = metrics.get("num-examples")
        if isinstance(examples, bool) or not isinstance(examples, int) or examples < 1:
            return f"num-examples must be a positive integer, got {examples!r}", {}
        if set(content.array_records) != {ARRAYS_KEY}:
            return f"expected exactly one ArrayRecord '{ARRAYS_KEY}', got {sorted(content.array_records)}", {}
        arrays = {}
        for name, array in content.array_records[ARRAYS_KEY].items():
            try:
                arrays[name] = array.numpy()
            except Exception as error:  # a malformed payload can fail decoding in many ways
                return f"tensor '{name}' cannot be decoded: {error}", {}
        problem = update_problem(arrays, self.global_state, self.max_update_norm)
        if problem is None and self.client_dp and update_norm(arrays, self.global_state) == 0:
            problem = "zero update (client-level DP clipping needs a non-zero update norm)"
        return problem, arrays

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)


def _site_fields(metrics: MetricRecord | None) -> dict:
    if metrics is None:
        return {}
    # What metrics.jsonl keeps of a reply: the allow-listed privacy facts
    # (dpmemarc_core.federated.site.REPLY_METRIC_KEYS).
    return {key: metrics[key] for key in REPLY_METRIC_KEYS if key in metrics}


def build_strategy(cfg: FederatedConfig) -> ValidatedUpdates:
    """Flower's strategy named by ``strategy`` (FedAvg, FedProx with ``proximal-mu``, FedAdam with server
    learning rate ``server-lr``), sampling ``fraction-train`` of the connected sites each round (at least
    ``min-train-nodes``), aggregating weighted by each site's number of examples; with ``client-dp``, Flower's
    server-side fixed clipping + Gaussian noise around it, with equal weights. With ``federated-eval`` every
    site is asked to evaluate after each round.

    The DP wrapper's noise is σ·C / ``num_sampled_clients``; passing ``min-valid-replies`` there makes the
    noise at least what a mean of the actual (≥ min-valid-replies) updates needs.
    """
    common = {"fraction_train": cfg.fraction_train, "fraction_evaluate": 1.0 if cfg.federated_eval else 0.0,
              "min_train_nodes": cfg.min_train_nodes, "min_evaluate_nodes": cfg.min_valid_replies,
              "min_available_nodes": cfg.min_train_nodes, "weighted_by_key": WEIGHT_KEY,
              "arrayrecord_key": ARRAYS_KEY}
    if cfg.strategy == "fedprox":
        inner: Strategy = FedProx(**common, proximal_mu=cfg.proximal_mu)
    elif cfg.strategy == "fedadam":
        inner = FedAdam(**common, eta=cfg.server_lr)
    else:
        inner = FedAvg(**common)
    if cfg.client_dp:
        inner = DifferentialPrivacyServerSideFixedClipping(
            inner, noise_multiplier=cfg.client_dp_noise_multiplier, clipping_norm=cfg.client_dp_clipping_norm,
            num_sampled_clients=cfg.min_valid_replies)
    return ValidatedUpdates(inner, max_update_norm=cfg.max_update_norm, min_valid_replies=cfg.min_valid_replies,
                            client_dp=cfg.client_dp)
