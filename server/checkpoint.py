"""The run's output directory: one checkpoint per round, the run's lineage token, and metrics.jsonl.

Layout of ``<output-dir>``:
  run-lineage                    a random token naming this run and its resumptions (sent to the sites,
                                 whose simulated shares keep their privacy records per lineage)
  round-<k>.safetensors          global trainable state after round k (nothing else of the model)
  metrics.jsonl                  one JSON object per round (round 0: the starting model)

The sites' accountants are not here: each site keeps its own on its own disk (`dpmemarc_core.federated.budget`).
A round counts as done once its .safetensors file exists: the metrics line is written before it, so a run
killed at any point resumes from a consistent round, and metrics lines of a round that never finished are
dropped on resume.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

CHECKPOINT = re.compile(r"^round-(\d+)\.safetensors$")
METRICS_FILE = "metrics.jsonl"
LINEAGE_FILE = "run-lineage"


@dataclass
class Checkpoint:
    round: int
    state: dict[str, np.ndarray]


def checkpoint_path(output_dir: Path, server_round: int) -> Path:
    return Path(output_dir) / f"round-{server_round}.safetensors"


def run_lineage(output_dir: Path) -> str:
    """The output directory's lineage token, made (randomly) the first time a run writes there."""
    path = Path(output_dir) / LINEAGE_FILE
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, (secrets.token_hex(16) + "\n").encode())
    return path.read_text(encoding="utf-8").strip()


def save_round(output_dir: Path, server_round: int, state: Mapping[str, np.ndarray], metrics: Mapping) -> None:
    """Write round ``server_round``: the metrics line, then the checkpoint that marks it done."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    append_metrics(output_dir, metrics)
    tmp = checkpoint_path(output_dir, server_round).with_suffix(".tmp")
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(tmp),
              metadata={"round": str(server_round)})
    os.replace(tmp, checkpoint_path(output_dir, server_round))


def append_metrics(output_dir: Path, record: Mapping) -> None:
    with open(Path(output_dir) / METRICS_FILE, "a", encoding="utf-8") as out:
        out.write(json.dumps(_strict_json(record), allow_nan=False) + "\n")


def read_metrics(output_dir: Path) -> list[dict]:
    path = Path(output_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def latest_checkpoint(output_dir: Path) -> Checkpoint | None:
    """The last completed round in ``output_dir``, or None when it holds none."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    rounds = [int(m.group(1)) for p in output_dir.iterdir() if (m := CHECKPOINT.match(p.name))]
    if not rounds:
        return None
    last = max(rounds)
    return Checkpoint(round=last, state=load_file(str(checkpoint_path(output_dir, last))))


def drop_metrics_after(output_dir: Path, last_round: int) -> None:
    """Remove metrics lines of rounds after ``last_round`` (a killed run may have written one)."""
    kept = [r for r in read_metrics(output_dir) if r.get("round", 0) <= last_round]
    _atomic_write(Path(output_dir) / METRICS_FILE,
                  "".join(json.dumps(r, allow_nan=False) + "\n" for r in kept).encode())


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _strict_json(value):
    """JSON has no NaN/Infinity: non-finite numbers become null (e.g. ε of a non-private run)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(v) for v in value]
    return value
