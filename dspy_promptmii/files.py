"""Atomic file writes: a reader, or a crash, sees the old file or the new one, never half;
a failed write leaves no ``.partial`` file behind. :func:`check_writable` checks an output
path before any work is done for it."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["write_text", "write_json", "write_jsonl", "partial_path", "check_writable"]


def partial_path(path: Path) -> Path:
    """Where a file is written before it is renamed into place (same folder, so the rename is atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(path.name + ".partial")


def check_writable(path: str | Path, *, folder: bool = False) -> Path:
    """Check, before any work is done, that a file (or with ``folder``, a folder) can be
    written at ``path``: it is not a folder (not a file), the nearest existing parent is a
    folder, and a file can be created there (tried, then removed). Creates nothing else.

    Returns the path. Raises ``ValueError`` saying why not, naming the path.
    """
    path = Path(path).expanduser()
    if folder and path.exists() and not path.is_dir():
        raise ValueError(f"cannot write results into {path}: it is a file, not a folder")
    if not folder and path.is_dir():
        raise ValueError(f"cannot write {path}: it is a folder; give a file name")
    existing = path if folder and path.is_dir() else path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"cannot write {path}: {existing} is a file, not a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".write-check-"):
            pass
    except OSError as error:
        raise ValueError(f"cannot write {path}: {existing} is not writable ({error.strerror or error})") from None
    return path


def write_text(text: str, path: str | Path) -> None:
    """Write ``text`` (UTF-8), atomically; on any failure the partial file is removed and
    the error raised (``OSError``: e.g. ``IsADirectoryError`` when ``path`` is a folder)."""
    path = Path(path)
    partial = partial_path(path)
    try:
        with partial.open("w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        partial.replace(path)
    except BaseException:
        try:
            partial.unlink(missing_ok=True)
        except OSError:  # pragma: no cover - e.g. a folder of that name: not ours to remove
            pass
        raise


def write_json(data: Any, path: str | Path) -> None:
    """Write ``data`` as indented JSON, atomically."""
    write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", path)


def write_jsonl(records: Iterable[Any], path: str | Path) -> None:
    """Write one JSON object a line, atomically."""
    write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records), path)
