"""A site's own data file: every format through `datasets`, column renames, labels by name or index, the
chat template, and a clear error naming file, row and field for each kind of bad data."""

from __future__ import annotations

import json

import datasets
import pytest
from test_data import tiny_tokenizer

from dpmemarc_core.site_data import Columns, SiteDataError, load_site_task, parse_labels, read_table

ROWS = [{"text": "a great film", "label": "positive"}, {"text": "dull and long", "label": "negative"},
        {"text": "fun", "label": 1}, {"text": "awful", "label": 0}]
LABELS = ("negative", "positive")
EXPECTED = [1, 0, 1, 0]


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def write(path, rows, fmt: str) -> str:
    """The rows in one of the formats a site may hold (labels as names: every format keeps one column type)."""
    table = datasets.Dataset.from_list(rows)
    if fmt == "jsonl":
        return write_jsonl(path.with_suffix(".jsonl"), rows)
    if fmt == "csv":
        table.to_csv(str(path.with_suffix(".csv")), index=False)
        return str(path.with_suffix(".csv"))
    if fmt == "parquet":
        table.to_parquet(str(path.with_suffix(".parquet")))
        return str(path.with_suffix(".parquet"))
    table.save_to_disk(str(path))
    return str(path)


def decoded(task, tokenizer) -> list[str]:
    return [tokenizer.decode(e["input_ids"]) for e in task.train]


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet", "saved"])
def test_every_format_gives_the_same_classification_task(tmp_path, fmt):
    rows = [{**row, "label": LABELS[y]} for row, y in zip(ROWS, EXPECTED)]
    tok = tiny_tokenizer()
    task = load_site_task(write(tmp_path / "site", rows, fmt), tok, "classification", 2, LABELS)
    assert task.kind == "classification" and task.num_labels == 2 and task.eval == []
    assert [e["labels"] for e in task.train] == EXPECTED
    assert decoded(task, tok) == [row["text"] for row in rows]


def test_labels_by_name_and_index_mix_in_one_file(tmp_path):
    task = load_site_task(write_jsonl(tmp_path / "s.jsonl", ROWS), tiny_tokenizer(), "classification", 2, LABELS)
    assert [e["labels"] for e in task.train] == EXPECTED


def test_label_names_fix_the_head_order(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", ROWS[:2])
    task = load_site_task(path, tiny_tokenizer(), "classification", 2, ("positive", "negative"))
    assert [e["labels"] for e in task.train] == [0, 1]


def test_indices_alone_need_no_label_names(tmp_path):
    rows = [{"text": r["text"], "label": y} for r, y in zip(ROWS, EXPECTED)]
    task = load_site_task(write(tmp_path / "s", rows, "csv"), tiny_tokenizer(), "classification", 2)
    assert [e["labels"] for e in task.train] == EXPECTED


def test_columns_are_renamed_by_the_run_config(tmp_path):
    rows = [{"note": r["text"], "y": r["label"], "extra": 1} for r in ROWS]
    columns = Columns(text="note", label="y")
    task = load_site_task(write_jsonl(tmp_path / "s.jsonl", rows), tiny_tokenizer(), "classification", 2, LABELS,
                          columns)
    assert [e["labels"] for e in task.train] == EXPECTED


def test_generation_rows_mask_the_prompt(tmp_path):
    tok = tiny_tokenizer()
    rows = [{"question": "Repeat: good film", "answer": "good film"}, {"question": "Repeat: fun", "answer": " fun"}]
    task = load_site_task(write_jsonl(tmp_path / "g.jsonl", rows), tok, "generation",
                          columns=Columns(prompt="question", completion="answer"))
    assert task.kind == "generation" and task.num_labels == 0
    example = task.train[0]
    prompt = tok("Repeat: good film")["input_ids"]
    target = tok(" good film", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert example["input_ids"] == prompt + target
    assert example["labels"] == [-100] * len(prompt) + target
    assert [e["references"] for e in task.train] == [["good film"], ["fun"]]


def test_generation_uses_the_chat_template_where_the_tokenizer_has_one(tmp_path):
    tok = tiny_tokenizer()
    tok.chat_template = ("{% for m in messages %}[PAD] {{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %} Copy:{% endif %}")
    task = load_site_task(write_jsonl(tmp_path / "g.jsonl", [{"prompt": "good film", "completion": "good film"}]),
                          tok, "generation")
    example = task.train[0]
    prompt = tok("[PAD] good film Copy:", add_special_tokens=False)["input_ids"]
    assert example["input_ids"][:len(prompt)] == prompt
    assert example["labels"] == [-100] * len(prompt) + tok("good film", add_special_tokens=False)["input_ids"] + [
        tok.eos_token_id]


def test_holdout_is_decided_per_row_so_one_more_row_moves_no_other(tmp_path):
    rows = [{"text": " ".join(words), "label": i % 2} for i, words in enumerate(
        (a, b) for a in ("good", "great", "fine", "lovely", "bad") for b in ("film", "plot", "scene", "actor"))]
    load = lambda rows, name: load_site_task(write_jsonl(tmp_path / name, rows), tiny_tokenizer(), "classification",
                                             2, LABELS, holdout_fraction=0.25, seed=3)
    task, more = load(rows, "a.jsonl"), load(rows[:5] + [{"text": "awful", "label": 0}] + rows[5:], "b.jsonl")
    assert 0 < len(task.eval) < len(rows) and len(task.train) + len(task.eval) == len(rows)
    held = {tuple(e["input_ids"]) for e in task.eval}
    assert held <= {tuple(e["input_ids"]) for e in more.eval} and len(more.eval) - len(task.eval) in (0, 1)


# ---- bad data: the file, the row and the field in one message, before any training ----------------------

@pytest.mark.parametrize("rows, message", [
    ([{"text": "fun", "label": 1}, {"label": 0}], "row 2: field 'text' must be non-empty text"),
    ([{"text": "fun", "label": 1}, {"text": "   ", "label": 0}], "row 2: field 'text' must be non-empty text"),
    ([{"text": "fun", "label": "neutral"}], "row 1: field 'label' has an unknown label"),
    ([{"text": "fun", "label": 1}, {"text": "awful", "label": 2}], "row 2: field 'label' has an unknown label"),
    ([{"text": "fun"}], "missing column(s) ['label']"),
    ([{"review": "fun", "label": 1}], "missing column(s) ['text']; the file has ['review', 'label']"),
])
def test_bad_classification_rows_name_file_row_and_field(tmp_path, rows, message):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(SiteDataError) as error:
        load_site_task(path, tiny_tokenizer(), "classification", 2, LABELS)
    assert str(error.value).startswith(path) and message in str(error.value)


def test_label_names_without_the_labels_key_say_so(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", ROWS)
    with pytest.raises(SiteDataError, match=r"row 1: field 'label' has an unknown label.*'labels'.*got 'positive'"):
        load_site_task(path, tiny_tokenizer(), "classification", 2)


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "fun", "completion": ""}], "row 1: field 'completion' must be non-empty text"),
    ([{"prompt": "fun", "completion": "x"}, {"prompt": None, "completion": "x"}],
     "row 2: field 'prompt' must be non-empty text"),
    ([{"prompt": "fun"}], "missing column(s) ['completion']"),
    ([{"prompt": "a " * 40, "completion": "x"}], "row 1: field 'prompt' the prompt leaves no room"),
])
def test_bad_generation_rows_name_file_row_and_field(tmp_path, rows, message):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(SiteDataError) as error:
        load_site_task(path, tiny_tokenizer(), "generation", max_length=16)
    assert str(error.value).startswith(path) and message in str(error.value)


@pytest.mark.parametrize("name, payload, message", [
    ("broken.jsonl", '{"text": "fun", "label": 1}\n{"text": "x", oops\n', "unreadable json file"),
    ("broken.parquet", "not parquet", "unreadable parquet file"),
    ("notes.txt", "fun\n", "unsupported file type '.txt'"),
    ("empty.jsonl", "", "unreadable json file"),
])
def test_unreadable_files_are_named(tmp_path, name, payload, message):
    (tmp_path / name).write_text(payload)
    with pytest.raises(SiteDataError, match=message) as error:
        read_table(tmp_path / name)
    assert str(tmp_path / name) in str(error.value)


def test_missing_file_and_folder_without_a_dataset_are_named(tmp_path):
    with pytest.raises(SiteDataError, match="no such file"):
        read_table(tmp_path / "absent.jsonl")
    (tmp_path / "folder").mkdir()
    with pytest.raises(SiteDataError, match="not a readable datasets save_to_disk folder"):
        read_table(tmp_path / "folder")


def test_nothing_of_the_site_file_is_left_in_the_datasets_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    read_table(write_jsonl(tmp_path / "s.jsonl", ROWS))
    assert not any((tmp_path / "cache").rglob("*.arrow"))


@pytest.mark.parametrize("text, names", [("negative,positive", ("negative", "positive")),
                                         (" a , b ,c", ("a", "b", "c")), ("", ())])
def test_parse_labels(text, names):
    assert parse_labels(text) == names


@pytest.mark.parametrize("text", ["a", "a,,b", "a,a"])
def test_parse_labels_refuses_bad_lists(text):
    with pytest.raises(ValueError, match="labels must be two or more distinct"):
        parse_labels(text)


def test_the_reason_a_site_may_send_holds_no_value_from_the_file(tmp_path):
    path = write_jsonl(tmp_path / "notes.jsonl", [{"text": "fun", "label": 1}, {"text": "secret words", "label": 7}])
    with pytest.raises(SiteDataError) as error:
        load_site_task(path, tiny_tokenizer(), "classification", 2, LABELS)
    assert "7" in str(error.value) and str(tmp_path) in str(error.value)
    assert error.value.reason == ("notes.jsonl: row 2: field 'label' has an unknown label; accepted: a name in "
                                  "['negative', 'positive'] or an index in [0, 1]")
