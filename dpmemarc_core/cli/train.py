"""`dpmemarc train`: private fine-tuning on one site."""

from __future__ import annotations

import argparse
import math

from dpmemarc_core.cli.common import (
    delta_arg,
    epsilon_arg,
    memory_arg,
    method_option_arg,
    physical_batch_size_arg,
)
from dpmemarc_core.single_site import train
from dpmemarc_core.training.config import TrainConfig
from dpmemarc_core.training.precision import PRECISIONS
from dpmemarc_core.training.presets import PRESETS, preset_config


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="private fine-tuning on one site (no arguments: the offline quickstart)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = TrainConfig()
    p.add_argument("--preset", default="quick", choices=PRESETS,
                   help="starting point for every setting below left unset: 'quick' learns in a few CPU minutes "
                        "(B=128, one epoch of all examples, T=48, lr 5e-3, LoRA r=1, head lr 2e-2), 'long' is quick at "
                        "B=512 over 4 epochs (same steps, 4x the compute; side: 16 epochs), 'paper' is the paper's (B=32, T=128, "
                        "lr 5e-4, r=64, one epoch of all examples); see dpmemarc_core/training/presets.py")
    p.add_argument("--model", default=d.model, help="HF name or path, or an offline alias: minilm, smollm2-135m")
    p.add_argument("--task", default=d.task, help="task name (see dpmemarc_core.data.TASKS)")
    p.add_argument("--method", default=d.method, help="full, lora, adapter, bitfit, side, rev, zo")
    p.add_argument("--epsilon", type=epsilon_arg, default=d.epsilon, help="privacy budget; inf = non-private")
    p.add_argument("--delta", type=delta_arg, default=None,
                   help="a number in (0, 1), or a rule of the number N of training examples: 1/(10N) (the default: "
                        "delta must be well below 1/N) or 1/N (the paper's, the 'paper' preset's default)")
    p.add_argument("--secure-mode", action="store_true",
                   help="draw Poisson batches and noise from a cryptographically secure generator, with noise "
                        "robust to the floating-point attack (as Opacus's secure_mode); slower, see BENCHMARKS.md")
    steps = p.add_mutually_exclusive_group()
    steps.add_argument("--epochs", type=float, default=None, help="default: the preset's")
    steps.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="expected (Poisson) batch size; default: the preset's")
    p.add_argument("--physical-batch-size", type=physical_batch_size_arg, default=None,
                   help="split each batch into micro-batches of this size to save memory; 'auto': the largest the "
                        "memory simulator fits in --memory (without --memory: the GPU's free memory, or the CPU's "
                        "available RAM); the expected batch, the noise and the accounting do not change")
    p.add_argument("--memory", type=memory_arg, default=None,
                   help="memory budget of --physical-batch-size auto, e.g. 8GiB")
    p.add_argument("--precision", choices=list(PRECISIONS), default=None,
                   help="bf16/fp16: frozen weights in that dtype, trainable weights fp32, autocast forward (fp16 with "
                        "a loss scale); amp-bf16: all weights fp32, autocast bf16; fp32: no autocast (default: bf16 "
                        "on a CUDA GPU that supports it, else fp32)")
    p.add_argument("--lr", type=float, default=None,
                   help="default: the preset's for the method, else 5e-4 (DP-Adam), 1e-5 for --method zo (DPZero)")
    p.add_argument("--head-lr", type=float, default=None,
                   help="learning rate of a classifier head (BK methods); default: the preset's, else --lr")
    p.add_argument("--zo-params", default=d.zo_params, choices=["full", "lora", "bitfit"],
                   help="with --method zo: which parameters DPZero perturbs")
    p.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm)
    p.add_argument("--clipping-mode", default=d.clipping_mode, choices=["mixed", "ghost", "instantiate"])
    p.add_argument("--clip-fn", default=d.clip_fn, choices=["abadi", "automatic"])
    p.add_argument("--clip-groups", default=None, choices=["all", "head"],
                   help="all: one clipping norm over every trainable parameter; head: the classifier head and the "
                        "rest clipped separately, each to C/sqrt(2) (same noise, same epsilon); default: the "
                        "preset's")
    p.add_argument("--probe-fraction", type=float, default=None,
                   help="train the classifier head alone for this fraction of the steps first, then every trainable "
                        "part (DP linear probing, then fine-tuning; same noise, same epsilon); in [0, 1), default: "
                        "the preset's")
    p.add_argument("--accountant", default=d.accountant, choices=["rdp", "prv"])
    p.add_argument("--max-length", type=int, default=None, help="tokens; default: the preset's")
    p.add_argument("--max-train", type=int, default=None, help="cap on training examples (0 = all); default: the preset's")
    p.add_argument("--max-eval", type=int, default=None, help="cap on evaluation examples (0 = all); default: the preset's")
    p.add_argument("--validation", action="store_true",
                   help="evaluate on a held-out tenth of the training split instead of the test split (for "
                        "hyper-parameter sweeps)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--method-option", type=method_option_arg, action="append", default=[], metavar="KEY=VALUE",
                   help="method option, e.g. r=16 or reduction=8 (repeatable; merged over the preset's)")
    p.add_argument("--output", default="runs/quickstart", help="directory for summary.json and the trainable state")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_run_train)


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The run's TrainConfig: the preset's settings, overridden by every flag given."""
    # Flags left unset (None) take the preset's value; 0 for the caps means "all examples".
    unset_by_default = {"epochs": args.epochs, "max_steps": args.max_steps, "batch_size": args.batch_size,
                        "lr": args.lr, "head_lr": args.head_lr, "max_length": args.max_length,
                        "max_train": args.max_train,
                        "max_eval": args.max_eval, "delta": args.delta, "clip_groups": args.clip_groups,
                        "probe_fraction": args.probe_fraction}
    given = {k: v for k, v in unset_by_default.items() if v is not None}
    for cap in ("max_train", "max_eval"):
        if given.get(cap) == 0:
            given[cap] = None
    if args.max_steps is not None:
        given["epochs"] = None
    return preset_config(
        args.preset, args.method, model=args.model, task=args.task, epsilon=args.epsilon,
        secure_mode=args.secure_mode,
        physical_batch_size=args.physical_batch_size, memory=args.memory, precision=args.precision,
        max_grad_norm=args.max_grad_norm,
        clipping_mode=args.clipping_mode, clip_fn=args.clip_fn, accountant=args.accountant, seed=args.seed,
        validation=args.validation,
        device=args.device, output=args.output, method_options=dict(args.method_option),
        zo_params=args.zo_params, progress=not args.no_progress, **given)


def _run_train(args: argparse.Namespace) -> int:
    summary = train(train_config_from_args(args))
    eps = summary["epsilon"]
    print(f"done: method={summary['method']} steps={summary['steps']} "
          f"epsilon={'inf' if math.isinf(eps) else f'{eps:.3f}'} delta={summary['delta']:.3g} "
          f"metrics before={summary['metrics_before']} after={summary['metrics']}")
    return 0
