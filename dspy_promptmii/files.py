"""Atomic file writes: a reader, or a crash, sees the old file or the new one, never half."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["write_json", "write_jsonl"]


def _replace(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with partial.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    partial.replace(path)


def write_json(data: Any, path: str | Path) -> None:
    """Write ``data`` as indented JSON, atomically."""
    _replace(Path(path), json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_jsonl(records: Iterable[Any], path: str | Path) -> None:
    """Write one JSON object a line, atomically."""
    _replace(Path(path), "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
