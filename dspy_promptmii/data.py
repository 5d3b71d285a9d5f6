"""Task data in the shared folder format: one JSON object a line,
``{"text": ..., ["text_pair": ...,] "label": ...}``, turned into DSPy examples and a
classification signature.

Labels are strings. Every reader of task data (:func:`load_jsonl` here, the Hugging Face
rows of :func:`training.sources.rows_from_columns`) turns a raw label value into its
label with :func:`label_text` and refuses, through :class:`LabelReader`, two different
raw values that would become one label. The rule:

* a string is the label after stripping surrounding white space;
* an integer is its decimal text (``7`` -> ``"7"``), a float with an integral value too
  (``7.0`` -> ``"7"``: integer columns exported with gaps become floats);
* a boolean is ``"true"`` or ``"false"`` (JSON's spelling);
* anything else is refused: ``null``, an empty or blank string, a list, an object, a
  float with a fraction, NaN or infinity;
* two different raw values that give the same label (``1`` and ``"1"``, ``" x"`` and
  ``"x"``, ``true`` and ``"true"``, ``1`` and ``1.0``) are an error naming both places.

A multi-label task file gives every row a list of labels (``"label": ["a", "c"]``,
``[]`` when none applies); each item follows the rule above, a label listed twice in a row
counts once, and the task's rows keep the sorted list. Whether a file is multi-label is
read from its first row: a list in a single-label file, or anything but a list in a
multi-label one, is an error naming the line.
"""

from __future__ import annotations

import json
import math
import numbers
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import dspy

from dspy_promptmii.protocol import label_array

__all__ = [
    "TaskData",
    "LabelReader",
    "label_text",
    "load_jsonl",
    "load_task",
    "read_splits",
    "classifier_signature",
    "split_rows",
]

INPUT_FIELDS = ("text", "text_pair")


def _shown(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False, default=repr)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def label_text(value: Any) -> str:
    """The label a raw label value stands for, by the module's rule (strings stripped,
    integers and integral floats as decimal text, booleans as ``"true"``/``"false"``).

    Raises ``ValueError`` saying why the value is not a label (without a location: the
    caller names the file and line): ``null``, an empty string, a list, an object, a
    fractional or non-finite number.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        number = float(value)
        if math.isfinite(number) and number.is_integer():
            return str(int(number))
        raise ValueError(f"the number {_shown(value)} is not a label (only integral numbers are)")
    if isinstance(value, str):
        text = value.strip()
        if not text:
            raise ValueError("an empty label")
        return text
    if value is None:
        raise ValueError("null is not a label")
    kind = {list: "a list", tuple: "a list", dict: "an object"}.get(type(value), f"a {type(value).__name__}")
    raise ValueError(f"{kind} ({_shown(value)}) is not a label; a label is a string, an integer or a boolean")


class LabelReader:
    """Applies :func:`label_text` to the raw labels of one task, in order, and refuses two
    different raw values that give one label (``1`` and ``"1"``).

    >>> read = LabelReader()
    >>> read(" pos", "f:1"), read(" pos", "f:2")
    ('pos', 'pos')
    """

    def __init__(self) -> None:
        self._first: dict[str, tuple[str, str]] = {}  # label -> (raw value as JSON, where)

    def __call__(self, value: Any, where: str) -> str:
        """The label of ``value`` found at ``where`` (e.g. ``path:line``).

        Raises ``ValueError`` starting with ``where``: a value :func:`label_text` refuses,
        or another raw value seen before that gives the same label (both places named).
        """
        try:
            label = label_text(value)
        except ValueError as error:
            raise ValueError(f"{where}: 'label': {error}") from None
        raw = json.dumps(value, ensure_ascii=False, sort_keys=True, default=repr)
        first_raw, first_where = self._first.setdefault(label, (raw, where))
        if first_raw != raw:
            raise ValueError(
                f"{where}: 'label' {_shown(value)} and 'label' {first_raw} at {first_where} both become the "
                f"label {label!r}; write one label one way"
            )
        return label


def load_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a task file (UTF-8, a byte-order mark allowed; blank lines skipped).

    Every row is a JSON object with a non-empty string ``text`` and a ``label`` (turned
    into a string by the module's label rule, see :func:`label_text`), or, in a
    multi-label file (its first row's label is a list), a list of labels (kept sorted,
    each once); a ``text_pair``, a non-empty string, must be in all rows or none.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: naming ``path:line``: bytes that are not UTF-8, a line that is not
            JSON (or nested too deeply to read) or not an object, a missing or empty ``text`` or ``text_pair``, a label
            the rule refuses or that collides with another spelling (both lines named),
            ``text_pair`` in some rows only, a list label in a single-label file or another
            label in a multi-label one; or a file with no rows.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no task file at {path}")
    rows: list[dict[str, Any]] = []
    numbers_: list[int] = []
    read_label = LabelReader()
    multilabel, first = False, 0
    with path.open("rb") as handle:
        for number, data in enumerate(handle, start=1):
            try:
                line = data.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(
                    f"{path}:{number}: not valid UTF-8 (byte 0x{data[error.start]:02x} at column {error.start + 1})"
                ) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid JSON ({error.msg})") from None
            except RecursionError:
                raise ValueError(f"{path}:{number}: JSON nested too deeply to read") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            if not isinstance(row.get("text"), str) or not row["text"].strip():
                raise ValueError(f"{path}:{number}: missing or empty 'text'")
            pair = row.get("text_pair", "-")
            if not isinstance(pair, str) or not pair.strip():
                raise ValueError(f"{path}:{number}: 'text_pair' must be a non-empty string, got {_shown(pair)}")
            if "label" not in row:
                raise ValueError(f"{path}:{number}: missing 'label'")
            if not rows:
                multilabel, first = isinstance(row["label"], list), number
            label = _row_label(row["label"], read_label, multilabel, first, f"{path}:{number}")
            rows.append({**row, "label": label})
            numbers_.append(number)
    if not rows:
        raise ValueError(f"{path} holds no rows")
    with_pair = sum("text_pair" in row for row in rows)
    if 0 < with_pair < len(rows):
        # Name the first line of the minority: the rows most likely to be the mistake.
        odd = with_pair <= len(rows) - with_pair
        line = next(n for n, row in zip(numbers_, rows) if ("text_pair" in row) == odd)
        raise ValueError(
            f"{path}:{line}: 'text_pair' is in {with_pair} of {len(rows)} rows; it must be in all or none"
        )
    return rows


def _row_label(value: Any, read_label: LabelReader, multilabel: bool, first: int, where: str) -> str | list[str]:
    """A row's label (single-label file) or sorted list of labels (multi-label file, as
    its first row, line ``first``, says). Raises ``ValueError`` starting with ``where``."""
    if not multilabel:
        return read_label(value, where)
    if not isinstance(value, list):
        raise ValueError(
            f"{where}: 'label' must be a list of labels in a multi-label file (line {first} has a list), "
            f"got {_shown(value)}"
        )
    return sorted({read_label(item, where) for item in value})


def classifier_signature(
    labels: Sequence[str],
    pair: bool,
    instructions: str | None = None,
    descriptions: Mapping[str, str] | None = None,
    multilabel: bool = False,
) -> type[dspy.Signature]:
    """``text[, text_pair] -> label: Literal[labels]`` (``list[Literal[labels]]`` with
    ``multilabel``), with ``instructions`` or DSPy's default ones (which the protocol does
    not show as an author's task description), and ``descriptions`` of the fields
    (``{"text": ..., "text_pair": ..., "label": ...}``, each optional) as their ``desc=``."""
    descriptions = descriptions or {}

    def field(kind: Any, name: str) -> Any:
        return kind(desc=descriptions[name]) if descriptions.get(name) else kind()

    fields: dict[str, Any] = {"text": (str, field(dspy.InputField, "text"))}
    if pair:
        fields["text_pair"] = (str, field(dspy.InputField, "text_pair"))
    label_type: Any = Literal[tuple(labels)]
    fields["label"] = (list[label_type] if multilabel else label_type, field(dspy.OutputField, "label"))
    return dspy.Signature(fields, instructions) if instructions else dspy.Signature(fields)


@dataclass
class TaskData:
    """A task's rows with the signature and examples DSPy needs.

    Raises ``ValueError`` when a row's label is not already a label by the module's rule
    (a non-empty string without surrounding white space): rows built by hand must pass
    their labels through :func:`label_text` (or :class:`LabelReader`) as the readers do.
    A multi-label task's rows each hold a list of such labels (its first row says which).
    """

    name: str
    rows: list[dict[str, Any]]

    def __post_init__(self) -> None:
        multilabel = bool(self.rows) and isinstance(self.rows[0].get("label"), list)
        for index, row in enumerate(self.rows):
            label = row.get("label")
            if multilabel:
                if not isinstance(label, list) or any(
                    not isinstance(item, str) or not item or item != item.strip() for item in label
                ):
                    raise ValueError(
                        f"task {self.name!r} row {index}: label {label!r} is not a list of label strings, as a "
                        "multi-label task's rows hold (its first row has a list)"
                    )
                continue
            if not isinstance(label, str) or not label or label != label.strip():
                raise ValueError(
                    f"task {self.name!r} row {index}: label {label!r} is not a label string "
                    "(non-empty, no surrounding white space); read rows with dspy_promptmii.data.load_jsonl "
                    "or convert labels with dspy_promptmii.data.label_text"
                )

    @property
    def pair(self) -> bool:
        return "text_pair" in self.rows[0]

    @property
    def input_fields(self) -> tuple[str, ...]:
        return INPUT_FIELDS if self.pair else INPUT_FIELDS[:1]

    @property
    def multilabel(self) -> bool:
        """Whether each row holds a list of labels (any number, none included)."""
        return isinstance(self.rows[0]["label"], list)

    @property
    def labels(self) -> list[str]:
        """Distinct labels, sorted (the order the format line lists them in); of a
        multi-label task, those of every row's list."""
        if self.multilabel:
            return sorted({label for row in self.rows for label in row["label"]})
        return sorted({row["label"] for row in self.rows})

    def label_key(self, row: Mapping[str, Any]) -> str:
        """A row's label as one string: the label, or a multi-label row's JSON array of
        labels in the task's order (what stratified sampling groups rows by)."""
        if self.multilabel:
            chosen = set(row["label"])
            return label_array([label for label in self.labels if label in chosen])
        return row["label"]

    def signature(
        self, instructions: str | None = None, descriptions: Mapping[str, str] | None = None
    ) -> type[dspy.Signature]:
        """The task's signature (see :func:`classifier_signature`)."""
        return classifier_signature(self.labels, self.pair, instructions, descriptions, self.multilabel)

    def examples(self, rows: Sequence[dict[str, Any]] | None = None) -> list[dspy.Example]:
        """The rows (default: all of them) as ``dspy.Example``s with their inputs marked
        (``examples`` always means ``dspy.Example``s; a ``ClassificationTask``'s checked
        ``LabelledExample``s are its ``labelled_examples``)."""
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


#: The lists of ``SPLITS.json`` that name tasks.
SPLIT_LISTS = ("train", "dev")


def read_splits(datasets_dir: str | Path) -> dict[str, list[str]] | None:
    """``SPLITS.json`` of a datasets folder (``{"train": [...], "dev": [...]}``, other keys
    ignored), or None if it has none.

    Raises ``ValueError`` naming the file: not JSON (with line and column), not a JSON
    object, or a ``train`` or ``dev`` that is not a list of task names (``{"dev": "t1"}``
    is refused, not read as the tasks ``t`` and ``1``).
    """
    from dspy_promptmii.files import read_json

    file = Path(datasets_dir) / "SPLITS.json"
    if not file.is_file():
        return None
    data = read_json(file)
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a JSON object with 'train' and 'dev' lists, got {type(data).__name__}")
    splits: dict[str, list[str]] = {}
    for key in SPLIT_LISTS:
        if key not in data:
            continue
        names = data[key]
        if not isinstance(names, list) or not all(isinstance(n, str) and n.strip() for n in names):
            raise ValueError(f"{file}: {key!r} must be a list of task names, got {_shown(names)}")
        splits[key] = [n.strip() for n in names]
    return splits


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
