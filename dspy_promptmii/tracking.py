"""MLflow: a compile recorded by ``mlflow.dspy.autolog(log_compiles=True)`` gets what
Prompt-MII did (its parameters, the per-predictor report, the instructions, calls and
tokens), and tracking URIs are checked before a run starts.

MLflow is optional (the ``mlflow`` extra) and never imported here unless the caller has
imported it already (:func:`autolog_compiles`) or asks for it (:func:`require_mlflow`).

Autolog patches ``compile`` of the classes that subclass ``dspy.Teleprompter`` directly
*when ``mlflow.dspy.autolog()`` is called*; :class:`~dspy_promptmii.PromptMIIOptimizer`
is one, but its module must have been imported by then::

    from dspy_promptmii import PromptMIIOptimizer   # first: the class must exist
    import mlflow
    mlflow.dspy.autolog(log_compiles=True)         # then: patches PromptMIIOptimizer.compile

A compile under autolog with no MLflow run (the class came later) logs a warning that says so.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from dspy_promptmii.secrets import protected_logger, redact

logger = protected_logger(__name__)

__all__ = [
    "MLFLOW_INSTALL",
    "require_mlflow",
    "tracking_uri",
    "check_tracking_uri",
    "autolog_compiles",
    "log_compile",
    "optimizer_params",
]

#: What to install for MLflow.
MLFLOW_INSTALL = "pip install 'dspy-promptmii[mlflow]'"
#: Longest instruction kept in a run tag (the whole text is an artifact).
TAG_LIMIT = 5000
_told: set[str] = set()


def require_mlflow() -> Any:
    """The ``mlflow`` module; ``ImportError`` saying what to install when it is missing."""
    try:
        import mlflow
    except ImportError:
        raise ImportError(f"MLflow is not installed: {MLFLOW_INSTALL} (or pip install mlflow)") from None
    return mlflow


def tracking_uri(uri: str | None, default_folder: str | os.PathLike[str] | None = None) -> str:
    """The tracking URI to use: ``uri`` as given (``sqlite:///...``, ``http(s)://...``,
    ``databricks``, ``file:...``); a path ending in ``.db`` or ``.sqlite`` as a SQLite
    store; without ``uri``, ``sqlite:///<default_folder>/mlflow.db``.

    Raises ``ValueError`` for a path that is not a database file, or no ``uri`` and no folder."""
    if not uri:
        if default_folder is None:
            raise ValueError("no MLflow tracking URI and no folder for the default store")
        return f"sqlite:///{(Path(default_folder) / 'mlflow.db').resolve()}"
    if "://" in uri or uri in ("databricks", "databricks-uc") or uri.startswith(("file:", "databricks:")):
        return uri
    if Path(uri).suffix in (".db", ".sqlite"):
        return f"sqlite:///{Path(uri).resolve()}"
    raise ValueError(
        f"{uri!r} is not an MLflow tracking URI: give sqlite:///PATH.db, a PATH.db, http(s)://HOST:PORT or databricks"
    )


@contextlib.contextmanager
def _quick_http() -> Iterator[None]:
    """MLflow's HTTP client retries for minutes; a check asks once, for 10 seconds."""
    saved = {name: os.environ.get(name) for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "10"
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def check_tracking_uri(uri: str) -> None:
    """Check that MLflow can track to ``uri`` (a store it knows, reachable, readable),
    before anything else runs: a SQLite file's folder must exist (it is not created), and
    the store must answer a search for an experiment.

    Raises:
        ImportError: MLflow is not installed (what to install named).
        ValueError: ``MLflow cannot use tracking URI '...': <MLflow's reason, first line>``.
    """
    require_mlflow()
    from mlflow.tracking import MlflowClient

    parts = urlsplit(uri)
    if parts.scheme == "sqlite":
        path = Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None
        if path is None or not str(path):
            raise ValueError(f"MLflow cannot use tracking URI {uri!r}: write sqlite:///PATH (absolute: sqlite:////PATH)")
        folder = path.parent if path.is_absolute() else (Path.cwd() / path).parent
        if not folder.is_dir():
            raise ValueError(f"MLflow cannot use tracking URI {uri!r}: the folder {folder} does not exist")
    try:
        with _quick_http():
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as error:  # noqa: BLE001 - MLflow raises many kinds; each becomes one line
        first = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise ValueError(f"MLflow cannot use tracking URI {uri!r}: {first.strip()}") from None


def autolog_compiles() -> bool:
    """Whether ``mlflow.dspy.autolog(log_compiles=True)`` is in effect (False when MLflow
    was never imported: it is not imported here)."""
    if "mlflow" not in sys.modules:
        return False
    try:
        from mlflow.utils.autologging_utils import autologging_is_disabled, get_autologging_config
    except ImportError:  # pragma: no cover - another MLflow layout
        return False
    return not autologging_is_disabled("dspy") and bool(get_autologging_config("dspy", "log_compiles", False))


def optimizer_params(optimizer: Any) -> dict[str, Any]:
    """The optimizer's settings as run parameters (``promptmii.<name>``): scalars as they
    are, a custom template as ``custom`` (its text is an artifact), the LMs by model."""
    protocol = optimizer.protocol
    template = protocol.template
    params: dict[str, Any] = {
        "n": optimizer.n,
        "template": template if len(template) < 40 and "\n" not in template else "custom",
        "seed": optimizer.seed,
        "sampling": optimizer.sampling,
        "max_prompt_tokens": optimizer.max_prompt_tokens,
        "temperature": optimizer.temperature,
        "max_tokens": optimizer.max_tokens,
        "exemplars": optimizer.exemplars,
        "max_instruction_tokens": optimizer.max_instruction_tokens,
        "candidates": optimizer.candidates,
        "val_size": optimizer.val_size,
        "include_naive": optimizer.include_naive,
        "scores_naive": optimizer.scores_naive,
        "demos": optimizer.demos,
        "generator_lm": getattr(optimizer.generator_lm, "model", None),
        "follower_lm": getattr(optimizer.follower_lm, "model", None),
        "protocol.demo_style": protocol.demo_style,
        "protocol.constrained": protocol.constrained,
        "protocol.reply_limit": protocol.reply_limit,
        "protocol.temperature": protocol.temperature,
        "protocol.field_descriptions": protocol.field_descriptions,
    }
    return {f"promptmii.{k}": "None" if v is None else v for k, v in params.items()}


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "predictor"


def log_compile(optimizer: Any, report: Sequence[Mapping[str, Any]]) -> bool:
    """Log a finished compile to the active MLflow run when autolog records compiles
    (see the module docstring): parameters ``promptmii.*``, the per-predictor report
    (``promptmii/report.json``, credentials redacted), each instruction
    (``promptmii/instructions/<predictor>.txt`` and the tag
    ``promptmii.instruction.<predictor>``, cut at 5,000 characters), a custom template
    (``promptmii/template.txt``), and the metrics ``promptmii.generator_calls``,
    ``promptmii.follower_calls``, ``promptmii.prompt_tokens``,
    ``promptmii.completion_tokens`` (generator usage; missing on cache hits) and
    ``promptmii.seconds``. Returns whether it logged. Never raises: an MLflow failure is
    a warning (the compile succeeded)."""
    if not autolog_compiles():
        return False
    import mlflow

    if mlflow.active_run() is None:
        if "no-run" not in _told:
            _told.add("no-run")
            logger.warning(
                "mlflow.dspy.autolog(log_compiles=True) is on but this compile has no MLflow run: autolog patches the "
                "Teleprompter subclasses that exist when it is called, so import PromptMIIOptimizer (from "
                "dspy_promptmii import PromptMIIOptimizer) before calling mlflow.dspy.autolog()"
            )
        return False
    try:
        entries = [redact(dict(entry)) for entry in report]
        mlflow.log_params(optimizer_params(optimizer))
        mlflow.log_dict({"predictors": entries}, "promptmii/report.json")
        if optimizer_params(optimizer)["promptmii.template"] == "custom":
            mlflow.log_text(optimizer.protocol.template, "promptmii/template.txt")
        for entry in entries:
            name = _safe_name(str(entry["predictor"]))
            mlflow.log_text(entry["instruction"], f"promptmii/instructions/{name}.txt")
            mlflow.set_tag(f"promptmii.instruction.{name}", entry["instruction"][:TAG_LIMIT])
        metrics = {
            "promptmii.generator_calls": sum(e["generator_calls"] for e in entries),
            "promptmii.follower_calls": sum(e["follower_calls"] for e in entries),
            "promptmii.seconds": sum(e["seconds"] for e in entries),
        }
        for key in ("prompt_tokens", "completion_tokens"):
            values = [e[key] for e in entries]
            if all(v is not None for v in values):
                metrics[f"promptmii.{key}"] = sum(values)
        mlflow.log_metrics(metrics)
    except Exception as error:  # noqa: BLE001 - tracking must not fail a compile that worked
        logger.warning("the compile could not be logged to MLflow: %s: %s", type(error).__name__, error)
        return False
    return True
