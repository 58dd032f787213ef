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


def method_option_arg(text: str) -> tuple[str, object]:
    """One `--method-option KEY=VALUE` (repeatable; `dict()` of them is the keyword arguments): VALUE is JSON
    where it parses, else the text."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--method-option takes KEY=VALUE, got {text!r}")
    try:
        return key.replace("-", "_"), json.loads(value)
    except json.JSONDecodeError:
        return key.replace("-", "_"), value


def add_step_arguments(p: argparse.ArgumentParser) -> None:
    """The flags that say which simulated training step (`memory.step.MemorySpec`) `dpmemarc memory` and
    `dpmemarc plan` look at: model, expected batch, sequence length, precision, ε and DPZero's parameters."""
    from dpmemarc_core.memory.step import PRECISIONS, MemorySpec
    from dpmemarc_core.training.config import ZO_PARAM_METHODS

    d = MemorySpec(model="", method="")
    p.add_argument("--model", required=True,
                   help="a shipped published config (dpmemarc_core.models.PUBLISHED_CONFIGS) or a path to config.json")
    p.add_argument("--batch-size", type=positive_int("--batch-size"), default=d.batch_size,
                   help="the logical (expected Poisson) batch size")
    p.add_argument("--seq-len", type=positive_int("--seq-len"), default=d.seq_len)
    p.add_argument("--precision", choices=list(PRECISIONS), default=d.precision,
                   help="bf16/fp16: frozen weights in that dtype, trainable ones fp32, autocast forward; "
                        "amp-bf16: all weights fp32, autocast bf16; fp32: no autocast")
    p.add_argument("--epsilon", type=epsilon_arg, default=d.epsilon,
                   help="finite: noise is drawn (its scale moves no byte); inf: no noise, a non-private step")
    p.add_argument("--zo-params", choices=list(ZO_PARAM_METHODS), default=d.zo_params,
                   help="method zo: whose trainable part DPZero perturbs")
