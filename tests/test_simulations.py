"""The paper-reproduction scripts on tiny stand-ins: configs (the recipe keys head_lr and preset), resumable cells
per seed (stale when their settings or, for memory, the simulating code changed), the statistics over seeds
(mean ± sd, Welch intervals, the class prior), Markdown with the paper's numbers, cells in parallel processes,
paper scale failing fast without the hub, and its wiring when the hub is (pretended) there."""

from __future__ import annotations

import json
import math
import os
import statistics
import time

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
)

from dpmemarc_core import data, offline
from dpmemarc_core.data import _NEGATIVE, _NEUTRAL, _POSITIVE
from simulations import common, figure2, figure3, table2, table3, table4
from simulations.common import (
    CONFIG_DIR,
    CellStore,
    Job,
    class_prior,
    difference_text,
    fingerprint,
    load_config,
    margin_verdict,
    no_change,
    paired_interval,
    run_cells,
    sign_verdict,
    summarize,
    unlearned,
)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> str:
    """A 2-layer BERT with a word-level vocabulary covering the synthetic task, saved like a hub model."""
    directory = tmp_path_factory.mktemp("tiny-bert")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *_POSITIVE, *_NEGATIVE, *_NEUTRAL]
    (directory / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizer(str(directory / "vocab.txt")).save_pretrained(directory)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    BertForSequenceClassification(config).save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory) -> str:
    directory = tmp_path_factory.mktemp("tiny-gpt2")
    tokenizer = offline.gpt2_tokenizer()
    tokenizer.save_pretrained(directory)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_layer=2, n_embd=32, n_head=4, n_positions=128)
    GPT2LMHeadModel(config).save_pretrained(directory)
    return str(directory)


def write_config(path, model: str, memory_model: str, *, paper_task: str = "sst2", methods=("lora", "bitfit"),
                 epsilons=("inf",), seeds=(0,), extra: str = "") -> str:
    path.write_text(f"""
[common]
methods = {json.dumps(list(methods))}
epsilons = [{", ".join(epsilons)}]
seeds = {json.dumps(list(seeds))}
batch_size = 2
max_length = 32
max_train = 32
max_eval = 8
max_steps = 1
[common.method_options]
lora = {{ r = 4 }}
rev = {{ r = 4 }}
[paper]
model = "{model}"
tasks = ["{paper_task}"]
[offline]
model = "{model}"
tasks = ["synthetic"]
paper_columns = {{ synthetic = "sst2" }}
[quick]
max_train = 8
[memory]
model = "{memory_model}"
batch_size = 2
seq_len = 8
precision = "fp32"
device = "meta"
{extra}
""")
    return str(path)


def test_load_config_overlays_sections_and_names_bad_keys(tmp_path, tiny_bert):
    path = write_config(tmp_path / "t.toml", tiny_bert, tiny_bert, epsilons=("8.0", "inf"))
    offline_run = load_config(path, "offline")
    quick_run = load_config(path, "offline", quick=True)
    assert offline_run["tasks"] == ["synthetic"]
    assert quick_run["max_train"] == 8 and offline_run["max_train"] == 32 and quick_run["max_steps"] == 1
    assert load_config(path, "paper")["tasks"] == ["sst2"]
    assert offline_run["epsilons"][-1] == float("inf") and offline_run["memory"]["seq_len"] == 8
    (tmp_path / "bad.toml").write_text((tmp_path / "t.toml").read_text().replace("max_steps = 1", "max_stepz = 1"))
    with pytest.raises(ValueError, match="max_stepz"):
        load_config(tmp_path / "bad.toml", "offline")
    with pytest.raises(ValueError, match="scale"):
        load_config(path, "cloud")
    for bad in ("[]", "[0, 0]", "[0.5]", "0"):
        (tmp_path / "bad.toml").write_text((tmp_path / "t.toml").read_text().replace("seeds = [0]", f"seeds = {bad}"))
        with pytest.raises(ValueError, match="seeds"):
            load_config(tmp_path / "bad.toml", "offline")


def test_shipped_configs_parse_for_every_scale():
    for name in ("table2", "table3", "table4", "figure2", "figure3"):
        for scale, quick in (("paper", False), ("offline", False), ("offline", True)):
            config = load_config(common.CONFIG_DIR / f"{name}.toml", scale, quick)
            assert config["methods"] and config["epsilons"]
            if name != "table4" and not quick:  # table4 trains nothing
                assert config["seeds"] == [0, 1, 2]


def test_a_config_with_a_base_overlays_its_sections_key_by_key_and_unset_removes_a_key(tmp_path):
    (tmp_path / "base.toml").write_text('[common]\nmodel = "m"\ntasks = ["t"]\nmethods = ["lora"]\nepsilons = [8.0]\n'
                                        '[common.method_options]\nlora = { r = 4 }\n'
                                        '[offline]\nmax_train = 640\nmax_steps = 20\n[memory]\nmodel = "gpt2"\n')
    (tmp_path / "child.toml").write_text('base = "base.toml"\n[common]\nepsilons = [1.0, inf]\n'
                                         '[offline]\nmax_train = "unset"\nbatch_size = 128\n')
    config = load_config(tmp_path / "child.toml", "offline")
    assert (config["epsilons"], config["methods"]) == ([1.0, math.inf], ["lora"])
    assert config["method_options"] == {"lora": {"r": 4}}
    assert (config["batch_size"], config["max_steps"], "max_train" in config) == (128, 20, False)
    assert config["memory"] == {"model": "gpt2"}
    (tmp_path / "base.toml").write_text('base = "child.toml"\n')
    with pytest.raises(ValueError, match="'base' chain comes back to it"):
        load_config(tmp_path / "child.toml", "offline")
    (tmp_path / "odd.toml").write_text('base = 3\n')
    with pytest.raises(ValueError, match="base must be the file name of another config"):
        load_config(tmp_path / "odd.toml", "offline")


@pytest.mark.parametrize("name, batch_size, seeds", [("table3_generation_aim", 128, 3),
                                                     ("table3_generation_aim_b256", 256, 5)])
def test_a_generation_aim_config_is_table3s_offline_stand_in_on_every_pair_at_a_larger_batch(name, batch_size, seeds):
    table3_config, aim = (load_config(common.CONFIG_DIR / f"{config}.toml", "offline") for config in ("table3", name))
    assert (aim["batch_size"], aim["physical_batch_size"], "max_train" in aim) == (batch_size, 32, False)
    assert aim["epsilons"] == [8.0, math.inf] and aim["seeds"] == list(range(seeds))
    differ = {"batch_size", "physical_batch_size", "max_train", "epsilons", "seeds", "config_path"}
    assert {k: v for k, v in aim.items() if k not in differ} == {k: v for k, v in table3_config.items()
                                                                 if k not in differ}


def test_head_lr_key_reaches_the_trainer_and_a_bad_value_names_the_key(tmp_path, tiny_bert, monkeypatch):
    path = write_config(tmp_path / "t.toml", tiny_bert, tiny_bert, methods=("lora", "zo"), epsilons=("8.0",))
    text = (tmp_path / "t.toml").read_text().replace("max_steps = 1", "max_steps = 1\nlr = 1e-3\nhead_lr = 0.05")
    (tmp_path / "t.toml").write_text(text)
    config = common.with_seed(load_config(path, "offline"), 0)
    assert common.train_config(config, "synthetic", "lora", 8.0).head_lr == 0.05
    assert common.train_config(config, "synthetic", "zo", 8.0).head_lr is None  # DPZero has no head rate

    from dpmemarc_core import single_site
    trainers = []

    def recording(*args, **kwargs):
        trainers.append(build_trainer(*args, **kwargs))
        return trainers[-1]

    build_trainer = single_site.make_trainer
    monkeypatch.setattr(single_site, "make_trainer", recording)
    assert common.train_cell(config, "synthetic", "lora", 8.0)["steps"] == 1
    assert sorted(group["lr"] for group in trainers[0].optimizer.param_groups) == [1e-3, 0.05]

    for bad in ("0", "-0.02", "inf", "nan", "true", '"0.02"'):
        (tmp_path / "bad.toml").write_text(text.replace("head_lr = 0.05", f"head_lr = {bad}"))
        with pytest.raises(ValueError, match="head_lr .* must be a finite number > 0"):
            load_config(tmp_path / "bad.toml", "offline")


def test_a_preset_is_the_base_that_the_config_keys_override(tmp_path, tiny_bert):
    from dpmemarc_core.training.presets import QUICK_HEAD_LR, preset_config

    path = write_config(tmp_path / "t.toml", tiny_bert, tiny_bert, methods=("lora", "side"), epsilons=("8.0",))
    text = (tmp_path / "t.toml").read_text().replace("[offline]\n", '[offline]\npreset = "quick"\n')
    (tmp_path / "t.toml").write_text(text)
    config = common.with_seed(load_config(path, "offline"), 0)
    lora = common.train_config(config, "synthetic", "lora", 8.0)
    assert (lora.lr, lora.head_lr, lora.epochs) == (5e-3, QUICK_HEAD_LR, 1.0)  # the preset's
    assert (lora.batch_size, lora.max_eval, lora.method_options) == (2, 8, {"r": 4})  # the config's keys win
    side = common.train_config(config, "synthetic", "side", 8.0)
    assert (side.lr, side.method_options) == (preset_config("quick", "side").lr, {"reduction": 16})
    (tmp_path / "bad.toml").write_text(text.replace('"quick"', '"fast"'))
    with pytest.raises(ValueError, match="preset must be one of"):
        load_config(tmp_path / "bad.toml", "offline")


def test_scale_note_names_the_epsilons_of_a_setting_a_preset_makes_for_private_runs_only(tmp_path, tiny_bert):
    path = write_config(tmp_path / "t.toml", tiny_bert, tiny_bert, methods=("lora", "side"), epsilons=("8.0", "inf"))
    text = (tmp_path / "t.toml").read_text().replace("[offline]\n", '[offline]\npreset = "quick"\n')
    (tmp_path / "t.toml").write_text(text)
    config = load_config(path, "offline")
    note = common.scale_note(config)
    side = note.split("side: ")[1].split(";")[0]
    assert "probe_fraction=0.75 (at ε=8 only)" in side  # side's probe phase: private classification runs only
    assert "lr=0.0005" in side and "only" not in side.replace("probe_fraction=0.75 (at ε=8 only)", "")
    assert "probe_fraction" not in note.split("side: ")[0]  # lora has no probe phase


def test_table2_and_figure2_offline_train_the_quick_preset_on_every_movie_snippet_and_the_whole_test_split():
    from dpmemarc_core.training.presets import preset_config

    every_snippet = len(data._movie_sentiment(0, None, None)[0])
    for name in ("table2", "figure2"):
        config = common.with_seed(load_config(CONFIG_DIR / f"{name}.toml", "offline"), 0)
        for method in config["methods"]:
            cell = common.train_config(config, "movie-sentiment", method, 8.0)
            quick = preset_config("quick", method, delta="1/N")  # the paper's delta, as every table uses
            assert cell.max_eval is None and (cell.max_train is None or cell.max_train >= every_snippet)
            same = ("batch_size", "epochs", "max_length", "head_lr", "delta") + (() if method == "zo" else ("lr",))
            assert {k: getattr(cell, k) for k in same} == {k: getattr(quick, k) for k in same}, (name, method)
            if name == "table2":
                assert cell.method_options == quick.method_options
            else:  # figure2's rev at r=2, the smallest rank where every F differs from LoRA
                assert cell.method_options == {**quick.method_options, "r": 2}


def done_cell(seed: int, accuracy: float, *, before: float = 0.5, counts: dict | None = None, task: str = "synthetic",
              method: str = "lora", epsilon: str = "8") -> dict:
    """A finished classification cell as train_cell stores it (only what the tables read)."""
    cell = {"id": f"{task}__{method}__eps{epsilon}__seed{seed}", "task": task, "method": method,
            "epsilon_target": epsilon, "settings": {"seed": seed}, "status": "done",
            "metrics": {"accuracy": accuracy}, "metrics_before": {"accuracy": before}, "seconds": 1.0}
    if counts is not None:
        cell["eval_label_counts"] = counts
        cell["eval_examples"] = sum(counts.values())
    return cell


def test_summarize_gives_mean_sample_sd_and_each_seed_value_of_done_cells():
    cells = [done_cell(0, 0.60), done_cell(1, 0.64), None, {"settings": {"seed": 3}, "status": "error"},
             done_cell(2, 0.68)]
    summary = summarize(cells, lambda c: 100 * c["metrics"]["accuracy"])
    assert summary["n"] == 3 and summary["values"] == pytest.approx({"0": 60.0, "1": 64.0, "2": 68.0})
    assert summary["mean"] == pytest.approx(64.0) and summary["sd"] == pytest.approx(4.0)  # sample sd (n - 1)
    one = summarize([done_cell(5, 0.7), None], lambda c: c["metrics"]["accuracy"])
    assert one["n"] == 1 and one["mean"] == pytest.approx(0.7) and one["sd"] is None
    assert summarize([None], lambda c: 1.0) == {"mean": None, "sd": None, "n": 0, "values": {}}


def test_seed_text_shows_mean_sd_and_says_which_seeds_are_missing_or_failed():
    notes = common.Footnotes()

    def text(cells: list) -> str:
        return common.seed_text(cells, summarize(cells, lambda c: 100 * c["metrics"]["accuracy"]), ".1f", notes)

    failed = {"settings": {"seed": 1}, "status": "error", "error": "RuntimeError: out of memory\ntraceback"}
    assert text([done_cell(0, 0.6), done_cell(1, 0.62), done_cell(2, 0.64)]) == "62.0 ± 2.0"
    assert text([done_cell(0, 0.6), failed, None]) == "60.0 (n=1)[^1]"
    assert text([None, failed, None]) == "n/a[^1]" and text([None, None]) == "…"
    assert notes.notes == ["RuntimeError: out of memory"]


def test_paired_interval_matches_scipy_and_a_hand_computation():
    from scipy import stats

    side = {"0": 58.8, "1": 61.0, "2": 60.2, "3": 57.4}
    lora = {"0": 62.4, "1": 64.8, "2": 63.0, "3": 59.9}
    interval = paired_interval(side, lora)
    low, high = stats.ttest_rel(list(side.values()), list(lora.values())).confidence_interval(0.95)
    assert (interval["low"], interval["high"]) == (pytest.approx(low), pytest.approx(high))
    assert interval["pairs"] == 4 and interval["df"] == 3
    # By hand: per-seed differences -1, -2, -3: mean -2, sd 1, se 1/sqrt(3), t(0.975, 2) = 4.3027.
    hand = paired_interval({"0": 77.0, "1": 78.0, "2": 79.0}, {"0": 78.0, "1": 80.0, "2": 82.0})
    assert hand["difference"] == pytest.approx(-2.0)
    assert hand["high"] - hand["difference"] == pytest.approx(4.3027 / 3 ** 0.5, abs=1e-4)
    # Only the seeds both arms have are paired; a seed on one side alone is left out.
    assert paired_interval({"0": 77.0, "1": 78.0, "5": 10.0}, {"0": 78.0, "1": 80.0, "2": 82.0})["pairs"] == 2
    assert paired_interval({"0": 1.0, "1": 2.0}, {"1": 1.0, "2": 2.0}) is None
    # The pairing is what it buys: a seed that is hard for both arms no longer widens the interval.
    shifted = paired_interval({"0": 70.0, "1": 80.0, "2": 75.0}, {"0": 69.0, "1": 79.2, "2": 73.9})
    assert shifted["low"] > 0
    flat = paired_interval({"0": 60.2, "1": 61.0}, {"0": 60.2, "1": 61.0})
    assert flat["low"] == flat["high"] == 0.0


def test_claim_verdicts_follow_the_interval():
    def interval(low: float, high: float) -> dict:
        return {"difference": (low + high) / 2, "low": low, "high": high}

    assert margin_verdict(interval(-1.5, 3.0), 2.0) == "holds"
    assert margin_verdict(interval(-6.0, -2.5), 2.0) == "fails"
    assert margin_verdict(interval(-4.3, 0.3), 2.0) == "cannot be told apart at this size"
    assert margin_verdict(None, 2.0).startswith("cannot be told apart")
    assert sign_verdict(interval(0.5, 2.0), "up", "down") == "up"
    assert sign_verdict(interval(-2.0, -0.5), "up", "down") == "down"
    assert sign_verdict(interval(-2.0, 0.5), "up", "down") == "cannot be told apart at this size"


def test_class_prior_flags_accuracy_within_sampling_noise_of_the_majority_share():
    counts = {"0": 199, "1": 301}  # rotten tomatoes' 500 evaluation reviews: the majority share is 60.2 %
    prior = class_prior([done_cell(s, 0.602, counts=counts) for s in range(3)])
    assert prior["majority_share"] == pytest.approx(0.602) and prior["at_prior"]
    # noise: 1.96 binomial standard errors of the mean of 3 evaluation sets of 500
    assert prior["noise"] == pytest.approx(1.96 * (0.602 * 0.398 / 500 / 3) ** 0.5)
    assert class_prior([done_cell(s, 0.62, counts=counts) for s in range(3)])["at_prior"]  # +1.8 < 2.5 points
    assert not class_prior([done_cell(s, 0.65, counts=counts) for s in range(3)])["at_prior"]
    assert not class_prior([done_cell(0, 0.50, counts=counts)])["at_prior"]  # far below the prior is a result too
    assert class_prior([done_cell(0, 0.602)]) is None  # no label counts recorded: cannot tell


def test_no_change_flags_accuracy_within_sampling_noise_of_where_training_started():
    counts = {"0": 500, "1": 500}
    # DPZero at epsilon 1.6: a random head favouring the minority class stays there, far from the 50 % prior
    stuck = [done_cell(s, after, before=before, counts=counts) for s, (before, after) in
             enumerate([(0.43, 0.435), (0.55, 0.548), (0.49, 0.492)])]
    unchanged = no_change(stuck)
    assert unchanged["change"] == pytest.approx(0.005 / 3) and unchanged["unchanged"]
    # 1.96 standard errors of a difference of two independent binomial accuracies, mean of three seeds of 1000
    variance = sum(a * (1 - a) + b * (1 - b) for b, a in [(0.43, 0.435), (0.55, 0.548), (0.49, 0.492)]) / 1000
    assert unchanged["noise"] == pytest.approx(1.96 * variance ** 0.5 / 3)
    assert not no_change([done_cell(s, 0.53, before=0.50, counts=counts) for s in range(3)])["unchanged"]  # +3 > 2.5
    assert not no_change([done_cell(s, 0.47, before=0.50, counts=counts) for s in range(3)])["unchanged"]  # worse too
    assert no_change([done_cell(0, 0.5)]) is None  # no evaluation size recorded: cannot tell


def test_difference_text_gives_the_interval_or_says_there_is_none():
    ours, theirs = {"0": 80.0, "1": 82.0, "2": 81.0}, {"0": 78.0, "1": 79.0, "2": 77.0}
    text, interval = difference_text(ours, theirs)
    assert interval == paired_interval(ours, theirs)
    assert text == f"+3.0 points [{interval['low']:+.1f}, {interval['high']:+.1f}]" and interval["low"] > 0
    assert difference_text({"0": 80.0}, {"0": 78.0, "1": 79.0}) == ("+1.5 points (no interval)", None)
    assert difference_text({"0": 11.0, "1": 12.0}, {"0": 10.0, "1": 10.5}, ".2f", unit="")[0].startswith("+1.25 [")


def test_unlearned_names_the_class_prior_before_no_change():
    at_prior, moved = {"at_prior": True}, {"at_prior": False}
    assert unlearned({"class_prior": at_prior, "no_change": {"unchanged": True}}) == "class prior"
    assert unlearned({"class_prior": moved, "no_change": {"unchanged": True}}) == "no change"
    assert unlearned({"class_prior": None, "no_change": {"unchanged": False}}) is None
    assert unlearned({"class_prior": moved, "no_change": None}) is None


def test_cells_are_written_atomically_and_failures_retried(tmp_path):
    store = CellStore(tmp_path / "cells")
    calls = []

    def work(value):
        calls.append(value)
        if value == "bad":
            raise ValueError("not supported here")
        return {"value": value}

    jobs = [(v, {"name": v}, lambda v=v: work(v)) for v in ("good", "bad")]
    cells = run_cells(store, jobs)
    assert cells["good"]["status"] == "done" and cells["good"]["value"] == "good"
    assert cells["bad"]["status"] == "error" and "not supported here" in cells["bad"]["error"]
    assert sorted(p.name for p in (tmp_path / "cells").iterdir()) == ["bad.json", "good.json"]  # no temp files
    run_cells(store, jobs)
    assert calls == ["good", "bad", "bad"]  # the done cell is skipped, the failed one retried


def test_cells_not_run_now_are_shown_only_if_made_with_the_current_settings(tmp_path):
    store = CellStore(tmp_path / "cells")
    run_cells(store, [("a", {"lr": 1}, lambda: {"value": 1}), ("b", {"lr": 1}, lambda: {"value": 2})])
    changed = [("a", {"lr": 2}, lambda: {"value": 3}), ("b", {"lr": 1}, lambda: {"value": 4})]
    cells = run_cells(store, changed, selected=lambda fields: False)
    assert list(cells) == ["b"] and cells["b"]["value"] == 2  # a's stored cell is from other settings: hidden


def seed_jobs(seeds, calls: list, lr: float = 1.0) -> list[Job]:
    def fields(seed: int) -> dict:
        return {"task": "t", "settings": {"lr": lr, "seed": seed}}

    return [Job(f"t__seed{seed}", fields(seed), lambda s=seed: calls.append(s) or {"value": s}, legacy_id="t")
            for seed in seeds]


def test_finished_seeds_are_resumed_and_only_new_seeds_run(tmp_path):
    store, calls = CellStore(tmp_path / "cells"), []
    run_cells(store, seed_jobs([0, 1], calls))
    cells = run_cells(store, seed_jobs([0, 1, 2], calls))
    assert calls == [0, 1, 2] and list(cells) == ["t__seed0", "t__seed1", "t__seed2"]
    assert [cells[f"t__seed{s}"]["value"] for s in range(3)] == [0, 1, 2]
    run_cells(store, seed_jobs([0, 1, 2], calls, lr=2.0))  # other settings: every seed again
    assert calls == [0, 1, 2, 0, 1, 2]
    only = run_cells(store, seed_jobs([0, 1, 2, 3], calls, lr=2.0),
                     selected=lambda fields: fields["settings"]["seed"] == 3)  # what --seeds 3 selects
    assert calls[6:] == [3] and len(only) == 4


def test_a_single_draw_cell_counts_as_seed_0_only_when_its_settings_match(tmp_path):
    store, calls = CellStore(tmp_path / "cells"), []
    legacy = {"task": "t", "settings": {"lr": 1.0, "seed": 0}}  # stored before the seeds axis, under id "t"
    store.save({"id": "t", **legacy, "fingerprint": fingerprint(legacy), "status": "done", "value": "old"})
    cells = run_cells(store, seed_jobs([0, 1], calls))
    assert calls == [1] and cells["t__seed0"]["value"] == "old" and cells["t__seed0"]["legacy_id"] == "t"
    assert not (tmp_path / "cells" / "t__seed0.json").exists()  # read where it is, not copied
    shown = run_cells(store, seed_jobs([0, 1], calls, lr=2.0), selected=lambda fields: False)
    assert shown == {}  # other settings: the old draw is stale, not shown as seed 0
    run_cells(store, seed_jobs([0], calls, lr=2.0))
    assert calls == [1, 0]


def test_a_cell_trained_with_another_head_lr_or_evaluation_size_is_not_read_back(tmp_path, tiny_bert):
    path = write_config(tmp_path / "t.toml", tiny_bert, tiny_bert, methods=("lora",), epsilons=("8.0",))
    text = (tmp_path / "t.toml").read_text()
    store = CellStore(tmp_path / "cells")
    (old,) = common.training_jobs(load_config(path, "offline"))
    store.save({"id": old.cell_id, **old.fields, "fingerprint": fingerprint(old.fields), "status": "done"})
    assert common.stored_cell(store, old) is not None
    for changed in (text.replace("max_steps = 1", "max_steps = 1\nhead_lr = 0.02"),
                    text.replace("max_eval = 8\n", ""),  # the whole evaluation split
                    text.replace("max_eval = 8", "max_eval = 16")):
        (tmp_path / "new.toml").write_text(changed)
        (new,) = common.training_jobs(load_config(tmp_path / "new.toml", "offline"))
        assert new.cell_id == old.cell_id and common.stored_cell(store, new) is None


def test_a_memory_cell_simulated_by_other_code_is_computed_again(tmp_path, monkeypatch):
    from dpmemarc_core.memory import cache

    spec = {"model": "roberta-large", "method": "rev", "batch_size": 32, "seq_len": 128, "precision": "bf16",
            "device": "meta", "epsilon": 8.0, "method_options": {"r": 64}, "engine": "bk"}
    simulated = []
    monkeypatch.setattr(common, "memory_cell", lambda s: simulated.append(s) or {"peak_gib": 1.27})
    store = common.memory_store(tmp_path)
    [(cell_id, fields, _)] = common.memory_jobs([spec])
    assert fields["code"] == cache.code_fingerprint()
    stale = {"spec": spec, "code": "the simulator of an older commit"}
    store.save({"id": cell_id, **stale, "fingerprint": fingerprint(stale), "status": "done", "peak_gib": 1.94})
    cells = run_cells(store, common.memory_jobs([spec]))
    assert simulated == [spec] and cells[cell_id]["peak_gib"] == 1.27
    assert run_cells(store, common.memory_jobs([spec]))[cell_id]["peak_gib"] == 1.27 and len(simulated) == 1


def test_the_code_fingerprint_follows_step_code_not_comments_mtimes_or_paths(tmp_path, monkeypatch):
    from dpmemarc_core.memory import cache

    def fingerprint_of(package) -> str:
        monkeypatch.setattr(cache, "_PACKAGE_DIR", package)
        cache.code_fingerprint.cache_clear()
        return cache.code_fingerprint()

    for clone in ("a", "b"):
        (tmp_path / clone / "methods").mkdir(parents=True)
        (tmp_path / clone / "cli").mkdir()
        (tmp_path / clone / "methods" / "lora.py").write_text("R = 64\n")
        (tmp_path / clone / "cli" / "main.py").write_text("print()\n")
    try:
        first = fingerprint_of(tmp_path / "a")
        os.utime(tmp_path / "a" / "methods" / "lora.py", (1, 1))
        assert fingerprint_of(tmp_path / "a") == first == fingerprint_of(tmp_path / "b")  # another clone, same bytes
        (tmp_path / "a" / "cli" / "main.py").write_text("print('a command the step never runs')\n")
        assert fingerprint_of(tmp_path / "a") == first
        (tmp_path / "a" / "methods" / "lora.py").write_text('"""LoRA, reworded."""\n\nR = (  # why 64\n    64)\n')
        assert fingerprint_of(tmp_path / "a") == first  # docstring, comment and layout: the same code
        (tmp_path / "a" / "methods" / "lora.py").write_text("R = 32\n")
        assert fingerprint_of(tmp_path / "a") != first
    finally:
        cache.code_fingerprint.cache_clear()


def test_cells_run_in_parallel_processes_with_the_cores_split(tmp_path):
    import cell_work

    store = CellStore(tmp_path / "cells")
    jobs = [Job("a", {"n": 1}, cell_work.process_facts), Job("b", {"n": 2}, cell_work.process_facts),
            Job("c", {"n": 3}, cell_work.fails)]
    cells = run_cells(store, jobs, processes=2)
    assert list(cells) == ["a", "b", "c"]  # in job order, whatever order they finished in
    assert cells["a"]["status"] == cells["b"]["status"] == "done"
    assert os.getpid() not in {cells["a"]["pid"], cells["b"]["pid"]}
    assert cells["a"]["threads"] == max(1, common.available_cores() // 2)
    assert cells["c"]["status"] == "error" and "not supported here" in cells["c"]["error"]
    assert json.loads((tmp_path / "cells" / "a.json").read_text())["pid"] == cells["a"]["pid"]
    assert run_cells(store, jobs, processes=2)["a"]["pid"] == cells["a"]["pid"]  # done: not run again


def test_table2_offline_writes_cells_per_seed_markdown_with_paper_numbers_and_resumes(tmp_path, tiny_bert,
                                                                                     monkeypatch, capsys):
    config = write_config(tmp_path / "t.toml", tiny_bert, tiny_bert, methods=("lora", "bitfit", "nosuchmethod"),
                          seeds=(0, 1))
    argv = ["--scale", "offline", "--config", config, "--results", str(tmp_path / "results")]
    assert table2.main(argv) == 0
    out = tmp_path / "results" / "table2" / "offline"
    result = json.loads((out / "table2.json").read_text())
    lora = [result["train"][f"synthetic__lora__epsinf__seed{s}"] for s in (0, 1)]
    assert [c["settings"]["seed"] for c in lora] == [0, 1]
    for cell in lora:
        assert cell["status"] == "done" and 0.0 <= cell["metrics"]["accuracy"] <= 1.0
        assert cell["epsilon"] == float("inf") and cell["steps"] == 1
        assert sum(cell["eval_label_counts"].values()) == cell["eval_examples"] == 8
    summary = result["summary"]["synthetic__lora__epsinf"]
    assert summary["accuracy"]["values"] == pytest.approx(
        {str(s): 100 * c["metrics"]["accuracy"] for s, c in enumerate(lora)})
    assert summary["accuracy"]["mean"] == pytest.approx(statistics.fmean(summary["accuracy"]["values"].values()))
    assert summary["eval_examples"] == {"0": 8, "1": 8} and "at_prior" in summary["class_prior"]
    assert result["train"]["synthetic__nosuchmethod__epsinf__seed0"]["status"] == "error"
    assert result["timing"]["cells_run"] == 6 and result["timing"]["jobs"] == 1
    assert result["timing"]["wall_seconds"] > 0 and result["timing"]["cell_seconds_shown"] > 0
    assert [run["cells_run"] for run in result["runs"]] == [6]  # this invocation, kept for the next ones
    markdown = (out / "table2.md").read_text()
    assert "(96.25)" in markdown and "(7.12)" in markdown and "PromptDPSGD" in markdown  # the paper's, beside ours
    assert "n/a[^" in markdown and "unknown method" in markdown  # the failed cell's reason, as a footnote
    assert "over 2 seeds [0, 1]" in markdown and "synthetic n = 8" in markdown
    # 8 evaluation examples cannot tell a trained tiny model from the class prior: labelled so, not shown as a result
    prior = summary["class_prior"]["at_prior"]
    ours = f"{summary['accuracy']['mean']:.1f} ± {summary['accuracy']['sd']:.1f}"
    assert ("class prior[^" in markdown) if prior else (f"{ours} (96.25)" in markdown)

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished cell was run again")

    monkeypatch.setattr(common, "train_cell", must_not_run)
    monkeypatch.setattr(common, "memory_cell", lambda spec: must_not_run())
    capsys.readouterr()
    table2.main(argv)
    log = capsys.readouterr().out
    assert "synthetic__lora__epsinf__seed1: done earlier, skipped" in log
    assert "table2: 2 cell(s) run" in log  # the two failed cells, retried
    assert json.loads((out / "table2.json").read_text())["train"]["synthetic__lora__epsinf__seed0"] == lora[0]
    markdown = (out / "table2.md").read_text()
    (out / "table2.md").unlink()
    table2.main(argv + ["--report"])  # runs nothing, not even the failed cells; writes the table again
    assert (out / "table2.md").read_text() == markdown
    runs = json.loads((out / "table2.json").read_text())["runs"]  # the report added no run and lost none
    assert [run["cells_run"] for run in runs] == [6, 2] and all(run["wall_seconds"] > 0 for run in runs)


def render_config(tmp_path) -> dict:
    path = write_config(tmp_path / "t.toml", "model", "memory-model", methods=("lora", "bitfit", "side", "rev"),
                        epsilons=("8.0",), seeds=(0, 1, 2))
    return load_config(path, "offline")


def test_table2_prints_mean_sd_claim_intervals_and_class_prior_labels(tmp_path):
    config = render_config(tmp_path)
    counts = {"0": 40, "1": 60}
    accuracy = {"lora": (0.79, 0.80, 0.81), "side": (0.77, 0.785, 0.785), "rev": (0.85, 0.86, 0.87),
                "bitfit": (0.60, 0.61, 0.59)}
    cells = {}
    for method, values in accuracy.items():
        for seed, value in enumerate(values):
            cell = done_cell(seed, value, counts=counts, method=method)
            cells[cell["id"]] = cell
    del cells["synthetic__rev__eps8__seed2"]
    summary = table2.summarize_cells(config, cells)
    assert summary["synthetic__lora__eps8"]["accuracy"]["values"] == pytest.approx({"0": 79.0, "1": 80.0, "2": 81.0})
    assert summary["synthetic__bitfit__eps8"]["class_prior"]["at_prior"]
    markdown = table2.render(config, cells, {}, summary)
    assert "| DP-LoRA | … (12.24) | 80.0 ± 1.0 (95.20) |" in markdown
    assert "| MemDPT_rev | … (5.65) | 85.5 ± 0.7 (n=2) (93.89) |" in markdown
    assert "| DP-BiTFiT | … (5.88) | class prior[^1] (93.02) |" in markdown
    assert "[^1]: synthetic: the majority class is 60.0 % of the evaluation examples" in markdown
    for seed in range(3):  # side where it started (78 % before, 78 % mean after): no change, and the claim says nothing
        cells[f"synthetic__side__eps8__seed{seed}"]["metrics_before"]["accuracy"] = 0.78
    unchanged = table2.render(config, cells, {}, table2.summarize_cells(config, cells))
    assert "| MemDPT_side | … (6.23) | no change[^2] (95.44) |" in unchanged
    assert "[^2]: no change: the mean accuracy moved +0.0 points from before training (78.0 %)" in unchanged
    assert "side − DP-LoRA -2.0 points [-3.2, -0.8]: says nothing: side unchanged by training" in unchanged
    for seed in range(3):
        cells[f"synthetic__side__eps8__seed{seed}"]["metrics_before"]["accuracy"] = 0.5
    # side - lora per seed: -2, -1.5, -2.5: mean -2, sd 0.5, t(0.975, 2) = 4.303: [-3.2, -0.8] straddles -2
    assert "side − DP-LoRA -2.0 points [-3.2, -0.8]: cannot be told apart at this size" in markdown
    # rev has seeds 0 and 1 only: paired with LoRA's, +6 on both (85 - 79, 86 - 80)
    assert "rev − DP-LoRA +6.0 points [+6.0, +6.0]: holds" in markdown
    assert "seeds lora/side/rev: 3/3/2" in markdown and "synthetic n = 100" in markdown
    for seed, value in enumerate((0.70, 0.71, 0.72)):  # side 8.7 points below: the claim fails
        cells[f"synthetic__side__eps8__seed{seed}"]["metrics"]["accuracy"] = value
    assert "side − DP-LoRA -9.0 points [" in table2.render(config, cells, {}, table2.summarize_cells(config, cells))
    assert "]: fails" in table2.render(config, cells, {}, table2.summarize_cells(config, cells))


def test_table2_shows_the_private_probe_at_its_delta_as_the_baseline_of_each_task_it_embeds(tmp_path):
    probe = tmp_path / "probe.jsonl"
    lines = [{"epsilon": 8.0, "delta": "1/N", "split": "test", "seeds": [0, 1, 2], "accuracy": [0.77, 0.78, 0.76]},
             {"epsilon": 8.0, "split": "test", "seeds": [0, 1, 2], "accuracy": [0.5, 0.5, 0.5]},  # δ = 1/(10N)
             {"epsilon": 8.0, "delta": "1/N", "split": "validation", "seeds": [0], "accuracy": [0.9]},
             {"epsilon": float("inf"), "delta": "1/N", "split": "test", "seeds": [0, 5], "accuracy": [0.8, 0.1]},
             {"task": "rotten-tomatoes", "epsilon": 8.0, "delta": "1/N", "split": "test", "seeds": [0, 1, 2],
              "accuracy": [0.74, 0.75, 0.73]}]
    probe.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    assert common.read_probe(tmp_path / "absent.jsonl", "1/N") == {}
    assert common.read_probe(probe)["8"]["mean"] == pytest.approx(50.0)  # the default δ's line only
    found = common.read_probe(probe, "1/N")  # lines without a task are movie snippets (the probe's first task)
    assert found["8"]["values"] == pytest.approx({"0": 77.0, "1": 78.0, "2": 76.0})
    rotten = common.read_probe(probe, "1/N", "rotten-tomatoes")
    assert set(rotten) == {"8"} and rotten["8"]["mean"] == pytest.approx(74.0)
    probe.write_text(json.dumps({"epsilon": 8.0, "delta": "1e-5", "split": "test", "accuracy": [0.7]}) + "\n")
    assert common.read_probe(probe, 1e-05)["8"]["mean"] == pytest.approx(70.0)  # a number matches as a number
    config = render_config(tmp_path)
    config["epsilons"] = [1.6, 8.0, math.inf]
    summary = table2.summarize_cells(config, {})
    assert common.PROBE_ROW not in table2.render(config, {}, {}, summary, probe={})  # not the probe's task
    config |= {"model": table2.PROBE_MODEL, "tasks": ["movie-sentiment", "rotten-tomatoes", "snli"]}
    summary = table2.summarize_cells(config, {})
    markdown = table2.render(config, {}, {}, summary, probe={"movie-sentiment": found, "rotten-tomatoes": rotten})
    # seed 5 is not one of the table's seeds [0, 1, 2]: ε=∞ shows seed 0 alone, marked as one of three; Rotten
    # Tomatoes has ε=8 only; SNLI's text pairs have no probe
    assert (f"| {common.PROBE_ROW} | — | — | — | … | 77.0 ± 1.0 | 80.0 (n=1) | … | 74.0 ± 1.0 | … | — | — | — | — |"
            in markdown)


def test_table3_prints_mean_sd_and_differences_with_dp_lora(tmp_path):
    config = render_config(tmp_path)
    config["tasks"], config["paper_columns"] = ["synthetic-generation"], {"synthetic-generation": "e2e"}
    cells = {}
    for method, bleu in {"lora": (4.0, 5.0, 6.0), "side": (4.5, 5.0, 5.5), "rev": (14.0, 15.0, 16.0)}.items():
        for seed, value in enumerate(bleu):
            metrics = {"bleu": value, "rouge_l": 3 * value, "perplexity": 20.0 - value}
            cell = {"id": f"synthetic-generation__{method}__eps8__seed{seed}", "task": "synthetic-generation",
                    "settings": {"seed": seed}, "status": "done", "metrics": metrics, "eval_examples": 64,
                    "metrics_before": {"bleu": 1.5, "rouge_l": 11.2, "perplexity": 27.7}}
            cells[cell["id"]] = cell
    summary = table3.summarize_cells(config, cells)
    markdown = table3.render(config, cells, {}, summary)
    assert "| DP-LoRA | … (21.75) | 5.0 ± 1.0 (67.3) | 15.0 ± 3.0 (69.1) | 15.00 ± 1.00 (2.48) |" in markdown
    assert "- side − DP-LoRA (seeds 3/3): BLEU +0.0 [" in markdown and "cannot be told apart" in markdown
    assert "- rev − DP-LoRA (seeds 3/3): BLEU +10.0 [" in markdown and "rev higher (better)" in markdown
    assert "PPL -10.00 [" in markdown and "rev lower (better)" in markdown
    assert "Before fine-tuning" in markdown and "BLEU 1.5 ± 0.0" in markdown


@pytest.mark.parametrize("private, verdict", [((11.0, 11.5, 12.0), "fails"), ((7.5, 7.6, 7.7), "holds"),
                                              ((7.0, 8.1, 9.5), "cannot be told apart")])
def test_table3_judges_the_perplexity_aim_on_log_perplexity_over_seeds(tmp_path, private, verdict):
    config = render_config(tmp_path)
    config["tasks"], config["epsilons"] = ["synthetic-generation"], [8.0, math.inf]
    public = (6.9, 7.0, 7.1)
    cells = {}
    for key, values in (("8", private), ("inf", public)):
        for seed, value in enumerate(values):
            cell = {"id": f"synthetic-generation__lora__eps{key}__seed{seed}", "task": "synthetic-generation",
                    "settings": {"seed": seed}, "status": "done", "eval_examples": 64,
                    "metrics": {"bleu": 5.0, "rouge_l": 30.0, "perplexity": value},
                    "metrics_before": {"bleu": 1.5, "rouge_l": 11.2, "perplexity": 27.7}}
            cells[cell["id"]] = cell
    text = table3.perplexity_aim(config, table3.summarize_cells(config, cells))
    log = [math.log(v) for v in private], [math.log(v) for v in public]
    ratio = math.exp(statistics.fmean(log[0]) - statistics.fmean(log[1]))
    assert f": {ratio:.2f}x [" in text and "(seed pairs 3)" in text
    assert text.endswith((f": {verdict}.", f": {verdict} at this size."))


def test_paper_scale_fails_fast_without_the_hub(monkeypatch, capsys):
    monkeypatch.setattr(offline, "hub_reachable", lambda: False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    start = time.perf_counter()
    with pytest.raises(SystemExit) as stop:
        table2.main(["--scale", "paper"])
    assert time.perf_counter() - start < 10
    assert "roberta-large" in str(stop.value.code) and "--scale offline" in str(stop.value.code)


def test_paper_scale_wiring_with_stand_in_loaders(tmp_path, tiny_bert, monkeypatch):
    """With the hub pretended reachable, the GLUE task name is passed through to load_task (answered here by
    the synthetic task) and the paper's own numbers sit beside ours."""
    monkeypatch.setattr(offline, "hub_reachable", lambda: True)
    asked = []
    real_load_task = data.load_task

    def stand_in(name, tokenizer, **kwargs):
        asked.append(name)
        return real_load_task("synthetic", tokenizer, **kwargs)

    monkeypatch.setattr(data, "load_task", stand_in)
    config = write_config(tmp_path / "t.toml", tiny_bert, tiny_bert, methods=("lora",))
    assert table2.main(["--scale", "paper", "--config", config, "--results", str(tmp_path / "r")]) == 0
    assert asked == ["sst2", "sst2"]  # training, then the label counts of the same evaluation set
    markdown = (tmp_path / "r" / "table2" / "paper" / "table2.md").read_text()
    assert "(96.25)" in markdown and "Scale: paper" in markdown


def test_quick_is_refused_at_paper_scale():
    with pytest.raises(SystemExit):
        table2.main(["--scale", "paper", "--quick"])


def test_table4_reports_each_engine_and_names_missing_settings(tmp_path, tiny_bert):
    extra = """
[engines.opacus]
engine = "opacus"
[engines.ghostclip]
engine = "bk"
clipping_mode = "ghost"
no_such_setting = 2
[engines.bk]
engine = "bk"
"""
    config = write_config(tmp_path / "t.toml", tiny_bert, tiny_bert, methods=("lora",), epsilons=("8.0", "inf"),
                          extra=extra)
    assert table4.main(["--config", config, "--results", str(tmp_path / "r")]) == 0
    cells = json.loads((tmp_path / "r" / "table4" / "offline" / "table4.json").read_text())["memory"]
    by_engine = {(c["spec"]["engine"], c["spec"].get("clipping_mode"), c["spec"]["epsilon"]): c for c in cells.values()}
    assert by_engine[("opacus", None, 8.0)]["status"] == "done"
    assert by_engine[("bk", None, 8.0)]["peak_bytes"] > 0
    assert by_engine[("nondp", None, float("inf"))]["status"] == "done"
    assert "no_such_setting" in by_engine[("bk", "ghost", 8.0)]["error"]
    markdown = (tmp_path / "r" / "table4" / "offline" / "table4.md").read_text()
    assert "Book-Keeping" in markdown and "Opacus" in markdown and "no_such_setting" in markdown


def test_figure2_marks_unavailable_variants_and_draws_png(tmp_path, tiny_bert):
    extra = """
[variants.lora]
label = "LoRA"
options = { r = 4 }
[variants.other]
label = "Unavailable F"
options = { r = 4, no_such_option = "x" }
"""
    config = write_config(tmp_path / "t.toml", tiny_bert, tiny_bert, methods=("rev",), epsilons=("8.0",),
                          extra=extra)
    assert figure2.main(["--config", config, "--results", str(tmp_path / "r")]) == 0
    out = tmp_path / "r" / "figure2" / "offline"
    cells = json.loads((out / "figure2.json").read_text())["train"]
    assert cells["lora__seed0"]["status"] == "done" and cells["other__seed0"]["status"] == "error"
    assert (out / "figure2.png").read_bytes()[:4] == b"\x89PNG"
    assert "n/a[^" in (out / "figure2.md").read_text()  # [^1] may be the class prior of the lora row


def test_figure3_records_bleu_at_checkpoints(tmp_path, tiny_gpt2, tiny_bert):
    config = write_config(tmp_path / "t.toml", tiny_gpt2, tiny_bert, methods=("lora",), epsilons=("8.0",),
                          extra="")
    text = (tmp_path / "t.toml").read_text().replace('tasks = ["synthetic"]', 'tasks = ["synthetic-generation"]')
    text = text.replace("max_steps = 1", "max_steps = 2\neval_every = 1").replace("max_eval = 8", "max_eval = 2")
    (tmp_path / "t.toml").write_text(text)
    text = text.replace("seeds = [0]", "seeds = [0, 1]")
    (tmp_path / "t.toml").write_text(text)
    assert figure3.main(["--config", config, "--results", str(tmp_path / "r")]) == 0
    out = tmp_path / "r" / "figure3" / "offline"
    result = json.loads((out / "figure3.json").read_text())
    curves = [result["curves"][f"lora__seed{s}"]["curve"] for s in (0, 1)]
    for curve in curves:
        assert [p["step"] for p in curve] == [0, 1, 2] and all(p["bleu"] >= 0 for p in curve)
    mean_curve = result["summary"]["lora"]["curve"]
    assert [p["step"] for p in mean_curve] == [0, 1, 2]
    assert mean_curve[2]["perplexity"]["values"] == pytest.approx({str(s): c[2]["perplexity"]
                                                                   for s, c in enumerate(curves)})
    assert mean_curve[2]["perplexity"]["n"] == 2 and mean_curve[2]["perplexity"]["sd"] is not None
    assert (out / "figure3.png").read_bytes()[:4] == b"\x89PNG"
    markdown = (out / "figure3.md").read_text()
    assert "step 2" in markdown and f"{mean_curve[2]['perplexity']['mean']:.2f} ± " in markdown


def test_figure2_trains_every_shipped_f_at_the_scale_rank_and_sizes_memory_at_the_variant_rank(tmp_path, tiny_bert):
    shipped = load_config(CONFIG_DIR / "figure2.toml", "offline")

    def inline(options: dict) -> str:
        return "{ " + ", ".join(f"{key} = {json.dumps(value)}" for key, value in options.items()) + " }"

    extra = "\n".join(f"[variants.{name}]\nlabel = {json.dumps(v['label'])}\noptions = {inline(v['options'])}"
                      for name, v in figure2.variants_of(shipped).items())
    config = write_config(tmp_path / "t.toml", tiny_bert, tiny_bert, methods=("rev",), epsilons=("8.0",),
                          extra=extra)
    assert figure2.main(["--config", config, "--results", str(tmp_path / "r")]) == 0
    result = json.loads((tmp_path / "r" / "figure2" / "offline" / "figure2.json").read_text())
    assert set(result["train"]) == {f"{name}__seed0" for name in ("lora", "parallel_adapter", "prefix", "dylora")}
    for name, cell in result["train"].items():
        assert cell["status"] == "done", cell.get("error")
        variant = name.removesuffix("__seed0")
        assert cell["settings"]["method_options"] == {**shipped["variants"][variant]["options"], "r": 4}
        assert result["summary"][variant]["accuracy"]["n"] == 1
    memory_options = sorted(c["spec"]["method_options"]["r"] for c in result["memory"].values())
    assert memory_options == [64] * 4


def test_figure2_claim_check_gives_lora_minus_each_other_f_with_its_interval(tmp_path):
    config = load_config(CONFIG_DIR / "figure2.toml", "offline")
    accuracy = {"lora": (80.0, 81.0, 82.0), "parallel_adapter": (70.0, 71.5, 71.5), "prefix": (80.5, 80.5, 82.0),
                "dylora": (79.0,)}
    summary = {name: {"accuracy": summarize([done_cell(s, v / 100) for s, v in enumerate(values)],
                                            lambda c: 100.0 * c["metrics"]["accuracy"])}
               for name, values in accuracy.items()}
    text = figure2.claim_check(config, summary)
    # per seed +10, +9.5, +10.5: mean +10, sd 0.5, t(0.975, 2) = 4.303, se = 0.5 / sqrt(3): [+8.8, +11.2]
    assert "- LoRA − Parallel adapter: +10.0 points [+8.8, +11.2]: LoRA higher" in text
    assert "- LoRA − Prefix tuning: +0.0 points [-1.2, +1.2]: cannot be told apart at this size" in text
    assert "- LoRA − DyLoRA: +2.0 points (no interval): cannot be told apart at this size (needs at least 2" in text
    summary["lora"]["accuracy"] = summarize([], lambda c: 0.0)
    assert "- LoRA has not finished" in figure2.claim_check(config, summary)
