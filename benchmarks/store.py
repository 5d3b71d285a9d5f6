"""The results folder on disk: ``results.jsonl`` (one record per finished cell, appended
and fsync'ed as each cell finishes) and ``manifest.json`` (replaced atomically).

A cell is keyed by (task, n, method, seed). A record with status ``ok`` or ``failed``
(the method itself produced no program) finishes its cell; ``error`` records (a crash of
the machinery: a dropped server, an exception) are kept for the log but the cell runs
again on the next invocation. A torn last line (a crash mid-write) is ignored on reading
and never glued to the next record.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from dspy_promptmii.files import write_json

logger = logging.getLogger(__name__)

__all__ = ["RESULTS", "MANIFEST", "FINISHED", "cell_key", "latest", "ResultStore", "read_records", "write_json"]

RESULTS = "results.jsonl"
MANIFEST = "manifest.json"
FINISHED = ("ok", "failed")

Key = tuple[str, int, str, int]


def cell_key(record: dict[str, Any]) -> Key:
    return (str(record["task"]), int(record["n"]), str(record["method"]), int(record["seed"]))


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Every readable record of a results file, in file order (torn lines skipped with a warning)."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS
    if not path.is_file():
        return []
    records = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                logger.warning("%s:%d: unreadable line (a write cut short?); ignored", path, number)
                continue
            if isinstance(record, dict) and {"task", "n", "method", "seed"} <= record.keys():
                records.append(record)
            else:
                logger.warning("%s:%d: not a result record; ignored", path, number)
    return records


class ResultStore:
    """Append-only access to one results folder."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.results = self.folder / RESULTS
        self.manifest_path = self.folder / MANIFEST

    def records(self) -> list[dict[str, Any]]:
        return read_records(self.results)

    def finished(self) -> set[Key]:
        """Keys of the cells that need not run again."""
        return {cell_key(r) for r in self.records() if r.get("status") in FINISHED}

    def append(self, record: dict[str, Any]) -> None:
        """Append one record and force it to disk before returning."""
        line = json.dumps(record, ensure_ascii=False, sort_keys=False) + "\n"
        with self.results.open("a+b") as handle:
            handle.seek(0, os.SEEK_END)
            if handle.tell() > 0:
                handle.seek(-1, os.SEEK_END)
                if handle.read(1) != b"\n":
                    handle.write(b"\n")  # a torn last line stays on its own line
            handle.write(line.encode("utf-8"))
            handle.flush()
            os.fsync(handle.fileno())

    def read_manifest(self) -> dict[str, Any] | None:
        if not self.manifest_path.is_file():
            return None
        return json.loads(self.manifest_path.read_text(encoding="utf-8"))

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        write_json(manifest, self.manifest_path)


def latest(records: Iterable[dict[str, Any]], statuses: tuple[str, ...] = ("ok",)) -> list[dict[str, Any]]:
    """The last record of each cell among those with one of ``statuses``, in first-seen order."""
    chosen: dict[Key, dict[str, Any]] = {}
    for record in records:
        if record.get("status") in statuses:
            chosen[cell_key(record)] = record
    return list(chosen.values())
