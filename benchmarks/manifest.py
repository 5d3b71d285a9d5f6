"""What a results folder's manifest records about the software, the models and the machine."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from dspy_promptmii.routes import Endpoint
from dspy_promptmii.secrets import redact

__all__ = ["versions", "machine", "model_info", "local_model", "now", "config_id", "RESULT_PACKAGES"]

#: Packages whose version changes a cell's figures (prompts, requests, search, decoding):
#: part of a run's settings. The others in the manifest change only its report.
RESULT_PACKAGES = ("dspy", "litellm", "gepa", "optuna", "llama-cpp-python")

_PACKAGES = (
    "dspy",
    "dspy-promptmii",
    "llama-cpp-python",
    "litellm",
    "gepa",
    "optuna",
    "scikit-learn",
    "scipy",
    "matplotlib",
)


def now() -> str:
    """The current UTC time, ISO 8601, to the second."""
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def versions() -> dict[str, str | None]:
    """Installed versions of the packages a benchmark's figures depend on (None: absent)."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024**2, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _gpus() -> list[str]:
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def machine() -> dict[str, Any]:
    """The machine a run ran on, and how loaded it was when the run started."""
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "memory_gib": _memory_gib(),
        "gpus": _gpus(),
        "load_average_at_start": load,
        "hostname_hash": hashlib.sha256(platform.node().encode()).hexdigest()[:8],
    }


def _recorded_sha256(path: Path) -> str | None:
    """The sha256 that ``promptmii models pull`` recorded for a model file, when the file
    still has the recorded size and mtime (never computed here: that reads the whole file)."""
    try:
        from dspy_promptmii.local.pull import marker_path

        record = json.loads(marker_path(path).read_text(encoding="utf-8"))
        stat = path.stat()
    except (ImportError, OSError, ValueError):
        return None
    if isinstance(record, dict) and record.get("size") == stat.st_size and record.get("mtime_ns") == stat.st_mtime_ns:
        return record.get("sha256")
    return None


def local_model(server: Any) -> dict[str, Any]:
    """What identifies the model a local server serves and how: registry name (or path),
    file name, size, sha256 (the registry's, else the one recorded at pull, else None),
    and the context size. Nothing that changes from one start to the next (port, path of
    the cache, threads)."""
    path = getattr(server, "model_path", None)
    path = Path(path) if path else None
    sha256 = None
    try:
        from dspy_promptmii.local.registry import REGISTRY

        spec = REGISTRY.get(server.model)
        sha256 = spec.sha256 if spec is not None else None
    except ImportError:  # pragma: no cover
        pass
    if sha256 is None and path is not None:
        sha256 = _recorded_sha256(path)
    info = {
        "model": server.model,
        "file": path.name if path else None,
        "bytes": path.stat().st_size if path and path.is_file() else None,
        "sha256": sha256,
        "n_ctx": server.n_ctx,
    }
    adapter = _adapter(server)
    if adapter is not None:
        info["adapter"] = adapter
    return info


def _adapter(server: Any) -> dict[str, Any] | None:
    """The LoRA adapter a local server applies (a trained generator's): file, size, sha256."""
    lora = getattr(server, "lora_path", None)
    if not lora:
        return None
    lora = Path(lora)
    if not lora.is_file():
        return {"file": lora.name, "bytes": None, "sha256": None}
    stat = lora.stat()
    return {"file": lora.name, "bytes": stat.st_size,
            "sha256": _file_sha256(str(lora.resolve()), stat.st_size, stat.st_mtime_ns)}


@functools.lru_cache(maxsize=8)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    """A file's sha256, hashed once per (path, size, mtime): a run records the adapter twice."""
    from dspy_promptmii.local.pull import sha256_file

    return sha256_file(path)


def model_info(endpoint: Endpoint | None) -> dict[str, Any] | None:
    """The route and, for the embedded model, the served file, its size and server
    settings. LM arguments are redacted (:func:`dspy_promptmii.secrets.redact`)."""
    if endpoint is None:
        return None
    info: dict[str, Any] = {
        "route": endpoint.route,
        "model": getattr(endpoint.lm, "model", None),
        "lm_kwargs": redact(dict(getattr(endpoint.lm, "kwargs", {}) or {})),
        "context_tokens": endpoint.context_tokens,
        "constrained_style": endpoint.constrained_style,
    }
    server = endpoint.server
    if server is not None:
        path = getattr(server, "model_path", None)
        info["local_server"] = {
            "model": server.model,
            "model_path": str(path) if path else None,
            "model_bytes": path.stat().st_size if path and Path(path).is_file() else None,
            "n_ctx": server.n_ctx,
            "n_threads": server.n_threads,
            "runtime": "llama.cpp (llama-cpp-python server)",
        }
        adapter = _adapter(server)
        if adapter is not None:
            info["local_server"]["adapter"] = adapter
        recorded = _recorded_sha256(Path(path)) if path else None
        if recorded:
            info["local_server"]["sha256"] = recorded
        try:
            from dspy_promptmii.local.registry import REGISTRY

            spec = REGISTRY.get(server.model)
            if spec is not None:
                info["local_server"].update({"sha256": spec.sha256, "description": spec.description})
        except ImportError:  # pragma: no cover
            pass
    return info


def config_id(settings: dict[str, Any]) -> str:
    """A short hash of the settings that change a cell's figures (not of tasks, n, methods
    or seeds, which are part of each cell's key)."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]
