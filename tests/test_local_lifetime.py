"""``dspy_promptmii.local.lifetime``: folders owned by a live process, the sweep of those
left by dead ones, and children that die with the process, not with a thread."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dspy_promptmii.local.lifetime import OwnedFolder, popen_for_process_lifetime, sweep

REPO_ROOT = Path(__file__).resolve().parents[1]
PREFIX = "promptmii-test-"

HOLD = (
    "import sys, time; from pathlib import Path; from dspy_promptmii.local.lifetime import OwnedFolder; "
    "folder = OwnedFolder(Path(sys.argv[1]), sys.argv[2]); print(folder.path, flush=True); time.sleep(60)"
)


def hold_folder(parent: Path) -> tuple[subprocess.Popen, Path]:
    """Another process that owns a folder under ``parent`` until it is killed."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(parent), PREFIX],
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])},
        stdout=subprocess.PIPE,
        text=True,
    )
    return process, Path(process.stdout.readline().strip())


def test_owned_folder_is_named_with_the_pid_and_close_removes_it(tmp_path):
    with OwnedFolder(tmp_path, PREFIX) as folder:
        assert folder.path.parent == tmp_path and folder.path.name.startswith(f"{PREFIX}{os.getpid()}-")
        (folder.path / "data").write_text("x")
        assert sweep(tmp_path, PREFIX) == []  # ours, alive
    assert not folder.path.exists()
    folder.close()  # twice is harmless


def test_sweep_removes_the_folder_of_a_killed_owner_only(tmp_path):
    """Liveness comes from the owner's lock, which the kernel drops when it dies, so a
    folder of another live process is kept and one of a killed process goes."""
    live, live_folder = hold_folder(tmp_path)
    dead, dead_folder = hold_folder(tmp_path)
    try:
        dead.kill()
        dead.wait(timeout=30)

        assert sweep(tmp_path, PREFIX) == [dead_folder]
        assert live_folder.is_dir() and not dead_folder.exists()
    finally:
        live.kill()
        live.wait(timeout=30)
    assert sweep(tmp_path, PREFIX) == [live_folder]


def test_sweep_judges_by_the_lock_not_by_a_reused_pid(tmp_path):
    """A folder named with a pid that is alive now (here: ours, as for a container's
    process that always runs as pid 1), but whose lock nobody holds: a leftover."""
    stale = tmp_path / f"{PREFIX}{os.getpid()}-old"
    stale.mkdir()
    (stale / "owner.lock").write_text("")
    assert sweep(tmp_path, PREFIX) == [stale]


def test_sweep_keeps_a_folder_being_created_by_a_live_process(tmp_path):
    """Between making the folder and putting its lock in (an instant), the pid in the
    name decides; a folder without a pid and without a lock (an older version's) goes."""
    creating = tmp_path / f"{PREFIX}{os.getpid()}-new"
    creating.mkdir()
    legacy = tmp_path / f"{PREFIX}abc123"
    legacy.mkdir()
    assert sweep(tmp_path, PREFIX) == [legacy]
    assert creating.is_dir()


def test_sweep_ignores_files_and_other_names(tmp_path):
    (tmp_path / f"{PREFIX}1-file").write_text("not a folder")
    (tmp_path / "other-1-folder").mkdir()
    assert sweep(tmp_path, PREFIX) == []
    assert sweep(tmp_path / "absent", PREFIX) == []


def test_launch_errors_reach_the_caller():
    with pytest.raises(FileNotFoundError):
        popen_for_process_lifetime(["/no/such/binary"])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_child_launched_from_a_thread_outlives_the_thread():
    processes: list[subprocess.Popen] = []
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    worker = threading.Thread(target=lambda: processes.append(popen_for_process_lifetime(sleeper)))
    worker.start()
    worker.join(30)
    [process] = processes
    try:
        time.sleep(0.5)  # the parent-death signal would arrive as the thread ends
        assert process.poll() is None, "the child died with the thread that started it"
    finally:
        process.kill()
        process.wait(timeout=30)
