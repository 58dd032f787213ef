"""benchmarks/gpu_check: skips cleanly without CUDA; its CPU dry run writes the JSON and the Markdown table."""

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a CUDA machine the script measures instead of skipping")
def test_script_skips_cleanly_without_cuda():
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "/nonexistent"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "skipped" in done.stdout


def test_dry_run_writes_json_and_markdown_with_self_checks(gpu_check, tmp_path, monkeypatch):
    monkeypatch.setenv("DPMEMARC_CACHE", str(tmp_path / "cache"))
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path), "--rows", "dp-lora", "opacus-lora"]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    (cells,) = report["table"].values()
    assert set(cells) == {"dp-lora", "opacus-lora"}
    for cell in cells.values():
        assert cell["measured_bytes"] > 0 and cell["simulated_bytes"] > 0 and cell["step_seconds"] > 0
    assert all(check["ok"] for check in report["checks"]), report["checks"]
    assert any("dp-lora <= opacus-lora" in check["check"] for check in report["checks"])
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| DP LoRA (ours, BK) |" in table and "simulated / measured" in table


def test_a_cell_reports_one_tagged_json_line(gpu_check, tmp_path, capsys):
    config = gpu_check.dry_run_config(tmp_path)
    assert gpu_check.main(["--one", config, "dp-zo", "--device", "cpu", "--batch-size", "2", "--seq-len", "8",
                           "--precision", "fp32"]) == 0
    (line,) = [x for x in capsys.readouterr().out.splitlines() if x.startswith(gpu_check.RESULT_TAG)]
    result = json.loads(line[len(gpu_check.RESULT_TAG):])
    assert result["device"] == "cpu" and result["method"] == "zo" and result["peak_bytes"] > 0
