"""`dpmemarc audit`: a one-run privacy audit of the real training loop on offline data.

Registered by `add_audit_parser(subparsers)`; the work is `dpmemarc_core.audit.run_audit`.
"""

from __future__ import annotations

import argparse
import json
import math

from dpmemarc_core.audit import AuditResult, run_audit, tokenizer_canaries
from dpmemarc_core.cli.common import epsilon_arg, method_option_arg
from dpmemarc_core.privacy.settings import PrivacySettings
from dpmemarc_core.training.config import BK_DEFAULT_LR, ZO_PARAM_METHODS, TrainConfig
from dpmemarc_core.training.zo import DEFAULT_LR as ZO_DEFAULT_LR

# The bound pays 2·m·δ: with a δ of order 1/N and m canaries among N examples that term is about 1,
# which costs a good part of the bound (the paper audits at δ = 1e-5).
DEFAULT_DELTA = 1e-5


def add_audit_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `dpmemarc audit` on `subparsers` (the `add_subparsers()` of the `dpmemarc` parser)."""
    p = subparsers.add_parser(
        "audit", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="empirical lower bound on epsilon from one training run with canaries (Steinke et al. 2023)",
        description="Mix random-token canaries (each kept with probability 1/2) into the real training set, "
                    "train once, guess membership from each canary's loss drop, and turn the right guesses "
                    "into a lower bound on epsilon at confidence 1 - beta. A loose lower bound, not a proof.")
    p.add_argument("--model", default="minilm", help="HF name or path, or an offline alias: minilm, smollm2-135m")
    p.add_argument("--task", default="movie-sentiment", help="task name (see dpmemarc_core.data.TASKS)")
    p.add_argument("--method", default="lora",
                   help="full, lora, adapter, bitfit, side, rev (BK DP-Adam), or zo (DPZero on --zo-params' part)")
    p.add_argument("--zo-params", default=TrainConfig.zo_params, choices=list(ZO_PARAM_METHODS),
                   help="with --method zo: which parameters DPZero perturbs")
    p.add_argument("--epsilon", type=epsilon_arg, default=8.0, help="privacy budget; inf = non-private")
    p.add_argument("--delta", type=float, default=DEFAULT_DELTA,
                   help="delta of both the accountant and the audit (the bound adds 2 * canaries * delta)")
    p.add_argument("--canaries", type=int, default=500, help="number of canaries m, each included with prob. 1/2")
    p.add_argument("--canary-length", type=int, default=8, help="random tokens per canary")
    p.add_argument("--guesses", type=int, default=None,
                   help="guesses per side k (k 'in' for the highest scores, k 'out' for the lowest); "
                        "default canaries // 10")
    p.add_argument("--beta", type=float, default=0.05, help="1 - confidence of the lower bound")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=32, help="expected (Poisson) batch size")
    p.add_argument("--physical-batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None,
                   help=f"default: the method's, as in dpmemarc_core.training.build.make_trainer ({BK_DEFAULT_LR:g} "
                        f"DP-Adam, {ZO_DEFAULT_LR:g} DPZero)")
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--accountant", default="rdp", choices=["rdp", "prv"])
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--max-train", type=int, default=500, help="real training examples the canaries join (0 = all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--method-option", type=method_option_arg, action="append", default=[], metavar="KEY=VALUE",
                   help="method option, e.g. r=16 (repeatable)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--progress", action="store_true", help="show a progress bar")
    p.set_defaults(func=_run_audit)


def audit_from_args(args: argparse.Namespace) -> AuditResult:
    """Build the run as `dpmemarc train` does (`build_run`), load the offline task, build canaries from tokens
    the task never uses, and audit."""
    from dpmemarc_core.data import load_task, num_labels_of, task_kind_of
    from dpmemarc_core.training.build import build_run

    privacy = PrivacySettings(target_epsilon=args.epsilon, delta=args.delta, max_grad_norm=args.max_grad_norm,
                              accountant=args.accountant)
    kind = task_kind_of(args.task)
    run = build_run(args.model, kind, args.method, num_labels=num_labels_of(args.task),
                    method_options=dict(args.method_option), zo_params=args.zo_params,
                    device=args.device, seed=args.seed)
    task = load_task(args.task, run.tokenizer, max_length=args.max_length, max_train=args.max_train or None,
                     max_eval=1, seed=args.seed)
    canaries = tokenizer_canaries(run.tokenizer, args.canaries, args.canary_length, max(task.num_labels, 2),
                                  task.train, seed=args.seed, generation=kind == "generation")
    return run_audit(run.model, task.train, task.collate, canaries, privacy, steps=args.steps,
                     batch_size=args.batch_size, method=args.method, lr=args.lr, guesses_per_side=args.guesses,
                     beta=args.beta, seed=args.seed, physical_batch_size=args.physical_batch_size, device=run.device,
                     precision=run.precision, progress=args.progress)


def _format_epsilon(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.3f}"


def _run_audit(args: argparse.Namespace) -> int:
    result = audit_from_args(args)
    if args.json:
        summary = {"model": args.model, "task": args.task, "method": args.method, **result.as_dict()}
        print(json.dumps({k: (str(v) if isinstance(v, float) and math.isinf(v) else v) for k, v in summary.items()}))
    else:
        print(f"audit: {args.method} on {args.model} / {args.task}: empirical epsilon lower bound "
              f"{_format_epsilon(result.epsilon_lower_bound)} at {result.confidence:.0%} confidence; accountant "
              f"epsilon {_format_epsilon(result.accountant_epsilon)} (delta {result.delta:g}); "
              f"{result.correct}/{result.guesses} right guesses on {result.canaries} canaries "
              f"({result.included} included), {result.steps} steps, noise multiplier {result.noise_multiplier:.4g}")
    return 0
