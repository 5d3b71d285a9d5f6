"""The benchmark loop: every (task, n, method) cell compiled, evaluated on the task's
held-out rows, and appended to ``results.jsonl`` as soon as it finishes.

Per cell: what the compile will cost is estimated first (``record["estimate"]``: calls,
tokens and price, from the optimizer's own estimate or budget rule; no LM call); the
method compiles inside ``dspy.context(lm=<metered follower copy>, adapter=<the shared
adapter>)`` and any generator call goes through a second metered copy, so compile LM
calls and tokens are counted per role; the compiled program is then scored with
:func:`dspy_promptmii.evaluation.evaluate` (macro-F1, accuracy, invalid rate, prompt
tokens per query from the LM's usage) on the same test rows for every method.

A cell's score is complete or not recorded as a score: when an LM call fails during its
evaluation (a server down for a while), the cell is an ``error`` (retried by the next
run, listed in the report with how many rows failed), never ``ok`` with the failed rows
counted as misses. A run ends ``finished`` only when every cell finished; with cells in
error it ends ``incomplete``.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import traceback
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import dspy
from tqdm import tqdm

from benchmarks import methods as methods_module
from benchmarks.manifest import RESULT_PACKAGES, config_id, local_model, machine, model_info, now, versions
from benchmarks.methods import Budgets, CompileContext, MethodFailure
from benchmarks.store import FINISHED, ResultStore
from benchmarks.tasks import SPLIT_PROTOCOL, Split, make_split
from dspy_promptmii.adapter import LabelAdapter
from dspy_promptmii.data import TaskData, load_task
from dspy_promptmii.evaluation import IncompleteEvaluation, evaluate
from dspy_promptmii.protocol import Protocol, follower_decoding, follower_style_from_constrained
from dspy_promptmii.routes import Endpoint
from dspy_promptmii.secrets import protected_logger, redact, remember, scrub
from dspy_promptmii.stopping import stop_on_signals
from dspy_promptmii.usage import Usage, metered

logger = protected_logger(__name__)

__all__ = [
    "RunConfig",
    "Endpoints",
    "RunSummary",
    "ConfigMismatch",
    "make_protocol",
    "make_adapter",
    "load_splits",
    "run_benchmark",
    "run_cell",
    "interrupt_on_sigterm",
]

#: Consecutive machinery errors after which the run stops (a dead endpoint fails every cell;
#: a local server the run started is watched, and its end stops the run at once).
MAX_CONSECUTIVE_ERRORS = 3


class ConfigMismatch(RuntimeError):
    """The output folder holds results made with other settings."""


@dataclass
class RunConfig:
    out: Path
    tasks: list[Path]
    n_values: list[int]
    methods: list[str]
    test_rows: int = 200
    seed: int = 0
    threads: int = 1
    adapter: str = "label"
    #: The follower's constrained decoding with LabelAdapter: ``"endpoint"`` (the follower
    #: endpoint's default style), ``"none"``, or a style name (``json_schema``,
    #: ``json_object``, ``grammar``, ``choice``; see :class:`~dspy_promptmii.protocol.Protocol`).
    follower_style: str = "endpoint"
    #: The follower's reply limit with LabelAdapter; None: the protocol's default per label set.
    follower_max_tokens: int | None = None
    template: str = "auto"
    #: Per task, what its author would write in the signature: ``{"task": docstring,
    #: "text": desc, "text_pair": desc, "label": desc}`` (each optional).
    descriptions: dict[str, dict[str, str]] = field(default_factory=dict)
    budgets: Budgets = field(default_factory=Budgets)
    progress: bool = True
    preset: dict[str, Any] | None = None
    args: dict[str, Any] = field(default_factory=dict)
    #: Deprecated spelling of ``follower_style``: True meant ``"endpoint"`` (not the
    #: protocol's ``constrained=True``, json_schema), False ``"none"``, or a style name.
    constrained: bool | str | None = None

    def __post_init__(self) -> None:
        if self.constrained is not None:
            warnings.warn(
                "RunConfig(constrained=...) is deprecated: use follower_style='endpoint', 'none' or a style name",
                DeprecationWarning,
                stacklevel=3,
            )
            self.follower_style = follower_style_from_constrained(self.constrained)
            self.constrained = None
        follower_decoding(self.follower_style, None)  # a style it does not know raises ValueError


@dataclass
class Endpoints:
    """The LMs of a run: the follower, the (untrained) generator, optionally a trained
    generator, and the generators methods name in their options (``generator=ROUTE``)."""

    follower: Endpoint
    generator: Endpoint
    trained: Endpoint | None = None
    extra: dict[str, Endpoint] = field(default_factory=dict)

    def server_failure(self) -> Exception | None:
        """Why a local server of these LMs stopped on its own (``LocalServer.failure``), else None."""
        for endpoint in (self.follower, self.generator, self.trained, *self.extra.values()):
            failure = getattr(getattr(endpoint, "server", None), "failure", None)
            if failure is not None:
                return failure
        return None


@dataclass
class RunSummary:
    """How a run ended. ``status``: ``finished`` (every cell of the run is finished),
    ``incomplete`` (it went through its cells but some are errors, to be retried),
    ``stopped`` (too many errors in a row), ``interrupted`` (Ctrl-C or SIGTERM) or
    ``error`` (the run itself failed, e.g. a results file could not be written).
    ``cells_unfinished`` counts the cells of the run without a finished record."""

    status: str
    cells_total: int
    cells_already_done: int
    cells_run: int
    by_status: dict[str, int]
    wall_seconds: float
    notes: list[str]
    cells_unfinished: int = 0


def _load() -> list[float] | None:
    """The 1/5/15-minute load averages: other processes on a small machine slow a cell down."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def make_protocol(config: RunConfig, follower: Endpoint) -> Protocol:
    """The one protocol of a run: the template, demos as chat turns (ICL), the follower's
    constrained decoding (``follower_style``: the endpoint's, none, or a named style) and
    the reply limit."""
    style = follower_decoding(config.follower_style, follower.constrained_style) if config.adapter == "label" else False
    return Protocol(
        template=config.template,
        demo_style="turns",
        constrained=style,
        reply_limit=config.follower_max_tokens if config.adapter == "label" else None,
    )


def make_adapter(kind: str, protocol: Protocol) -> tuple[dspy.Adapter, dict[str, Any]]:
    """The one adapter instance every method's follower calls go through, and its description.

    Raises ``ValueError`` for a kind other than ``label`` or ``chat``.
    """
    if kind == "label":
        adapter = LabelAdapter(protocol=protocol)
        return adapter, {
            "kind": "label",
            "class": "dspy_promptmii.adapter.LabelAdapter",
            "constrained": protocol.constrained,
            "demos": protocol.demo_style,
            "note": (
                "one instance for every method; methods without demos get the paper's one-message prompt "
                "(instruction, format line, input); ICL's demos are chat turns (inline demos measured far "
                "worse with the 0.5B follower); other predictors (GEPA/MIPROv2 proposers) fall back to ChatAdapter"
            ),
        }
    if kind == "chat":
        return dspy.ChatAdapter(), {"kind": "chat", "class": "dspy.ChatAdapter", "constrained": False}
    raise ValueError(f"adapter must be 'label' or 'chat', got {kind!r}")


def _describe(method: str, budgets: Budgets) -> str:
    """What a (possibly optioned) method does, for the manifest and the report."""
    spec, options = methods_module.parse_method(method)
    text = budgets.describe()[spec.name]
    if options:
        text += "; options: " + ", ".join(f"{k}={v}" for k, v in options.items())
    return text


def _signature(task: TaskData, config: RunConfig) -> type[dspy.Signature]:
    """The task's signature, with its author's descriptions when the run has them."""
    notes = config.descriptions.get(task.name) or {}
    return task.signature(instructions=notes.get("task"), descriptions=notes)


def _route(endpoint: Endpoint | None) -> str | None:
    return None if endpoint is None else endpoint.route


def _settings(
    config: RunConfig, endpoints: Endpoints, adapter: dict[str, Any], protocol: Protocol
) -> dict[str, Any]:
    """Every input that changes a cell's figures besides its key (task, n, method, seed);
    the run's config_id hashes them, so a resume with any of them changed is refused.

    Per LM: route, model, every LM argument (temperature, reply limit, ``api_base``,
    headers, ...; credentials redacted, so a new key does not count as a change; not the
    request timeout, nor the cache scope, which neither change a figure), cache,
    the context size it is fitted to and, for a local server, the model file (name, size,
    sha256) and its n_ctx (not its port or threads). Also the test rows, adapter,
    protocol, budgets, split protocol and the versions of :data:`RESULT_PACKAGES`.
    """

    def lm(endpoint: Endpoint | None) -> dict[str, Any] | None:
        if endpoint is None:
            return None
        kwargs = dict(getattr(endpoint.lm, "kwargs", {}) or {})
        if endpoint.server is not None:  # its URL (port) and key change at every start; its model does not
            kwargs.pop("api_base", None)
            kwargs.pop("api_key", None)
        # Neither changes a figure: the request deadline, and the cache scope (made of the
        # route, api_base and model file, which are recorded here).
        kwargs.pop("timeout", None)
        kwargs.pop("rollout_id", None)
        return {
            "route": endpoint.route,
            "model": getattr(endpoint.lm, "model", None),
            "temperature": kwargs.pop("temperature", None),
            "max_tokens": kwargs.pop("max_tokens", None),
            "api_base": kwargs.pop("api_base", None),
            "lm_kwargs": redact(kwargs),
            "cache": getattr(endpoint.lm, "cache", None),
            "context_tokens": endpoint.context_tokens,
            "local_server": local_model(endpoint.server) if endpoint.server is not None else None,
        }

    installed = versions()
    settings = {
        "test_rows": config.test_rows,
        "follower": lm(endpoints.follower),
        "generator": lm(endpoints.generator),
        "generator_trained": lm(endpoints.trained),
        "adapter": {k: v for k, v in adapter.items() if k != "note"},
        "follower_max_tokens": config.follower_max_tokens,
        "protocol": protocol.to_dict(),
        "descriptions": config.descriptions,
        "budgets": asdict(config.budgets),
        "split_protocol": SPLIT_PROTOCOL,
        "versions": {name: installed.get(name) for name in RESULT_PACKAGES},
    }
    return redact(settings)  # no credential is hashed or written: a new key is not a new setting


def _generator_for(spec: methods_module.MethodSpec, endpoints: Endpoints, options: dict[str, Any]) -> Endpoint | None:
    if spec.generator is not None and options.get("generator"):
        route = options["generator"]
        if route not in endpoints.extra:
            raise ValueError(f"no endpoint for generator {route!r}: start it (the CLI does) and pass it in extra")
        return endpoints.extra[route]
    return {None: None, "generator": endpoints.generator, "trained": endpoints.trained}[spec.generator]


def _usage_fields(prefix: str, usage: Usage | None) -> dict[str, int]:
    usage = usage or Usage()
    return {
        f"{prefix}_calls": usage.calls,
        f"{prefix}_prompt_tokens": usage.prompt_tokens,
        f"{prefix}_completion_tokens": usage.completion_tokens,
        f"{prefix}_calls_without_usage": usage.calls_without_usage,
    }


def run_cell(
    split: Split,
    n: int,
    method: str,
    *,
    config: RunConfig,
    endpoints: Endpoints,
    adapter: dspy.Adapter,
    run_config_id: str,
    protocol: Protocol | None = None,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Compile and evaluate one cell and return its record (status ok, failed or error).
    ``protocol`` is the run's (default: the adapter's, else ``Protocol()``); ``options``
    what the method does (default: what its name means now, see
    :func:`~benchmarks.methods.method_options`), stored in the record."""
    protocol = protocol or getattr(adapter, "protocol", None) or Protocol()
    spec, _ = methods_module.parse_method(method)
    options = dict(methods_module.method_options(method) if options is None else options)
    task = split.task
    examples = split.examples(n)
    follower_lm, follower_meter = metered(endpoints.follower.lm)
    generator = _generator_for(spec, endpoints, options)
    generator_lm = generator_meter = None
    if generator is not None:
        generator_lm, generator_meter = metered(generator.lm)

    record: dict[str, Any] = {
        "task": task.name,
        "n": n,
        "method": method,
        "seed": split.seed,
        "options": options,
        "status": None,
        "n_available": split.n_available,
        "n_examples": len(examples),
        "n_used": None,
        "test_rows": len(split.test),
        "labels": len(task.labels),
        "split_id": split.split_id(n),
        "config_id": run_config_id,
        "follower": _route(endpoints.follower),
        "generator": _route(generator),
    }

    def compile_usage() -> dict[str, Any]:
        g = generator_meter.snapshot() if generator_meter is not None else None
        f = follower_meter.snapshot()
        fields = {**_usage_fields("compile_generator", g), **_usage_fields("compile_follower", f)}
        fields["compile_calls"] = fields["compile_generator_calls"] + fields["compile_follower_calls"]
        fields["compile_tokens"] = sum(
            fields[f"compile_{role}_{kind}_tokens"]
            for role in ("generator", "follower")
            for kind in ("prompt", "completion")
        )
        fields["compile_lm_errors"] = f.errors + (g.errors if g is not None else 0)
        return fields

    ctx = CompileContext(
        student=dspy.Predict(_signature(task, config)),
        examples=examples,
        seed=split.seed,
        threads=config.threads,
        budgets=config.budgets,
        follower=endpoints.follower,
        generator=generator,
        generator_lm=generator_lm,
        follower_lm=follower_lm,
        longest_input=split.longest_input(),
        protocol=protocol,
        options=options,
        adapter=adapter,
    )
    # What the compile will cost, said before it spends anything (no LM call).
    try:
        with dspy.context(lm=follower_lm, adapter=adapter):
            record["estimate"] = methods_module.estimate_record(spec.estimate(ctx))
    except Exception as error:  # noqa: BLE001 - a cell without an estimate still runs
        logger.warning("%s n=%d %s: no estimate: %s", task.name, n, method, scrub(str(error)))
        record["estimate"] = {"error": scrub(f"{type(error).__name__}: {error}")[:500]}
    started = time.perf_counter()
    try:
        with dspy.context(lm=follower_lm, adapter=adapter):
            compiled = spec.compile(ctx)
    except MethodFailure as error:
        # Error texts are scrubbed of credentials before they are logged or stored.
        logger.warning("%s n=%d %s: the method failed: %s", task.name, n, method, scrub(str(error)))
        return {
            **record,
            "status": "failed",
            "error": scrub(str(error))[:2000],
            "compile_seconds": round(time.perf_counter() - started, 3),
            **compile_usage(),
            "finished_at": now(),
        }
    except Exception as error:  # the machinery broke: record, and retry on the next run
        text = scrub(str(error))
        logger.error("%s n=%d %s: compile raised %s: %s", task.name, n, method, type(error).__name__, text)
        return {
            **record,
            "status": "error",
            "error": f"compile: {type(error).__name__}: {text}"[:2000],
            "traceback": scrub(traceback.format_exc())[-4000:],
            "compile_seconds": round(time.perf_counter() - started, 3),
            **compile_usage(),
            "finished_at": now(),
        }
    compile_seconds = time.perf_counter() - started
    record.update(compile_usage())
    record["compile_seconds"] = round(compile_seconds, 3)

    predictor = compiled.program.predictors()[-1]
    record["n_used"] = compiled.n_used
    record["demos"] = len(getattr(predictor, "demos", []) or [])
    record["instruction"] = predictor.signature.instructions
    record["details"] = compiled.details

    try:
        result = evaluate(
            compiled.program,
            split.test,
            lm=endpoints.follower.lm,
            adapter=adapter,
            threads=config.threads,
            progress=config.progress,
        )
    except IncompleteEvaluation as error:
        # Some test rows got no reply: the cell has no score (not misses), and runs again.
        partial = error.evaluation
        text = scrub(str(error))
        logger.error("%s n=%d %s: %s", task.name, n, method, text)
        return {
            **record,
            "status": "error",
            "error": f"evaluate: {partial.errors} of {partial.n} test rows raised: {text}"[:2000],
            "eval_rows_failed": partial.errors,
            "eval_calls": partial.calls,
            "eval_lm_errors": partial.lm_errors,
            "eval_first_error": scrub(partial.first_error or "")[:1000] or None,
            "eval_seconds": partial.seconds,
            "finished_at": now(),
        }
    except Exception as error:
        text = scrub(str(error))
        logger.error("%s n=%d %s: evaluation raised %s: %s", task.name, n, method, type(error).__name__, text)
        return {
            **record,
            "status": "error",
            "error": f"evaluate: {type(error).__name__}: {text}"[:2000],
            "traceback": scrub(traceback.format_exc())[-4000:],
            "finished_at": now(),
        }
    if result.example_f1 is not None:  # a multi-label task: accuracy is the exact-match rate
        record.update({"example_f1": result.example_f1, "micro_f1": result.micro_f1, "multilabel": True})
    record.update(
        {
            "status": "ok",
            "macro_f1": result.macro_f1,
            "accuracy": result.accuracy,
            "invalid_rate": result.invalid_rate,
            "prompt_tokens_per_query": result.prompt_tokens_per_query,
            "eval_calls": result.calls,
            "eval_lm_errors": result.lm_errors,
            "eval_seconds": result.seconds,
            "finished_at": now(),
            "load_average": _load(),
        }
    )
    return record


def _differences(old: Any, new: Any, where: str = "") -> list[str]:
    """Dotted paths of the leaves where two settings trees differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [
            path
            for key in sorted(set(old) | set(new), key=str)
            for path in _differences(old.get(key), new.get(key), f"{where}.{key}" if where else str(key))
        ]
    return [] if old == new else [where or "settings"]


def _check_compatible(store: ResultStore, settings: dict[str, Any], run_id: str) -> dict[str, Any] | None:
    """The folder's manifest, or None for a new folder.

    Raises :class:`ConfigMismatch` naming the differing settings (up to 8, as dotted
    paths such as ``follower.api_base``) when the folder's results were made with others.
    """
    existing = store.read_manifest()
    if existing is None:
        return None
    if existing.get("config_id") != run_id:
        differ = _differences(existing.get("settings", {}), settings)
        shown = ", ".join(differ[:8]) + (f" and {len(differ) - 8} more" if len(differ) > 8 else "")
        raise ConfigMismatch(
            f"{store.folder} holds results made with other settings (differing: {shown or 'unknown'}); "
            "resume with the same settings or pass another --out"
        )
    return existing


def _check_same_data(store: ResultStore, cells: list[tuple[Split, int, str]], seed: int) -> set[tuple]:
    """Keys of the cells already finished with the data they would run on now.

    Raises :class:`ConfigMismatch` naming the tasks (and n) whose finished cells were
    made with other rows (their recorded ``split_id`` is not the current split's): the
    task's data changed under the same name.
    """
    done = store.finished_records()
    finished: set[tuple] = set()
    changed: dict[str, set[int]] = {}
    for split, n, method in cells:
        key = (split.task.name, n, method, seed)
        if key not in done:
            continue
        if done[key].get("split_id") != split.split_id(n):
            changed.setdefault(split.task.name, set()).add(n)
        else:
            finished.add(key)
    if changed:
        named = "; ".join(f"task {task!r} (n={sorted(ns)})" for task, ns in sorted(changed.items()))
        raise ConfigMismatch(
            f"{store.folder} holds finished cells made with other data than the tasks hold now: {named}. "
            "The task files changed under the same name; pass another --out (or restore the data)"
        )
    return finished


def _method_meanings(store: ResultStore, methods: list[str], notes: list[str]) -> dict[str, dict[str, Any]]:
    """What each method of the run does: what its name means now, unless the folder's
    finished cells of that name were made with other options (a run resumed across a
    change of a default); then its remaining cells run with those, so that one name keeps
    one meaning in a folder (a note says so)."""
    recorded = {key[2]: record.get("options") for key, record in store.finished_records().items()}
    meanings = {}
    for method in methods:
        meanings[method] = methods_module.method_options(method)
        before = recorded.get(method)
        if before is not None and before != meanings[method]:
            meanings[method] = dict(before)
            notes.append(
                f"method {method}: the folder's finished cells ran with {before}, which the name no longer means "
                f"({methods_module.method_options(method)}); its remaining cells run with them too"
            )
            logger.warning(notes[-1])
    return meanings


@contextlib.contextmanager
def interrupt_on_sigterm() -> Iterator[None]:
    """Within the block, SIGTERM ends a run as Ctrl-C does, and after either no LM request
    starts (see :func:`dspy_promptmii.stopping.stop_on_signals`, which this is)."""
    with stop_on_signals():
        yield


def _close_dead_runs(runs: list[dict[str, Any]]) -> None:
    """Mark earlier runs still recorded as ``running`` as ``died``: this run holds the
    folder's lock, so none of them is alive; they ended without writing their end
    (``kill -9``, a crash or a machine restart). Their finished cells are in the results."""
    for entry in runs:
        if entry.get("status") == "running":
            entry["status"] = "died"
            entry["note"] = "ended without recording its end (killed, crashed or the machine restarted)"


def load_splits(config: RunConfig) -> tuple[list[Split], list[str]]:
    """Every task of ``config`` loaded and split, and notes on them (n values larger than
    a task's pool). The command line calls it before any model is pulled or started.

    Raises:
        ValueError: a method name or option that is unknown; a task file with a bad line
            (naming ``file:line``), too few rows for the test rows.
        FileNotFoundError: a task without its file.
    """
    for method in config.methods:
        methods_module.parse_method(method)  # ValueError naming an unknown method or option
    splits, notes = [], []
    for path in config.tasks:
        task = load_task(path)
        split = make_split(task, config.test_rows, config.seed)
        too_big = [n for n in config.n_values if n > split.n_available]
        if too_big:
            notes.append(f"{task.name}: n={too_big} exceed the {split.n_available} non-test rows; all of them are used")
        splits.append(split)
    return splits, notes


def run_benchmark(
    config: RunConfig,
    endpoints: Endpoints,
    splits: tuple[list[Split], list[str]] | None = None,
    sink: Any | None = None,
) -> RunSummary:
    """Run every unfinished cell of ``config`` and return a summary.

    Finished cells found in ``config.out`` are skipped; a Ctrl-C or SIGTERM stops after
    writing the manifest (status ``interrupted``), losing only the cell in progress, and
    no LM request starts after it. The folder is locked for the whole run. ``splits`` is
    what :func:`load_splits` returned for ``config``, if it was called already. ``sink``
    (e.g. :class:`benchmarks.tracking.MlflowSink`) gets ``sync(records)`` with the finished
    records already in the folder, then ``log(record)`` for each new one.

    Raises:
        FolderLocked: another run writes ``config.out``.
        ConfigMismatch: ``config.out`` holds results made with other settings, or
            finished cells made with other data under the same task name.
        ValueError, FileNotFoundError: an unknown method, a bad task folder or file.
        OSError: a results file cannot be written (named); the manifest then records the
            run as ``error`` when it still can be written.
        ServerError: a local server of the endpoints stopped on its own
            (``LocalServer.failure``); the run stops before its next cell, recorded as ``error``.
    """
    with interrupt_on_sigterm(), ResultStore(config.out).lock():
        return _run_benchmark(config, endpoints, splits, sink)


def _run_benchmark(
    config: RunConfig, endpoints: Endpoints, loaded: tuple[list[Split], list[str]] | None, sink: Any | None = None
) -> RunSummary:
    wall_started = time.perf_counter()
    store = ResultStore(config.out)
    protocol = make_protocol(config, endpoints.follower)
    adapter, adapter_info = make_adapter(config.adapter, protocol)
    for endpoint in (endpoints.follower, endpoints.generator, endpoints.trained, *endpoints.extra.values()):
        remember(getattr(endpoint.lm, "kwargs", {}) if endpoint is not None else {})  # scrubbed from error texts
    settings = _settings(config, endpoints, adapter_info, protocol)
    run_id = config_id(settings)
    existing = _check_compatible(store, settings, run_id)

    # Load and split every task up front: a bad folder fails before any LM call.
    splits, task_notes = loaded if loaded is not None else load_splits(config)
    notes: list[str] = []
    methods = list(config.methods)
    if "promptmii" in methods and endpoints.trained is None:
        methods.remove("promptmii")
        notes.append(
            "method promptmii skipped: no trained generator route given (--generator-trained); "
            "promptmii_zero uses the untrained generator"
        )
        logger.warning(notes[-1])

    for note in task_notes:
        notes.append(note)
        logger.warning(note)

    meanings = _method_meanings(store, methods, notes)
    cells = [(s, n, m) for s in splits for n in config.n_values for m in methods]
    finished = _check_same_data(store, cells, config.seed)
    todo = [c for c in cells if (c[0].task.name, c[1], c[2], config.seed) not in finished]

    run_entry: dict[str, Any] = {
        "started": now(),
        "finished": None,
        "status": "running",
        "argv": list(sys.argv),
        "args": config.args,
        "cells_total": len(cells),
        "cells_already_done": len(cells) - len(todo),
        "cells_run": 0,
        "machine": machine(),
    }
    manifest = existing or {
        "benchmark": "dspy-promptmii side-by-side: naive, ICL, Prompt-MII(-Zero), GEPA, MIPROv2",
        "created": now(),
        "config_id": run_id,
        "settings": settings,
        "runs": [],
    }
    manifest.update(
        {
            "updated": now(),
            "versions": versions(),
            "models": {
                "follower": model_info(endpoints.follower),
                "generator": model_info(endpoints.generator),
                "generator_trained": model_info(endpoints.trained),
            },
            "adapter": adapter_info,
            "methods": {m: _describe(m, config.budgets) for m in methods},
            "preset": config.preset,
            "split_protocol": SPLIT_PROTOCOL,
            "seeds": sorted({*manifest.get("seeds", []), config.seed}),
            "tasks": sorted({*manifest.get("tasks", []), *(s.task.name for s in splits)}),
            "n_values": sorted({*manifest.get("n_values", []), *config.n_values}),
            "test_rows": config.test_rows,
            "notes": notes,
        }
    )
    _close_dead_runs(manifest["runs"])
    manifest["runs"].append(run_entry)
    store.write_manifest(manifest)
    logger.info(
        "%d cells (%d tasks x %d n x %d methods); %d already finished in %s",
        len(cells),
        len(splits),
        len(config.n_values),
        len(methods),
        len(cells) - len(todo),
        config.out,
    )

    if sink is not None:  # cells finished before (resumed, or run without a sink)
        logged = sink.sync(store.finished_records().values())
        if logged:
            logger.info("%d finished cell(s) of earlier runs logged to %s", logged, type(sink).__name__)
    by_status: dict[str, int] = {}
    status = "finished"
    failure: BaseException | None = None
    consecutive_errors = 0
    bar = tqdm(total=len(cells), initial=len(cells) - len(todo), desc="cells", unit="cell", disable=not config.progress)
    try:
        for split, n, method in todo:
            died = endpoints.server_failure()
            if died is not None:  # every later cell would only collect connection errors
                raise died
            bar.set_postfix_str(f"{split.task.name} n={n} {method}")
            record = run_cell(
                split,
                n,
                method,
                config=config,
                endpoints=endpoints,
                adapter=adapter,
                run_config_id=run_id,
                protocol=protocol,
                options=meanings[method],
            )
            store.append(record)
            if sink is not None:
                sink.log(record)
            run_entry["cells_run"] += 1
            by_status[record["status"]] = by_status.get(record["status"], 0) + 1
            bar.update(1)
            if record["status"] == "ok":
                logger.info(
                    "%s n=%d %s: macro-F1 %.3f, %s prompt tokens/query, compile calls %d gen + %d fol, %.1f s + %.1f s",
                    split.task.name,
                    n,
                    method,
                    record["macro_f1"],
                    "n/a" if record["prompt_tokens_per_query"] is None else f"{record['prompt_tokens_per_query']:.0f}",
                    record["compile_generator_calls"],
                    record["compile_follower_calls"],
                    record["compile_seconds"],
                    record["eval_seconds"],
                )
            consecutive_errors = consecutive_errors + 1 if record["status"] == "error" else 0
            if consecutive_errors >= MAX_CONSECUTIVE_ERRORS:
                status = "stopped"
                logger.error("%d cells in a row raised errors: stopping (see results.jsonl)", consecutive_errors)
                break
    except KeyboardInterrupt:
        status = "interrupted"
        logger.warning(
            "interrupted: finished cells are saved in %s; run the same command again to resume", store.results
        )
    except Exception as error:  # the run itself failed, e.g. a results file that cannot be written
        status, failure = "error", error
        logger.error("the run failed: %s: %s", type(error).__name__, error)
    bar.close()
    wall = time.perf_counter() - wall_started
    unfinished = len(todo) - sum(by_status.get(kind, 0) for kind in FINISHED)
    if status == "finished" and unfinished:
        status = "incomplete"
        logger.error(
            "%d of %d cells have no score (errors, listed in results.jsonl and the report); "
            "run the same command again to retry them", unfinished, len(cells),
        )
    run_entry.update(
        {
            "finished": now(),
            "status": status,
            "wall_seconds": round(wall, 1),
            "cells_by_status": by_status,
            "cells_unfinished": unfinished,
            "load_average_at_end": _load(),
        }
    )
    if failure is not None:
        run_entry["error"] = scrub(f"{type(failure).__name__}: {failure}")[:2000]
    manifest["updated"] = now()
    try:
        store.write_manifest(manifest)
    except OSError as error:
        if failure is None:
            raise
        # The disk that refused the results refuses the manifest too: say so, and raise
        # the first error (the next run marks this one as died).
        logger.error("the manifest could not record the failure either: %s", error)
    if failure is not None:
        raise failure
    return RunSummary(
        status=status,
        cells_total=len(cells),
        cells_already_done=len(cells) - len(todo),
        cells_run=run_entry["cells_run"],
        by_status=by_status,
        wall_seconds=round(wall, 1),
        notes=notes,
        cells_unfinished=unfinished,
    )
