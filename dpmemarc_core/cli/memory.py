"""`dpmemarc memory`: peak memory of one DP training step of an exact published config, GPU or not."""

from __future__ import annotations

import argparse
import json
import sys

from dpmemarc_core.cli.common import epsilon_arg, positive_int
from dpmemarc_core.memory.step import DEVICES, ENGINES, PRECISIONS, MemorySpec, format_report, step_memory
from dpmemarc_core.training.config import ZO_PARAM_METHODS


def _method_option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--method-option takes KEY=VALUE, got {text!r}")
    try:
        return key.replace("-", "_"), json.loads(value)
    except json.JSONDecodeError:
        return key.replace("-", "_"), value


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
    p.add_argument("--model", required=True,
                   help="a shipped published config (dpmemarc_core.models.PUBLISHED_CONFIGS) or a path to config.json")
    p.add_argument("--method", required=True, help="full, lora, adapter, bitfit, side, rev, zo (DPZero)")
    p.add_argument("--zo-params", choices=list(ZO_PARAM_METHODS), default=d.zo_params,
                   help="method zo: whose trainable part DPZero perturbs")
    p.add_argument("--batch-size", type=positive_int("--batch-size"), default=d.batch_size)
    p.add_argument("--seq-len", type=positive_int("--seq-len"), default=d.seq_len)
    p.add_argument("--precision", choices=list(PRECISIONS), default=d.precision,
                   help="bf16/fp16: frozen weights in that dtype, trainable ones fp32, autocast forward; "
                        "amp-bf16: all weights fp32, autocast bf16; fp32: no autocast")
    p.add_argument("--device", choices=list(DEVICES), default=None,
                   help="meta: simulate; cuda: measure; cpu: count real tensors "
                        "(default: cuda when available, else meta)")
    p.add_argument("--engine", choices=list(ENGINES), default=d.engine,
                   help="bk: ours (method zo: DPZero's clipped, noised step); opacus: GradSampleModule hooks + "
                        "DPOptimizer (not with zo); nondp: no clipping, no noise")
    p.add_argument("--epsilon", type=epsilon_arg, default=d.epsilon,
                   help="finite: noise is drawn (its scale moves no byte); "
                        "inf: no noise (engine bk: a non-private step)")
    p.add_argument("--clipping-mode", choices=["mixed", "ghost", "instantiate"], default=d.clipping_mode)
    p.add_argument("--backward-passes", type=int, choices=[1, 2], default=None,
                   help="engine bk: one backward (BK) or two (GhostClip-style; default: the method's choice)")
    p.add_argument("--attn-implementation", default=None, help="e.g. eager or sdpa (default: the model's)")
    p.add_argument("--method-option", type=_method_option, action="append", default=[], metavar="KEY=VALUE",
                   help="method option, e.g. r=16 or reduction=8 (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.set_defaults(func=run_memory)


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
