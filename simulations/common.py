"""What every table/figure script shares: command line, TOML configs, resumable cells, memory cells.

A *cell* is one unit of work (one training run, one memory simulation) stored as one JSON file, written
atomically. A re-run loads cells whose status is "done" and runs the rest (failed cells are retried: the
failure may have been a library gap since filled). Scripts turn the cells into Markdown and PNG.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shlex
import sys
import tempfile
import time
import tomllib
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path

SIMULATIONS_DIR = Path(__file__).resolve().parent
CONFIG_DIR = SIMULATIONS_DIR / "configs"
DEFAULT_RESULTS = SIMULATIONS_DIR.parent / "results"
SCALES = ("paper", "offline")
TRAIN_KEYS = {"model", "tasks", "paper_columns", "methods", "epsilons", "batch_size", "lr", "max_length", "max_train",
              "max_eval", "max_steps", "epochs", "seed", "physical_batch_size", "device", "method_options",
              "method_lr", "max_grad_norm", "eval_every", "zo_params", "delta"}


def epsilon_key(epsilon: float) -> str:
    """'1.6', '8', 'inf': the keys of paper_numbers and of cell ids."""
    if math.isinf(epsilon):
        return "inf"
    return f"{epsilon:g}"


def epsilon_label(epsilon: float) -> str:
    return "ε=∞" if math.isinf(epsilon) else f"ε={epsilon:g}"


def parse_args(name: str, description: str, argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m simulations.{name}", description=description)
    parser.add_argument("--scale", choices=SCALES, default="offline",
                        help="paper: the paper's models and data by name (needs the hub, a GPU advised); "
                             "offline: small real models and data that work on a CPU without network")
    parser.add_argument("--quick", action="store_true", help="a much smaller offline smoke run (results in .../quick)")
    parser.add_argument("--config", type=Path, default=CONFIG_DIR / f"{name}.toml", help="TOML config")
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="results root directory")
    parser.add_argument("--tasks", type=_names, default=None, help="run only these tasks (comma-separated)")
    parser.add_argument("--methods", type=_names, default=None, help="run only these methods (comma-separated)")
    parser.add_argument("--epsilons", type=_names, default=None,
                        help="run only these ε columns, e.g. 8,inf (comma-separated); the table shows every cell done")
    parser.add_argument("--report", action="store_true",
                        help="run nothing: write the table (and figure) from the cells finished so far")
    args = parser.parse_args(argv)
    if args.quick and args.scale == "paper":
        parser.error("--quick is a smaller offline run; use it with --scale offline")
    return args


def _names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of names, got {text!r}")
    return names


def selection(args: argparse.Namespace) -> Callable[[dict], bool]:
    """Whether a cell (by its fields) is among those asked for with --tasks / --methods / --epsilons."""
    epsilons = None if args.epsilons is None else {epsilon_key(float(e)) for e in args.epsilons}

    def selected(fields: dict) -> bool:
        return not args.report and ((args.tasks is None or fields.get("task") in args.tasks)
                and (args.methods is None or fields.get("method") in args.methods)
                and (epsilons is None or fields.get("epsilon_target") in epsilons))

    return selected


def memory_selection(args: argparse.Namespace) -> Callable[[dict], bool]:
    """Memory cells are cheap and shared: every one a table needs is run, unless --report."""
    return lambda fields: not args.report


def run_name(args: argparse.Namespace) -> str:
    return "quick" if args.quick else args.scale


def load_config(path: Path, scale: str, quick: bool = False) -> dict:
    """[common], overlaid with [paper] or [offline], then [quick] when asked; [memory] and the rest as they are.

    Raises ValueError naming the section and key for anything unknown or missing.
    """
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    with open(path, "rb") as handle:
        raw = tomllib.load(handle)
    sections = ("common", scale) + (("quick",) if quick else ())
    merged: dict = {}
    for section in sections:
        if section not in raw:
            raise ValueError(f"{path}: missing section [{section}]")
        unknown = set(raw[section]) - TRAIN_KEYS
        if unknown:
            raise ValueError(f"{path}: unknown key(s) {sorted(unknown)} in [{section}]; accepted: {sorted(TRAIN_KEYS)}")
        merged.update(raw[section])
    for key in ("model", "tasks", "methods", "epsilons"):
        if key not in merged:
            raise ValueError(f"{path}: '{key}' is set in none of {[f'[{s}]' for s in sections]}")
    for epsilon in merged["epsilons"]:
        if not (isinstance(epsilon, (int, float)) and epsilon > 0):
            raise ValueError(f"{path}: epsilons must be numbers > 0 (inf for non-private), got {epsilon!r}")
    extra = {k: v for k, v in raw.items() if k not in ("common", "paper", "offline", "quick")}
    return {**merged, **extra, "scale": scale, "quick": quick, "config_path": str(path)}


def require_hub(config: dict) -> None:
    """At paper scale, stop at once (not after a minute of retries per cell) when the hub is out of reach."""
    from huggingface_hub import constants as hub_constants

    from dpmemarc_core import offline

    if hub_constants.is_offline_mode() or offline.hub_reachable():
        return
    sys.exit(f"--scale paper loads {config['model']} and {', '.join(config['tasks'])} by name from the model and "
             f"dataset hub ({hub_constants.ENDPOINT}), which this machine cannot reach. Run --scale offline "
             "(small real models and data that need no network), or set HF_HUB_OFFLINE=1 if those models "
             "and data sets are already in the local Hugging Face cache.")


class CellStore:
    """One JSON file per cell under `directory`, written atomically (temp file + rename)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def path(self, cell_id: str) -> Path:
        return self.directory / f"{cell_id}.json"

    def load(self, cell_id: str) -> dict | None:
        path = self.path(cell_id)
        if not path.exists():
            return None
        return json.loads(path.read_text())

    def save(self, cell: dict) -> None:
        write_json_atomic(self.path(cell["id"]), cell)


def write_json_atomic(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w") as handle:
            handle.write(json.dumps(data, indent=2, default=str, allow_nan=True) + "\n")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def fingerprint(fields: dict) -> str:
    """A digest of everything that defines a cell: a stored cell made with other settings is run again."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_cells(store: CellStore, jobs: Iterable[tuple[str, dict, Callable[[], dict]]],
              selected: Callable[[dict], bool] = lambda fields: True) -> dict[str, dict]:
    """Run each selected (cell id, identifying fields, work) whose stored cell is not done; returns every
    stored cell of `jobs` by id (also those not selected this time).

    A job that raises becomes a cell with status "error" and the message, so one unsupported combination
    (a method a tool cannot run) does not stop the table; it is retried on the next run.
    """
    jobs = list(jobs)
    cells = {}
    for cell_id, fields, _ in jobs:  # cells not run now: shown only if made with the current settings
        stored = None if selected(fields) else store.load(cell_id)
        if stored is not None and stored.get("fingerprint") == fingerprint(fields):
            cells[cell_id] = stored
    jobs = [job for job in jobs if selected(job[1])]
    for number, (cell_id, fields, work) in enumerate(jobs, 1):
        stored = store.load(cell_id)
        fields = {**fields, "fingerprint": fingerprint(fields)}
        if stored is not None and stored.get("status") == "done" and stored.get("fingerprint") == fields["fingerprint"]:
            print(f"[{number}/{len(jobs)}] {cell_id}: done earlier, skipped", flush=True)
            cells[cell_id] = stored
            continue
        print(f"[{number}/{len(jobs)}] {cell_id}: running", flush=True)
        start = time.perf_counter()
        try:
            cell = {"id": cell_id, **fields, "status": "done", **work()}
        except Exception as error:  # noqa: BLE001 - recorded in the cell and shown in the table
            traceback.print_exc()
            cell = {"id": cell_id, **fields, "status": "error", "error": f"{type(error).__name__}: {error}"}
        cell["seconds"] = time.perf_counter() - start
        store.save(cell)
        print(f"[{number}/{len(jobs)}] {cell_id}: {cell['status']} in {cell['seconds']:.0f} s", flush=True)
        cells[cell_id] = cell
    return cells


# ---- training cells -------------------------------------------------------------------------------------


def train_settings(config: dict, task: str, method: str, epsilon: float, **overrides) -> dict:
    """The TrainConfig fields one cell sets (the rest are TrainConfig's defaults). They define the cell: a
    new TrainConfig field with a default leaves finished cells valid."""
    fields = {k: config[k] for k in ("batch_size", "lr", "max_length", "max_train", "max_eval", "max_steps", "epochs",
                                     "seed", "physical_batch_size", "device", "max_grad_norm", "delta") if k in config}
    fields["lr"] = config.get("method_lr", {}).get(method, fields.get("lr", 5e-4))
    fields["method_options"] = dict(config.get("method_options", {}).get(method, {}))
    if method == "zo" and "zo_params" in config:
        fields["zo_params"] = config["zo_params"]
    return {"model": config["model"], "task": task, "method": method, "epsilon": epsilon, **fields, **overrides}


def train_config(config: dict, task: str, method: str, epsilon: float, **overrides):
    """The TrainConfig of one cell: the paper's B, T, lr and LoRA/adapter sizes unless the config says otherwise."""
    from dpmemarc_core.training.config import TrainConfig
    return TrainConfig(**train_settings(config, task, method, epsilon, **overrides), progress=False)


def train_cell(config: dict, task: str, method: str, epsilon: float, **overrides) -> dict:
    """Train and evaluate one cell; keeps what the tables and a reader need from train()'s summary."""
    from dpmemarc_core.single_site import train
    summary = train(train_config(config, task, method, epsilon, **overrides))
    keep = ("metrics", "metrics_before", "epsilon", "delta", "noise_multiplier", "sample_rate", "steps",
            "train_examples", "eval_examples", "trainable_parameters", "non_private_diagnostics", "config")
    return {k: summary[k] for k in keep if k in summary}


def training_jobs(config: dict, tasks: list[str] | None = None) -> list[tuple[str, dict, Callable[[], dict]]]:
    jobs = []
    for task in tasks or config["tasks"]:
        for method in config["methods"]:
            for epsilon in config["epsilons"]:
                cell_id = f"{task}__{method}__eps{epsilon_key(epsilon)}"
                fields = {"task": task, "method": method, "epsilon_target": epsilon_key(epsilon),
                          "model": config["model"], "settings": train_settings(config, task, method, epsilon)}
                jobs.append((cell_id, fields, lambda t=task, m=method, e=epsilon: train_cell(config, t, m, e)))
    return jobs


# ---- memory cells ---------------------------------------------------------------------------------------


def memory_spec(config: dict, method: str, epsilon: float, engine: dict | None = None) -> dict:
    """MemorySpec fields of the paper's configuration: model, B, T, precision and (when the training scale uses
    other sizes) method options from [memory]; ε = ∞ is the
    non-private loop (engine "nondp"), as in the paper where every engine degrades to plain training."""
    memory = config["memory"]
    engine = dict(engine or {"engine": "bk"})
    if math.isinf(epsilon):
        engine = {"engine": "nondp"}
    spec = {"model": memory["model"], "method": method, "batch_size": memory.get("batch_size", 32),
            "seq_len": memory.get("seq_len", 128), "precision": memory.get("precision", "bf16"),
            "device": memory.get("device", "meta"), "epsilon": 8.0 if math.isfinite(epsilon) else math.inf,
            "method_options": dict(memory.get("method_options", config.get("method_options", {})).get(method, {})),
            **engine}
    if method == "zo":  # what DPZero perturbs, always named so the cell and its command say it
        spec["zo_params"] = memory.get("zo_params", config.get("zo_params", "full"))
    return spec


def memory_command(spec: dict) -> str:
    """The `dpmemarc memory` command printing the same JSON as the cell (step_memory of the same spec)."""
    parts = ["dpmemarc", "memory", "--model", spec["model"], "--method", spec["method"], "--engine", spec["engine"],
             "--batch-size", str(spec["batch_size"]), "--seq-len", str(spec["seq_len"]),
             "--precision", spec["precision"], "--device", spec["device"], "--epsilon", epsilon_key(spec["epsilon"])]
    if "clipping_mode" in spec:
        parts += ["--clipping-mode", spec["clipping_mode"]]
    if spec.get("backward_passes") is not None:
        parts += ["--backward-passes", str(spec["backward_passes"])]
    if "zo_params" in spec:
        parts += ["--zo-params", spec["zo_params"]]
    for key, value in spec.get("method_options", {}).items():
        parts += ["--method-option", f"{key}={json.dumps(value)}"]
    return shlex.join(parts) + " --json"


def memory_cell_id(spec: dict) -> str:
    options = "_".join(f"{k}-{v}" for k, v in sorted(spec.get("method_options", {}).items()))
    extra = "".join(f"__{k}-{spec[k]}" for k in sorted(spec) if k not in (
        "model", "method", "engine", "epsilon", "method_options", "batch_size", "seq_len", "precision", "device"))
    name = (f"{Path(spec['model']).stem}__{spec['method']}__{spec['engine']}__B{spec['batch_size']}"
            f"_T{spec['seq_len']}_{spec['precision']}_{spec['device']}__eps{epsilon_key(spec['epsilon'])}{extra}"
            + (f"__{options}" if options else ""))
    return name.replace("/", "-").replace(" ", "")


def memory_cell(spec: dict) -> dict:
    """Peak memory of one training step (`dpmemarc_core.memory.step.step_memory`, what `dpmemarc memory --json`
    prints). Finite ε values share one cell: the noise scale moves no byte."""
    from dpmemarc_core.memory.step import MemorySpec, step_memory

    unknown = sorted(set(spec) - set(MemorySpec.__dataclass_fields__))
    if unknown:
        raise ValueError(f"the memory tool (dpmemarc memory / MemorySpec) has no setting {unknown}")
    result = step_memory(MemorySpec(**spec))
    return {"peak_bytes": result["peak_bytes"], "peak_gib": result["peak_gib"], "simulated": result["simulated"],
            "trainable_parameters": result["trainable_parameters"], "total_parameters": result["total_parameters"],
            "peak_phase": result["peak_phase"], "breakdown": result["breakdown"], "note": result["note"],
            "command": memory_command(spec)}


def memory_jobs(specs: Iterable[dict]) -> list[tuple[str, dict, Callable[[], dict]]]:
    jobs, seen = [], set()
    for spec in specs:
        cell_id = memory_cell_id(spec)
        if cell_id not in seen:
            seen.add(cell_id)
            jobs.append((cell_id, {"spec": spec}, lambda s=spec: memory_cell(s)))
    return jobs


def memory_store(results: Path) -> CellStore:
    """Memory cells are shared by every table and scale: they always simulate the paper's exact configs."""
    return CellStore(results / "memory")


# ---- Markdown -------------------------------------------------------------------------------------------


class Footnotes:
    """Numbered notes for cells that failed, so a table cell stays short and the reason is still shown."""

    def __init__(self) -> None:
        self.notes: list[str] = []

    def mark(self, text: str) -> str:
        if text not in self.notes:
            self.notes.append(text)
        return f"n/a[^{self.notes.index(text) + 1}]"

    def render(self) -> str:
        return "\n".join(f"[^{i}]: {note}" for i, note in enumerate(self.notes, 1))


def cell_value(cell: dict | None, read: Callable[[dict], float | None], fmt: str, notes: Footnotes) -> str:
    """Our number, a footnoted n/a for a failed cell, '…' for one not run yet."""
    if cell is None:
        return "…"
    if cell.get("status") != "done":
        return notes.mark(cell.get("error", "failed").splitlines()[0][:300])
    value = read(cell)
    return "—" if value is None else format(value, fmt)


def with_paper(ours: str, paper: float | None, fmt: str) -> str:
    return ours if paper is None else f"{ours} ({format(paper, fmt)})"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def write_outputs(directory: Path, name: str, cells: dict, markdown: str) -> None:
    """<name>.json with every cell, <name>.md with the table."""
    write_json_atomic(directory / f"{name}.json", cells)
    write_text_atomic(directory / f"{name}.md", markdown)
    print(f"wrote {directory / f'{name}.json'} and {directory / f'{name}.md'}", flush=True)


def scale_note(config: dict) -> str:
    if config["scale"] == "paper":
        return f"Scale: paper ({config['model']}; tasks {', '.join(config['tasks'])})."
    steps = config.get("max_steps") or f"{config.get('epochs', 1)} epoch(s)"
    return (f"Scale: {'quick (smoke run)' if config['quick'] else 'offline'}: {config['model']} on "
            f"{', '.join(config['tasks'])}; max_train={config.get('max_train')}, max_eval={config.get('max_eval')}, "
            f"steps={steps}, B={config.get('batch_size', 32)}, "
            f"lr={config.get('lr', 5e-4)} (per method: {config.get('method_lr', {})}), "
            f"method options {config.get('method_options', {})}. These are stand-ins for "
            "the paper's models and data, so the paper's numbers in brackets are a reference, not a target.")
