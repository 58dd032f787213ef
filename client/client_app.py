"""Flower ClientApp of a site: local DP training of the trainable part, with a budget the site owns.

Per round: read the site's data (its own file, node config ``data-path``; or, simulated, its share of a public
data set), load the global trainable state into the (process-cached) model, read the site's accountant
from the site's own disk (`dpmemarc_core.federated.budget`; nothing the server sends is taken as a history),
refuse if the round would pass the site's (ε, δ), else run the local DP steps, write the accountant back
(atomically, before the reply leaves) and reply with only the trainable state, the allow-listed privacy
facts (`REPLY_METRIC_KEYS`) and a status. Statistics of the private examples stay in the site's log.
A file with bad rows is reported back (status ``data-error``, with the row and field but no value from the
file) instead of failing the run. Federated evaluation (`@app.evaluate`) releases only a noised, accounted
count (`dpmemarc_core.federated.site_evaluation`).
"""

from __future__ import annotations

import math
from logging import INFO, WARNING

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import log

from client.task import Site, site_for
from dpmemarc_core.federated.budget import RUN_LINEAGE_KEY, SiteBudgetRecord, site_identity, state_dir
from dpmemarc_core.federated.config import FederatedConfig
from dpmemarc_core.federated.site import reply_metrics, run_site_round
from dpmemarc_core.federated.site_evaluation import EVAL_RELEASE, evaluate_site
from dpmemarc_core.federated.wire import load_numpy_state, trainable_numpy_state
from dpmemarc_core.privacy.settings import check_epsilon
from dpmemarc_core.site_data import SiteDataError

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = FederatedConfig.from_run_config(context.run_config)
    site = _site(cfg, context)
    if isinstance(site, RecordDict):
        return Message(site, reply_to=msg)
    config = msg.content["config"]
    record = _budget_record(context, config)
    accountant = record.load(cfg.accountant)
    load_numpy_state(site.run.model, {name: array.numpy() for name, array in msg.content["arrays"].items()})
    outcome = run_site_round(site.run.model, site.task, cfg, site.plan, accountant, site.run.device,
                             max_epsilon=site_max_epsilon(context.node_config),
                             proximal_mu=float(config.get("proximal-mu", 0.0)))
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


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """The global model on the site's held-out rows: a noised count of correct predictions, charged to the
    site's budget (refused when it would pass it)."""
    cfg = FederatedConfig.from_run_config(context.run_config)
    if not cfg.federated_eval:
        raise ValueError("this run has federated-eval = false: the site holds no rows out for evaluation")
    site = _site(cfg, context)
    if isinstance(site, RecordDict):
        return Message(site, reply_to=msg)
    # The held-out rows' own record (parallel to training's: see dpmemarc_core.federated.site_evaluation).
    record = _budget_record(context, msg.content["config"], release=EVAL_RELEASE)
    accountant = record.load(cfg.accountant)
    load_numpy_state(site.run.model, {name: array.numpy() for name, array in msg.content["arrays"].items()})
    outcome = evaluate_site(site.run.model, site.task, cfg, site.plan, accountant,
                            max_epsilon=site_max_epsilon(context.node_config))
    record.save(accountant)  # durable before the release leaves the site
    content = RecordDict({"site": ConfigRecord({"status": "evaluated" if outcome.released else "budget-exhausted"})})
    if outcome.released:
        content["metrics"] = MetricRecord(outcome.metrics(cfg, site.plan))
    return Message(content, reply_to=msg)


def _site(cfg: FederatedConfig, context: Context) -> Site | RecordDict:
    """The site, or (when its file has bad rows) the reply's content that says so, without any value from it."""
    try:
        return site_for(cfg, context.node_config)
    except SiteDataError as error:
        log(WARNING, "this site's data cannot be used: %s", error)  # the full message stays in the site's log
        return RecordDict({"site": ConfigRecord({"status": "data-error", "reason": error.reason})})


def _budget_record(context: Context, config: ConfigRecord, release: str | None = None) -> SiteBudgetRecord:
    identity = site_identity(context.node_config, str(config.get(RUN_LINEAGE_KEY, "")))
    return SiteBudgetRecord(state_dir(context.node_config), identity if release is None else {**identity,
                                                                                             "release": release})


def site_max_epsilon(node_config: dict) -> float:
    """The site's own cap on ε (node config ``max-epsilon``), below any run's target; default none."""
    value = node_config.get("max-epsilon")
    return math.inf if value is None else check_epsilon(value, "node config 'max-epsilon'")
