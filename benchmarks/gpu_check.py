"""The day a GPU is at hand: measured peak memory and step time of the BENCHMARKS memory rows, beside the
simulated figures of the same code. Run through `benchmarks/gpu_check.sh`, which skips without CUDA.

Rows (RoBERTa-large and GPT-2-large from the shipped configs, random weights, B=32, T=128, bf16): non-DP
LoRA, our DP-LoRA, side, rev, DPZero (zo), and Opacus DP-LoRA beside them. Each memory cell runs in a
fresh interpreter (`torch.cuda.max_memory_allocated` of two training steps, peaks never mix); the
simulated figure of the same cell is computed meanwhile on the CPU (meta device, cached). Then a few
timed steps of our DP-LoRA against Opacus DP-LoRA. Writes `gpu_check.json` and `gpu_check.md`.

Self-checks (listed in both files; the exit status is 1 when a cell failed to run): every cell produced
a peak; the simulation reads low, but not by more than the 15 % the planner allows for; side and rev
need less than DP-LoRA; our DP-LoRA needs no more than Opacus's.

    python benchmarks/gpu_check.py --out benchmarks/results             # on CUDA (what gpu_check.sh runs)
    python benchmarks/gpu_check.py --dry-run --out /tmp/gpu-check        # CPU, a tiny config: checks the script
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GIB = 1024 ** 3
MODELS = ("roberta-large", "gpt2-large")
# row key → (label, method, engine)
ROWS = {
    "nondp-lora": ("non-DP LoRA", "lora", "nondp"),
    "opacus-lora": ("Opacus DP-LoRA (hooks)", "lora", "opacus"),
    "dp-lora": ("DP LoRA (ours, BK)", "lora", "bk"),
    "dp-side": ("DP side network (ours, BK)", "side", "bk"),
    "dp-rev": ("DP reversible (ours, BK)", "rev", "bk"),
    "dp-zo": ("DPZero, full (ours, forward only)", "zo", "bk"),
}
TIMED_ROWS = ("dp-lora", "opacus-lora")
SIMULATION_LOW_BY = 0.15  # memory.plan's margin: a simulation may read this much low, no more
RESULT_TAG = "GPU_CHECK_CELL "


def spec_for(model: str, row: str, args: argparse.Namespace, device: str):
    from dpmemarc_core.memory.step import MemorySpec

    _, method, engine = ROWS[row]
    return MemorySpec(model=model, method=method, engine=engine, batch_size=args.batch_size, seq_len=args.seq_len,
                      precision=args.precision, device=device)


def cell_result(model: str, row: str, args: argparse.Namespace) -> dict:
    """The measured peak of one cell, and its step time for the timed rows."""
    from dpmemarc_core.memory.step import step_memory, step_seconds

    result = step_memory(spec_for(model, row, args, args.device))
    if row in TIMED_ROWS:
        result["step_seconds"] = step_seconds(spec_for(model, row, args, args.device), steps=args.timed_steps)
    return result


def in_process(model: str, row: str, args: argparse.Namespace) -> dict:
    """The dry run's cells: in this process, sequentially (the script's logic, not the process isolation)."""
    try:
        return cell_result(model, row, args)
    except Exception as error:
        return {"error": f"failed: {type(error).__name__}: {error}"}


def measure(model: str, row: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--one", model, row, "--device", args.device, "--batch-size",
               str(args.batch_size), "--seq-len", str(args.seq_len), "--precision", args.precision,
               "--timed-steps", str(args.timed_steps)]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.timeout} s"}
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            result = json.loads(line[len(RESULT_TAG):])
            result["wall_seconds"] = round(time.perf_counter() - start, 1)
            return result
    return {"error": f"failed: {(done.stderr.strip().splitlines() or ['no output'])[-1][:300]}"}


def simulate(model: str, row: str, args: argparse.Namespace) -> int:
    from dpmemarc_core.memory.plan import simulated_step

    return simulated_step(spec_for(model, row, args, "meta"))["peak_bytes"]


def checks(table: dict) -> list[dict]:
    """The self-checks over the measured cells (a check whose cells are missing is not run)."""
    out = []
    for model, cells in table.items():
        peak = {row: cell.get("measured_bytes") for row, cell in cells.items()}
        for row, cell in cells.items():
            out.append({"check": f"{model} {row}: measured", "ok": peak[row] is not None,
                        "detail": cell.get("error") or ""})
            if peak[row] and cell.get("simulated_bytes"):
                ratio = cell["simulated_bytes"] / peak[row]
                out.append({"check": f"{model} {row}: simulated / measured >= {1 - SIMULATION_LOW_BY:.2f}",
                            "ok": ratio >= 1 - SIMULATION_LOW_BY, "detail": f"{ratio:.3f}"})
        for lean in ("dp-side", "dp-rev"):
            if peak.get(lean) and peak.get("dp-lora"):
                out.append({"check": f"{model}: {lean} < dp-lora", "ok": peak[lean] < peak["dp-lora"],
                            "detail": f"{peak[lean] / GIB:.2f} vs {peak['dp-lora'] / GIB:.2f} GiB"})
        if peak.get("dp-lora") and peak.get("opacus-lora"):
            out.append({"check": f"{model}: dp-lora <= opacus-lora", "ok": peak["dp-lora"] <= peak["opacus-lora"],
                        "detail": f"{peak['dp-lora'] / GIB:.2f} vs {peak['opacus-lora'] / GIB:.2f} GiB"})
    return out


def markdown(report: dict) -> str:
    a = report["settings"]
    lines = [f"### Measured on {report['device_name']} (`{report['command']}`)", "",
             f"B={a['batch_size']}, T={a['seq_len']}, {a['precision']}, random weights of the shipped configs; "
             "measured: `torch.cuda.max_memory_allocated` over two training steps in a fresh process; simulated: "
             "the same cell on the meta device (`dpmemarc memory --device meta`).", "",
             "| model | row | measured GiB | simulated GiB | simulated / measured | step s |",
             "|---|---|---:|---:|---:|---:|"]
    for model, cells in report["table"].items():
        for row, cell in cells.items():
            measured, simulated = cell.get("measured_bytes"), cell.get("simulated_bytes")
            ratio = f"{simulated / measured:.2f}" if measured and simulated else "-"
            step = f"{cell['step_seconds']:.3f}" if cell.get("step_seconds") else "-"
            lines.append(f"| {model} | {ROWS[row][0]} | {measured / GIB if measured else float('nan'):.2f} | "
                         f"{simulated / GIB if simulated else float('nan'):.2f} | {ratio} | {step} |")
    lines += ["", "| self-check | ok | detail |", "|---|---|---|"]
    lines += [f"| {c['check']} | {'yes' if c['ok'] else '**no**'} | {c['detail']} |" for c in report["checks"]]
    return "\n".join(lines) + "\n"


def dry_run_config(out: Path) -> str:
    """A two-layer GPT-2 config: the CPU dry run exercises every code path of the real run in seconds."""
    from transformers import GPT2Config

    path = out / "dry-run-gpt2.json"
    GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=500, n_positions=64, bos_token_id=0,
               eos_token_id=0).to_json_file(str(path))
    return str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="directory for the JSON + MD")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "amp-bf16", "fp32"])
    parser.add_argument("--timed-steps", type=int, default=5)
    parser.add_argument("--timeout", type=int, default=240, help="seconds per memory cell")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, a tiny GPT-2 config, B=2, T=16, fp32, one timed step: checks the script, not a GPU")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "ROW"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(RESULT_TAG + json.dumps(cell_result(*args.one, args), default=str), flush=True)
        return 0

    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    models = MODELS
    if args.dry_run:
        args.device, args.batch_size, args.seq_len, args.precision, args.timed_steps = "cpu", 2, 16, "fp32", 1
        models = (dry_run_config(out),)
    elif not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here: skipped (use --dry-run to check the script on a CPU)")
        return 0
    start = time.perf_counter()
    cells = [(model, row) for model in models for row in args.rows]
    pool = None
    if not args.dry_run:
        # Simulations on the CPU while the GPU measures; spawned: no child inherits the parent's CUDA state.
        pool = ProcessPoolExecutor(max_workers=4, mp_context=multiprocessing.get_context("spawn"))
        simulations = {cell: pool.submit(simulate, *cell, args) for cell in cells}
    table: dict[str, dict] = {model: {} for model in models}
    for model, row in cells:
        cell = (in_process if args.dry_run else measure)(model, row, args)
        table[model][row] = {"measured_bytes": cell.get("peak_bytes"), "error": cell.get("error"),
                             "step_seconds": cell.get("step_seconds"), "wall_seconds": cell.get("wall_seconds")}
        print(f"gpu_check: {model} {row}: " + (f"{cell['peak_bytes'] / GIB:.3f} GiB" if cell.get("peak_bytes")
                                               else cell["error"]), flush=True)
    for model, row in cells:
        try:
            table[model][row]["simulated_bytes"] = (simulate(model, row, args) if pool is None
                                                    else simulations[(model, row)].result())
        except Exception as error:  # a failed simulation is reported beside the measurement, not fatal
            table[model][row]["simulated_error"] = f"{type(error).__name__}: {error}"
    if pool is not None:
        pool.shutdown()
    report = {"command": " ".join(["python", "benchmarks/gpu_check.py", *(argv or sys.argv[1:])]),
              "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu (dry run)",
              "torch": torch.__version__, "seconds": round(time.perf_counter() - start, 1),
              "settings": {"batch_size": args.batch_size, "seq_len": args.seq_len, "precision": args.precision,
                           "timed_steps": args.timed_steps},
              "table": table}
    report["checks"] = checks(table)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    print(f"gpu_check: wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'} in {report['seconds']:.0f} s")
    failed = [c for c in report["checks"] if c["check"].endswith("measured") and not c["ok"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
