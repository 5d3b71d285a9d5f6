"""Task data in the shared folder format: one JSON object a line,
``{"text": ..., ["text_pair": ...,] "label": ...}``, turned into DSPy examples and a
classification signature."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import dspy

__all__ = ["TaskData", "load_jsonl", "load_task", "classifier_signature", "split_rows"]

INPUT_FIELDS = ("text", "text_pair")


def load_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a task file. Every row needs a non-empty ``text`` and a ``label``; a
    ``text_pair`` must be in all rows or none. Errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no task file at {path}")
    rows: list[dict[str, Any]] = []
    numbers: list[int] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid JSON ({error.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            if not isinstance(row.get("text"), str) or not row["text"].strip():
                raise ValueError(f"{path}:{number}: missing or empty 'text'")
            if row.get("label") is None or str(row["label"]).strip() == "":
                raise ValueError(f"{path}:{number}: missing 'label'")
            rows.append({**row, "label": str(row["label"])})
            numbers.append(number)
    if not rows:
        raise ValueError(f"{path} holds no rows")
    with_pair = sum("text_pair" in row for row in rows)
    if 0 < with_pair < len(rows):
        # Name the first line of the minority: the rows most likely to be the mistake.
        odd = with_pair <= len(rows) - with_pair
        line = next(n for n, row in zip(numbers, rows) if ("text_pair" in row) == odd)
        raise ValueError(
            f"{path}:{line}: 'text_pair' is in {with_pair} of {len(rows)} rows; it must be in all or none"
        )
    return rows


def classifier_signature(labels: Sequence[str], pair: bool, instructions: str | None = None) -> type[dspy.Signature]:
    """``text[, text_pair] -> label: Literal[labels]``, with ``instructions`` or DSPy's
    default ones (which the protocol does not show as an author's task description)."""
    fields: dict[str, Any] = {"text": (str, dspy.InputField())}
    if pair:
        fields["text_pair"] = (str, dspy.InputField())
    fields["label"] = (Literal[tuple(labels)], dspy.OutputField())
    return dspy.Signature(fields, instructions) if instructions else dspy.Signature(fields)


@dataclass
class TaskData:
    """A task's rows with the signature and examples DSPy needs."""

    name: str
    rows: list[dict[str, Any]]

    @property
    def pair(self) -> bool:
        return "text_pair" in self.rows[0]

    @property
    def input_fields(self) -> tuple[str, ...]:
        return INPUT_FIELDS if self.pair else INPUT_FIELDS[:1]

    @property
    def labels(self) -> list[str]:
        """Distinct labels, sorted (the order the format line lists them in)."""
        return sorted({row["label"] for row in self.rows})

    def signature(self, instructions: str | None = None) -> type[dspy.Signature]:
        return classifier_signature(self.labels, self.pair, instructions)

    def examples(self, rows: Sequence[dict[str, Any]] | None = None) -> list[dspy.Example]:
        return [
            dspy.Example({name: row[name] for name in (*self.input_fields, "label")}).with_inputs(*self.input_fields)
            for row in (self.rows if rows is None else rows)
        ]


def load_task(path: str | Path) -> TaskData:
    """A task from a folder holding ``data.jsonl`` or from a ``.jsonl`` file."""
    path = Path(path)
    file = path / "data.jsonl" if path.is_dir() else path
    name = path.name if path.is_dir() else path.stem
    return TaskData(name=name, rows=load_jsonl(file))


def split_rows(
    rows: Sequence[dict[str, Any]], train: int, test: int, seed: int = 0
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A seeded, disjoint (train, test) split: ``test`` rows are drawn first, so the test
    rows stay the same whatever ``train`` is; train is the next ``train`` rows."""
    if train < 0 or test < 0:
        raise ValueError(f"train and test row counts must not be negative, got train={train}, test={test}")
    if train + test > len(rows):
        raise ValueError(f"asked for {train} train + {test} test rows but the task has {len(rows)}")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    test_rows = [rows[i] for i in order[:test]]
    train_rows = [rows[i] for i in order[test : test + train]]
    return train_rows, test_rows
