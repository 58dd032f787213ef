"""`dpmemarc ...`: differentially private, memory-lean fine-tuning of language models (one subcommand each)."""

from __future__ import annotations

import argparse
import sys

from dpmemarc_core.cli.train import add_train_parser


def build_parser() -> argparse.ArgumentParser:
    from dpmemarc_core.cli.audit import add_audit_parser
    from dpmemarc_core.cli.export import add_export_parser
    from dpmemarc_core.cli.memory import add_memory_parser
    from dpmemarc_core.cli.plan import add_plan_parser

    parser = argparse.ArgumentParser(prog="dpmemarc", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    add_train_parser(sub)
    add_memory_parser(sub)
    add_plan_parser(sub)
    add_audit_parser(sub)
    add_export_parser(sub)
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
