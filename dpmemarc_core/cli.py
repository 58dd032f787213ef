"""`dpmemarc ...`: single-site commands. Each subcommand parses its flags and calls the library."""

from __future__ import annotations

import argparse
import json
import math
import sys

from dpmemarc_core.cli_args import epsilon_arg
from dpmemarc_core.train import TrainConfig, train


def _method_options(pairs: list[str]) -> dict:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"--method-option takes KEY=VALUE, got {pair!r}")
        try:
            options[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            options[key.replace("-", "_")] = value
    return options


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="private fine-tuning on one site (no arguments: the offline quickstart)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = TrainConfig()
    p.add_argument("--model", default=d.model, help="HF name or path, or an offline alias: minilm, smollm2-135m")
    p.add_argument("--task", default=d.task, help="task name (see dpmemarc_core.data.TASKS)")
    p.add_argument("--method", default=d.method, help="full, lora, adapter, bitfit, side, rev, zo")
    p.add_argument("--epsilon", type=epsilon_arg, default=d.epsilon, help="privacy budget; inf = non-private")
    p.add_argument("--delta", type=float, default=None, help="default 1/N (N training examples)")
    steps = p.add_mutually_exclusive_group()
    steps.add_argument("--epochs", type=float, default=None, help="default 1 epoch when --max-steps is unset")
    steps.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="expected (Poisson) batch size")
    p.add_argument("--physical-batch-size", type=int, default=None,
                   help="split each batch into micro-batches of this size to save memory")
    p.add_argument("--lr", type=float, default=None, help="default 5e-4 (DP-Adam); 1e-5 for --method zo (DPZero's SGD)")
    p.add_argument("--zo-params", default=d.zo_params, choices=["full", "lora", "bitfit"],
                   help="with --method zo: which parameters DPZero perturbs")
    p.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm)
    p.add_argument("--clipping-mode", default=d.clipping_mode, choices=["mixed", "ghost", "instantiate"])
    p.add_argument("--clip-fn", default=d.clip_fn, choices=["abadi", "automatic"])
    p.add_argument("--accountant", default=d.accountant, choices=["rdp", "prv"])
    p.add_argument("--max-length", type=int, default=d.max_length)
    p.add_argument("--max-train", type=int, default=2000, help="cap on training examples (0 = all)")
    p.add_argument("--max-eval", type=int, default=500, help="cap on evaluation examples (0 = all)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--method-option", action="append", default=[], metavar="KEY=VALUE",
                   help="method option, e.g. r=16 or reduction=8 (repeatable)")
    p.add_argument("--output", default="runs/quickstart", help="directory for summary.json and the trainable state")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    cfg = TrainConfig(
        model=args.model, task=args.task, method=args.method, epsilon=args.epsilon, delta=args.delta,
        epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
        physical_batch_size=args.physical_batch_size, lr=args.lr, max_grad_norm=args.max_grad_norm,
        clipping_mode=args.clipping_mode, clip_fn=args.clip_fn, accountant=args.accountant,
        max_length=args.max_length, max_train=args.max_train or None, max_eval=args.max_eval or None,
        seed=args.seed, device=args.device, output=args.output,
        method_options=_method_options(args.method_option), zo_params=args.zo_params,
        progress=not args.no_progress)
    summary = train(cfg)
    eps = summary["epsilon"]
    print(f"done: method={summary['method']} steps={summary['steps']} "
          f"epsilon={'inf' if math.isinf(eps) else f'{eps:.3f}'} delta={summary['delta']:.3g} "
          f"metrics before={summary['metrics_before']} after={summary['metrics']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from dpmemarc_core.cli_audit import add_audit_parser
    from dpmemarc_core.cli_memory import add_memory_parser

    parser = argparse.ArgumentParser(prog="dpmemarc", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    add_train_parser(sub)
    add_memory_parser(sub)
    add_audit_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:  # bad input: a message, not a traceback
        print(f"dpmemarc {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
