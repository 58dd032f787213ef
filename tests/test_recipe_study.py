"""simulations/recipe_study.py: cells are `dpmemarc train` commands, resumed by their summary.json, summarised
over seeds with the issue's aims judged (no training here: summaries are written by hand or by a stand-in)."""

import json
import subprocess

import pytest

from simulations import recipe_study


def write_summary(cells, method, seed, epsilon, accuracy, before=0.5):
    directory = cells / recipe_study.cell_name(method, seed, epsilon)
    directory.mkdir(parents=True)
    spent = float("inf") if epsilon == "inf" else float(epsilon) - 0.01
    (directory / "summary.json").write_text(json.dumps({
        "method": method, "config": {"seed": seed}, "metrics_before": {"accuracy": before},
        "metrics": {"accuracy": accuracy}, "eval_examples": 1057, "epsilon": spent, "delta": 1e-5, "steps": 74,
        "non_private_diagnostics": {"train_seconds": 120.0, "clipped_fraction": 0.6}}))


def test_groups_are_mean_and_sd_over_the_seeds_done(tmp_path):
    cells = tmp_path / "cells"
    for seed, acc in enumerate([0.76, 0.78, 0.77]):
        write_summary(cells, "lora", seed, "8", acc)
    write_summary(cells, "lora", 5, "8", 0.75)  # a seed outside the defaults still counts
    groups = recipe_study.collect(cells, ["lora", "side"], ["8"])
    lora = groups["lora/8"]["accuracy"]
    assert lora["n"] == 4 and lora["mean"] == pytest.approx(76.5) and lora["sd"] == pytest.approx(1.2909944, 1e-6)
    assert [c["seed"] for c in groups["lora/8"]["cells"]] == [0, 1, 2, 5]
    assert groups["side/8"]["accuracy"]["n"] == 0
    table = recipe_study.render(groups, ["lora", "side"], ["8"])
    assert "| lora | 76.5 ± 1.3 (n=4) |" in table and "| side | not run |" in table


def test_claims_judge_each_aim(tmp_path):
    cells = tmp_path / "cells"
    for seed, (private, public, low) in enumerate([(0.775, 0.78, 0.76), (0.78, 0.787, 0.755), (0.772, 0.779, 0.74)]):
        write_summary(cells, "lora", seed, "8", private)
        write_summary(cells, "lora", seed, "inf", public)
        write_summary(cells, "lora", seed, "1.6", low)
        write_summary(cells, "side", seed, "8", private - 0.08)
    lines = "\n".join(recipe_study.claims(recipe_study.collect(cells, ["lora", "side"], ["8", "1.6", "inf"])))
    assert "lora at ε = 8 ≥ 77 %: mean 77.6 (met, n = 3)" in lines
    assert "side at ε = 8 ≥ 77 %: mean 69.6 (not met, n = 3)" in lines
    assert "lora at ε = 1.6 ≥ 75 %: mean 75.2 (met, n = 3)" in lines
    # Paired by seed: lora − non-private -0.5, -0.7, -0.7 points ([-0.9, -0.3], above -2); side 8 points lower
    verdicts = [line for line in lines.splitlines() if "non-private LoRA" in line]
    assert "holds" in verdicts[0] and "fails" in verdicts[1], verdicts
    assert "[-0.9, -0.3] (95 % paired, 3 seeds)" in verdicts[0], verdicts


def test_an_aim_on_fewer_seeds_than_three_is_not_called_met(tmp_path):
    cells = tmp_path / "cells"
    write_summary(cells, "rev", 0, "8", 0.78)
    write_summary(cells, "rev", 0, "1.6", 0.74)
    lines = "\n".join(recipe_study.claims(recipe_study.collect(cells, ["rev"], ["8", "1.6"])))
    assert "rev at ε = 8 ≥ 77 %: mean 78.0 (at the level, but the aim needs 3 seeds, n = 1)" in lines
    assert "rev at ε = 1.6 ≥ 75 %: mean 74.0 (not met, n = 1)" in lines


def test_a_done_cell_is_not_run_again_and_a_missing_one_runs_the_user_command(tmp_path, monkeypatch):
    cells = tmp_path / "cells"
    write_summary(cells, "lora", 0, "8", 0.77)
    calls = []

    def fake_run(command, stdout, stderr, env, check):
        calls.append((command, env["OMP_NUM_THREADS"]))
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(recipe_study.subprocess, "run", fake_run)
    recipe_study.run_cell("lora", 0, "8", cells, threads=2)
    assert calls == []
    recipe_study.run_cell("rev", 1, "1.6", cells, threads=1)
    directory = cells / "rev-s1-e1.6"
    assert calls == [(["dpmemarc", "train", "--method", "rev", "--seed", "1", "--epsilon", "1.6", "--no-progress",
                       "--output", str(directory)], "1")]
    assert (cells / "rev-s1-e1.6.log").exists() and not (cells / "rev-s1-e1.log").exists()


@pytest.mark.parametrize("argv, message", [(["--methods", "lora,foo"], "unknown"),
                                           (["--epsilons", "0"], "not a number > 0"),
                                           (["--seeds", "a"], "integers"), (["--jobs", "0"], ">= 1")])
def test_bad_arguments_name_the_option(argv, message, capsys):
    with pytest.raises(SystemExit):
        recipe_study.parse_args(argv)
    err = capsys.readouterr().err
    assert argv[0] in err and message in err


def test_the_probe_is_a_baseline_row(tmp_path):
    probe = tmp_path / "probe.jsonl"
    assert recipe_study.read_probe(probe) == {}  # not made yet: no row
    lines = [{"epsilon": 8.0, "split": "test", "accuracy": [0.766, 0.775, 0.760]},
             {"epsilon": 8.0, "split": "validation", "accuracy": [0.9, 0.9, 0.9]},  # a sweep's line: not a result
             {"epsilon": float("inf"), "split": "test", "accuracy": [0.771]}]
    probe.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    found = recipe_study.read_probe(probe)
    assert found["8"]["n"] == 3 and found["8"]["mean"] == pytest.approx(76.7)
    table = recipe_study.render(recipe_study.collect(tmp_path / "cells", ["lora"], ["8", "1.6", "inf"]), ["lora"],
                                ["8", "1.6", "inf"], probe=found)
    assert f"| {recipe_study.PROBE_ROW} | 76.7 ± 0.8 (n=3) | not run | 77.1 (one seed) |" in table
