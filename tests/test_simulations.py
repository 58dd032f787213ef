"""The paper-reproduction scripts on tiny stand-ins: configs, resumable cells, Markdown with the paper's
numbers, paper scale failing fast without the hub, and its wiring when the hub is (pretended) there."""

from __future__ import annotations

import json
import time

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizer, GPT2Config, GPT2LMHeadModel

import dpmemarc_core.data as data
import dpmemarc_core.offline as offline
import simulations.common as common
from dpmemarc_core.data import _NEGATIVE, _NEUTRAL, _POSITIVE
from simulations import figure2, figure3, table2, table4
from simulations.common import CONFIG_DIR, CellStore, load_config, run_cells


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
                 epsilons=("inf",), extra: str = "") -> str:
    path.write_text(f"""
[common]
methods = {json.dumps(list(methods))}
epsilons = [{", ".join(epsilons)}]
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


def test_shipped_configs_parse_for_every_scale():
    for name in ("table2", "table3", "table4", "figure2", "figure3"):
        for scale, quick in (("paper", False), ("offline", False), ("offline", True)):
            config = load_config(common.CONFIG_DIR / f"{name}.toml", scale, quick)
            assert config["methods"] and config["epsilons"]


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


def test_table2_offline_writes_cells_markdown_with_paper_numbers_and_resumes(tmp_path, tiny_bert, monkeypatch, capsys):
    config = write_config(tmp_path / "t.toml", tiny_bert, tiny_bert, methods=("lora", "bitfit", "nosuchmethod"))
    argv = ["--scale", "offline", "--config", config, "--results", str(tmp_path / "results")]
    assert table2.main(argv) == 0
    out = tmp_path / "results" / "table2" / "offline"
    cells = json.loads((out / "table2.json").read_text())
    lora = cells["train"]["synthetic__lora__epsinf"]
    assert lora["status"] == "done" and 0.0 <= lora["metrics"]["accuracy"] <= 1.0
    assert lora["epsilon"] == float("inf") and lora["steps"] == 1
    assert cells["train"]["synthetic__nosuchmethod__epsinf"]["status"] == "error"
    markdown = (out / "table2.md").read_text()
    ours = f"{100 * lora['metrics']['accuracy']:.2f}"
    assert f"{ours} (96.25)" in markdown  # DP-LoRA on SST-2 at ε=∞ in the paper, beside ours
    assert "(7.12)" in markdown and "PromptDPSGD" in markdown and "n/a[^1]" in markdown
    assert "unknown method" in markdown  # the failed cell's reason, as a footnote

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished cell was run again")

    monkeypatch.setattr(common, "train_cell", must_not_run)
    monkeypatch.setattr(common, "memory_cell", lambda spec: must_not_run())
    capsys.readouterr()
    table2.main(argv)
    log = capsys.readouterr().out
    assert "synthetic__lora__epsinf: done earlier, skipped" in log
    assert json.loads((out / "table2.json").read_text())["train"]["synthetic__lora__epsinf"] == lora
    (out / "table2.md").unlink()
    table2.main(argv + ["--report"])  # runs nothing, not even the failed cells; writes the table again
    assert f"{ours} (96.25)" in (out / "table2.md").read_text()


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
    assert asked == ["sst2"]
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
    assert cells["lora"]["status"] == "done" and cells["other"]["status"] == "error"
    assert (out / "figure2.png").read_bytes()[:4] == b"\x89PNG"
    assert "n/a[^1]" in (out / "figure2.md").read_text()


def test_figure3_records_bleu_at_checkpoints(tmp_path, tiny_gpt2, tiny_bert):
    config = write_config(tmp_path / "t.toml", tiny_gpt2, tiny_bert, methods=("lora",), epsilons=("8.0",),
                          extra="")
    text = (tmp_path / "t.toml").read_text().replace('tasks = ["synthetic"]', 'tasks = ["synthetic-generation"]')
    text = text.replace("max_steps = 1", "max_steps = 2\neval_every = 1").replace("max_eval = 8", "max_eval = 2")
    (tmp_path / "t.toml").write_text(text)
    assert figure3.main(["--config", config, "--results", str(tmp_path / "r")]) == 0
    out = tmp_path / "r" / "figure3" / "offline"
    curve = json.loads((out / "figure3.json").read_text())["curves"]["lora"]["curve"]
    assert [p["step"] for p in curve] == [0, 1, 2] and all(p["bleu"] >= 0 for p in curve)
    assert (out / "figure3.png").read_bytes()[:4] == b"\x89PNG"
    assert "step 2" in (out / "figure3.md").read_text()


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
    assert set(result["train"]) == {"lora", "parallel_adapter", "prefix", "dylora"}
    for name, cell in result["train"].items():
        assert cell["status"] == "done", cell.get("error")
        assert cell["settings"]["method_options"] == {**shipped["variants"][name]["options"], "r": 4}
    memory_options = sorted(c["spec"]["method_options"]["r"] for c in result["memory"].values())
    assert memory_options == [64] * 4
