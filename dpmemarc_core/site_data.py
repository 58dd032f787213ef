"""A site's own data file: JSON Lines, CSV, Parquet or a ``datasets`` ``save_to_disk`` folder, read through
``datasets`` and checked row by row before any training step.

Classification rows have a text and a label (a name from the run's label names, or an index); generation
rows have a prompt and a completion. Every problem is a ``SiteDataError`` naming the file, the row (1-based,
a CSV header not counted) and the field, so a site can reply with the reason instead of crashing the run.
The site's N (for its sampling rate and δ = 1/N) is the number of rows it trains on: the whole file, less
a held-out part only when federated evaluation asks for one.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
from transformers import PreTrainedTokenizerBase

from dpmemarc_core.data import IGNORE_INDEX, Row, Task, _tokenize_classification

# File suffix -> the `datasets` builder that reads it; a directory is a `save_to_disk` folder.
READERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
TASK_KINDS = ("classification", "generation")


class SiteDataError(ValueError):
    """A site's data file cannot be trained on. ``str()``, for the site's own log, names the file, the row and the
    field and shows the offending value; ``reason`` says the same without anything read from the file (the file's
    name, not its directory, and no value): what a site may tell the server."""

    def __init__(self, path: str | Path, problem: str, row: int | None = None, field: str | None = None,
                 detail: str = "") -> None:
        where = (f"row {row}: " if row is not None else "") + (f"field '{field}' " if field is not None else "")
        super().__init__(f"{path}: {where}{problem}{detail}")
        self.reason = f"{Path(path).name}: {where}{problem}"


@dataclass(frozen=True)
class Columns:
    """Column names in the site's file (run-config keys ``text-column``, ``label-column``, ...)."""

    text: str = "text"
    label: str = "label"
    prompt: str = "prompt"
    completion: str = "completion"


def parse_labels(text: str) -> tuple[str, ...]:
    """``"negative,positive"`` -> ("negative", "positive"): the label names in head order; "" -> ()."""
    if not text.strip():
        return ()
    names = tuple(name.strip() for name in text.split(","))
    if any(not name for name in names) or len(set(names)) != len(names) or len(names) < 2:
        raise ValueError(f"labels must be two or more distinct, non-empty names separated by commas, got {text!r}")
    return names


def read_table(path: str | Path) -> datasets.Dataset:
    """The rows of ``path`` as a ``datasets.Dataset`` held in memory; SiteDataError when it cannot be read."""
    path = Path(path).expanduser()
    if not path.exists():
        raise SiteDataError(path, "no such file or directory")
    if path.is_dir():
        return _read_saved(path)
    builder = READERS.get(path.suffix.lower())
    if builder is None:
        raise SiteDataError(path, f"unsupported file type '{path.suffix}'; accepted: {', '.join(READERS)} files or a "
                                  "datasets save_to_disk folder")
    try:
        # A throw-away cache and keep_in_memory: no Arrow copy of the site's private text is left behind in
        # the shared datasets cache.
        with tempfile.TemporaryDirectory(prefix="dpmemarc-site-data-") as cache:
            return datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache,
                                         keep_in_memory=True)
    except Exception as error:  # datasets/pyarrow raise many kinds for a malformed file
        raise SiteDataError(path, f"unreadable {builder} file", detail=f": {_reason(error)}") from error


def _read_saved(path: Path) -> datasets.Dataset:
    try:
        table = datasets.load_from_disk(str(path), keep_in_memory=True)
    except Exception as error:
        raise SiteDataError(path, "not a readable datasets save_to_disk folder",
                            detail=f": {_reason(error)}") from error
    if isinstance(table, datasets.DatasetDict):
        if "train" in table:
            return table["train"]
        if len(table) == 1:
            return next(iter(table.values()))
        raise SiteDataError(path, f"a DatasetDict with splits {sorted(table)} and no 'train' split; save the split "
                                  "to train on")
    return table


def _reason(error: BaseException) -> str:
    # datasets wraps the parser's message (with its row number) in a generic one: show the whole chain.
    reasons = []
    while error is not None:
        reasons.append(f"{type(error).__name__}: {error}")
        error = error.__cause__ or error.__context__
    return " <- ".join(reasons)


def classification_rows(path: str | Path, num_labels: int, labels: Sequence[str] = (),
                        columns: Columns = Columns()) -> list[Row]:
    """Checked classification rows ``{"text", "text_pair": None, "label": index}`` of the file at ``path``.

    A label is a name from ``labels`` (which fixes the names and their order) or an index in [0, num_labels).
    """
    if labels and len(labels) != num_labels:
        raise ValueError(f"labels names {len(labels)} classes {list(labels)}, the model has {num_labels}")
    table = read_table(path)
    _require_columns(path, table, (columns.text, columns.label))
    index_of = {name: i for i, name in enumerate(labels)}
    rows = []
    for number, (text, label) in enumerate(zip(table[columns.text], table[columns.label]), 1):
        rows.append({"text": _text(path, number, columns.text, text), "text_pair": None,
                     "label": _label(path, number, columns.label, label, index_of, num_labels)})
    _require_rows(path, rows)
    return rows


def generation_rows(path: str | Path, columns: Columns = Columns()) -> list[Row]:
    """Checked generation rows ``{"prompt", "completion"}`` of the file at ``path``."""
    table = read_table(path)
    _require_columns(path, table, (columns.prompt, columns.completion))
    rows = [{"prompt": _text(path, number, columns.prompt, prompt),
             "completion": _text(path, number, columns.completion, completion)}
            for number, (prompt, completion) in enumerate(zip(table[columns.prompt], table[columns.completion]), 1)]
    _require_rows(path, rows)
    return rows


def _require_columns(path: str | Path, table: datasets.Dataset, names: Sequence[str]) -> None:
    missing = [name for name in names if name not in table.column_names]
    if missing:
        raise SiteDataError(path, f"missing column(s) {missing}; the file has {table.column_names} (rename with the "
                                  "run-config keys text-column, label-column, prompt-column, completion-column)")


def _require_rows(path: str | Path, rows: list) -> None:
    if not rows:
        raise SiteDataError(path, "the file has no rows")


def _text(path: str | Path, number: int, field: str, value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise SiteDataError(path, "must be non-empty text", number, field, detail=f", got {value!r}")
    return value


def _label(path: str | Path, number: int, field: str, value: object, index_of: dict[str, int],
           num_labels: int) -> int:
    if isinstance(value, str) and value in index_of:
        return index_of[value]
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and 0 <= value < num_labels:
        return int(value)
    accepted = f"a name in {list(index_of)} or " if index_of else ""
    hint = "" if index_of or not isinstance(value, str) else " (labels by name need the run-config key 'labels')"
    raise SiteDataError(path, f"has an unknown label; accepted: {accepted}an index in [0, {num_labels - 1}]{hint}",
                        number, field, detail=f" (got {value!r})")


def load_site_task(path: str | Path, tokenizer: PreTrainedTokenizerBase, kind: str, num_labels: int = 0,
                   labels: Sequence[str] = (), columns: Columns = Columns(), max_length: int = 128,
                   holdout_fraction: float = 0.0, seed: int = 0) -> Task:
    """The site's file as a tokenized ``Task``: every row trains unless ``holdout_fraction`` (for federated
    evaluation) holds a seeded share out as ``eval``. All rows are checked before anything is tokenized."""
    if kind not in TASK_KINDS:
        raise ValueError(f"kind must be one of {TASK_KINDS}, got {kind!r}")
    if not 0 <= holdout_fraction < 1:
        raise ValueError(f"holdout_fraction must satisfy 0 <= value < 1, got {holdout_fraction!r}")
    if kind == "classification":
        examples = _tokenize_classification(classification_rows(path, num_labels, labels, columns), tokenizer,
                                            max_length)
    else:
        examples = tokenize_generation(path, generation_rows(path, columns), tokenizer, max_length, columns.prompt)
    train, held_out = hold_out(examples, holdout_fraction, seed)
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_token_id is None:
        raise ValueError("the tokenizer has neither a pad token nor an EOS token to pad with")
    return Task(name=str(path), kind=kind, num_labels=num_labels if kind == "classification" else 0, train=train,
                eval=held_out, pad_token_id=pad_token_id)


def tokenize_generation(path: str | Path, rows: list[Row], tokenizer: PreTrainedTokenizerBase,
                        max_length: int, prompt_field: str = "prompt") -> list[dict]:
    """Prompt, completion, EOS; loss on the completion and EOS only. A model with a chat template gets the
    prompt as a user turn followed by the assistant's turn opening; otherwise prompt and completion are
    joined by one space. A prompt that leaves no room for the completion within ``max_length`` is an error
    (dropping the row would silently change the site's N)."""
    if tokenizer.eos_token_id is None:
        raise ValueError("generation needs a tokenizer with an EOS token to end completions")
    templated = bool(getattr(tokenizer, "chat_template", None))
    if templated:
        sources = [tokenizer.apply_chat_template([{"role": "user", "content": row["prompt"]}], tokenize=False,
                                                 add_generation_prompt=True) for row in rows]
        targets = [row["completion"] for row in rows]
    else:
        sources = [row["prompt"] for row in rows]
        targets = [row["completion"] if row["completion"][0].isspace() else " " + row["completion"] for row in rows]
    # A chat template writes its own special tokens (BOS included where the model has one).
    prompts = tokenizer(sources, add_special_tokens=not templated)["input_ids"]
    completions = tokenizer(targets, add_special_tokens=False)["input_ids"]
    examples = []
    for number, (row, source, prompt, completion) in enumerate(zip(rows, sources, prompts, completions), 1):
        if len(prompt) >= max_length:
            raise SiteDataError(path, f"the prompt leaves no room for the completion within max-length {max_length}; "
                                      "shorten it or raise max-length", number, prompt_field,
                                detail=f" ({len(prompt)} prompt tokens)")
        target = completion + [tokenizer.eos_token_id]
        input_ids = (prompt + target)[:max_length]
        examples.append({"input_ids": input_ids, "attention_mask": [1] * len(input_ids),
                         "labels": ([IGNORE_INDEX] * len(prompt) + target)[:max_length],
                         "source": source, "references": [row["completion"].strip()]})
    return examples


def hold_out(examples: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(kept, held out): each example is held out when a seeded hash of its tokens falls below ``fraction``.

    Each example's side depends on that example alone (not on its position or on the other rows), so adding
    or removing one row changes one side only: training and evaluation releases then compose in parallel.
    """
    if fraction == 0:
        return examples, []
    held = [_hash_share(example["input_ids"], seed) < fraction for example in examples]
    kept, out = [e for e, h in zip(examples, held) if not h], [e for e, h in zip(examples, held) if h]
    if not kept or not out:
        raise ValueError(f"holdout fraction {fraction} of {len(examples)} rows leaves no evaluation or no training "
                         "rows")
    return kept, out


def _hash_share(tokens: list[int], seed: int) -> float:
    digest = hashlib.sha256(f"{seed}:{','.join(map(str, tokens))}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64
