"""Task data: JSONL loading with file:line errors, seeded splits, signature and examples."""

from __future__ import annotations

import json
import re
from typing import Literal, get_args

import dspy
import pytest

from dspy_promptmii.data import TaskData, classifier_signature, load_jsonl, load_task, split_rows
from dspy_promptmii.task import signature_task


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def rows_of(n, pair=False):
    rows = []
    for i in range(n):
        row = {"text": f"text {i}", "label": ["b", "a", "c"][i % 3]}
        if pair:
            row["text_pair"] = f"pair {i}"
        rows.append(row)
    return rows


def write_rows(path, rows):
    return write_lines(path, [json.dumps(r) for r in rows])


# --- load_jsonl ---------------------------------------------------------------------


def test_load_jsonl_reads_rows_and_labels_as_strings(tmp_path):
    path = write_lines(
        tmp_path / "d.jsonl",
        [json.dumps({"text": "a", "label": 1}), "", json.dumps({"text": "b", "label": "0", "extra": True})],
    )
    rows = load_jsonl(path)
    assert rows == [{"text": "a", "label": "1"}, {"text": "b", "label": "0", "extra": True}]


def _error(path):
    with pytest.raises(ValueError) as info:
        load_jsonl(path)
    return str(info.value)


def test_bad_json_names_file_and_line(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps({"text": "a", "label": "x"}), "", '{"text": "b", "label":'])
    message = _error(path)
    assert message.startswith(f"{path}:3:")
    assert "not valid JSON" in message


def test_non_object_row_names_file_and_line(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps({"text": "a", "label": "x"}), '["text", "label"]'])
    assert _error(path).startswith(f"{path}:2: expected a JSON object")


@pytest.mark.parametrize(
    "bad", [{"label": "x"}, {"text": "", "label": "x"}, {"text": "  ", "label": "x"}, {"text": 3, "label": "x"}]
)
def test_missing_text_names_file_and_line(tmp_path, bad):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps({"text": "a", "label": "x"}), json.dumps(bad)])
    message = _error(path)
    assert message.startswith(f"{path}:2:")
    assert "'text'" in message


@pytest.mark.parametrize("bad", [{"text": "b"}, {"text": "b", "label": None}, {"text": "b", "label": " "}])
def test_missing_label_names_file_and_line(tmp_path, bad):
    rows = [json.dumps({"text": "a", "label": "x"})] * 3 + [json.dumps(bad)]
    path = write_lines(tmp_path / "d.jsonl", rows)
    message = _error(path)
    assert message.startswith(f"{path}:4:")
    assert "'label'" in message


def test_label_zero_is_a_label(tmp_path):
    path = write_rows(tmp_path / "d.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": False}])
    assert [r["label"] for r in load_jsonl(path)] == ["0", "false"]  # booleans by the label rule: JSON's spelling


def test_text_pair_in_some_rows_only_names_file_and_line(tmp_path):
    rows = rows_of(5, pair=True)
    del rows[3]["text_pair"]  # line 4 is the odd one out
    message = _error(write_rows(tmp_path / "d.jsonl", rows))
    assert message.startswith(f"{tmp_path / 'd.jsonl'}:4:")
    assert "'text_pair' is in 4 of 5 rows" in message

    rows = rows_of(5)
    rows[1]["text_pair"] = "stray"  # line 2 is the odd one out
    message = _error(write_rows(tmp_path / "e.jsonl", rows))
    assert message.startswith(f"{tmp_path / 'e.jsonl'}:2:")
    assert "'text_pair' is in 1 of 5 rows" in message


def test_empty_and_absent_files(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", ["", "  "])
    assert re.search(r"holds no rows", _error(path))
    with pytest.raises(FileNotFoundError, match="no task file"):
        load_jsonl(tmp_path / "missing.jsonl")


# --- split_rows ---------------------------------------------------------------------


def test_split_is_disjoint_sized_and_seeded():
    rows = rows_of(50)
    train, test = split_rows(rows, train=20, test=10, seed=3)
    assert len(train) == 20 and len(test) == 10
    train_ids = {r["text"] for r in train}
    test_ids = {r["text"] for r in test}
    assert not train_ids & test_ids
    assert (train, test) == split_rows(rows, train=20, test=10, seed=3)
    assert any(split_rows(rows, train=20, test=10, seed=s)[1] != test for s in (4, 5, 6))


def test_test_rows_do_not_depend_on_train_size():
    rows = rows_of(50)
    _, test_small = split_rows(rows, train=5, test=10, seed=1)
    train_big, test_big = split_rows(rows, train=40, test=10, seed=1)
    assert test_small == test_big
    train_small, _ = split_rows(rows, train=5, test=10, seed=1)
    assert train_big[:5] == train_small


def test_split_asking_for_too_many_rows():
    with pytest.raises(ValueError, match="asked for 8 train \\+ 5 test rows but the task has 10"):
        split_rows(rows_of(10), train=8, test=5)


# --- TaskData -----------------------------------------------------------------------


def test_task_signature_sorted_labels_single_input():
    task = TaskData("t", [{"text": "x", "label": lab} for lab in ["neg", "pos", "neg", "neutral"]])
    assert task.labels == ["neg", "neutral", "pos"]
    assert task.pair is False and task.input_fields == ("text",)
    signature = task.signature()
    assert list(signature.input_fields) == ["text"]
    assert list(signature.output_fields) == ["label"]
    assert get_args(signature.output_fields["label"].annotation) == ("neg", "neutral", "pos")
    # DSPy's own default instructions: the protocol shows no author's task description.
    assert signature.instructions == "Given the fields `text`, produce the fields `label`."
    assert task.signature("Do it.").instructions == "Do it."
    parsed = signature_task(signature)
    assert parsed is not None and parsed.labels == ("neg", "neutral", "pos")


def test_task_pair_detection_and_examples():
    task = TaskData("p", rows_of(4, pair=True))
    assert task.pair is True
    assert task.input_fields == ("text", "text_pair")
    assert list(task.signature().input_fields) == ["text", "text_pair"]
    examples = task.examples()
    assert len(examples) == 4
    assert isinstance(examples[0], dspy.Example)
    assert set(examples[0].inputs().keys()) == {"text", "text_pair"}
    assert examples[0].label == "b"
    assert [e.text for e in task.examples(task.rows[2:])] == ["text 2", "text 3"]


def test_examples_drop_extra_columns():
    task = TaskData("t", [{"text": "x", "label": "a", "id": 7}])
    assert set(task.examples()[0].keys()) == {"text", "label"}


def test_load_task_from_folder_or_file(tmp_path):
    folder = tmp_path / "sst2"
    folder.mkdir()
    write_rows(folder / "data.jsonl", rows_of(6))
    task = load_task(folder)
    assert task.name == "sst2" and len(task.rows) == 6 and task.labels == ["a", "b", "c"]
    file_task = load_task(write_rows(tmp_path / "rte.jsonl", rows_of(3, pair=True)))
    assert file_task.name == "rte" and file_task.pair


def test_classifier_signature_literal():
    signature = classifier_signature(["x", "y"], pair=False)
    assert signature.output_fields["label"].annotation == Literal["x", "y"]


def test_split_rows_rejects_negative_counts():
    rows = [{"text": str(i), "label": "a"} for i in range(10)]
    with pytest.raises(ValueError, match="must not be negative"):
        split_rows(rows, train=-5, test=12)
