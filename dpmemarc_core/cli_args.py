"""Argument types shared by the `dpmemarc` subcommands."""

from __future__ import annotations

import argparse


def epsilon_arg(text: str) -> float:
    """`--epsilon`: a number > 0, or 'inf' for non-private training."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--epsilon must be a number > 0 or 'inf', got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"--epsilon must be > 0 (or 'inf' for non-private), got {text}")
    return value
