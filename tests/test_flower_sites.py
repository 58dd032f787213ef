"""Real sites in one process (the real ClientApp and the ServerApp's round loop over an in-process Grid, tiny
BERT): each site trains on its own file, the server reads nothing but its own evaluation file, a site with bad
rows sits the round out with the reason, the final global model is a peft adapter; site sampling, Flower's
FedProx and FedAdam, the client-level budget, and federated evaluation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors.numpy import load_file
from test_flower_rounds import run_config, server_identity, tiny_model_dir  # noqa: F401 (fixtures)

from client.client_app import app as client_app
from client.task import site_for
from dpmemarc_core import site_data
from dpmemarc_core.cli.main import main
from dpmemarc_core.federated.budget import SiteBudgetRecord, site_identity, state_dir
from dpmemarc_core.federated.config import FederatedConfig
from dpmemarc_core.federated.data import server_eval_task
from dpmemarc_core.federated.site import build_run_model
from dpmemarc_core.federated.site_evaluation import EVAL_RELEASE
from dpmemarc_core.federated.wire import load_numpy_state
from dpmemarc_core.methods import load_pretrained
from dpmemarc_core.models import load_backbone
from server.checkpoint import read_metrics
from server.local_grid import InProcessGrid
from server.server_app import run_rounds

WORDS = {"positive": ["good", "great", "fine", "lovely"], "negative": ["bad", "awful", "poor", "dull"]}


def write_site(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def site_rows(offset: int) -> list[dict]:
    return [{"text": f"the {noun} was {word}", "label": label}
            for label, words in WORDS.items() for word in words for noun in ("movie", "plot", "scene")[offset:]]


def sites_config(tiny_model_dir, tmp_path, **overrides) -> dict:
    return run_config(tiny_model_dir, tmp_path / "run", task="classification", labels="negative,positive",
                      **{"eval-path": write_site(tmp_path / "server-eval.jsonl", site_rows(0)[::3]), **overrides})


def site_grid(config: dict, files: list[str], tmp_path) -> InProcessGrid:
    grid = InProcessGrid(client_app, config, len(files))
    for (node, context), path in zip(grid.contexts.items(), files):
        context.node_config = {"data-path": path, "state-dir": str(tmp_path / f"state-{node}")}
    return grid


def test_sites_train_on_their_own_files_and_the_server_reads_only_its_eval_file(tiny_model_dir, tmp_path,
                                                                                monkeypatch):
    files = [write_site(tmp_path / f"site-{i}.jsonl", site_rows(i)) for i in range(2)]
    config = sites_config(tiny_model_dir, tmp_path)
    read = []
    real_read = site_data.read_table
    monkeypatch.setattr(site_data, "read_table", lambda path: read.append(str(path)) or real_read(path))

    cfg = FederatedConfig.from_run_config(config)
    run_rounds(site_grid(config, files, tmp_path), cfg)

    metrics = read_metrics(tmp_path / "run")
    assert [m["round"] for m in metrics] == [0, 1, 2]
    assert metrics[-1]["accepted"] == 2 and metrics[-1]["eval"]["examples"] == len(site_rows(0)[::3])
    assert sorted(c["num-examples"] for c in metrics[-1]["clients"]) == sorted(len(site_rows(i)) for i in range(2))
    assert sorted(set(read)) == sorted([*files, config["eval-path"]])
    # The server's own process reads only its evaluation file, never a site's.
    read.clear()
    assert server_eval_task(cfg, build_run_model(cfg).tokenizer) is not None and read == [config["eval-path"]]

    final = tmp_path / "run" / "final"
    base, tokenizer = load_backbone(tiny_model_dir, "classification", num_labels=2)
    peft_model = PeftModel.from_pretrained(base, str(final)).eval()
    ours = build_run_model(cfg).model.eval()
    load_numpy_state(ours, load_file(str(tmp_path / "run" / "round-2.safetensors")))
    batch = tokenizer(["the movie was good", "the plot was dull"], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**batch).logits, ours(**batch).logits, rtol=0, atol=1e-5)
    privacy = json.loads((final / "privacy.json").read_text())
    assert sorted(privacy["sites"]) == ["100", "101"] and all(s["steps"] == 4 for s in privacy["sites"].values())
    # `dpmemarc export` of the run's directory (its last round and run.json) gives the same folder.
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "exported")]) == 0
    with torch.no_grad():
        torch.testing.assert_close(load_pretrained(tmp_path / "exported")(**batch).logits, ours(**batch).logits,
                                   rtol=0, atol=1e-5)
    assert json.loads((tmp_path / "exported" / "privacy.json").read_text()) == privacy


def test_without_eval_path_or_public_data_the_server_evaluates_nothing(tiny_model_dir, tmp_path):
    cfg = FederatedConfig.from_run_config(sites_config(tiny_model_dir, tmp_path, **{"eval-path": ""}))
    assert server_eval_task(cfg, build_run_model(cfg).tokenizer) is None
    public = FederatedConfig.from_run_config(run_config(tiny_model_dir, tmp_path))  # task 'synthetic'
    task = server_eval_task(public, build_run_model(public).tokenizer)
    assert task.train == [] and len(task.eval) == public.max_eval


def test_a_site_with_bad_rows_replies_with_the_reason_and_the_others_train(tiny_model_dir, tmp_path):
    bad = site_rows(1) + [{"text": "  ", "label": "negative"}]
    files = [write_site(tmp_path / "good-0.jsonl", site_rows(0)), write_site(tmp_path / "good-1.jsonl", site_rows(1)),
             write_site(tmp_path / "bad.jsonl", bad)]
    config = sites_config(tiny_model_dir, tmp_path, **{"num-server-rounds": 1})
    run_rounds(site_grid(config, files, tmp_path), FederatedConfig.from_run_config(config))
    record = read_metrics(tmp_path / "run")[-1]
    assert record["accepted"] == 2 and not record["skipped"]
    assert record["rejected"] == [{"node": 102, "reason": f"site data: bad.jsonl: row {len(bad)}: field 'text' "
                                                          "must be non-empty text"}]
    assert str(tmp_path) not in json.dumps(record)  # the site's directory stays with the site


def test_site_sampling_takes_a_fraction_of_the_sites_each_round(tiny_model_dir, tmp_path):
    files = [write_site(tmp_path / f"site-{i}.jsonl", site_rows(i % 2)) for i in range(4)]
    config = sites_config(tiny_model_dir, tmp_path, **{"num-server-rounds": 1, "fraction-train": 0.5})
    run_rounds(site_grid(config, files, tmp_path), FederatedConfig.from_run_config(config))
    assert len(read_metrics(tmp_path / "run")[-1]["clients"]) == 2


@pytest.mark.parametrize("strategy", ["fedprox", "fedadam"])
def test_flowers_strategies_run_unchanged(tiny_model_dir, tmp_path, strategy):
    files = [write_site(tmp_path / f"site-{i}.jsonl", site_rows(i)) for i in range(2)]
    config = sites_config(tiny_model_dir, tmp_path, **{"num-server-rounds": 1, "strategy": strategy,
                                                       "proximal-mu": 1.0})
    grid = site_grid(config, files, tmp_path)
    sent = []
    deliver = grid.deliver
    grid.deliver = lambda message: sent.append(message.content["config"]) or deliver(message)
    run_rounds(grid, FederatedConfig.from_run_config(config))
    start, final = load_file(str(tmp_path / "run" / "round-1.safetensors")), build_run_model(
        FederatedConfig.from_run_config(config))
    assert read_metrics(tmp_path / "run")[-1]["accepted"] == 2
    assert ("proximal-mu" in sent[0]) == (strategy == "fedprox")
    assert any(not np.allclose(start[n], p.detach().numpy()) for n, p in final.model.named_parameters()
               if p.requires_grad)


def test_client_level_epsilon_is_recorded_and_the_run_stops_at_its_budget(tiny_model_dir, tmp_path):
    from dpmemarc_core.federated.client_level import ClientLevelBudget

    files = [write_site(tmp_path / f"site-{i}.jsonl", site_rows(i)) for i in range(2)]
    one, two = (ClientLevelBudget(2.0, 1e-5, rounds=k).epsilon for k in (1, 2))
    config = sites_config(tiny_model_dir, tmp_path, **{
        "num-server-rounds": 3, "client-dp": True, "client-dp-noise-multiplier": 2.0,
        "client-dp-clipping-norm": 0.5, "client-dp-target-epsilon": (one + two) / 2})
    run_rounds(site_grid(config, files, tmp_path), FederatedConfig.from_run_config(config))
    metrics = read_metrics(tmp_path / "run")
    assert [m["round"] for m in metrics] == [0, 1]  # round 2 would have passed the client-level budget
    assert metrics[1]["client-dp"]["epsilon"] == pytest.approx(one) and metrics[1]["client-dp"]["rounds"] == 1
    privacy = json.loads((tmp_path / "run" / "final" / "privacy.json").read_text())
    assert privacy["client_level"]["epsilon"] == pytest.approx(one)


def test_federated_evaluation_releases_a_noised_count_charged_to_each_sites_held_out_rows(tiny_model_dir, tmp_path):
    files = [write_site(tmp_path / f"site-{i}.jsonl", site_rows(i)) for i in range(2)]
    config = sites_config(tiny_model_dir, tmp_path, **{"num-server-rounds": 1, "federated-eval": True,
                                                       "site-eval-fraction": 0.3})
    grid = site_grid(config, files, tmp_path)
    run_rounds(grid, FederatedConfig.from_run_config(config))
    record = read_metrics(tmp_path / "run")[-1]
    assert record["accepted"] == 2 and record["federated-eval"]["sites"] == 2
    held_out = [len(site_for(FederatedConfig.from_run_config(config), c.node_config).task.eval)
                for c in grid.contexts.values()]
    assert record["federated-eval"]["examples"] == sum(held_out) > 0
    for context in grid.contexts.values():  # two records on the site's disk: training and the held-out rows
        identity = site_identity(context.node_config, "")
        training = SiteBudgetRecord(state_dir(context.node_config), identity).load("rdp")
        evaluation = SiteBudgetRecord(state_dir(context.node_config), {**identity, "release": EVAL_RELEASE})
        assert training.steps == 2 and evaluation.load("rdp").state_dict()["history"] == [[10.0, 1.0, 1]]


def test_federated_evaluation_is_off_by_default_and_classification_only(tiny_model_dir, tmp_path):
    assert not FederatedConfig().federated_eval
    with pytest.raises(ValueError, match="classification only"):
        FederatedConfig.from_run_config({"task": "generation", "federated-eval": True})
    with pytest.raises(ValueError, match="needs labels"):
        FederatedConfig.from_run_config({"task": "classification"})
