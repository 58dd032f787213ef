"""DP linear probing, then fine-tuning: the classifier head alone for the first steps, then every trainable part.

A head that starts from scratch on a pretrained encoder's pooled state is a linear probe, and a private probe on
the offline MiniLM reaches what private fine-tuning struggles to (BENCHMARKS.md, "Private recipe"). Training it
first, with the whole clipping budget to itself, gives the fine-tuning phase a head that already reads the
features (Kumar et al. 2022, "Fine-Tuning can Distort Pretrained Features"). Both phases are Poisson-sampled
Gaussian steps at the run's rate and noise multiplier recorded in one accountant, so the run's (ε, δ) is the one
planned for all its steps: which parameters a step updates does not change its privacy cost.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from dpmemarc_core.training.bk import PrivateTrainer, split_head_required


def check_probe_fraction(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"probe_fraction must be a number in [0, 1), got {value!r}")
    return float(value)


def probe_steps_of(probe_fraction: float, steps: int) -> int:
    """How many of a run's `steps` train the head alone: the fraction, rounded, leaving at least one step of
    fine-tuning."""
    return min(round(check_probe_fraction(probe_fraction) * steps), steps - 1)


@contextmanager
def head_only(model: torch.nn.Module) -> Iterator[None]:
    """Freeze every trainable parameter outside the classifier head (`split_head_required`) while inside."""
    rest, _ = split_head_required(model, "probe_fraction > 0")
    for param in rest:
        param.requires_grad_(False)
    try:
        yield
    finally:
        for param in rest:
            param.requires_grad_(True)


def run_probe_then_tune(make_trainer: Callable[[bool], PrivateTrainer], model: torch.nn.Module, steps: int,
                        probe_steps: int, progress: bool = True) -> tuple[PrivateTrainer, dict]:
    """Run `probe_steps` steps of the head alone, then `steps - probe_steps` of every trainable part.

    `make_trainer(head_alone)` builds a trainer for the model's trainable parameters as they are when it is
    called; the caller gives every trainer the same accountant. Returns the last trainer and the statistics of
    all steps together (each phase's under "phases")."""
    phases = []
    if probe_steps > 0:
        with head_only(model):
            probe = make_trainer(True)
            phases.append(probe.run(probe_steps, progress=progress, description="probe"))
            probe.close()
    trainer = make_trainer(False)
    phases.append(trainer.run(steps - probe_steps, progress=progress))
    return trainer, combined_stats(phases)


def combined_stats(phases: list[dict]) -> dict:
    """`StepStats.as_dict` of several runs as one, each run's kept under "phases" when there are several."""
    if len(phases) == 1:
        return phases[0]
    examples = sum(p["examples"] for p in phases)
    seen = max(examples, 1)
    return {"steps": sum(p["steps"] for p in phases), "examples": examples,
            "train_loss": sum(p["train_loss"] * p["examples"] for p in phases) / seen,
            "clipped_fraction": sum(p["clipped_fraction"] * p["examples"] for p in phases) / seen,
            "phases": phases}
