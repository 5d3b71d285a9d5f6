"""Child processes and scratch folders that end with the process that made them.

* ``popen_for_process_lifetime``: start a child that Linux kills (SIGKILL) when this
  process dies, even by ``kill -9``. Linux ties this parent-death signal to the
  *thread* that forks, not to the process, so these children are all forked by one
  daemon helper thread that lives as long as the process: any thread may call it, and
  the child outlives the calling thread.
* ``death_signal``: the ``preexec_fn`` that asks for the parent-death signal, for a
  child run from a thread that waits for it (``subprocess.run``).
* ``OwnedFolder``: a folder ``<parent>/<prefix><pid>-<random>`` on which this process
  holds an exclusive ``flock`` (of ``owner.lock`` inside) until ``close()``, which
  removes the folder. ``sweep`` removes the folders whose owner is gone. The kernel
  drops the lock when its owner dies in any way (``kill -9`` included), so a sweep never
  removes the folder of a live process, also not one of another process or container
  sharing the parent folder, and a reused pid does not keep a dead owner's folder.
"""

from __future__ import annotations

import functools
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from dspy_promptmii.secrets import protected_logger

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no flock, so no folder is judged dead
    fcntl = None  # type: ignore[assignment]

logger = protected_logger(__name__)

__all__ = ["OwnedFolder", "death_signal", "popen_for_process_lifetime", "sweep"]

LINUX = sys.platform.startswith("linux")
_LOCK_NAME = "owner.lock"
_PR_SET_PDEATHSIG = 1

# Loaded here, in the parent: the child, between fork and exec, only calls it.
_prctl: Callable[..., int] | None = None
if LINUX:
    try:
        import ctypes

        _prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # pragma: no cover - a libc without prctl
        _prctl = None


def _die_with_parent(parent_pid: int) -> None:  # pragma: no cover - runs in the child
    """In the child, before exec: have Linux send SIGKILL when the forking thread ends.
    SIGKILL, not SIGTERM: llama.cpp's server, on SIGTERM, first finishes the request in
    flight, which nobody waits for any more."""
    if _prctl is None:
        return
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(1)


def death_signal() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child die (SIGKILL) with the thread that forks it
    (Linux; ``None`` elsewhere). Use it where that thread waits for the child."""
    return functools.partial(_die_with_parent, os.getpid()) if _prctl is not None else None


# -- the launcher thread ---------------------------------------------------------------

_requests: queue.SimpleQueue[tuple[Future[subprocess.Popen], list[str], dict[str, Any]]] = queue.SimpleQueue()
_launcher: threading.Thread | None = None
_launcher_lock = threading.Lock()


def _launch_forever() -> None:
    while True:
        future, args, kwargs = _requests.get()
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(subprocess.Popen(args, **kwargs))
            except BaseException as error:  # handed to the caller
                future.set_exception(error)


def _kill_unclaimed(future: Future[subprocess.Popen]) -> None:
    """A child started for a caller that stopped waiting (Ctrl-C): nobody will stop it."""
    if not future.cancelled() and future.exception() is None:
        process = future.result()
        process.kill()
        process.wait()


def popen_for_process_lifetime(args: Sequence[str], **kwargs: Any) -> subprocess.Popen:
    """``subprocess.Popen(args, **kwargs)`` for a child that must not outlive this
    process but may outlive the calling thread.

    On Linux the child gets SIGKILL when this process dies (even by ``kill -9``); it is
    forked by a daemon helper thread that lives as long as the process. Elsewhere it is
    a plain ``Popen`` (nothing kills the child if this process is killed).

    Raises:
        OSError: the command cannot be launched (as ``Popen`` raises it).
    """
    if _prctl is None:
        return subprocess.Popen(args, **kwargs)
    global _launcher
    with _launcher_lock:
        if _launcher is None or not _launcher.is_alive():
            _launcher = threading.Thread(target=_launch_forever, name="promptmii-launcher", daemon=True)
            _launcher.start()
    future: Future[subprocess.Popen] = Future()
    _requests.put((future, list(args), {**kwargs, "preexec_fn": death_signal()}))
    try:
        return future.result()
    except BaseException:
        if not future.cancel():  # already launching or launched: kill what comes of it
            future.add_done_callback(_kill_unclaimed)
        raise


def _reset_after_fork() -> None:  # pragma: no cover - runs in a forked child
    global _requests, _launcher, _launcher_lock
    _requests, _launcher, _launcher_lock = queue.SimpleQueue(), None, threading.Lock()


os.register_at_fork(after_in_child=_reset_after_fork)


# -- owned folders ---------------------------------------------------------------------


class OwnedFolder:
    """A new folder ``<parent>/<prefix><pid>-<random>``, owned by this process until
    ``close()`` (which removes it) or until the process dies (then ``sweep`` removes it).

    Raises:
        OSError: the folder cannot be created.
    """

    def __init__(self, parent: Path, prefix: str) -> None:
        parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent))
        self._lock_fd: int | None = None
        if fcntl is not None:
            # Locked first, then renamed in: under its name the lock file is always held.
            pending = self.path / f"{_LOCK_NAME}.new"
            self._lock_fd = os.open(pending, os.O_CREAT | os.O_RDWR, 0o600)
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            os.replace(pending, self.path / _LOCK_NAME)

    def close(self) -> None:
        """Remove the folder and everything in it; harmless twice."""
        shutil.rmtree(self.path, ignore_errors=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> OwnedFolder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner_alive(folder: Path, prefix: str) -> bool:
    if fcntl is None:  # pragma: no cover - Windows
        return True
    try:
        fd = os.open(folder / _LOCK_NAME, os.O_RDWR)  # writable: NFS emulates flock with write locks
    except FileNotFoundError:
        # Being created right now (the lock is renamed in just after the folder is made),
        # or left by an owner that died in that instant, or by an older version: judged
        # by the pid in the name.
        match = re.match(r"(\d+)-", folder.name[len(prefix):])
        return match is not None and _pid_alive(int(match.group(1)))
    except OSError:
        return True  # not ours to open (another user's folder): leave it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True  # held: its owner is alive
    finally:
        os.close(fd)
    return False


def sweep(parent: Path, prefix: str) -> list[Path]:
    """Remove the folders ``<parent>/<prefix>*`` whose owner process is gone (see
    ``OwnedFolder``); return the ones removed. Never raises for a folder it cannot read."""
    removed = []
    try:
        candidates = sorted(parent.glob(f"{prefix}*"))
    except OSError:
        return removed
    for folder in candidates:
        if folder.is_dir() and not folder.is_symlink() and not _owner_alive(folder, prefix):
            shutil.rmtree(folder, ignore_errors=True)
            if not folder.exists():
                logger.info("removed %s, left behind by a process that is gone", folder)
                removed.append(folder)
    return removed
