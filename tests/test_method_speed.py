"""benchmarks/method_speed.py on a tiny GPT-2: a timed row per method, each built the way `dpmemarc train` builds it."""

import json
import math
import sys

import pytest
import torch
from transformers import GPT2Config


@pytest.fixture
def method_speed(benchmark_script):
    return benchmark_script("method_speed")


@pytest.fixture
def tiny_config(tmp_path) -> str:
    path = tmp_path / "tiny_gpt2.json"
    GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=16, bos_token_id=0,
               eos_token_id=0).to_json_file(path)
    return str(path)


def test_rows_build_the_trainer_users_get(method_speed, tiny_config):
    from dpmemarc_core.training.bk import PrivateTrainer
    from dpmemarc_core.training.zo import ZOTrainer

    def trainer_of(row):
        return method_speed.build_trainer(row, tiny_config, batch_size=2, seq_len=8, device=torch.device("cpu"))[0]

    assert trainer_of("nondp-lora").engine is None
    assert isinstance(trainer_of("dp-lora"), PrivateTrainer) and trainer_of("dp-lora").engine is not None
    assert trainer_of("dp-rev").engine.backward_passes == "auto"
    assert trainer_of("dp-rev-2pass").engine.backward_passes == 2
    assert trainer_of("dp-rev-1pass").engine.backward_passes == 1
    from dpmemarc_core.training.loop import StepStats

    small, default = trainer_of("dp-rev-r1"), trainer_of("dp-rev")
    assert sum(p.numel() for p in small.params) < sum(p.numel() for p in default.params)
    small.step(list(range(2)), StepStats())
    assert small.engine.last_backward_passes == 1  # 'auto' keeps r=1's buffers
    zo = trainer_of("dp-zo")
    assert isinstance(zo, ZOTrainer) and len(zo.params) == sum(1 for _ in zo.model.parameters())


def test_driver_writes_a_timed_row_per_method(method_speed, tiny_config, tmp_path, monkeypatch):
    import step_speed

    def in_process(command):
        # The driver's subprocess command, run here: same arguments, no interpreter start-up per row.
        return {"status": "ok", **method_speed.run_row(method_speed.parse_args(command[2:]))}

    monkeypatch.setattr(step_speed, "run_in_subprocess", in_process)
    monkeypatch.setattr(sys, "argv", ["method_speed.py"])
    out = tmp_path / "method_speed_cpu.json"
    method_speed.main(["--model", tiny_config, "--batch-size", "2", "--seq-len", "8", "--warmup", "1",
                       "--steps", "2", "--threads", "1", "--out", str(out)])

    results = json.loads(out.read_text())["results"]
    assert list(results) == list(method_speed.ROWS)
    for row, cell in results.items():
        assert cell["status"] == "ok", row
        assert cell["median_cpu_s"] > 0 and cell["median_s"] > 0, row
        assert cell["cpu_time_ratio"] > 0 and math.isfinite(cell["cpu_time_ratio"]), row
        assert cell["rounds"][0]["trainable_parameters"] > 0, row
        assert math.isfinite(cell["rounds"][0]["train_loss"]), row
    assert results["nondp-lora"]["cpu_time_ratio"] == 1.0
    table = out.with_suffix(".md").read_text()
    assert all(f"| {row} |" in table for row in method_speed.ROWS)
