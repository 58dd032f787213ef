"""`dpmemarc memory`: peak memory of one DP training step of an exact published config, GPU or not."""

from __future__ import annotations

import argparse
import json
import sys

from dpmemarc_core.cli.common import add_step_arguments, method_option_arg
from dpmemarc_core.memory.step import (
    DEVICES,
    ENGINES,
    MemorySpec,
    format_report,
    step_memory,
)


def add_memory_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `memory` on the `dpmemarc` command's subparsers."""
    d = MemorySpec(model="", method="")
    p = subparsers.add_parser(
        "memory", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="peak memory of one DP training step (simulated on the meta device without a GPU)",
        description="Runs full training steps (forward, per-example loss, clipped backward, noise, Adam) of a "
                    "published model config with random weights and prints the peak memory with a breakdown "
                    "(method zo: two perturbed forwards, clipped scalars, noise, an in-place SGD update). "
                    "Without a GPU the step runs on the meta device and nothing is allocated.")
    add_step_arguments(p)
    p.add_argument("--method", required=True, help="full, lora, adapter, bitfit, side, rev, zo (DPZero)")
    p.add_argument("--device", choices=list(DEVICES), default=None,
                   help="meta: simulate; cuda: measure; cpu: count real tensors "
                        "(default: cuda when available, else meta)")
    p.add_argument("--engine", choices=list(ENGINES), default=d.engine,
                   help="bk: ours (method zo: DPZero's clipped, noised step); opacus: GradSampleModule hooks + "
                        "DPOptimizer (not with zo); nondp: no clipping, no noise")
    p.add_argument("--clipping-mode", choices=["mixed", "ghost", "instantiate"], default=d.clipping_mode)
    p.add_argument("--backward-passes", type=_backward_passes, choices=[1, 2, "auto"], default=None,
                   help="engine bk: one backward (BK), two (GhostClip-style) or auto (one while BK's buffers "
                        "stay small, else two; default: the method's choice)")
    p.add_argument("--attn-implementation", default=None, help="e.g. eager or sdpa (default: the model's)")
    p.add_argument("--method-option", type=method_option_arg, action="append", default=[], metavar="KEY=VALUE",
                   help="method option, e.g. r=16 or reduction=8 (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.set_defaults(func=run_memory)


def _backward_passes(text: str) -> int | str:
    if text not in ("1", "2", "auto"):
        raise argparse.ArgumentTypeError(f"expected 1, 2 or auto, got {text!r}")
    return text if text == "auto" else int(text)


def run_memory(args: argparse.Namespace) -> int:
    spec = MemorySpec(model=args.model, method=args.method, batch_size=args.batch_size, seq_len=args.seq_len,
                      precision=args.precision, device=args.device, engine=args.engine, epsilon=args.epsilon,
                      clipping_mode=args.clipping_mode, backward_passes=args.backward_passes,
                      method_options=dict(args.method_option), attn_implementation=args.attn_implementation,
                      zo_params=args.zo_params)
    result = step_memory(spec)
    if args.json:
        print(json.dumps(result, default=str))
        if result["note"]:
            print(f"note: {result['note']}", file=sys.stderr)
    else:
        print(format_report(result))
    return 0
