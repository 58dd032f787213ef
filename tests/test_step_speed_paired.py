"""benchmarks/step_speed.py --paired: both steps in one process, timed pair by pair in ABBA order."""

import json
import math
import sys

import pytest
import torch


@pytest.fixture
def step_speed(benchmark_script):
    return benchmark_script("step_speed")


def test_pairs_alternate_which_step_goes_first(step_speed):
    calls = []
    result = step_speed.paired_times(lambda: calls.append("A"), lambda: calls.append("B"), torch.device("cpu"),
                                     warmup=1, pairs=4)
    assert "".join(calls) == "AB" + "AB" + "BA" + "AB" + "BA"  # warm-up, then ABBA...
    assert len(result["ratios"]) == len(result["times_s"]) == len(result["baseline_times_s"]) == 4
    expected = [t / b for t, b in zip(result["times_s"], result["baseline_times_s"])]
    assert result["ratios"] == expected
    assert result["median_ratio"] == pytest.approx((sorted(expected)[1] + sorted(expected)[2]) / 2)


def test_driver_writes_paired_ratios(step_speed, tmp_path, monkeypatch):
    from transformers import GPT2Config, GPT2LMHeadModel

    def tiny_model(family, device):
        assert family == "full"
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=16)).train()

    def in_process(command):
        # The driver's subprocess command, run here (where the tiny model is patched in).
        return {"status": "ok", **step_speed.run_pair(step_speed.parse_args(command[2:]))}

    monkeypatch.setattr(step_speed, "build_model", tiny_model)
    monkeypatch.setattr(step_speed, "random_ids", lambda b, t, vocab, device: torch.randint(0, 64, (b, t)))
    monkeypatch.setattr(step_speed, "run_in_subprocess", in_process)
    monkeypatch.setattr(sys, "argv", ["step_speed.py"])
    out = tmp_path / "paired.json"
    step_speed.main(["--paired", "--variants", "full", "bk-full", "--batch-size", "2", "--seq-len", "8",
                     "--warmup", "1", "--steps", "3", "--repeats", "2", "--threads", "1", "--out", str(out)])

    payload = json.loads(out.read_text())
    assert payload["paired"] is True
    results = payload["results"]
    assert list(results) == ["bk-full"]  # a baseline is not paired with itself
    row = results["bk-full"]
    assert row["status"] == "ok" and row["baseline"] == "full" and row["pairs"] == 6
    assert len(row["round_median_ratios"]) == 2
    assert row["min_ratio"] <= row["median_ratio"] <= row["max_ratio"]
    assert all(math.isfinite(r) and r > 0 for run in row["rounds"] for r in run["ratios"])


def test_paired_needs_a_variant_with_another_baseline(step_speed):
    with pytest.raises(SystemExit):
        step_speed.parse_args(["--paired", "--variants", "full", "lora"])
