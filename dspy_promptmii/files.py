"""Atomic file writes: a reader, or a crash, sees the old file or the new one, never half."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["write_text", "write_json", "write_jsonl", "partial_path"]


def partial_path(path: Path) -> Path:
    """Where a file is written before it is renamed into place (same folder, so the rename is atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(path.name + ".partial")


def write_text(text: str, path: str | Path) -> None:
    """Write ``text`` (UTF-8), atomically."""
    path = Path(path)
    partial = partial_path(path)
    with partial.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    partial.replace(path)


def write_json(data: Any, path: str | Path) -> None:
    """Write ``data`` as indented JSON, atomically."""
    write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", path)


def write_jsonl(records: Iterable[Any], path: str | Path) -> None:
    """Write one JSON object a line, atomically."""
    write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records), path)
