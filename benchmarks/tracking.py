"""``python -m benchmarks run --mlflow [URI]``: every finished cell logged as an MLflow
run, so that ``mlflow ui`` shows the side-by-side study.

One experiment per results folder (``dspy-promptmii benchmark: <folder>``); one run per
finished cell (status ``ok`` or ``failed``; a cell in ``error`` is retried, and logged
once it finishes), named ``<task> n=<n> <method>``, with

* parameters: method, task, n, seed, test rows, follower and generator routes;
* metrics: ``macro_f1``, ``accuracy``, ``invalid_rate``, ``tokens_per_query``,
  ``compile_calls`` (and per role), ``compile_tokens``, ``compile_seconds``,
  ``eval_seconds``, and the estimate made before the compile
  (``estimated_compile_calls``, ``estimated_compile_tokens``);
* tags: ``promptmii.cell`` (task/n/method/seed), ``promptmii.config_id``, status.

Logging is idempotent: a resumed run, or one whose earlier cells were run without
``--mlflow``, logs the finished cells its experiment lacks (found by their
``promptmii.cell`` and ``promptmii.config_id`` tags). The results folder stays the record:
an MLflow failure during the run is a warning, never a failed cell. The URI is checked
(:func:`dspy_promptmii.tracking.check_tracking_uri`) before any LM starts.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from dspy_promptmii.secrets import protected_logger, redact
from dspy_promptmii.tracking import check_tracking_uri, require_mlflow, tracking_uri

logger = protected_logger(__name__)

__all__ = ["MlflowSink", "EXPERIMENT_PREFIX", "cell_tag"]

EXPERIMENT_PREFIX = "dspy-promptmii benchmark: "
#: Record fields logged as metrics, under these names.
METRICS = {
    "macro_f1": "macro_f1",
    "accuracy": "accuracy",
    "invalid_rate": "invalid_rate",
    "prompt_tokens_per_query": "tokens_per_query",
    "compile_calls": "compile_calls",
    "compile_generator_calls": "compile_generator_calls",
    "compile_follower_calls": "compile_follower_calls",
    "compile_tokens": "compile_tokens",
    "compile_seconds": "compile_seconds",
    "eval_seconds": "eval_seconds",
}
LOGGED = ("ok", "failed")


def cell_tag(record: Mapping[str, Any]) -> str:
    """A cell's identity in MLflow: ``task/n/method/seed``."""
    return f"{record['task']}/{record['n']}/{record['method']}/{record['seed']}"


class MlflowSink:
    """Logs benchmark records to one MLflow experiment (see the module docstring).

    Args:
        uri: The tracking URI (see :func:`dspy_promptmii.tracking.tracking_uri`; None:
            ``sqlite:///<results folder>/mlflow.db``).
        folder: The results folder: the experiment's name, and the default store's place.

    Raises:
        ImportError: MLflow is not installed (what to install named).
        ValueError: an unusable URI (one line naming it and MLflow's reason).
    """

    def __init__(self, uri: str | None, folder: str | Path):
        self.folder = Path(folder)
        self.uri = tracking_uri(uri, self.folder)
        check_tracking_uri(self.uri)
        require_mlflow()
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=self.uri)
        self.experiment_name = f"{EXPERIMENT_PREFIX}{self.folder.resolve().name}"
        found = self.client.get_experiment_by_name(self.experiment_name)
        # Its artifacts (none are logged here; a user's may be) live beside the results, not in
        # MLflow's default ./mlruns of whatever folder the run started in.
        self.experiment_id = (
            found.experiment_id
            if found is not None
            else self.client.create_experiment(
                self.experiment_name, artifact_location=(self.folder.resolve() / "mlflow-artifacts").as_uri()
            )
        )
        self.logged: set[tuple[str, str]] = set()
        for run in self._runs():
            tags = run.data.tags
            if "promptmii.cell" in tags:
                self.logged.add((tags["promptmii.cell"], tags.get("promptmii.config_id", "")))
        logger.info("MLflow: experiment %r at %s (%d cells logged before)", self.experiment_name, self.uri,
                    len(self.logged))

    def _runs(self) -> list[Any]:
        runs, token = [], None
        while True:
            page = self.client.search_runs([self.experiment_id], max_results=1000, page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                return runs

    def log(self, record: Mapping[str, Any]) -> bool:
        """Log one finished record (``ok`` or ``failed``) unless its cell is logged already;
        returns whether a run was made. MLflow errors are warnings."""
        if record.get("status") not in LOGGED:
            return False
        key = (cell_tag(record), str(record.get("config_id", "")))
        if key in self.logged:
            return False
        try:
            self._log(record)
        except Exception as error:  # noqa: BLE001 - the results folder stays the record
            logger.warning("MLflow: cell %s not logged: %s: %s", key[0], type(error).__name__, error)
            return False
        self.logged.add(key)
        return True

    def _log(self, record: Mapping[str, Any]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        record = redact(dict(record))
        run = self.client.create_run(
            self.experiment_id,
            run_name=f"{record['task']} n={record['n']} {record['method']}",
            tags={
                "promptmii.cell": cell_tag(record),
                "promptmii.config_id": str(record.get("config_id", "")),
                "promptmii.status": str(record["status"]),
                "promptmii.method": str(record["method"]),
                "promptmii.task": str(record["task"]),
            },
        )
        run_id = run.info.run_id
        params = {
            "method": record["method"],
            "task": record["task"],
            "n": record["n"],
            "seed": record["seed"],
            "test_rows": record.get("test_rows"),
            "follower": record.get("follower"),
            "generator": record.get("generator"),
        }
        metrics = {name: record.get(field) for field, name in METRICS.items()}
        estimate = record.get("estimate") or {}
        metrics["estimated_compile_calls"] = estimate.get("calls")
        metrics["estimated_compile_tokens"] = estimate.get("tokens")
        stamp = _millis(record.get("finished_at"))
        self.client.log_batch(
            run_id,
            metrics=[Metric(k, float(v), stamp, 0) for k, v in metrics.items() if isinstance(v, (int, float))],
            params=[Param(k, str(v)[:6000]) for k, v in params.items() if v is not None],
            tags=[RunTag("promptmii.instruction", str(record.get("instruction") or "")[:5000])],
        )
        if record.get("status") == "failed":
            self.client.set_tag(run_id, "promptmii.error", str(record.get("error", ""))[:5000])
        self.client.set_terminated(run_id, "FINISHED" if record["status"] == "ok" else "FAILED")

    def sync(self, records: Iterable[Mapping[str, Any]]) -> int:
        """Log every finished record whose cell is not logged yet; returns how many."""
        return sum(self.log(record) for record in records)


def _millis(stamp: Any) -> int:
    """Milliseconds since the epoch of an ISO time stamp (now when absent or unreadable)."""
    import time
    from datetime import datetime

    try:
        return int(datetime.fromisoformat(str(stamp)).timestamp() * 1000)
    except ValueError:
        return int(time.time() * 1000)
