"""The results folder on disk: ``results.jsonl`` (one record per finished cell, appended
and fsync'ed as each cell finishes) and ``manifest.json`` (replaced atomically).

A cell is keyed by (task, n, method, seed). A record with status ``ok`` or ``failed``
(the method itself produced no program) finishes its cell; ``error`` records (a crash of
the machinery: a dropped server, an exception) are kept for the log but the cell runs
again on the next invocation. A torn last line (a crash mid-write, even inside a UTF-8
character) is ignored on reading, with a warning, and never glued to the next record.

One run at a time writes a folder: :meth:`ResultStore.lock` holds an exclusive
``fcntl.flock`` on ``run.lock`` in it for the whole run; another process asking for it
gets :class:`FolderLocked` at once. The manifest and every record are written through
:func:`dspy_promptmii.secrets.redact`: no credential reaches them. A write that fails
names its file (a full disk's ``[Errno 28]`` included).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from benchmarks.methods import PROMPTMII_METHODS, method_options, parse_method
from dspy_promptmii.files import naming_path, read_json, write_json
from dspy_promptmii.secrets import protected_logger, redact

logger = protected_logger(__name__)

__all__ = [
    "RESULTS",
    "MANIFEST",
    "LOCK",
    "FINISHED",
    "FolderLocked",
    "cell_key",
    "latest",
    "ResultStore",
    "read_records",
    "read_manifest",
    "write_json",
]

RESULTS = "results.jsonl"
MANIFEST = "manifest.json"
LOCK = "run.lock"
FINISHED = ("ok", "failed")

Key = tuple[str, int, str, int]


def cell_key(record: dict[str, Any]) -> Key:
    return (str(record["task"]), int(record["n"]), str(record["method"]), int(record["seed"]))


class FolderLocked(RuntimeError):
    """Another run (another process, or another thread of this one) writes the folder."""


def _with_options(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with its ``options``: everything its method name meant when it ran
    (see :func:`benchmarks.methods.method_options`)."""
    if "options" in record:
        return _include_naive_as_now(record)
    # A record written before records stored their options (results up to 2026-12-05)
    # means what its method name meant then, and this is the one place that old meaning
    # lives: a Prompt-MII method whose name did not set max_instruction_tokens ran without
    # an instruction budget (the optimizer's default, 160, did not apply); every other
    # default was the optimizer's, as now.
    try:
        spec, named = parse_method(str(record["method"]))
        options = method_options(str(record["method"]))
    except ValueError:  # a method name this code no longer knows: its meaning is unknown
        return {**record, "options": None}
    if spec.name in PROMPTMII_METHODS and "max_instruction_tokens" not in named:
        options["max_instruction_tokens"] = None
    return {**record, "options": options}


def _include_naive_as_now(record: dict[str, Any]) -> dict[str, Any]:
    """Until 2026-12-06 ``include_naive`` defaulted to True and applied only with
    ``candidates`` > 1, which is what None means now (True with one candidate is now a
    naive check): a stored True under a name that does not set it is read as None."""
    options = record["options"]
    if not isinstance(options, dict) or options.get("include_naive") is not True:
        return record
    try:
        _, named = parse_method(str(record["method"]))
    except ValueError:  # a method name this code no longer knows: left as stored
        return record
    if "include_naive" in named:
        return record
    return {**record, "options": {**options, "include_naive": None}}


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Every readable record of a results file, in file order, each with its
    ``options`` (inferred for a record written before they were stored). A line that is
    not UTF-8 or not JSON (a write cut short) or not a record is skipped with a warning
    naming it."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS
    if not path.is_file():
        return []
    lines = path.read_bytes().split(b"\n")
    records = []
    for number, data in enumerate(lines, start=1):
        if not data.strip():
            continue
        torn = "the last line, a write cut short?" if number == len(lines) else "a write cut short?"
        try:
            record = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            logger.warning("%s:%d: unreadable line (%s); ignored", path, number, torn)
            continue
        if isinstance(record, dict) and {"task", "n", "method", "seed"} <= record.keys():
            records.append(_with_options(record))
        else:
            logger.warning("%s:%d: not a result record; ignored", path, number)
    return records


def read_manifest(path: str | Path) -> dict[str, Any] | None:
    """A results folder's manifest (``path``: the folder or its ``manifest.json``), or
    None when there is none. Raises ``ValueError`` naming the file when it is not a JSON
    object (it is written atomically, so only by hand)."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = read_json(path)
    except ValueError as error:
        raise ValueError(f"not a readable manifest: {error}") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{path}: not a readable manifest (not a JSON object)")
    return manifest


#: Folders this process holds the lock of: resolved lock path -> [fd, holding thread, depth].
_held: dict[str, list[int]] = {}
_held_lock = threading.Lock()


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
        return set(self.finished_records())

    def finished_records(self) -> dict[Key, dict[str, Any]]:
        """The last finished record of each finished cell (its ``split_id`` says which
        data it was made with)."""
        return {cell_key(r): r for r in self.records() if r.get("status") in FINISHED}

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the folder's exclusive lock (``run.lock``, ``fcntl.flock``) for a run.

        Re-entrant in the thread that holds it (the command line locks before starting
        its LMs, the runner again inside). Raises :class:`FolderLocked` at once, naming the
        folder and the holder's process id, when another process or thread holds it.
        """
        path = os.path.realpath(self.folder / LOCK)
        me = threading.get_ident()
        with _held_lock:
            held = _held.get(path)
            if held is not None and held[1] != me:
                raise FolderLocked(f"{self.folder} is being written by another run in this process; use another --out")
            if held is None:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
                    os.close(fd)
                    raise FolderLocked(
                        f"{self.folder} is being written by another benchmark run (process {holder}); "
                        "wait for it to end, or pass another --out"
                    ) from None
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                held = _held[path] = [fd, me, 0]
            held[2] += 1
        try:
            yield
        finally:
            with _held_lock:
                held[2] -= 1
                if held[2] == 0:
                    del _held[path]
                    os.close(held[0])  # closing the descriptor releases the flock

    def append(self, record: dict[str, Any]) -> None:
        """Append one record (credentials redacted) and force it to disk before returning.
        Raises ``OSError`` naming ``results.jsonl`` when it cannot be written."""
        line = json.dumps(redact(record), ensure_ascii=False, sort_keys=False) + "\n"
        with naming_path(self.results), self.results.open("a+b") as handle:
            handle.seek(0, os.SEEK_END)
            if handle.tell() > 0:
                handle.seek(-1, os.SEEK_END)
                if handle.read(1) != b"\n":
                    handle.write(b"\n")  # a torn last line stays on its own line
            handle.write(line.encode("utf-8"))
            handle.flush()
            os.fsync(handle.fileno())

    def read_manifest(self) -> dict[str, Any] | None:
        """The manifest, or None when there is none (see :func:`read_manifest`)."""
        return read_manifest(self.manifest_path)

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        """Replace the manifest atomically, with every credential redacted."""
        write_json(redact(manifest), self.manifest_path)


def latest(records: Iterable[dict[str, Any]], statuses: tuple[str, ...] = ("ok",)) -> list[dict[str, Any]]:
    """The last record of each cell among those with one of ``statuses``, in first-seen order."""
    chosen: dict[Key, dict[str, Any]] = {}
    for record in records:
        if record.get("status") in statuses:
            chosen[cell_key(record)] = record
    return list(chosen.values())
