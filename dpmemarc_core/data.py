"""Tasks: tokenized train/eval splits for classification (GLUE-style) and generation (E2E-style), and
federated partitions of them.

Offline tasks read real data that ships in packages (``offline``); the paper's GLUE and E2E tasks load through
``datasets.load_dataset`` and need the dataset hub.
"""

from __future__ import annotations

import bz2
import csv
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import datasets
import numpy as np
import torch
from huggingface_hub import constants as hub_constants
from torch.nn.utils.rnn import pad_sequence
from transformers import PreTrainedTokenizerBase

from dpmemarc_core import offline

DEFAULT_TASK = "movie-sentiment"
IGNORE_INDEX = -100  # label of tokens that carry no loss (padding, prompt)
EVAL_FRACTION = 0.1  # held out by seed where a data set has no official test split
SNLI_LABELS = {"entailment": 0, "neutral": 1, "contradiction": 2}  # GLUE MNLI's order
PARTITION_SCHEMES = ("iid", "dirichlet", "group")
SYNTHETIC_SIZES = (64, 32)  # train, eval rows when max_train/max_eval are not given

# name: (fields of the text / text pair, number of labels, evaluation split)
GLUE_TASKS = {
    "sst2": (("sentence", None), 2, "validation"),
    "mnli": (("premise", "hypothesis"), 3, "validation_matched"),
    "qqp": (("question1", "question2"), 2, "validation"),
    "qnli": (("question", "sentence"), 2, "validation"),
}
GLUE_DATASET = "nyu-mll/glue"
E2E_DATASET = "tuetschek/e2e_nlg"

# Raw rows before tokenization. Classification: {"text", "text_pair" (or None), "label", metadata...}.
# Generation: {"source" (the prompt), "target", "references" (all accepted outputs for the source)}.
Row = dict


@dataclass
class Task:
    """Tokenized splits. Examples are dicts with ``input_ids``, ``attention_mask``, ``labels`` (an int for
    classification; a token list with -100 on the prompt for generation, whose examples also keep
    ``source`` and ``references`` strings for BLEU). ``num_labels`` is 0 for generation."""

    name: str
    kind: str
    num_labels: int
    train: list[dict]
    eval: list[dict]
    pad_token_id: int

    def collate(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        """Right-pad a batch; padded positions get attention 0 and, for generation, label -100."""
        batch = {
            "input_ids": _pad([e["input_ids"] for e in examples], self.pad_token_id),
            "attention_mask": _pad([e["attention_mask"] for e in examples], 0),
        }
        if examples and "token_type_ids" in examples[0]:
            batch["token_type_ids"] = _pad([e["token_type_ids"] for e in examples], 0)
        if self.kind == "classification":
            batch["labels"] = torch.tensor([e["labels"] for e in examples], dtype=torch.long)
        else:
            batch["labels"] = _pad([e["labels"] for e in examples], IGNORE_INDEX)
        return batch


def load_task(
    name: str,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int = 128,
    max_train: int | None = None,
    max_eval: int | None = None,
    seed: int = 0,
    eval_only: bool = False,
    validation: bool = False,
) -> Task:
    """Load and tokenize a task from ``TASKS``. ``max_train``/``max_eval`` keep a seeded random subset;
    ``seed`` also fixes the train/eval split of data sets without an official one. ``eval_only``: the
    evaluation split alone (``train`` empty), for a process that must hold no training data. ``validation``:
    the evaluation split is a seeded tenth of the training split, held out of training, and the test split
    is not read: for choosing hyper-parameters without looking at the test set."""
    _check_task_name(name)
    if max_length < 8:
        raise ValueError(f"max_length must be >= 8 tokens, got {max_length}")
    for field, value in (("max_train", max_train), ("max_eval", max_eval)):
        if value is not None and value < 1:
            raise ValueError(f"{field} must be >= 1 or None, got {value}")
    kind, num_labels, loader = _LOADERS[name]
    train_rows, eval_rows = loader(seed, max_train, max_eval)
    if validation:
        train_rows, eval_rows = _split(train_rows, seed + 1)
    train_rows = [] if eval_only else _subset(train_rows, max_train, seed)
    eval_rows = _subset(eval_rows, max_eval, seed + 1)
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_token_id is None:
        raise ValueError("the tokenizer has neither a pad token nor an EOS token to pad with")
    tokenize = _tokenize_classification if kind == "classification" else _tokenize_generation
    return Task(
        name=name,
        kind=kind,
        num_labels=num_labels,
        train=tokenize(train_rows, tokenizer, max_length),
        eval=tokenize(eval_rows, tokenizer, max_length),
        pad_token_id=pad_token_id,
    )


def task_kind_of(name: str) -> str:
    """``classification`` or ``generation``: known before any data is read, to pick the model head."""
    _check_task_name(name)
    return _LOADERS[name][0]


def num_labels_of(name: str) -> int:
    """Number of classes of a classification task (0 for generation), known before any data is read."""
    _check_task_name(name)
    return _LOADERS[name][1]


def _check_task_name(name: str) -> None:
    if name not in _LOADERS:
        raise ValueError(f"unknown task '{name}'; known tasks: {', '.join(TASKS)}")


def partition(
    items: int | Sequence[int],
    num_partitions: int,
    partition_id: int,
    scheme: str = "iid",
    alpha: float = 0.3,
    labels: Sequence | None = None,
    groups: Sequence | None = None,
    seed: int = 0,
) -> list[int]:
    """The items (indices; ``n`` means ``range(n)``) of one federated site. All sites' parts are disjoint,
    cover the items, and are non-empty; the same seed gives the same split in every process.

    ``iid``: a seeded shuffle cut into near-equal parts. ``dirichlet``: per label, site shares drawn from
    Dirichlet(``alpha``) (smaller is more skewed); needs ``labels``. ``group``: whole groups (e.g. a movie, a
    user) go to one site, largest first to the smallest site; needs ``groups``.
    """
    indices = np.arange(items) if isinstance(items, int) else np.asarray(items)
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition_id must be in [0, {num_partitions - 1}], got {partition_id}")
    if len(indices) < num_partitions:
        raise ValueError(f"cannot split {len(indices)} items into {num_partitions} non-empty partitions")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        parts = np.array_split(rng.permutation(len(indices)), num_partitions)
    elif scheme == "dirichlet":
        if alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        parts = _dirichlet_parts(_aligned(labels, "labels", len(indices)), num_partitions, alpha, rng)
    elif scheme == "group":
        parts = _group_parts(_aligned(groups, "groups", len(indices)), num_partitions, rng)
    else:
        raise ValueError(f"scheme must be one of {PARTITION_SCHEMES}, got '{scheme}'")
    return sorted(indices[parts[partition_id]].tolist())


def _dirichlet_parts(labels: np.ndarray, num_partitions: int, alpha: float, rng) -> list[np.ndarray]:
    parts: list[list[int]] = [[] for _ in range(num_partitions)]
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        shares = rng.dirichlet(np.full(num_partitions, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
        for part, chunk in zip(parts, np.split(members, cuts)):
            part.extend(chunk.tolist())
    # Small alpha can leave a site with nothing; a site without data cannot take part in a round.
    for part in parts:
        if not part:
            part.append(max(parts, key=len).pop())
    return [np.asarray(part, dtype=int) for part in parts]


def _group_parts(groups: np.ndarray, num_partitions: int, rng) -> list[np.ndarray]:
    names, group_of = np.unique(groups, return_inverse=True)
    if len(names) < num_partitions:
        raise ValueError(f"{len(names)} groups cannot fill {num_partitions} partitions")
    sizes = np.bincount(group_of)
    order = rng.permutation(len(names))  # seeded tie-break among equal-sized groups
    order = order[np.argsort(-sizes[order], kind="stable")]
    site_of_group = np.empty(len(names), dtype=int)
    load = np.zeros(num_partitions, dtype=int)
    for group in order:
        site = int(np.argmin(load))
        site_of_group[group] = site
        load[site] += sizes[group]
    return [np.flatnonzero(site_of_group[group_of] == site) for site in range(num_partitions)]


def _aligned(values: Sequence | None, field: str, n: int) -> np.ndarray:
    if values is None or len(values) != n:
        got = "nothing" if values is None else f"{len(values)} values"
        raise ValueError(f"{field} must give one value per item ({n}), got {got}")
    return np.asarray(values)


def _pad(sequences: list[list[int]], value: int) -> torch.Tensor:
    if not sequences:
        return torch.zeros((0, 0), dtype=torch.long)
    return pad_sequence([torch.tensor(s, dtype=torch.long) for s in sequences], batch_first=True,
                        padding_value=value)


def _subset(rows: list[Row], limit: int | None, seed: int) -> list[Row]:
    if limit is None or limit >= len(rows):
        return rows
    keep = np.random.default_rng(seed).permutation(len(rows))[:limit]
    return [rows[i] for i in sorted(keep)]


def _split(rows: list[Row], seed: int) -> tuple[list[Row], list[Row]]:
    order = np.random.default_rng(seed).permutation(len(rows))
    n_eval = max(1, int(round(EVAL_FRACTION * len(rows))))
    return [rows[i] for i in sorted(order[n_eval:])], [rows[i] for i in sorted(order[:n_eval])]


def _tokenize_classification(rows: list[Row], tokenizer: PreTrainedTokenizerBase, max_length: int) -> list[dict]:
    if not rows:
        return []
    texts = [row["text"] for row in rows]
    pairs = [row["text_pair"] for row in rows] if rows[0].get("text_pair") is not None else None
    encoded = tokenizer(texts, pairs, truncation=True, max_length=max_length)
    metadata = [{k: v for k, v in row.items() if k not in ("text", "text_pair", "label")} for row in rows]
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoded]
    return [
        {**{k: encoded[k][i] for k in keys}, "labels": row["label"], **metadata[i]}
        for i, row in enumerate(rows)
    ]


def _tokenize_generation(rows: list[Row], tokenizer: PreTrainedTokenizerBase, max_length: int) -> list[dict]:
    """Prompt then target then EOS; loss on target and EOS only. Examples whose prompt alone fills
    ``max_length`` would carry no loss and are dropped."""
    if tokenizer.eos_token_id is None:
        raise ValueError("generation tasks need a tokenizer with an EOS token to end targets")
    if not rows:
        return []
    prompts = tokenizer([row["source"] for row in rows], add_special_tokens=True)["input_ids"]
    targets = tokenizer([row["target"] for row in rows], add_special_tokens=False)["input_ids"]
    examples = []
    for row, prompt, target in zip(rows, prompts, targets):
        if len(prompt) >= max_length:
            continue
        target = target + [tokenizer.eos_token_id]
        input_ids = (prompt + target)[:max_length]
        examples.append({
            "input_ids": input_ids,
            "attention_mask": [1] * len(input_ids),
            "labels": ([IGNORE_INDEX] * len(prompt) + target)[:max_length],
            "source": row["source"],
            "references": row["references"],
        })
    return examples


# ---- offline data sets ---------------------------------------------------------------------------------


def _movie_sentiment(seed: int, max_train: int | None, max_eval: int | None) -> tuple[list[Row], list[Row]]:
    """SST-2 stand-in: label = mean human score > 0; neutral (score exactly 0) snippets are dropped."""
    rows = []
    with open(offline.movie_snippets_path(), encoding="utf-8", newline="") as lines:
        for number, line in enumerate(lines, 1):
            line = line.rstrip("\r\n")
            if not line:
                continue
            fields = line.split("\t", 2)
            if len(fields) != 3:
                raise ValueError(f"movie snippets line {number}: expected 'id<TAB>score<TAB>text', got {line!r}")
            score = float(fields[1])
            if score != 0:
                rows.append({"text": fields[2], "text_pair": None, "label": int(score > 0)})
    return _split(rows, seed)


def _snli_rows(split: str) -> list[dict]:
    """SNLI rows with a gold label (``-`` marks pairs the annotators did not agree on)."""
    with open(offline.snli_paths()[split], encoding="utf-8") as lines:
        rows = [json.loads(line) for line in lines if line.strip()]
    return [row for row in rows if row["gold_label"] in SNLI_LABELS]


def _snli(seed: int, max_train: int | None, max_eval: int | None) -> tuple[list[Row], list[Row]]:
    def rows(split: str) -> list[Row]:
        return [{"text": r["sentence1"], "text_pair": r["sentence2"], "label": SNLI_LABELS[r["gold_label"]]}
                for r in _snli_rows(split)]

    return rows("train"), rows("test")


def _snli_generation(seed: int, max_train: int | None, max_eval: int | None) -> tuple[list[Row], list[Row]]:
    """Premise -> a hypothesis it entails. Evaluation has one example per test premise, with every entailed
    hypothesis of that premise as a reference."""

    def pairs(split: str) -> list[tuple[str, str]]:
        return [(r["sentence1"], r["sentence2"]) for r in _snli_rows(split) if r["gold_label"] == "entailment"]

    def prompt(premise: str) -> str:
        return f"Premise: {premise}\nEntailed:"

    train = [{"source": prompt(p), "target": " " + h, "references": [h]} for p, h in pairs("train")]
    return train, _grouped_references([(prompt(p), h) for p, h in pairs("test")])


def _rotten_tomatoes(seed: int, max_train: int | None, max_eval: int | None) -> tuple[list[Row], list[Row]]:
    """Fresh (1) / rotten (0) critic reviews; ``movie_name`` stays in each example for grouped partitions."""
    path = offline.rotten_tomatoes_path()
    with bz2.open(path, "rt", encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"category", "text", "movie_name"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: missing columns {sorted(missing)}")
        rows = [{"text": r["text"], "text_pair": None, "label": int(r["category"] == "fresh"),
                 "movie_name": r["movie_name"]}
                for r in reader if r["category"] in ("fresh", "rotten")]
    return _split(rows, seed)


def _grouped_references(pairs: list[tuple[str, str]]) -> list[Row]:
    references: dict[str, list[str]] = {}
    for source, reference in pairs:
        references.setdefault(source, []).append(reference)
    return [{"source": s, "target": " " + refs[0], "references": refs} for s, refs in references.items()]


# ---- synthetic data (no files) ---------------------------------------------------------------------------

_POSITIVE = ("good", "great", "fine", "lovely")
_NEGATIVE = ("bad", "awful", "poor", "dull")
_NEUTRAL = ("the", "movie", "plot", "actor", "scene", "was")


def _synthetic(seed: int, max_train: int | None, max_eval: int | None) -> tuple[list[Row], list[Row]]:
    """Label 1 when a sentence has more positive than negative words: learnable by a tiny model."""
    rng = np.random.default_rng(seed)

    def row() -> Row:
        positives, negatives = rng.choice(4, size=2, replace=False)  # distinct counts: never a tie
        words = [*rng.choice(_POSITIVE, positives), *rng.choice(_NEGATIVE, negatives),
                 *rng.choice(_NEUTRAL, rng.integers(1, 4))]
        return {"text": " ".join(rng.permutation(words)), "text_pair": None, "label": int(positives > negatives)}

    n_train, n_eval = max_train or SYNTHETIC_SIZES[0], max_eval or SYNTHETIC_SIZES[1]
    return [row() for _ in range(n_train)], [row() for _ in range(n_eval)]


def _synthetic_generation(seed: int, max_train: int | None, max_eval: int | None) -> tuple[list[Row], list[Row]]:
    """Copy a short word sequence: learnable by a tiny model, exercises prompt masking and decoding."""
    rng = np.random.default_rng(seed)

    def row() -> Row:
        words = " ".join(rng.choice(_POSITIVE + _NEGATIVE + _NEUTRAL, rng.integers(2, 6)))
        return {"source": f"Repeat: {words}\nCopy:", "target": " " + words, "references": [words]}

    n_train, n_eval = max_train or SYNTHETIC_SIZES[0], max_eval or SYNTHETIC_SIZES[1]
    return [row() for _ in range(n_train)], [row() for _ in range(n_eval)]


# ---- hub data sets (the paper's tasks) ------------------------------------------------------------------


def _load_hub_dataset(path: str, config: str | None = None) -> datasets.DatasetDict:
    """``datasets.load_dataset`` that fails in seconds, with what to do instead, when the hub is out of reach
    (datasets itself retries for about a minute)."""
    advice = (f"Offline tasks: {', '.join(OFFLINE_TASKS)}. If '{path}' is in the local datasets cache, "
              "set HF_HUB_OFFLINE=1 to use it.")
    if not hub_constants.is_offline_mode() and not offline.hub_reachable():
        raise ConnectionError(f"dataset '{path}' needs the dataset hub ({hub_constants.ENDPOINT}), which is "
                              f"unreachable. {advice}")
    try:
        return datasets.load_dataset(path, config)
    except OSError as error:  # includes ConnectionError and a data set missing from the offline cache
        raise ConnectionError(f"could not load dataset '{path}' ({error}). {advice}") from error


def _glue_loader(name: str) -> Callable:
    (text_field, pair_field), _, eval_split = GLUE_TASKS[name]

    def load(seed: int, max_train: int | None, max_eval: int | None) -> tuple[list[Row], list[Row]]:
        splits = _load_hub_dataset(GLUE_DATASET, name)

        def rows(split: str, limit: int | None, split_seed: int) -> list[Row]:
            table = _hub_subset(splits[split], limit, split_seed)
            pairs = table[pair_field] if pair_field else [None] * len(table)
            return [{"text": t, "text_pair": p, "label": y}
                    for t, p, y in zip(table[text_field], pairs, table["label"])]

        # GLUE test labels are hidden (-1): the validation split is the evaluation set, as in the paper.
        return rows("train", max_train, seed), rows(eval_split, max_eval, seed + 1)

    return load


def _e2e(seed: int, max_train: int | None, max_eval: int | None) -> tuple[list[Row], list[Row]]:
    splits = _load_hub_dataset(E2E_DATASET)

    def prompt(meaning_representation: str) -> str:
        return f"Table: {meaning_representation}\nSentence:"

    train = _hub_subset(splits["train"], max_train, seed)
    train_rows = [{"source": prompt(m), "target": " " + r, "references": [r]}
                  for m, r in zip(train["meaning_representation"], train["human_reference"])]
    test = splits["test"]
    return train_rows, _grouped_references([(prompt(m), r) for m, r in
                                            zip(test["meaning_representation"], test["human_reference"])])


def _hub_subset(table: datasets.Dataset, limit: int | None, seed: int) -> datasets.Dataset:
    """Subset before converting to Python rows: QQP's train split alone has 364k pairs."""
    if limit is None or limit >= len(table):
        return table
    return table.select(sorted(np.random.default_rng(seed).permutation(len(table))[:limit].tolist()))


# name: (kind, number of labels, loader(seed, max_train, max_eval) -> (train rows, eval rows))
_LOADERS: dict[str, tuple[str, int, Callable]] = {
    "movie-sentiment": ("classification", 2, _movie_sentiment),
    "snli": ("classification", 3, _snli),
    "rotten-tomatoes": ("classification", 2, _rotten_tomatoes),
    "snli-generation": ("generation", 0, _snli_generation),
    "synthetic": ("classification", 2, _synthetic),
    "synthetic-generation": ("generation", 0, _synthetic_generation),
    **{name: ("classification", num_labels, _glue_loader(name))
       for name, (_, num_labels, _) in GLUE_TASKS.items()},
    "e2e": ("generation", 0, _e2e),
}
TASKS = tuple(_LOADERS)
OFFLINE_TASKS = ("movie-sentiment", "snli", "rotten-tomatoes", "snli-generation", "synthetic",
                 "synthetic-generation")
