"""Task sources for meta-training (training/sources.py): SPLITS/INDEX reading, HF hub
column detection by heuristics and by an LLM, and the hub loading path with a stand-in
``datasets`` module (the hub is unreachable here)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest
from fakes import fake_lm  # noqa: E402

from training.sources import (  # noqa: E402
    ColumnChoice,
    ColumnDetectionError,
    describe_features,
    detect_columns,
    detect_columns_with_lm,
    load_hub_task,
    read_overlap_groups,
    read_splits,
    resolve_task_paths,
    rows_from_columns,
)


class ClassLabel:
    """Duck-typed stand-in for datasets.ClassLabel."""

    def __init__(self, names: list[str]):
        self.names = names

    def str2int(self, name: str) -> int:
        return self.names.index(name)


class Value:
    def __init__(self, dtype: str):
        self.dtype = dtype


def test_describe_features_kinds() -> None:
    dataset = types.SimpleNamespace(
        features={
            "label": ClassLabel(["neg", "pos"]),
            "sentence": Value("string"),
            "idx": Value("int32"),
            "score": Value("float32"),
            "flag": Value("bool"),
            "tokens": object(),
        }
    )
    kinds = {name: info["kind"] for name, info in describe_features(dataset).items()}
    assert kinds == {
        "label": "class_label",
        "sentence": "string",
        "idx": "int",
        "score": "float",
        "flag": "bool",
        "tokens": "other",
    }
    assert describe_features(dataset)["label"]["names"] == ["neg", "pos"]


def test_classlabel_and_longest_text_column() -> None:
    features = {
        "idx": {"kind": "int"},
        "title": {"kind": "string"},
        "content": {"kind": "string"},
        "topic": {"kind": "class_label", "names": ["world", "sports"]},
    }
    rows = [
        {"idx": i, "title": "short", "content": "a much longer body of text " * 3, "topic": i % 2} for i in range(10)
    ]
    choice = detect_columns(features, rows)
    assert choice == ColumnChoice(text="content", label="topic", label_names=("world", "sports"))


def test_known_pair_columns() -> None:
    features = {
        "premise": {"kind": "string"},
        "hypothesis": {"kind": "string"},
        "label": {"kind": "class_label", "names": ["entailment", "neutral", "contradiction"]},
    }
    choice = detect_columns(features, [{"premise": "p", "hypothesis": "h", "label": 0}])
    assert (choice.text, choice.text_pair, choice.label) == ("premise", "hypothesis", "label")


def test_string_label_column_needs_low_cardinality() -> None:
    features = {"text": {"kind": "string"}, "category": {"kind": "string"}, "id": {"kind": "string"}}
    rows = [{"text": f"text {i}", "category": ["a", "b"][i % 2], "id": f"x{i}"} for i in range(20)]
    assert detect_columns(features, rows).label == "category"
    unique = [{"text": f"text {i}", "category": f"c{i}", "id": f"x{i}"} for i in range(20)]
    with pytest.raises(ColumnDetectionError, match="no label column"):
        detect_columns(features, unique)


def test_no_text_column_is_an_error() -> None:
    with pytest.raises(ColumnDetectionError, match="no text column"):
        detect_columns({"label": {"kind": "class_label", "names": ["a", "b"]}, "id": {"kind": "string"}}, [])


def test_rows_from_columns_maps_names_and_drops_bad_rows() -> None:
    choice = ColumnChoice(text="s", label="y", label_names=("neg", "pos"))
    rows = [
        {"s": "good film", "y": 1},
        {"s": "bad film", "y": 0},
        {"s": "unlabelled", "y": -1},
        {"s": "  ", "y": 1},
        {"s": "good film", "y": 1},
        {"s": "both ways", "y": 0},
        {"s": "both ways", "y": 1},
    ]
    assert rows_from_columns(rows, choice) == [
        {"text": "good film", "label": "pos"},
        {"text": "bad film", "label": "neg"},
    ]
    pair = ColumnChoice(text="a", text_pair="b", label="y")
    assert rows_from_columns([{"a": "x", "b": "z", "y": "yes"}, {"a": "x", "b": None, "y": "no"}], pair) == [
        {"text": "x", "text_pair": "z", "label": "yes"}
    ]


def test_llm_detection_uses_a_valid_answer_and_rejects_a_bad_one() -> None:
    features = {
        "q1": {"kind": "string"},
        "q2": {"kind": "string"},
        "dup": {"kind": "class_label", "names": ["no", "yes"]},
    }
    rows = [{"q1": "how?", "q2": "why?", "dup": 0}]
    lm, engine = fake_lm('Here you go: {"text": "q1", "text_pair": "q2", "label": "dup"}')
    choice = detect_columns_with_lm(lm, features, rows)
    assert choice == ColumnChoice(text="q1", text_pair="q2", label="dup", label_names=("no", "yes"), how="llm")
    assert "q1: string" in engine.prompt(0)
    bad, _ = fake_lm('{"text": "question", "label": "dup"}')
    assert detect_columns_with_lm(bad, features, rows) is None
    prose, _ = fake_lm("The label is probably dup.")
    assert detect_columns_with_lm(prose, features, rows) is None


class _FakeSplit:
    """Just enough of datasets.Dataset for load_hub_task."""

    def __init__(self, rows: list[dict[str, Any]], features: dict[str, Any]):
        self._rows, self.features = rows, features
        self.column_names = list(features)

    def __len__(self) -> int:
        return len(self._rows)

    def __iter__(self):
        return iter(self._rows)

    def select(self, indices):
        return [self._rows[i] for i in indices]


def test_load_hub_task_through_a_stand_in_datasets_module(monkeypatch: pytest.MonkeyPatch) -> None:
    features = {"sentence": Value("string"), "label": ClassLabel(["negative", "positive"]), "idx": Value("int32")}
    train = _FakeSplit([{"sentence": f"review {i}", "label": i % 2, "idx": i} for i in range(50)], features)
    test = _FakeSplit([{"sentence": f"hidden {i}", "label": -1, "idx": i} for i in range(10)], features)
    calls: list[tuple] = []

    def load_dataset(name, config=None, split=None, cache_dir=None):
        calls.append((name, config, split))
        return {"train": train, "test": test} if split is None else train

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    task, source, choice = load_hub_task("glue:sst2", max_rows=30, seed=1)
    assert calls == [("glue", "sst2", None)]
    assert source == "hf:glue:sst2" and task.name == "glue_sst2"
    assert (choice.text, choice.label) == ("sentence", "label")
    assert len(task.rows) == 30 and task.labels == ["negative", "positive"]
    assert all(row["text"].startswith("review") for row in task.rows)  # unlabelled test split dropped


def test_splits_index_and_task_paths(tmp_path: Path) -> None:
    assert read_splits(tmp_path) is None
    (tmp_path / "SPLITS.json").write_text(json.dumps({"train": ["a"], "dev": ["b"], "note": "x"}))
    assert read_splits(tmp_path) == {"train": ["a"], "dev": ["b"]}
    (tmp_path / "INDEX.tsv").write_text("name\toverlap_group\na\tg1\nb\t-\nc\tg1\n")
    assert read_overlap_groups(tmp_path) == {"a": "g1", "c": "g1"}
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "data.jsonl").write_text('{"text": "t", "label": "l"}\n')
    assert resolve_task_paths(["a"], tmp_path) == [tmp_path / "a"]
    with pytest.raises(FileNotFoundError, match="b, zz"):
        resolve_task_paths(["a", "b", "zz"], tmp_path)
