"""Trained generators: a registry base model plus a LoRA adapter, each verified by sha256.

A name in :data:`~dspy_promptmii.local.registry.ADAPTERS` (e.g. the shipped
``promptmii-qwen2.5-0.5b``) stands for its base model (a :data:`REGISTRY` entry, pulled and
verified as usual) and its adapter file, shipped as package data and checked against its
size and sha256 before llama.cpp loads it. A model name of the base registry stands for
itself with no adapter.

>>> base, adapter = resolve_generator("qwen2.5-coder-0.5b-instruct")   # doctest: +SKIP
>>> LocalServer(base, lora=adapter)                                     # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

from dspy_promptmii.local.pull import CorruptModelError, resolve_model, verify_file
from dspy_promptmii.local.registry import ADAPTERS, REGISTRY, AdapterSpec, adapters_dir

__all__ = ["adapter_path", "is_generator_name", "resolve_adapter", "resolve_generator"]


def is_generator_name(name: str) -> bool:
    """A base model or a trained generator of the registries."""
    return name in REGISTRY or name in ADAPTERS


def adapter_path(spec: AdapterSpec, directory: Path | None = None) -> Path:
    """Where an adapter's file is expected (whether or not it is there)."""
    return (directory or adapters_dir()) / spec.filename


def resolve_adapter(spec: AdapterSpec | str, directory: Path | None = None) -> Path:
    """The verified path of a registry adapter (size and sha256 checked on every call: the
    file is a few MB).

    Raises:
        KeyError: an unknown adapter name (the message lists the known ones).
        FileNotFoundError: the file is not there (a package built without it).
        CorruptModelError: its size or sha256 is not the registry's.
    """
    if isinstance(spec, str):
        if spec not in ADAPTERS:
            raise KeyError(f"unknown trained generator {spec!r}: use one of {sorted(ADAPTERS) or 'none yet'}")
        spec = ADAPTERS[spec]
    path = adapter_path(spec, directory)
    if not path.is_file():
        raise FileNotFoundError(
            f"the adapter of {spec.name!r} is missing at {path}: reinstall dspy-promptmii (it ships as package data)"
        )
    if not verify_file(path, spec):  # duck-typed: size and sha256
        raise CorruptModelError(
            f"the adapter of {spec.name!r} at {path} is corrupt (its size or sha256 is not the registry's "
            f"{spec.sha256}); reinstall dspy-promptmii"
        )
    return path


def resolve_generator(
    name: str, *, auto_pull: bool = False, directory: Path | None = None
) -> tuple[Path, Path | None]:
    """(base model path, adapter path or None) for a registry model or a trained generator.

    Raises what :func:`~dspy_promptmii.local.pull.resolve_model` and :func:`resolve_adapter`
    raise, and ``KeyError`` for a name in neither registry.
    """
    if name in ADAPTERS:
        spec = ADAPTERS[name]
        adapter = resolve_adapter(spec, directory)
        return resolve_model(spec.base, auto_pull=auto_pull), adapter
    if name in REGISTRY:
        return resolve_model(name, auto_pull=auto_pull), None
    raise KeyError(f"unknown generator {name!r}: use one of {sorted(REGISTRY) + sorted(ADAPTERS)}")
