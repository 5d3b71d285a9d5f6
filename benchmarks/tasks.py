"""Which tasks a benchmark runs, and the one split of each task that every method shares.

The split protocol: the ``test_rows`` held-out rows are drawn first (a seeded shuffle,
:func:`dspy_promptmii.data.split_rows`), so they do not depend on ``n``; the remaining
rows are put in one seeded, stratified order (:func:`dspy_promptmii.sampling.select_examples`)
and every method gets the first ``n`` of it, so a smaller ``n`` is a prefix of a larger one
and no method ever sees a test row.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dspy

from dspy_promptmii.data import TaskData, read_splits, split_rows
from dspy_promptmii.sampling import select_examples
from dspy_promptmii.secrets import protected_logger

logger = protected_logger(__name__)

__all__ = ["REPO_ROOT", "DEFAULT_DATA_DIR", "SPLIT_PROTOCOL", "Split", "resolve_tasks", "make_split"]

REPO_ROOT = Path(__file__).resolve().parents[1]
#: ``../shared/datasets`` relative to the repository root.
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "datasets"

SPLIT_PROTOCOL = (
    "per task and seed: test rows drawn first by a seeded shuffle (dspy_promptmii.data.split_rows), "
    "identical for every n and method; the n labelled examples are the first n of one seeded stratified "
    "order of the remaining rows (dspy_promptmii.sampling.select_examples), so a smaller n is a prefix "
    "of a larger one; every method gets exactly these n examples and never a test row"
)


def resolve_tasks(data_dir: str | Path, names: list[str] | None = None) -> list[Path]:
    """The task folders to run: ``names`` if given, else the ``dev`` list of
    ``SPLITS.json`` when the folder has one, else every sub-folder holding ``data.jsonl``.

    Raises ``FileNotFoundError`` naming the folder (or the missing tasks) when absent,
    and ``ValueError`` naming ``SPLITS.json`` when it is not a JSON object whose ``dev`` is
    a list of task names (see :func:`dspy_promptmii.data.read_splits`).
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(
            f"no task folder at {data_dir}: pass --data-dir DIR, a folder of task folders "
            "(each with data.jsonl), or put the shared datasets there"
        )
    if not names:
        splits = read_splits(data_dir)
        if splits is not None:
            names = list(splits.get("dev") or [])
            logger.info("tasks: the %d 'dev' tasks of %s", len(names), data_dir / "SPLITS.json")
        if not names:
            names = sorted(p.name for p in data_dir.iterdir() if (p / "data.jsonl").is_file())
        if not names:
            raise FileNotFoundError(f"{data_dir} holds no task folder (a sub-folder with data.jsonl)")
    paths = [data_dir / name for name in names]
    missing = [str(p) for p in paths if not (p / "data.jsonl").is_file()]
    if missing:
        raise FileNotFoundError(f"no data.jsonl in task folder(s): {', '.join(missing)}")
    return paths


def _fingerprint(rows: list[dict[str, Any]]) -> str:
    text = json.dumps(rows, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclass
class Split:
    """A task's held-out test examples and its ordered pool of labelled examples."""

    task: TaskData
    seed: int
    test_rows: list[dict[str, Any]]
    ordered_rows: list[dict[str, Any]]  # the pool in the seeded stratified order
    test: list[dspy.Example] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.test = self.task.examples(self.test_rows)

    @property
    def n_available(self) -> int:
        return len(self.ordered_rows)

    def examples(self, n: int) -> list[dspy.Example]:
        """The first ``n`` examples of the pool, as ``dspy.Example``s (all of the pool when
        it is smaller)."""
        return self.task.examples(self.ordered_rows[:n])

    def split_id(self, n: int) -> str:
        """A fingerprint of the test rows and the first ``n`` examples: equal for every
        method of a cell exactly when they saw the same data."""
        return f"{_fingerprint(self.test_rows)}-{_fingerprint(self.ordered_rows[:n])}"

    def longest_input(self) -> dict[str, str]:
        """The test input with the most characters: ICL's context fit leaves room for it
        (its length only; no label is read)."""
        fields = self.task.input_fields
        row = max(self.test_rows, key=lambda r: sum(len(str(r[f])) for f in fields))
        return {f: str(row[f]) for f in fields}


def make_split(task: TaskData, test_rows: int, seed: int) -> Split:
    """The split of ``task`` for ``seed`` (see the module docstring)."""
    if test_rows < 1:
        raise ValueError(f"test_rows must be at least 1, got {test_rows}")
    if test_rows >= len(task.rows):
        raise ValueError(
            f"task {task.name!r} has {len(task.rows)} rows: too few for {test_rows} test rows plus examples"
        )
    pool, test = split_rows(task.rows, train=len(task.rows) - test_rows, test=test_rows, seed=seed)
    ordered = [row for row, _ in select_examples([(row, task.label_key(row)) for row in pool], len(pool), seed)]
    return Split(task=task, seed=seed, test_rows=test, ordered_rows=ordered)
