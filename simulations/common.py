"""What every table/figure script shares: command line, TOML configs, resumable cells, memory cells, and the
statistics over seeds.

A *cell* is one unit of work (one training run of one seed, one memory simulation) stored as one JSON file,
written atomically. A re-run loads cells whose status is "done" and runs the rest (failed cells are retried:
the failure may have been a library gap since filled), in parallel processes with ``--jobs``. Scripts turn
the cells into Markdown and PNG: every trained number is the mean over the config's ``seeds`` with its sample
standard deviation. A seed fixes initialisation and data split only; batches and noise come from OS entropy.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing
import os
import shlex
import statistics
import sys
import tempfile
import time
import tomllib
import traceback
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from functools import partial
from pathlib import Path
from typing import NamedTuple

SIMULATIONS_DIR = Path(__file__).resolve().parent
CONFIG_DIR = SIMULATIONS_DIR / "configs"
DEFAULT_RESULTS = SIMULATIONS_DIR.parent / "results"
SCALES = ("paper", "offline")
TRAIN_KEYS = {"model", "tasks", "paper_columns", "methods", "epsilons", "batch_size", "lr", "max_length", "max_train",
              "max_eval", "max_steps", "epochs", "seeds", "physical_batch_size", "device", "method_options",
              "method_lr", "max_grad_norm", "eval_every", "zo_params", "delta", "head_lr", "preset"}
# The TrainConfig fields a config sets for every cell (train_settings); the rest are read per method or by a script.
SETTING_KEYS = ("batch_size", "lr", "head_lr", "max_length", "max_train", "max_eval", "max_steps", "epochs", "seed",
                "physical_batch_size", "device", "max_grad_norm", "delta")


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
    parser.add_argument("--seeds", type=_seeds, default=None,
                        help="run only these of the config's seeds, e.g. 0 (comma-separated); the table shows every "
                             "seed done")
    parser.add_argument("--jobs", type=_positive, default=1,
                        help="cells trained at once, each in its own process with cores/jobs torch threads")
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


def _seeds(text: str) -> list[int]:
    try:
        return [int(name) for name in _names(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integer seeds, got {text!r}") from None


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return int(text)


def selection(args: argparse.Namespace) -> Callable[[dict], bool]:
    """Whether a cell (by its fields) is among those asked for with --tasks / --methods / --epsilons / --seeds."""
    epsilons = None if args.epsilons is None else {epsilon_key(float(e)) for e in args.epsilons}

    def selected(fields: dict) -> bool:
        return not args.report and ((args.tasks is None or fields.get("task") in args.tasks)
                and (args.methods is None or fields.get("method") in args.methods)
                and (epsilons is None or fields.get("epsilon_target") in epsilons)
                and (args.seeds is None or fields.get("settings", {}).get("seed") in args.seeds))

    return selected


def memory_selection(args: argparse.Namespace) -> Callable[[dict], bool]:
    """Memory cells are cheap and shared: every one a table needs is run, unless --report."""
    return lambda fields: not args.report


def run_name(args: argparse.Namespace) -> str:
    return "quick" if args.quick else args.scale


def read_config_file(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """The TOML at `path`; with a top-level `base = "other.toml"` (relative to `path`'s folder), that file's
    sections with this file's keys in their place, key by key within a section (a table-valued key, such as
    method_options, is replaced whole). A key set to "unset" removes the base's (TOML has no null)."""
    path = Path(path).resolve()
    if path in seen:
        raise ValueError(f"{path}: its 'base' chain comes back to it ({' -> '.join(p.name for p in (*seen, path))})")
    with open(path, "rb") as handle:
        raw = tomllib.load(handle)
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ValueError(f"{path}: base must be the file name of another config, got {base!r}")
    merged = read_config_file(path.parent / base, (*seen, path))
    for section, values in raw.items():
        if not isinstance(values, dict):
            raise ValueError(f"{path}: top-level key {section!r} is not a section (only 'base' may be set there)")
        into = merged.setdefault(section, {})
        into.update(values)
        for key in [key for key, value in values.items() if value == "unset"]:
            del into[key]
    return merged


def load_config(path: Path, scale: str, quick: bool = False) -> dict:
    """[common], overlaid with [paper] or [offline], then [quick] when asked; [memory] and the rest as they are
    (after `read_config_file` applied a `base`).

    Raises ValueError naming the section and key for anything unknown or missing.
    """
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    raw = read_config_file(path)
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
    head_lr = merged.get("head_lr")
    if head_lr is not None and not (type(head_lr) in (int, float) and 0 < head_lr < math.inf):
        raise ValueError(f"{path}: head_lr (the classifier head's DP-Adam rate) must be a finite number > 0, "
                         f"got {head_lr!r}")
    if "preset" in merged:
        from dpmemarc_core.training.presets import PRESETS
        if merged["preset"] not in PRESETS:
            raise ValueError(f"{path}: preset must be one of {list(PRESETS)} (dpmemarc train --preset), "
                             f"got {merged['preset']!r}")
    seeds = merged.setdefault("seeds", [0])
    if not (isinstance(seeds, list) and seeds and all(type(seed) is int for seed in seeds)
            and len(set(seeds)) == len(seeds)):
        raise ValueError(f"{path}: seeds must be a non-empty list of distinct integers, got {seeds!r}")
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


class Job(NamedTuple):
    """One cell to run: its id, the fields that define it (their fingerprint decides whether a stored cell is
    still valid) and the work that computes it. ``work`` must pickle (a module-level function or a partial of
    one) to run in another process. ``legacy_id``: where the same cell was stored before the seeds axis (one
    draw per cell, no seed in its id); a stored cell there counts as this seed's draw only if its fingerprint
    matches, which includes the seed."""

    cell_id: str
    fields: dict
    work: Callable[[], dict]
    legacy_id: str | None = None


def stored_cell(store: CellStore, job: Job) -> dict | None:
    """The stored cell of `job` if it was made with the job's settings (under its id or its legacy id)."""
    cell = store.load(job.cell_id)
    if cell is None and job.legacy_id is not None:
        cell = store.load(job.legacy_id)
        if cell is not None:
            cell = {**cell, "id": job.cell_id, "legacy_id": job.legacy_id}
    return cell if cell is not None and cell.get("fingerprint") == fingerprint(job.fields) else None


def run_cell(directory: Path, cell_id: str, fields: dict, work: Callable[[], dict]) -> dict:
    """Run one cell and store it; a job that raises becomes a cell with status "error" and the message."""
    start = time.perf_counter()
    try:
        cell = {"id": cell_id, **fields, "status": "done", **work()}
    except Exception as error:  # noqa: BLE001 - recorded in the cell and shown in the table
        traceback.print_exc()
        cell = {"id": cell_id, **fields, "status": "error", "error": f"{type(error).__name__}: {error}"}
    cell["seconds"] = time.perf_counter() - start
    cell["finished_at"] = time.time()
    CellStore(directory).save(cell)
    return cell


def _worker_threads(threads: int) -> None:
    import torch
    torch.set_num_threads(threads)


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def run_cells(store: CellStore, jobs: Iterable[Job | tuple], selected: Callable[[dict], bool] = lambda fields: True,
              processes: int = 1) -> dict[str, dict]:
    """Run each selected job whose stored cell is not done; returns every stored cell of `jobs` by id (also those
    not selected this time). Jobs are `Job`s or (cell id, fields, work) tuples.

    A job that raises becomes a cell with status "error" and the message, so one unsupported combination
    (a method a tool cannot run) does not stop the table; it is retried on the next run. ``processes`` > 1
    runs that many cells at once, each in a fresh (spawned) process with the cores split among them.
    """
    jobs = everything = [Job(*job) for job in jobs]
    cells = {}
    for job in jobs:  # cells not run now: shown only if made with the current settings
        stored = None if selected(job.fields) else stored_cell(store, job)
        if stored is not None:
            cells[job.cell_id] = stored
    jobs = [job for job in jobs if selected(job.fields)]
    pending = []
    for number, job in enumerate(jobs, 1):
        stored = stored_cell(store, job)
        if stored is not None and stored.get("status") == "done":
            print(f"[{number}/{len(jobs)}] {job.cell_id}: done earlier, skipped", flush=True)
            cells[job.cell_id] = stored
        else:
            pending.append((number, job))

    def finished(number: int, cell: dict) -> None:
        print(f"[{number}/{len(jobs)}] {cell['id']}: {cell['status']} in {cell['seconds']:.0f} s", flush=True)
        cells[cell["id"]] = cell

    def arguments(job: Job) -> tuple:
        return store.directory, job.cell_id, {**job.fields, "fingerprint": fingerprint(job.fields)}, job.work

    if processes <= 1 or len(pending) <= 1:
        for number, job in pending:
            print(f"[{number}/{len(jobs)}] {job.cell_id}: running", flush=True)
            finished(number, run_cell(*arguments(job)))
        return {job.cell_id: cells[job.cell_id] for job in everything if job.cell_id in cells}
    threads = max(1, available_cores() // processes)
    print(f"running {len(pending)} cell(s), {processes} at a time, {threads} torch thread(s) each", flush=True)
    # spawn, not fork: a forked child of a process that has used torch's OpenMP pool can hang.
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_worker_threads, initargs=(threads,)) as pool:
        futures = {pool.submit(run_cell, *arguments(job)): number for number, job in pending}
        for future in as_completed(futures):
            finished(futures[future], future.result())
    return {job.cell_id: cells[job.cell_id] for job in everything if job.cell_id in cells}


# ---- training cells -------------------------------------------------------------------------------------


def preset_settings(name: str, method: str, task: str, epsilon: float) -> dict:
    """The TrainConfig fields `dpmemarc train --preset NAME --method METHOD --task TASK --epsilon EPSILON` sets
    away from TrainConfig's defaults (`presets.preset_config`; some choices depend on the task and ε), so a
    config naming a preset trains what the command trains, and a retuned preset changes the cells' settings (and
    so their fingerprints) without an edit to the config."""
    from dataclasses import asdict

    from dpmemarc_core.training.config import TrainConfig
    from dpmemarc_core.training.presets import preset_config
    cell = {"method": method, "task": task, "epsilon": epsilon}
    preset, default = asdict(preset_config(name, **cell)), asdict(TrainConfig(**cell))
    return {k: v for k, v in preset.items() if v != default[k]}


def train_settings(config: dict, task: str, method: str, epsilon: float, **overrides) -> dict:
    """The TrainConfig fields one cell sets (the rest are TrainConfig's defaults): the config's `preset` for the
    method, overridden by the config's own keys (method options merged over the preset's, as the command
    merges --method-option). They define the cell: a new TrainConfig field with a default leaves finished
    cells valid."""
    preset = preset_settings(config["preset"], method, task, epsilon) if "preset" in config else {}
    fields = {**preset, **{k: config[k] for k in SETTING_KEYS if k in config}}
    fields["lr"] = config.get("method_lr", {}).get(method, fields.get("lr", 5e-4))
    fields["method_options"] = {**preset.get("method_options", {}), **config.get("method_options", {}).get(method, {})}
    if method == "zo":
        fields.pop("head_lr", None)  # DPZero steps every coordinate alike: the trainer has no head rate to set
        if "zo_params" in config:
            fields["zo_params"] = config["zo_params"]
    return {"model": config["model"], "task": task, "method": method, "epsilon": epsilon, **fields, **overrides}


def train_config(config: dict, task: str, method: str, epsilon: float, **overrides):
    """The TrainConfig of one cell: the paper's B, T, lr and LoRA/adapter sizes unless the config says otherwise."""
    from dpmemarc_core.training.config import TrainConfig
    return TrainConfig(**train_settings(config, task, method, epsilon, **overrides), progress=False)


def train_cell(config: dict, task: str, method: str, epsilon: float, **overrides) -> dict:
    """Train and evaluate one cell; keeps what the tables and a reader need from train()'s summary, and for
    classification the evaluation set's label counts (the class prior a model that learned nothing reaches)."""
    from dpmemarc_core.data import task_kind_of
    from dpmemarc_core.single_site import train
    cfg = train_config(config, task, method, epsilon, **overrides)
    summary = train(cfg)
    keep = ("metrics", "metrics_before", "epsilon", "delta", "noise_multiplier", "sample_rate", "steps",
            "train_examples", "eval_examples", "trainable_parameters", "non_private_diagnostics", "config")
    cell = {k: summary[k] for k in keep if k in summary}
    if task_kind_of(task) == "classification":
        cell["eval_label_counts"] = eval_label_counts(cfg)
    return cell


def eval_label_counts(cfg) -> dict[str, int]:
    """How many evaluation examples of a run (`TrainConfig`) carry each label: the same split and subset train()
    evaluates on, since the seed draws them."""
    from collections import Counter

    from transformers import AutoTokenizer

    from dpmemarc_core.data import load_task
    from dpmemarc_core.models import resolve
    tokenizer = AutoTokenizer.from_pretrained(resolve(cfg.model))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    task = load_task(cfg.task, tokenizer, max_length=cfg.max_length, max_train=cfg.max_train, max_eval=cfg.max_eval,
                     seed=cfg.seed, eval_only=True, validation=cfg.validation)
    counts = Counter(example["labels"] for example in task.eval)
    return {str(label): counts[label] for label in sorted(counts)}


def with_seed(config: dict, seed: int) -> dict:
    """The config of one seed's cells (`train_settings` reads `seed`)."""
    return {**config, "seed": seed}


def seed_of(cell: dict) -> int:
    return cell["settings"]["seed"]


def seeded_id(base: str, seed: int) -> str:
    return f"{base}__seed{seed}"


def group_id(task: str, method: str, epsilon: float) -> str:
    """The id of a (task, method, ε) cell of a table, before the seed (the id of single-draw cells)."""
    return f"{task}__{method}__eps{epsilon_key(epsilon)}"


def seed_cells(cells: dict, base: str, config: dict) -> list[dict | None]:
    """The stored cells of `base` for each of the config's seeds (None where not run yet)."""
    return [cells.get(seeded_id(base, seed)) for seed in config["seeds"]]


def training_jobs(config: dict, tasks: list[str] | None = None) -> list[Job]:
    jobs = []
    for task in tasks or config["tasks"]:
        for method in config["methods"]:
            for epsilon in config["epsilons"]:
                for seed in config["seeds"]:
                    seeded = with_seed(config, seed)
                    base = group_id(task, method, epsilon)
                    fields = {"task": task, "method": method, "epsilon_target": epsilon_key(epsilon),
                              "model": config["model"], "settings": train_settings(seeded, task, method, epsilon)}
                    jobs.append(Job(seeded_id(base, seed), fields, partial(train_cell, seeded, task, method, epsilon),
                                    legacy_id=base))
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
    """One job per distinct spec. A cell is defined by its spec and by the code that simulates it: the memory
    cache's `code_fingerprint` (the sources a simulated step runs, the shipped model configs, the torch /
    transformers / peft / opacus versions), so a library change recomputes the stored cells rather than
    showing figures the simulator no longer gives. A source hash, not a version constant bumped by hand:
    nobody has to remember it, and it hashes the code (syntax trees without docstrings) by relative path, so
    every clone of one commit (with the same library versions) agrees on it and a reworded comment keeps it."""
    from dpmemarc_core.memory.cache import code_fingerprint

    jobs, seen = [], set()
    for spec in specs:
        cell_id = memory_cell_id(spec)
        if cell_id not in seen:
            seen.add(cell_id)
            jobs.append((cell_id, {"spec": spec, "code": code_fingerprint()}, lambda s=spec: memory_cell(s)))
    return jobs


def memory_store(results: Path) -> CellStore:
    """Memory cells are shared by every table and scale: they always simulate the paper's exact configs."""
    return CellStore(results / "memory")


# ---- statistics over seeds ------------------------------------------------------------------------------


def mean_sd(values: list[float]) -> dict:
    """Mean (None for no value), sample standard deviation (None for fewer than two) and n."""
    return {"mean": statistics.fmean(values) if values else None,
            "sd": statistics.stdev(values) if len(values) > 1 else None, "n": len(values)}


PROBE_ROW = "private linear probe (baseline)"
# What benchmarks/private_probe.py wrote before it had --delta (and still writes by default), and the one task it
# embedded before it had --task.
PROBE_DEFAULT_DELTA = "1/(10N)"
PROBE_DEFAULT_TASK = "movie-sentiment"


def _delta_key(delta: str | float) -> str | float:
    """A δ rule as written ("1/N"), a number as a float (so "1e-5" and 1e-05 match)."""
    try:
        return float(delta)
    except ValueError:
        return str(delta)


def read_probe(path: Path, delta: str | float = PROBE_DEFAULT_DELTA,
               task: str = PROBE_DEFAULT_TASK) -> dict[str, dict]:
    """The private linear probe's test accuracy in % (mean ± sd over its seeds, and each seed's value) by ε key,
    from the JSON lines of `benchmarks/private_probe.py --json`, on `task` at privacy parameter `delta` only (a
    probe at another δ is another baseline). A validation sweep's lines are not results; a later line for the same
    ε wins."""
    if not path.exists():
        return {}
    found = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if (row.get("split") == "test" and row.get("task", PROBE_DEFAULT_TASK) == task
                and _delta_key(row.get("delta", PROBE_DEFAULT_DELTA)) == _delta_key(delta)):
            values = [100 * a for a in row["accuracy"]]
            found[epsilon_key(float(row["epsilon"]))] = {
                **mean_sd(values), "values": {str(s): v for s, v in zip(row.get("seeds", range(len(values))), values)}}
    return found


def summarize(cells: Iterable[dict | None], read: Callable[[dict], float | None]) -> dict:
    """`read` over the cells that are done: `mean_sd` and each seed's value (keyed by the seed, as JSON keys are
    strings)."""
    values = {str(seed_of(cell)): read(cell) for cell in cells if cell is not None and cell.get("status") == "done"}
    values = {seed: value for seed, value in values.items() if value is not None}
    return {**mean_sd(list(values.values())), "values": values}


PAIRED_INTERVAL = ("95 % paired t interval (a seed gives both arms the same data split and initialisation, so the "
                   "difference is taken within each seed)")


def paired_interval(a: dict[str, float], b: dict[str, float], level: float = 0.95) -> dict | None:
    """mean(a − b) over the seeds both have, with its paired t interval (n − 1 degrees of freedom); None with
    fewer than two shared seeds. Paired because a seed fixes the data split and the initialisation of every cell
    it trains: the two arms of a comparison share them by design, so their values are not independent samples
    (an unpaired interval assumes they are). Differences that do not vary give a zero-width interval."""
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return None
    from scipy import stats

    differences = [a[s] - b[s] for s in seeds]
    difference = statistics.fmean(differences)
    se = statistics.stdev(differences) / math.sqrt(len(differences))
    df = len(differences) - 1
    half = float(stats.t.ppf(0.5 + level / 2, df)) * se
    return {"difference": difference, "low": difference - half, "high": difference + half, "df": df,
            "level": level, "pairs": len(seeds)}


def difference_text(a: dict[str, float], b: dict[str, float], fmt: str = ".1f",
                    unit: str = " points") -> tuple[str, dict | None]:
    """mean(a − b) over the shared seeds as text with its 95 % paired interval ("+1.2 points [-0.3, +2.7]"), and
    the interval; with fewer than two shared seeds, the difference of the means of all values with "(no
    interval)" after it, and None. Both dicts (seed → value) must be non-empty."""
    interval = paired_interval(a, b)
    if interval is None:
        return (f"{statistics.fmean(a.values()) - statistics.fmean(b.values()):+{fmt}}{unit} (no interval)",
                None)
    return (f"{interval['difference']:+{fmt}}{unit} [{interval['low']:+{fmt}}, {interval['high']:+{fmt}}]",
            interval)


def margin_verdict(interval: dict | None, margin: float) -> str:
    """The claim "a is at most `margin` below b", judged on the interval of mean(a) - mean(b)."""
    if interval is None:
        return "cannot be told apart at this size (needs at least 2 seeds in both)"
    if interval["low"] >= -margin:
        return "holds"
    if interval["high"] < -margin:
        return "fails"
    return "cannot be told apart at this size"


def sign_verdict(interval: dict | None, higher: str, lower: str) -> str:
    """Whether mean(a) - mean(b) is told apart from zero by its interval."""
    if interval is None:
        return "cannot be told apart at this size (needs at least 2 seeds in both)"
    if interval["low"] > 0:
        return higher
    if interval["high"] < 0:
        return lower
    return "cannot be told apart at this size"


PRIOR_Z = 1.96  # binomial standard errors (95 %): "within the sampling noise" of the majority-class share


def class_prior(cells: Iterable[dict | None]) -> dict | None:
    """Whether the mean accuracy of the done cells sits at the majority-class share of their evaluation sets:
    within PRIOR_Z binomial standard errors of what always answering the majority class scores there (each
    seed draws its own evaluation set). None when no done cell recorded its label counts."""
    done = [c for c in cells if c is not None and c.get("status") == "done" and c.get("eval_label_counts")]
    if not done:
        return None
    shares = [max(c["eval_label_counts"].values()) / sum(c["eval_label_counts"].values()) for c in done]
    sizes = [sum(c["eval_label_counts"].values()) for c in done]
    accuracy = statistics.fmean(c["metrics"]["accuracy"] for c in done)
    share = statistics.fmean(shares)
    noise = PRIOR_Z * math.sqrt(sum(p * (1 - p) / n for p, n in zip(shares, sizes))) / len(done)
    return {"majority_share": share, "accuracy": accuracy, "noise": noise, "n_seeds": len(done),
            "eval_examples": sizes, "at_prior": abs(accuracy - share) <= noise}


def no_change(cells: Iterable[dict | None]) -> dict | None:
    """Whether training moved the done cells' accuracy at all: the mean change from each seed's accuracy before
    training, against PRIOR_Z standard errors of a difference of two binomial accuracies on that seed's
    evaluation examples (taken as independent, which errs toward "no change"). A cell can learn nothing and still
    sit away from the class prior (a random head that favours the minority class). None when no done cell
    recorded its accuracy before training and its evaluation size."""
    done = [c for c in cells if c is not None and c.get("status") == "done" and c.get("eval_examples")
            and "accuracy" in c.get("metrics_before", {})]
    if not done:
        return None
    pairs = [(c["metrics"]["accuracy"], c["metrics_before"]["accuracy"], c["eval_examples"]) for c in done]
    change = statistics.fmean(after - before for after, before, _ in pairs)
    noise = PRIOR_Z * math.sqrt(sum((a * (1 - a) + b * (1 - b)) / n for a, b, n in pairs)) / len(done)
    return {"change": change, "before": statistics.fmean(b for _, b, _ in pairs), "noise": noise,
            "n_seeds": len(done), "unchanged": abs(change) <= noise}


UNLEARNED = {"class prior": "at the class prior", "no change": "unchanged by training"}


def unlearned(entry: dict) -> str | None:
    """"class prior" or "no change" (a key of UNLEARNED) when a summarised cell's accuracy is no result
    (`class_prior`, else `no_change`, as its "class_prior" / "no_change" entries say); None when it is one."""
    prior, unchanged = entry.get("class_prior"), entry.get("no_change")
    if prior is not None and prior["at_prior"]:
        return "class prior"
    if unchanged is not None and unchanged["unchanged"]:
        return "no change"
    return None


def no_change_note(unchanged: dict) -> str:
    return (f"no change: the mean accuracy moved {100 * unchanged['change']:+.1f} points from before training "
            f"({100 * unchanged['before']:.1f} %), within {PRIOR_Z:g} standard errors "
            f"(±{100 * unchanged['noise']:.1f}): training moved nothing measurable, so its number is no result (it is "
            "in the JSON)")


def timing(started: float, started_at: float, processes: int, cells: Iterable[dict]) -> dict:
    """Wall time of this invocation and the run time of every trained cell shown (summed over the runs that
    made them). `started` is a perf_counter reading, `started_at` the wall clock then."""
    cells = list(cells)
    return {"wall_seconds": time.perf_counter() - started, "jobs": processes,
            "cells_run": sum(1 for c in cells if c.get("finished_at", 0.0) >= started_at),
            "cells_shown": len(cells), "cell_seconds_shown": sum(c.get("seconds", 0.0) for c in cells)}


def training_runs(previous: Path, record: dict, args: argparse.Namespace) -> list[dict]:
    """Every invocation that trained cells, oldest first, with the subset it asked for: the wall time of each
    part of a table run in several commands (`timing` is only the latest, which a --report rewrites)."""
    runs = json.loads(previous.read_text()).get("runs", []) if previous.exists() else []
    if record["cells_run"]:
        asked = {k: getattr(args, k, None) for k in ("tasks", "methods", "epsilons", "seeds")}
        runs.append({**record, "asked": asked, "finished_at": time.time()})
    return runs


def timing_line(name: str, record: dict) -> str:
    return (f"{name}: {record['cells_run']} cell(s) run in {record['wall_seconds']:.0f} s wall with --jobs "
            f"{record['jobs']}; the {record['cells_shown']} trained cell(s) shown took "
            f"{record['cell_seconds_shown'] / 60:.1f} min (each cell's own wall time, summed)")


# ---- Markdown -------------------------------------------------------------------------------------------


class Footnotes:
    """Numbered notes for cells that failed, so a table cell stays short and the reason is still shown."""

    def __init__(self) -> None:
        self.notes: list[str] = []

    def mark(self, text: str) -> str:
        """A failed cell: 'n/a' with the reference to its note."""
        return "n/a" + self.ref(text)

    def ref(self, text: str) -> str:
        if text not in self.notes:
            self.notes.append(text)
        return f"[^{self.notes.index(text) + 1}]"

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


def seed_text(cells: list[dict | None], summary: dict, fmt: str, notes: Footnotes) -> str:
    """`summary` (of `summarize`) as 'mean ± sd', with '(n=k)' when fewer than all of `cells` (one per seed of
    the config) are done and a footnote with the error of a seed that failed; a footnoted n/a when every seed
    that ran failed; '…' when none has run."""
    errors = [c.get("error", "failed").splitlines()[0][:300] for c in cells if c is not None and c.get("status") != "done"]
    if summary["n"] == 0:
        return notes.mark(errors[0]) if errors else "…"
    text = format(summary["mean"], fmt)
    if summary["sd"] is not None:
        text += f" ± {format(summary['sd'], fmt)}"
    if summary["n"] < len(cells):
        text += f" (n={summary['n']})"
    return text + (notes.ref(errors[0]) if errors else "")


def seeds_note(config: dict) -> str:
    seeds = config["seeds"]
    draws = ("a single draw (no standard deviation)" if len(seeds) == 1 else
             f"mean ± sample standard deviation over {len(seeds)} seeds {seeds}; '(n=k)': only k seeds finished so far")
    return (f"Every trained number: {draws}. A seed fixes the initialisation and the data split or subset; the "
            "Poisson batches and the noise are fresh OS entropy in every run. Per-seed values are in the JSON.")


def evaluation_note(cells: Iterable[dict]) -> str:
    """The evaluation set sizes of the done cells, per task."""
    sizes: dict[str, set] = {}
    for cell in cells:
        if cell.get("status") == "done" and "eval_examples" in cell:
            sizes.setdefault(cell["task"], set()).add(cell["eval_examples"])
    if not sizes:
        return ""
    return "Evaluation examples per seed: " + "; ".join(
        f"{task} n = {' / '.join(str(n) for n in sorted(ns))}" for task, ns in sizes.items()) + "."


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


def run_table(name: str, args: argparse.Namespace, config: dict, started: tuple[float, float],
              summarize_cells: Callable[[dict, dict], dict],
              render: Callable[[dict, dict, dict, dict], str]) -> int:
    """A paper table: its memory cells, its training cells (per seed, resumed), their summary, the JSON and
    Markdown under results/, and the wall time (`started`: perf_counter and wall clock at the start)."""
    if args.scale == "paper":
        require_hub(config)
    out = Path(args.results) / name / run_name(args)
    print(f"{name}: {scale_note(config)}\nresults in {out}", flush=True)
    memory_cells = run_cells(memory_store(Path(args.results)),
                             memory_jobs(memory_spec(config, m, e) for m in config["methods"]
                                         for e in config["epsilons"]), memory_selection(args))
    train_cells = run_cells(CellStore(out / "cells"), training_jobs(config), selection(args), args.jobs)
    summary = summarize_cells(config, train_cells)
    record = timing(*started, args.jobs, train_cells.values())
    write_outputs(out, name, {"config": config, "summary": summary, "train": train_cells, "memory": memory_cells,
                              "timing": record, "runs": training_runs(out / f"{name}.json", record, args)},
                  render(config, train_cells, memory_cells, summary))
    print(timing_line(name, record), flush=True)
    return 0


def scale_note(config: dict) -> str:
    """The scale and the training settings of its cells as `train_settings` resolves them (the config's preset
    included): those every method shares, then each method's own; a setting a preset makes at some ε only
    (e.g. side's probe phase, private runs only) names those ε."""
    if config["scale"] == "paper":
        return f"Scale: paper ({config['model']}; tasks {', '.join(config['tasks'])})."
    task, epsilons = config["tasks"][0], config["epsilons"]  # a preset's choices can depend on task and ε

    def settings(method: str) -> dict:
        """The settings of a private cell (the smallest ε); a value other ε do not share becomes (value, where)."""
        at = {e: {k: v for k, v in train_settings(config, task, method, e).items()
                  if k not in ("model", "task", "method", "epsilon") and v != {}} for e in epsilons}
        out = {}
        for key, value in at[min(epsilons)].items():
            where = [e for e in epsilons if key in at[e] and at[e][key] == value]
            out[key] = value if len(where) == len(epsilons) else (value, where)
        return out

    def shown(key: str, value) -> str:
        if isinstance(value, tuple):
            value, where = value
            return f"{key}={value} (at {', '.join(epsilon_label(e) for e in where)} only)"
        return f"{key}={value}"

    per_method = {m: settings(m) for m in config["methods"]}
    shared = {k: v for k, v in next(iter(per_method.values())).items()
              if all(k in s and s[k] == v for s in per_method.values())}
    shared |= {k: "all" for k in ("max_train", "max_eval") if all(k not in s for s in per_method.values())}
    own = ["{}: {}".format(m, ", ".join(shown(k, v) for k, v in s.items() if k not in shared))
           for m, s in per_method.items() if set(s) - set(shared)]
    text = (f"Scale: {'quick (smoke run)' if config['quick'] else 'offline'}: {config['model']} on "
            f"{', '.join(config['tasks'])}; ")
    if "preset" in config:
        text += f"each method from `dpmemarc train --preset {config['preset']}`, overridden by the config: "
    text += ", ".join(shown(k, v) for k, v in sorted(shared.items()))
    if own:
        text += f" (per method: {'; '.join(own)})"
    return text + (". These are stand-ins for the paper's models and data, so the paper's numbers in brackets are a "
                   "reference, not a target.")
