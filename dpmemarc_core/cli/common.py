"""Argument types shared by the `dpmemarc` subcommands."""

from __future__ import annotations

import argparse
import json


def epsilon_arg(text: str) -> float:
    """`--epsilon`: a number > 0, or 'inf' for non-private training."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--epsilon must be a number > 0 or 'inf', got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"--epsilon must be > 0 (or 'inf' for non-private), got {text}")
    return value


def delta_arg(text: str) -> float | str:
    """`--delta`: a number in (0, 1), or a rule of N ("1/(10N)", "1/N")."""
    from dpmemarc_core.privacy.settings import DELTA_RULES

    if text in DELTA_RULES:
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--delta must be a number in (0, 1) or one of {', '.join(DELTA_RULES)}, "
                                         f"got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"--delta must satisfy 0 < delta < 1, got {text}")
    return value


def positive_int(name: str):
    """An argparse type for an integer >= 1 whose errors name the flag `name`."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer >= 1, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{name} must be an integer >= 1, got {text!r}")
        return value

    return parse


def physical_batch_size_arg(text: str) -> int | str:
    """`--physical-batch-size`: an integer >= 1, or 'auto'."""
    if text == "auto":
        return text
    try:
        return positive_int("--physical-batch-size")(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"--physical-batch-size must be an integer >= 1 or 'auto', got {text!r}") \
            from None


def memory_arg(text: str) -> str:
    """`--memory`: a size such as 8GiB (checked here, kept as written for the run's config)."""
    from dpmemarc_core.memory.plan import parse_memory_size

    try:
        parse_memory_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def method_options_arg(pairs: list[str]) -> dict:
    """`--method-option KEY=VALUE` pairs (repeatable) as keyword arguments; VALUE is JSON where it parses."""
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
