"""Contamination check: do meta-training texts also occur in the evaluation tasks?

Every input text (``text`` and ``text_pair`` separately) is normalised -- Unicode NFKC,
case-folded, runs of white space folded to one space, trimmed -- and hashed with MD5.
A training row overlaps when any of its input texts has the hash of an evaluation text.
The paper reports 0.35% of its training instances overlapping its evaluation sets.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from dspy_promptmii.data import TaskData

__all__ = ["normalise_text", "text_hash", "row_hashes", "eval_hashes", "overlapping_rows"]

_SPACE = re.compile(r"\s+")


def normalise_text(text: Any) -> str:
    """NFKC, case-folded, white space folded and trimmed."""
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", str(text)).casefold()).strip()


def text_hash(text: Any) -> str:
    """MD5 hex digest of the normalised text."""
    return hashlib.md5(normalise_text(text).encode("utf-8")).hexdigest()


def row_hashes(row: Mapping[str, Any], fields: Sequence[str]) -> list[str]:
    """Hashes of the non-empty input texts of one row."""
    return [text_hash(row[f]) for f in fields if normalise_text(row.get(f, ""))]


def eval_hashes(tasks: Iterable[TaskData]) -> set[str]:
    """Hashes of every input text of the evaluation tasks."""
    hashes: set[str] = set()
    for task in tasks:
        for row in task.rows:
            hashes.update(row_hashes(row, task.input_fields))
    return hashes


def overlapping_rows(task: TaskData, hashes: set[str]) -> set[int]:
    """Indices of the task's rows having an input text among ``hashes``."""
    return {i for i, row in enumerate(task.rows) if any(h in hashes for h in row_hashes(row, task.input_fields))}
