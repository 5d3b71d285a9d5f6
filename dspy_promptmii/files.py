"""Files in and out.

Writes are atomic: a reader, or a crash, sees the old file or the new one, never half; a
failed write leaves no ``.partial`` file behind and its error names the file. A symbolic
link is followed as ``cp`` follows it: the file it points to is replaced, the link stays.
:func:`check_writable` checks an output path before any work is done for it, and refuses
one that resolves to an input of the same run.

A read of JSON (:func:`read_json`) fails with a ``ValueError`` naming the file (and line
and column) for text that is not UTF-8, not JSON or nested too deeply to read.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "write_text",
    "write_json",
    "write_jsonl",
    "partial_path",
    "check_writable",
    "naming_path",
    "read_json",
]


def partial_path(path: Path) -> Path:
    """Where a file is written before it is renamed into place (same folder, so the rename is atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(path.name + ".partial")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def check_writable(
    path: str | Path, *, folder: bool = False, inputs: Iterable[tuple[str, str | Path]] = ()
) -> Path:
    """Check, before any work is done, that a file (or with ``folder``, a folder) can be
    written at ``path``: it is not an input of the run (``inputs``: ``(what, path)``
    pairs, e.g. ``("--data", "tasks.jsonl")``; compared after following links, so a link
    to an input or another name of it counts), it is not a folder (not a file), the
    nearest existing parent is a folder, and a file can be created there (tried, then
    removed). A link is checked where it points (see the module docs). Creates nothing else.

    Returns the path. Raises ``ValueError`` saying why not, naming the path.
    """
    path = Path(path).expanduser()
    for what, given in inputs:
        source = Path(given).expanduser()
        if not folder and source.is_dir():
            continue
        if _same_file(path, source):
            raise ValueError(
                f"cannot write {path}: it is {what} {source}, an input of this run, which is never overwritten; "
                "give another file"
            )
    target = Path(os.path.realpath(path)) if path.is_symlink() else path  # a link: where it points
    if folder and target.exists() and not target.is_dir():
        raise ValueError(f"cannot write results into {target}: it is a file, not a folder")
    if not folder and target.is_dir():
        raise ValueError(f"cannot write {target}: it is a folder; give a file name")
    existing = target if folder and target.is_dir() else target.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"cannot write {target}: {existing} is a file, not a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".write-check-"):
            pass
    except OSError as error:
        raise ValueError(
            f"cannot write {target}: no file can be created in {existing} ({error.strerror or error})"
        ) from None
    return path


@contextlib.contextmanager
def naming_path(path: str | Path) -> Iterator[None]:
    """Re-raise an ``OSError`` that names no file (``[Errno 28] No space left on
    device``) as one of the same type naming ``path``."""
    try:
        yield
    except OSError as error:
        if error.filename is not None or error.errno is None:
            raise
        raise type(error)(error.errno, error.strerror or str(error), str(path)) from error


def write_text(text: str, path: str | Path) -> None:
    """Write ``text`` (UTF-8), atomically; a link is followed and the file it points to
    replaced (see the module docs). On any failure the partial file is removed and the
    error raised, naming the file (``OSError``: e.g. ``IsADirectoryError`` when ``path``
    is a folder, ``[Errno 28]`` on a full disk)."""
    given = Path(path)
    path = Path(os.path.realpath(given)) if given.is_symlink() else given
    with naming_path(given):
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


def read_json(path: str | Path) -> Any:
    """The JSON value of a UTF-8 file (a byte-order mark allowed).

    Raises:
        OSError: the file cannot be read (``FileNotFoundError``...), naming it.
        ValueError: ``path:line:column:`` bytes that are not UTF-8 or text that is not
            JSON; ``path:`` JSON nested too deeply to read.
    """
    path = Path(path)
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        raise ValueError(f"{path}:{line}:{column}: not valid UTF-8 (byte 0x{data[error.start]:02x})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}:{error.lineno}:{error.colno}: not valid JSON ({error.msg})") from None
    except RecursionError:
        raise ValueError(f"{path}: JSON nested too deeply to read") from None
