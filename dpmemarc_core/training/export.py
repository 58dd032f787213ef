"""A run's result as a folder people can use (`dpmemarc_core.methods.save_pretrained`), with its privacy record.

A run's records say how to rebuild its model: a single-site run's ``summary.json`` (beside
``trainable.safetensors``), a federated run's ``run.json`` (beside ``round-<k>.safetensors`` and
``metrics.jsonl``). ``export_run`` turns either, or a bare ``.safetensors`` state with the model and method
given, into an export folder; runs write their own to ``<output>/final/``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path

from safetensors.torch import load_file

from dpmemarc_core.methods.pretrained import ModelSpec, export_state

FINAL_DIR = "final"  # where a run writes its export, inside its output directory
SUMMARY_FILE = "summary.json"  # single-site run record (dpmemarc train)
RUN_FILE = "run.json"  # federated run record (the ServerApp): {"spec": ..., "run_config": ...}
METRICS_FILE = "metrics.jsonl"
SINGLE_STATE = "trainable.safetensors"
ROUND_STATE = re.compile(r"^round-(\d+)\.safetensors$")
# Per-site privacy fields of a federated reply (metrics.jsonl "clients") -> privacy.json names.
SITE_PRIVACY_FIELDS = {"epsilon": "epsilon", "delta": "delta", "noise-multiplier": "noise_multiplier",
                       "total-steps": "steps", "sample-rate": "sample_rate"}


def single_site_privacy(summary: Mapping) -> dict:
    """privacy.json of a single-site run: one site, example-level (ε, δ) with its σ and step count."""
    return {"unit": "example", "accountant": summary.get("config", {}).get("accountant"),
            "target_epsilon": _finite(summary.get("target_epsilon")),
            "sites": {"single-site": {"epsilon": _finite(summary.get("epsilon")), "delta": summary.get("delta"),
                                      "noise_multiplier": summary.get("noise_multiplier"),
                                      "sample_rate": summary.get("sample_rate"), "steps": summary.get("steps")}}}


def federated_privacy(run_config: Mapping, metrics: list[Mapping]) -> dict:
    """privacy.json of a federated run: each site's last reported (ε, δ, σ, steps), keyed by the site's name in
    the replies, and the client-level guarantee when the run had one."""
    sites: dict[str, dict] = {}
    client_level = None
    for line in metrics:
        for client in line.get("clients", []):
            site = str(client.get("site", client.get("partition-id", client.get("node"))))
            fields = {out: client[key] for key, out in SITE_PRIVACY_FIELDS.items() if key in client}
            if "epsilon" in fields:
                sites[site] = {**sites.get(site, {}), **fields}
        client_level = line.get("client-dp", client_level)
    return {"unit": "example", "accountant": run_config.get("accountant"),
            "target_epsilon": run_config.get("target-epsilon"), "sites": sites, "client_level": client_level}


def spec_of_summary(summary: Mapping) -> ModelSpec:
    """The model spec recorded by `dpmemarc train` (older summaries: rebuilt from the task's name)."""
    if "export" in summary:
        return ModelSpec.from_dict(summary["export"])
    from dpmemarc_core.data import num_labels_of, task_kind_of

    config = summary.get("config", {})
    method = config.get("zo_params") if summary["method"] == "zo" else summary["method"]
    return ModelSpec(base_model=summary["model"], task_kind=task_kind_of(summary["task"]), method=method,
                     num_labels=num_labels_of(summary["task"]), method_options=config.get("method_options", {}))


def records_of(source: Path) -> tuple[Path | None, ModelSpec | None, dict | None]:
    """(trainable state file, model spec, privacy record) found at ``source``: a run directory or a state file
    inside one. Parts the records do not give are None."""
    directory = source if source.is_dir() else source.parent
    state = None if source.is_dir() else source
    if (directory / SUMMARY_FILE).is_file():
        summary = json.loads((directory / SUMMARY_FILE).read_text())
        return state or _existing(directory / SINGLE_STATE), spec_of_summary(summary), single_site_privacy(summary)
    if (directory / RUN_FILE).is_file():
        run = json.loads((directory / RUN_FILE).read_text())
        metrics = [json.loads(line) for line in (directory / METRICS_FILE).read_text().splitlines()
                   if line.strip()] if (directory / METRICS_FILE).is_file() else []
        return (state or latest_round_state(directory), ModelSpec.from_dict(run["spec"]),
                federated_privacy(run.get("run_config", {}), metrics))
    if state is None:
        state = latest_round_state(directory) or _existing(directory / SINGLE_STATE)
    return state, None, None


def write_run_record(output_dir: str | Path, spec: ModelSpec, run_config: Mapping) -> None:
    """A federated run's ``run.json``: what `export_run` needs to rebuild its model from a round's state."""
    record = {"spec": spec.to_dict(), "run_config": dict(run_config)}
    (Path(output_dir) / RUN_FILE).write_text(json.dumps(record, indent=2, allow_nan=False) + "\n")


def latest_round_state(directory: Path) -> Path | None:
    rounds = [(int(m.group(1)), p) for p in directory.iterdir() if (m := ROUND_STATE.match(p.name))]
    return max(rounds)[1] if rounds else None


def _existing(path: Path) -> Path | None:
    return path if path.is_file() else None


def export_run(source: str | Path, out: str | Path, model: str | None = None, method: str | None = None,
               spec_overrides: Mapping | None = None) -> Path:
    """Export ``source`` (a run's output directory or a ``.safetensors`` trainable state) to ``out``.

    The model and method come from the run's records; ``model``/``method`` (and ``spec_overrides``, any other
    `ModelSpec` field) replace them, and are required where no record exists.
    """
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"export source {source} does not exist")
    if source.is_file() and source.suffix != ".safetensors":
        raise ValueError(f"export source must be a run's output directory or a .safetensors state, got {source}")
    state_path, spec, privacy = records_of(source)
    if state_path is None:
        raise ValueError(f"{source} holds no trainable state ({SINGLE_STATE} or round-<k>.safetensors)")
    given = {k: v for k, v in {"base_model": model, "method": method, **(spec_overrides or {})}.items()
             if v is not None}
    if spec is None:
        missing = [flag for flag, key in (("--model", "base_model"), ("--method", "method"), ("--task", "task_kind"))
                   if key not in given]
        if missing:
            raise ValueError(f"{source} has no run record ({SUMMARY_FILE} or {RUN_FILE}); give {' '.join(missing)}")
        spec = ModelSpec.from_dict(given)
    elif given:
        spec = ModelSpec.from_dict({**spec.to_dict(), **given})
    return export_state(load_file(str(state_path)), spec, out, privacy)


def _finite(value):
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None
