"""`dpmemarc plan`: which method, split into which micro-batches, fits a GPU of a given memory."""

from __future__ import annotations

import argparse
import json
import os

from dpmemarc_core.cli.common import add_step_arguments, positive_int
from dpmemarc_core.memory.plan import (
    PLAN_METHODS,
    SIMULATION_LOW_BY,
    PlanOption,
    parse_memory_size,
    plan,
)
from dpmemarc_core.memory.step import MemorySpec

GIB = 1024 ** 3


def _memory_arg(text: str) -> int:
    try:
        return parse_memory_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _methods_arg(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in PLAN_METHODS]
    if unknown or not methods:
        raise argparse.ArgumentTypeError(f"--method must be one or more of {', '.join(PLAN_METHODS)} "
                                         f"(comma-separated), got {text!r}")
    return methods


def add_plan_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `plan` on the `dpmemarc` command's subparsers."""
    p = subparsers.add_parser(
        "plan", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="which method and micro-batch fit a memory budget (simulated, no GPU needed)",
        description="For each method (or the given ones): the largest physical micro-batch whose simulated DP "
                    f"training step, read {SIMULATION_LOW_BY:.0%} high for the simulator's margin, fits the "
                    "budget; the micro-steps per logical batch and the simulated peak. The logical (expected "
                    "Poisson) batch, the noise and the privacy accounting do not depend on the micro-batch. "
                    "Best choice first. Simulations are cached in $DPMEMARC_CACHE/memory.")
    add_step_arguments(p)
    p.add_argument("--memory", required=True, type=_memory_arg, help="the GPU's memory, e.g. 8GiB, 24GB, 16000MiB")
    p.add_argument("--method", type=_methods_arg, default=list(PLAN_METHODS),
                   help="one method or a comma-separated list")
    p.add_argument("--workers", type=positive_int("--workers"), default=min(os.cpu_count() or 1, 4),
                   help="processes simulating methods side by side")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.set_defaults(func=run_plan)


def run_plan(args: argparse.Namespace) -> int:
    base = MemorySpec(model=args.model, method=args.method[0], batch_size=args.batch_size, seq_len=args.seq_len,
                      precision=args.precision, device="meta", epsilon=args.epsilon, zo_params=args.zo_params)
    options = plan(base, args.memory, args.method, workers=args.workers)
    if args.json:
        print(json.dumps({"budget_bytes": args.memory, "options": [o.as_json() for o in options],
                          "model": args.model, "batch_size": args.batch_size, "seq_len": args.seq_len,
                          "precision": args.precision, "simulation_low_by": SIMULATION_LOW_BY}))
    else:
        print(format_plan(base, args.memory, options))
    return 0


def format_plan(base: MemorySpec, budget_bytes: int, options: list[PlanOption]) -> str:
    """The options as a table, then the recommendation or, when nothing fits, the smallest configuration."""
    lines = [(f"{base.model}: logical batch {base.batch_size}, T={base.seq_len}, {base.precision}, budget "
              f"{budget_bytes / GIB:.2f} GiB (a simulated peak fits when it is at most "
              f"{1 - SIMULATION_LOW_BY:.0%} of the budget: the simulator reads up to {SIMULATION_LOW_BY:.0%} low)"),
             f"  {'method':<8} {'micro-batch':>11} {'steps/batch':>11} {'simulated peak':>15}  fits"]
    for o in options:
        lines.append(f"  {o.method:<8} {o.physical_batch_size:>11} {o.steps_per_batch:>11} "
                     f"{o.peak_bytes / GIB:>11.2f} GiB  {'yes' if o.fits else 'no'}")
    best = options[0]
    if best.fits:
        lines.append(f"best: --method {best.method} --physical-batch-size {best.physical_batch_size} "
                     f"({best.steps_per_batch} micro-step(s) per logical batch)")
    else:
        lines.append(f"nothing fits in {budget_bytes / GIB:.2f} GiB: the smallest configuration is --method "
                     f"{best.method} --physical-batch-size 1 at a simulated peak of {best.peak_bytes / GIB:.2f} GiB "
                     f"(plan for {best.as_json()['required_bytes'] / GIB:.2f} GiB); shorter sequences "
                     "(--seq-len) or a larger GPU are what is left")
    return "\n".join(lines)
