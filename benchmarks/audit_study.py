"""One-run privacy audit across methods and budgets: the empirical ε lower bound next to the accountant's ε.

Each cell is one `dpmemarc audit` run (same code path as the command) on MiniLM / movie-sentiment with the
same setup: real training examples plus random-token canaries, each canary included with probability 1/2.
The run is sized for a shared 2-core CPU (about 20 CPU minutes for the default grid); a one-run audit of so
short a run has little power, so read a bound of 0 as "the attack saw nothing", not as "the run is private".

    python benchmarks/audit_study.py                       # lora, side, rev x eps in {1, 4, 8, inf}
    python benchmarks/audit_study.py --methods lora --epsilons 8 inf --no-write
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

from dpmemarc_core.cli.audit import add_audit_parser, audit_from_args

RESULTS = Path(__file__).resolve().parent / "results"


def audit_cell(method: str, epsilon: float, args: argparse.Namespace) -> dict:
    parser = argparse.ArgumentParser(prog="dpmemarc")
    add_audit_parser(parser.add_subparsers())
    cell_args = parser.parse_args([
        "audit", "--method", method, "--epsilon", str(epsilon), "--canaries", str(args.canaries),
        "--canary-length", str(args.canary_length), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
        "--lr", str(args.lr), "--max-train", str(args.max_train), "--max-length", str(args.max_length),
        "--seed", str(args.seed), "--device", args.device])
    cpu, wall = time.process_time(), time.perf_counter()
    result = audit_from_args(cell_args).as_dict()
    return {"method": method, **result, "cpu_seconds": time.process_time() - cpu,
            "wall_seconds": time.perf_counter() - wall}


def json_safe(value):
    """inf is not JSON: write it as the string "inf"."""
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def plot(cells: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epsilons = sorted({c["target_epsilon"] for c in cells})
    positions = {eps: i for i, eps in enumerate(epsilons)}
    methods = sorted({c["method"] for c in cells}, key=[c["method"] for c in cells].index)
    width = 0.8 / max(len(methods), 1)
    fig, ax = plt.subplots(figsize=(7, 4))
    for j, method in enumerate(methods):
        rows = [c for c in cells if c["method"] == method]
        xs = [positions[c["target_epsilon"]] + (j - (len(methods) - 1) / 2) * width for c in rows]
        ax.bar(xs, [c["epsilon_lower_bound"] for c in rows], width, label=f"{method}: audit lower bound")
    finite = [eps for eps in epsilons if math.isfinite(eps)]
    ax.scatter([positions[eps] for eps in finite], finite, marker="_", s=900, color="black", zorder=3,
               label="accountant ε (target)")
    ax.set_xticks(range(len(epsilons)), ["∞ (non-private)" if math.isinf(e) else f"{e:g}" for e in epsilons])
    ax.set_xlabel("training budget ε (δ = 1e-5)")
    ax.set_ylabel("ε")
    confidence = cells[0]["confidence"]
    ax.set_title(f"One-run audit, {cells[0]['canaries']} canaries, {cells[0]['guesses']} guesses, "
                 f"{confidence:.0%} confidence")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["lora", "side", "rev"])
    parser.add_argument("--epsilons", nargs="+", type=float, default=[1.0, 4.0, 8.0, math.inf])
    parser.add_argument("--canaries", type=int, default=200)
    parser.add_argument("--canary-length", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--max-train", type=int, default=100)
    parser.add_argument("--max-length", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-write", action="store_true", help="print only; leave results/ alone")
    args = parser.parse_args()

    cells = []
    for method in args.methods:
        for epsilon in args.epsilons:
            cell = audit_cell(method, epsilon, args)
            cells.append(cell)
            print(f"{method:5s} eps={epsilon:<4g} audit lower bound {cell['epsilon_lower_bound']:.3f} "
                  f"(accountant {cell['accountant_epsilon']:.3f}) {cell['correct']}/{cell['guesses']} right, "
                  f"{cell['cpu_seconds']:.0f} s CPU", flush=True)
    if args.no_write:
        return
    RESULTS.mkdir(exist_ok=True)
    command = " ".join(["python benchmarks/audit_study.py", *sys.argv[1:]])
    report = {"command": command, "args": vars(args), "torch": torch.__version__, "machine": platform.machine(),
              "threads": torch.get_num_threads(), "cells": cells}
    (RESULTS / "audit_study.json").write_text(json.dumps(json_safe(report), indent=2) + "\n")
    plot(cells, RESULTS / "audit_study.png")
    print(f"wrote {RESULTS / 'audit_study.json'} and {RESULTS / 'audit_study.png'}")


if __name__ == "__main__":
    main()
