"""The simulator held against real tensors on this machine: `dpmemarc memory --device meta` against
`--device cpu` (the same step on real CPU tensors, counted by the same storage tracker) for MiniLM, GPT-2
small and SmolLM2-135M, every method, fp32 and bf16; beside them the max RSS of a real `dpmemarc train`
step of MiniLM (the one model of the three whose weights ship offline with a training task here).

    python benchmarks/memory_calibration.py                 # writes benchmarks/results/memory_calibration.json
    python benchmarks/memory_calibration.py --models gpt2 --precisions fp32 --no-train

B=8, T=64 (a real CPU step of every method of three models has to fit this machine's minutes), eager
attention on both devices: on meta the simulator otherwise emulates CUDA's fused attention kernel, which
the CPU does not run (with dropout on, CPU SDPA takes the math path and keeps T×T probabilities). Under
bf16 the meta step still follows CUDA autocast's op lists (memory_emulation), the CPU step CPU autocast's:
that difference is part of what the bf16 rows show. One interpreter per (model, precision) runs every
method on both devices; the tracker counts only storages created inside each step, so cells never mix.
Agreement goal: meta within 10 % of cpu.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "memory_calibration.json"
MODELS = ("minilm", "gpt2", "smollm2-135m")
METHODS = ("full", "lora", "adapter", "bitfit", "side", "rev", "zo")
PRECISIONS = ("fp32", "bf16")
GOAL = 0.10
TAG = "CALIBRATION "
# `dpmemarc train ARGS` in this interpreter, then its own peak resident set (Linux: KiB).
RSS_PROBE = ("import resource, sys; from dpmemarc_core.cli import main; code = main(sys.argv[1:]); "
             "print('MAX_RSS_KIB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(code)")


def model_source(model: str) -> str:
    """A name `dpmemarc memory` takes: shipped configs by name, MiniLM by its offline checkpoint's folder."""
    if model == "minilm":
        from dpmemarc_core.models import resolve

        return resolve("minilm")
    return model


def cells(model: str, precision: str, args: argparse.Namespace) -> None:
    """In a fresh interpreter: every method of `model` at `precision`, on meta and on cpu."""
    import torch

    from dpmemarc_core.memory.step import MemorySpec, step_memory

    torch.set_num_threads(2)
    for method in args.methods:
        row = {"model": model, "method": method, "precision": precision}
        for device in ("meta", "cpu"):
            spec = MemorySpec(model=model_source(model), method=method, batch_size=args.batch_size,
                              seq_len=args.seq_len, precision=precision, device=device, attn_implementation="eager")
            start = time.perf_counter()
            try:
                row[f"{device}_bytes"] = step_memory(spec)["peak_bytes"]
            except Exception as error:  # reported in the table, the other cells still run
                row[f"{device}_error"] = f"{type(error).__name__}: {error}"[:300]
            row[f"{device}_seconds"] = round(time.perf_counter() - start, 1)
        print(TAG + json.dumps(row), flush=True)


def train_rss(method: str, precision: str, args: argparse.Namespace) -> dict:
    """Max RSS of `dpmemarc train` running one step of MiniLM (the process, libraries and data included),
    read by the training process itself at its end."""
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-c", RSS_PROBE, "train", "--model", "minilm", "--task", "synthetic",
                   "--method", method, "--precision", precision, "--batch-size", str(args.batch_size),
                   "--max-length", str(args.seq_len), "--max-steps", "1", "--max-train", "64", "--max-eval", "8",
                   "--epsilon", "8", "--no-progress", "--output", out]
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    rss = [line.split()[1] for line in done.stdout.splitlines() if line.startswith("MAX_RSS_KIB ")]
    if done.returncode or not rss:
        return {"error": (done.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    return {"max_rss_bytes": int(rss[0]) * 1024}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--no-train", action="store_true", help="skip the dpmemarc train RSS column")
    parser.add_argument("--cells", nargs=2, metavar=("MODEL", "PRECISION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cells:
        cells(*args.cells, args)
        return 0
    rows = []
    for model in args.models:
        for precision in args.precisions:
            command = [sys.executable, __file__, "--cells", model, precision, "--methods", *args.methods,
                       "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len)]
            done = subprocess.run(command, capture_output=True, text=True)
            found = [json.loads(line[len(TAG):]) for line in done.stdout.splitlines() if line.startswith(TAG)]
            if not found:
                tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:300]
                found = [{"model": model, "precision": precision, "method": m, "error": tail} for m in args.methods]
            for row in found:
                if row.get("meta_bytes") and row.get("cpu_bytes"):
                    row["meta_over_cpu"] = round(row["meta_bytes"] / row["cpu_bytes"], 4)
                    row["within_goal"] = abs(row["meta_over_cpu"] - 1) <= GOAL
                if model == "minilm" and not args.no_train:
                    row["train_step"] = train_rss(row["method"], precision, args)
                rows.append(row)
                print(json.dumps(row), flush=True)
    RESULTS.write_text(json.dumps({"batch_size": args.batch_size, "seq_len": args.seq_len, "goal": GOAL,
                                   "command": "python " + " ".join(["benchmarks/memory_calibration.py",
                                                                    *sys.argv[1:]]),
                                   "rows": rows}, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
