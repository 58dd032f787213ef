"""The planner: the largest fitting micro-batch against a known peak curve, the ranking, the disk cache,
the `dpmemarc plan` JSON contract and its errors."""

import argparse
import json
import math

import pytest
from transformers import GPT2Config

import dpmemarc_core.memory.plan as memory_plan
from dpmemarc_core.cli.plan import add_plan_parser
from dpmemarc_core.memory.plan import (
    SIMULATION_LOW_BY,
    largest_fitting_batch,
    parse_memory_size,
    plan,
    required_bytes,
    simulated_step,
)
from dpmemarc_core.memory.step import MemorySpec

MIB = 1024 ** 2


def curve(fixed: int, per_example: int, bend_at: int | None = None, calls: list | None = None):
    """A fake simulation: persistent bytes + bytes per example (steeper past `bend_at`: a convex peak)."""
    def simulate(spec: MemorySpec) -> dict:
        if calls is not None:
            calls.append(spec.batch_size)
        b = spec.batch_size
        extra = 0 if bend_at is None or b <= bend_at else (b - bend_at) * per_example
        return {"peak_bytes": fixed + per_example * b + extra,
                "breakdown": {"weights_bytes": fixed, "trainable_params_bytes": 0, "grads_bytes": 0,
                              "optimizer_state_bytes": 0}}

    return simulate


def brute_force(simulate, logical: int, budget: int) -> int:
    fitting = [b for b in range(1, logical + 1)
               if required_bytes(simulate(MemorySpec(model="x", method="lora", batch_size=b))["peak_bytes"]) <= budget]
    return max(fitting, default=0)


@pytest.mark.parametrize("budget_mib, bend_at", [(3000, None), (1500, None), (1500, 8), (5000, 4), (100_000, None)])
def test_largest_fitting_batch_is_the_brute_force_answer_in_few_simulations(budget_mib, bend_at):
    calls: list[int] = []
    simulate = curve(1000 * MIB, 40 * MIB, bend_at, calls)
    spec = MemorySpec(model="x", method="lora", batch_size=32)
    option = largest_fitting_batch(spec, budget_mib * MIB, simulate)
    expected = brute_force(curve(1000 * MIB, 40 * MIB, bend_at), 32, budget_mib * MIB)
    assert option.fits and option.physical_batch_size == expected
    assert option.steps_per_batch == math.ceil(32 / expected)
    assert option.peak_bytes == simulate(MemorySpec(model="x", method="lora", batch_size=expected))["peak_bytes"]
    # The logical batch, the prediction and its neighbour (more only where the peak bends).
    assert len(set(calls)) <= (3 if bend_at is None else 5)
    if expected < 32:  # the answer is proven largest: the next size up was simulated and does not fit
        assert expected + 1 in calls


def test_nothing_fits_reports_micro_batch_one_and_its_peak():
    option = largest_fitting_batch(MemorySpec(model="x", method="rev", batch_size=16), 900 * MIB,
                                   curve(1000 * MIB, 40 * MIB))
    assert (option.physical_batch_size, option.fits, option.peak_bytes) == (1, False, 1040 * MIB)


def test_plan_ranks_fitting_fastest_first_then_by_method_preference_then_smallest_misfit():
    peaks = {"lora": (500, 40), "side": (300, 10), "rev": (300, 10), "full": (4000, 100), "zo": (1100, 100)}

    def simulate(spec):
        fixed, per = peaks[spec.method]
        return curve(fixed * MIB, per * MIB)(spec)

    options = plan(MemorySpec(model="x", method="lora", batch_size=32), 1200 * MIB, list(peaks), simulate=simulate)
    assert [(o.method, o.fits) for o in options] == [
        ("rev", True), ("side", True), ("lora", True), ("zo", False), ("full", False)]
    assert options[2].physical_batch_size < 32 and options[0].physical_batch_size == 32


def test_margin_and_sizes():
    assert required_bytes(850) == 1000 and SIMULATION_LOW_BY == 0.15
    assert parse_memory_size("8GiB") == parse_memory_size("8 G") == 8 * 1024 ** 3
    assert parse_memory_size("24GB") == 24 * 10 ** 9 and parse_memory_size("1536 MiB") == 1536 * MIB
    for bad in ("eight GiB", "8 GiBs", "-1GiB", "0"):
        with pytest.raises(ValueError, match="--memory"):
            parse_memory_size(bad)
    with pytest.raises(ValueError, match="method"):
        plan(MemorySpec(model="x", method="lora"), 10, ["lora", "prompt"])


@pytest.fixture
def tiny_gpt2(tmp_path, monkeypatch) -> str:
    monkeypatch.setenv("DPMEMARC_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "config.json"
    GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=500, n_positions=64, bos_token_id=0,
               eos_token_id=0).to_json_file(str(path))
    return str(path)


def test_simulations_are_cached_by_config(tiny_gpt2, monkeypatch):
    spec = MemorySpec(model=tiny_gpt2, method="lora", batch_size=4, seq_len=16, precision="fp32")
    first = simulated_step(spec)
    simulated: list[MemorySpec] = []
    monkeypatch.setattr(memory_plan, "step_memory", lambda spec: simulated.append(spec) or first)
    assert simulated_step(spec) == first and not simulated
    simulated_step(MemorySpec(model=tiny_gpt2, method="lora", batch_size=5, seq_len=16, precision="fp32"))
    assert [s.batch_size for s in simulated] == [5]  # another config is another key


def run_cli(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_plan_parser(parser.add_subparsers())
    return parser.parse_args(argv)


def test_cli_json_contract(tiny_gpt2, capsys):
    args = run_cli(["plan", "--model", tiny_gpt2, "--memory", "3MiB", "--method", "lora,zo", "--batch-size", "8",
                    "--seq-len", "16", "--precision", "fp32", "--workers", "1", "--json"])
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["budget_bytes"] == 3 * MIB
    assert {o["method"] for o in out["options"]} == {"lora", "zo"}
    for o in out["options"]:
        assert {"method", "physical_batch_size", "peak_bytes", "fits"} <= set(o)
        assert isinstance(o["physical_batch_size"], int) and isinstance(o["peak_bytes"], int)
        assert o["fits"] == (required_bytes(o["peak_bytes"]) <= 3 * MIB)
    fitting = [o["fits"] for o in out["options"]]
    assert fitting == sorted(fitting, reverse=True)  # fitting options first


def test_cli_says_what_is_smallest_when_nothing_fits(tiny_gpt2, capsys):
    args = run_cli(["plan", "--model", tiny_gpt2, "--memory", "1KiB", "--method", "zo", "--batch-size", "2",
                    "--seq-len", "8", "--precision", "fp32", "--workers", "1"])
    assert args.func(args) == 0
    assert "nothing fits" in capsys.readouterr().out


def test_cli_bad_input_names_the_flag(capsys):
    for argv, flag in ((["--memory", "lots"], "--memory"), (["--memory", "8GiB", "--method", "prompt"], "--method"),
                       (["--memory", "8GiB", "--batch-size", "0"], "--batch-size")):
        with pytest.raises(SystemExit):
            run_cli(["plan", "--model", "gpt2", *argv])
        assert flag in capsys.readouterr().err
