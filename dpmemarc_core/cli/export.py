"""`dpmemarc export SOURCE --out DIR`: a run's trainable state as a folder usable outside dpmemarc."""

from __future__ import annotations

import argparse
import json

from dpmemarc_core.methods import METHODS


def add_export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="write a run's result as a peft adapter (lora), a transformers model (full, bitfit) or a "
                       "folder for dpmemarc_core.methods.load_pretrained (adapter, side, rev), with privacy.json",
        description="SOURCE is a run's output directory (dpmemarc train --output, or a federated output-dir: its "
                    "last round) or a .safetensors trainable state. The model and method come from the run's "
                    "records; the flags replace them, and are needed for a state without records.")
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("--out", required=True, metavar="DIR", help="the export folder (replaced if an earlier export)")
    p.add_argument("--model", default=None, help="base model: HF name, local path or offline alias")
    p.add_argument("--method", default=None, choices=list(METHODS), help="the method the state belongs to")
    p.add_argument("--method-options", default=None, metavar="JSON",
                   help='the method\'s options as a JSON object, e.g. \'{"r": 8}\'')
    p.add_argument("--task", default=None,
                   help="'classification' or 'generation', or a task name of dpmemarc_core.data")
    p.add_argument("--labels", default=None, help="class names in head order, e.g. negative,positive")
    p.set_defaults(func=_run_export)


def _spec_overrides(args: argparse.Namespace) -> dict:
    from dpmemarc_core.data import TASKS, num_labels_of, task_kind_of
    from dpmemarc_core.site_data import TASK_KINDS, parse_labels

    overrides: dict = {}
    if args.method_options is not None:
        options = json.loads(args.method_options)
        if not isinstance(options, dict):
            raise ValueError(f"--method-options must be a JSON object, got {args.method_options!r}")
        overrides["method_options"] = options
    if args.labels is not None:
        overrides["labels"] = parse_labels(args.labels)
        overrides["num_labels"] = len(overrides["labels"])
    if args.task is not None:
        if args.task not in (*TASK_KINDS, *TASKS):
            raise ValueError(f"--task must be one of {', '.join((*TASK_KINDS, *TASKS))}, got {args.task!r}")
        kind = args.task if args.task in TASK_KINDS else task_kind_of(args.task)
        overrides["task_kind"] = kind
        if args.task in TASKS and kind == "classification":
            overrides.setdefault("num_labels", num_labels_of(args.task))
    return overrides


def _run_export(args: argparse.Namespace) -> int:
    from dpmemarc_core.training.export import export_run

    out = export_run(args.source, args.out, model=args.model, method=args.method,
                     spec_overrides=_spec_overrides(args))
    print(f"wrote {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")
    return 0
