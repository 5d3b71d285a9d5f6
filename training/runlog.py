"""Run files that survive being killed, shared by the long CPU jobs of the rejection-sampling
fine-tuning route (:mod:`training.rollouts`, :mod:`training.sft`).

* :class:`JsonlLog`: an append-only JSON-lines file. Each record is one ``write`` of one
  complete line, flushed and fsync'ed before :meth:`JsonlLog.append` returns. A kill in the
  middle of a write can leave a torn last line; :meth:`JsonlLog.repair` (called when a run
  opens the file) cuts it off, so the file never keeps a torn line and the next record
  starts on a line of its own. Readers skip a line that does not parse, with a warning.
* :func:`check_settings`: the resume rule. A run folder records the settings its results
  were made with (``manifest.json``); a restart with any of them changed is refused with
  :class:`SettingsMismatch`, naming the differing settings as dotted paths (as the
  benchmark runner's resume does), instead of mixing results of two configurations.
* :func:`folder_lock`: one process at a time writes a run folder (``fcntl.flock``).
* :func:`sha256_file`, :func:`digest`: content identities for settings.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dspy_promptmii.files import write_json

logger = logging.getLogger("training.runlog")

__all__ = [
    "JsonlLog",
    "RunLocked",
    "SettingsMismatch",
    "check_settings",
    "differences",
    "digest",
    "folder_lock",
]

_CHUNK = 1 << 20


class SettingsMismatch(RuntimeError):
    """A run folder holds results made with other settings than the ones given now."""


class RunLocked(RuntimeError):
    """Another process is writing the run folder."""


def digest(value: Any) -> str:
    """The sha256 (hex) of a JSON value in canonical form (sorted keys, no spaces):
    equal values give equal digests whatever their key order."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def differences(old: Any, new: Any, where: str = "") -> list[str]:
    """Dotted paths of the leaves where two JSON trees differ (``config.samples``)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [
            path
            for key in sorted(set(old) | set(new), key=str)
            for path in differences(old.get(key), new.get(key), f"{where}.{key}" if where else str(key))
        ]
    return [] if old == new else [where or "settings"]


def check_settings(manifest: Path, settings: dict[str, Any], *, what: str, hint: str) -> bool:
    """Compare ``settings`` with those recorded in ``manifest``; record them when there are none.

    Returns True when the folder is new (the manifest was written now), False when it
    matches (a resume).

    Raises:
        SettingsMismatch: the recorded settings differ; the message names up to 8 dotted
            paths, says what the folder holds (``what``) and how to go on (``hint``).
        ValueError: the manifest is not a JSON object (it is written atomically, so only
            a hand edit does that).
    """
    settings = json.loads(json.dumps(settings, default=str))  # the form it takes on disk
    if manifest.is_file():
        try:
            recorded = json.loads(manifest.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{manifest}: not a readable manifest ({error})") from None
        if not isinstance(recorded, dict):
            raise ValueError(f"{manifest}: not a readable manifest (not a JSON object)")
        differ = differences(recorded.get("settings", {}), settings)
        if differ:
            shown = ", ".join(differ[:8]) + (f" and {len(differ) - 8} more" if len(differ) > 8 else "")
            raise SettingsMismatch(
                f"{manifest.parent} holds {what} made with other settings (differing: {shown}); {hint}"
            )
        return False
    write_json({"settings": settings, "settings_sha256": digest(settings)}, manifest)
    return True


@contextlib.contextmanager
def folder_lock(folder: Path, what: str = "run") -> Iterator[None]:
    """Hold an exclusive lock on ``folder/run.lock`` (``fcntl.flock``; the kernel drops it
    when the process dies in any way). Raises :class:`RunLocked` at once, naming the
    holder's process id, when another process holds it."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "run.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            raise RunLocked(
                f"{folder} is being written by another {what} (process {holder}); wait for it to end or use "
                "another output folder"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


class JsonlLog:
    """An append-only JSON-lines file (see the module docstring)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)

    def repair(self) -> int:
        """Cut a torn last line (bytes after the last newline) off the file; returns how many
        bytes were removed (0 when the file is whole or absent), with a warning if any."""
        if not self.path.is_file():
            return 0
        with self.path.open("r+b") as handle:
            size = handle.seek(0, os.SEEK_END)
            if size == 0:
                return 0
            handle.seek(size - 1)
            if handle.read(1) == b"\n":
                return 0
            # Find the last newline, reading backwards in chunks.
            end = size
            keep = 0
            while end > 0:
                start = max(0, end - _CHUNK)
                handle.seek(start)
                block = handle.read(end - start)
                at = block.rfind(b"\n")
                if at >= 0:
                    keep = start + at + 1
                    break
                end = start
            handle.truncate(keep)
            handle.flush()
            os.fsync(handle.fileno())
        logger.warning(
            "%s: removed a torn last line (%d bytes, a write cut short by a kill); its work runs again",
            self.path,
            size - keep,
        )
        return size - keep

    def read(self) -> list[dict[str, Any]]:
        """Every record, in file order; a line that is not UTF-8 JSON of an object is
        skipped with a warning naming it."""
        if not self.path.is_file():
            return []
        records = []
        for number, data in enumerate(self.path.read_bytes().split(b"\n"), start=1):
            if not data.strip():
                continue
            try:
                record = json.loads(data.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                logger.warning("%s:%d: unreadable line (a write cut short?); ignored", self.path, number)
                continue
            if isinstance(record, dict):
                records.append(record)
            else:
                logger.warning("%s:%d: not a JSON object; ignored", self.path, number)
        return records

    def append(self, record: dict[str, Any]) -> None:
        """Append one record as one line, and force it to disk before returning."""
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("ab") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
