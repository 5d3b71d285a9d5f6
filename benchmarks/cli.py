"""``python -m benchmarks run|report|speed``: the command line of the side-by-side benchmark."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from datetime import date
from pathlib import Path
from typing import Any

# LiteLLM otherwise tries to download its model-cost map at import (no network here).
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from benchmarks.methods import METHODS, Budgets, parse_method  # noqa: E402
from benchmarks.tasks import DEFAULT_DATA_DIR, REPO_ROOT, resolve_tasks  # noqa: E402
from dspy_promptmii.cli import context_size, positive_float, positive_int  # noqa: E402
from dspy_promptmii.protocol import CONSTRAINED_STYLES  # noqa: E402
from dspy_promptmii.routes import LOCAL_TIMEOUT, REMOTE_TIMEOUT  # noqa: E402
from dspy_promptmii.secrets import protected_logger  # noqa: E402

logger = protected_logger("benchmarks")

__all__ = ["main", "build_parser", "QUICK", "DEFAULTS"]

#: Defaults of the options a preset may set (None in the parser, so a preset can tell
#: what the user typed from what it may fill in).
DEFAULTS: dict[str, Any] = {
    "tasks": None,
    "n": "5,10,20,50,100",
    "test_rows": 200,
    "methods": "naive,icl,promptmii_zero,promptmii,gepa,miprov2",
    "gepa_metric_calls": 150,
    "miprov2_auto": "light",
    "miprov2_candidates": None,
    "miprov2_trials": None,
    "generator_max_tokens": 1024,
}

#: The --quick preset: a smoke run that ends in under 15 minutes on 2 CPU cores with the
#: embedded 0.5B model, search methods included at a reduced budget. Options typed on the
#: command line win over it.
QUICK: dict[str, Any] = {
    "tasks": "snips,tweeteval_emotion",
    "n": "10",
    "test_rows": 30,
    "methods": "naive,icl,promptmii_zero,promptmii,gepa,miprov2",
    "gepa_metric_calls": 24,
    "miprov2_auto": "none",
    "miprov2_candidates": 2,
    "miprov2_trials": 2,
    "generator_max_tokens": 512,
}
QUICK_DESCRIPTION = (
    f"smoke preset for 2 CPU cores and the embedded model: tasks {QUICK['tasks']}, n={QUICK['n']}, "
    f"{QUICK['test_rows']} test rows per task, methods {QUICK['methods']} (promptmii only with "
    "--generator-trained); search budgets reduced: GEPA "
    f"max_metric_calls={QUICK['gepa_metric_calls']} (default and paper: 150); MIPROv2 auto=None with "
    f"num_candidates={QUICK['miprov2_candidates']} and num_trials={QUICK['miprov2_trials']} (default: auto='light'); "
    f"generator replies capped at {QUICK['generator_max_tokens']} tokens for every method (default 1024)"
)


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Side-by-side benchmark of Prompt-MII, naive, ICL, GEPA and MIPROv2 on classification tasks.",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log DSPy's own progress messages too; tracebacks with errors"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the benchmark (resumes an interrupted run in the same --out)")
    run.add_argument(
        "--data-dir",
        default=str(DEFAULT_DATA_DIR),
        help="folder of task folders (each with data.jsonl); default ../shared/datasets from the repository root",
    )
    run.add_argument("--tasks", default=None, help="comma-separated task folder names (default: SPLITS.json 'dev')")
    run.add_argument("--n", default=None, help=f"labelled examples per method, comma list (default {DEFAULTS['n']})")
    run.add_argument("--test-rows", type=positive_int, default=None, help="held-out rows per task (default 200)")
    run.add_argument("--seed", type=int, default=0, help="seed of the split and of the optimizers (default 0)")
    run.add_argument("--follower", default="local", help="follower LM route (default: the embedded model)")
    run.add_argument("--generator", default="local", help="instruction generator / reflection LM route (default local)")
    run.add_argument(
        "--generator-trained", default=None, help="route of a trained Prompt-MII generator (method promptmii)"
    )
    run.add_argument("--api-base", default=None, help="OpenAI-compatible base URL for non-local routes (e.g. vLLM)")
    run.add_argument(
        "--timeout",
        type=positive_float,
        default=None,
        help=f"seconds an LM request may wait for the server (default {LOCAL_TIMEOUT:g} for local models, "
        f"{REMOTE_TIMEOUT:g} for others)",
    )
    run.add_argument("--methods", default=None, help=f"comma list of {','.join(METHODS)} (default: all)")
    run.add_argument("--gepa-metric-calls", type=positive_int, default=None, help="GEPA max_metric_calls (default 150)")
    run.add_argument(
        "--miprov2-auto",
        choices=["light", "medium", "heavy", "none"],
        default=None,
        help="MIPROv2 auto (default light)",
    )
    run.add_argument(
        "--miprov2-candidates",
        type=positive_int,
        default=None,
        help="MIPROv2 num_candidates (with --miprov2-auto none)",
    )
    run.add_argument(
        "--miprov2-trials", type=positive_int, default=None, help="MIPROv2 num_trials (with --miprov2-auto none)"
    )
    run.add_argument(
        "--generator-max-tokens", type=positive_int, default=None, help="generator reply limit (default 1024)"
    )
    run.add_argument(
        "--follower-max-tokens",
        type=positive_int,
        default=None,
        help=(
            "follower reply limit (default with --adapter label: the protocol's, room for the longest label; "
            "128 with chat: its field markers need room)"
        ),
    )
    run.add_argument(
        "--descriptions",
        default=None,
        help="JSON file of what each task's author would write in its signature ({'tasks': {name: {'task', "
        "'text', 'text_pair', 'label'}}}), e.g. benchmarks/task_descriptions.json",
    )
    run.add_argument(
        "--template",
        default="auto",
        help="meta-prompt of Prompt-MII: meta1, meta2, label_defs, auto (default), a template file or a template text",
    )
    run.add_argument(
        "--threads",
        type=positive_int,
        default=1,
        help="parallel follower calls (the local server serves one at a time)",
    )
    run.add_argument(
        "--adapter", choices=["label", "chat"], default="label", help="follower prompt shape (default label)"
    )
    decoding = run.add_mutually_exclusive_group()
    decoding.add_argument(
        "--constrained",
        choices=["auto", "none", *CONSTRAINED_STYLES],
        default="auto",
        help="constrained decoding of the follower's label with LabelAdapter (default auto: the follower "
        "endpoint's default style)",
    )
    decoding.add_argument("--no-constrained", action="store_true", help="same as --constrained none")
    run.add_argument("--n-ctx", type=context_size, default=None, help="context size of the local server (default 8192)")
    run.add_argument(
        "--n-threads",
        type=positive_int,
        default=None,
        help="CPU threads of the local server (default: all cores; use 1 when other llama.cpp servers share the cores)",
    )
    run.add_argument(
        "--out", default=None, help="results folder (default benchmarks/results/run-<date>, quick-<date> with --quick)"
    )
    run.add_argument(
        "--mlflow",
        nargs="?",
        const="",
        default=None,
        metavar="URI",
        help="log each finished cell (method, task, macro-F1, tokens/query, calls, seconds) as an MLflow run; URI: "
        "sqlite:///PATH.db, a PATH.db, http(s)://HOST:PORT (default: sqlite:///<out>/mlflow.db); needs the mlflow "
        "extra",
    )
    run.add_argument("--quick", action="store_true", help=QUICK_DESCRIPTION)
    run.add_argument("--no-progress", action="store_true", help="no progress bars")

    report = sub.add_parser("report", help="write report.md and pareto.png for a results folder")
    report.add_argument(
        "results_dir", nargs="+", help="a folder written by `run`; several (with --out) for one combined report"
    )
    report.add_argument(
        "--out",
        default=None,
        help="write one report over the given folders (a study that ran in several) into this folder, with its "
        "sources.json; a cell found in several folders is taken from the last",
    )

    speed = sub.add_parser(
        "speed",
        help="latency of the follower per constrained style, DSPy stack overhead, prefix cache, compile time",
    )
    speed.add_argument("--follower", default="local", help="follower LM route (default: the embedded model)")
    speed.add_argument(
        "--generator",
        action="append",
        default=None,
        help="generator route(s) to time one compile call with (repeat the flag; default: the follower's model)",
    )
    speed.add_argument("--api-base", default=None, help="OpenAI-compatible base URL for non-local routes")
    speed.add_argument("--queries", type=positive_int, default=16, help="requests per series (default 16)")
    speed.add_argument(
        "--styles",
        default=",".join(["none", *CONSTRAINED_STYLES]),
        help=f"constrained styles to time, comma list of {','.join(['none', *CONSTRAINED_STYLES])}",
    )
    speed.add_argument("--n", type=positive_int, default=20, help="examples in the timed meta-prompt (default 20)")
    speed.add_argument(
        "--generator-max-tokens", type=positive_int, default=1024, help="reply limit of the timed compile call"
    )
    speed.add_argument("--no-stack", action="store_true", help="skip the DSPy + LabelAdapter series")
    speed.add_argument("--no-compile", action="store_true", help="skip the compile timing")
    speed.add_argument(
        "--no-prompt-processing", action="store_true", help="skip the answer-over-prompt-processing series"
    )
    speed.add_argument("--no-scoring", action="store_true", help="skip the 20-row scoring series")
    speed.add_argument(
        "--no-load", action="store_true", help="skip the series with one core busy (local followers only)"
    )
    speed.add_argument("--n-ctx", type=context_size, default=None, help="context size of local servers (default 8192)")
    speed.add_argument("--n-threads", type=positive_int, default=None, help="CPU threads of local servers")
    speed.add_argument("--out", default=None, help="write the measurements as JSON here")
    return parser


def _resolved(args: argparse.Namespace) -> dict[str, Any]:
    """Option values after the preset and the defaults are applied (typed values win)."""
    preset = QUICK if args.quick else {}
    values = {}
    for name, default in DEFAULTS.items():
        typed = getattr(args, name)
        values[name] = typed if typed is not None else preset.get(name, default)
    return values


def _follower_max_tokens(args: argparse.Namespace) -> int | None:
    """The follower's reply limit: as typed, else the adapter's default (None with
    LabelAdapter: its protocol's limit per label set; 128 for ChatAdapter's field markers)."""
    from dspy_promptmii.adapter import FOLLOWER_REPLY_LIMIT

    return args.follower_max_tokens if args.follower_max_tokens is not None else FOLLOWER_REPLY_LIMIT[args.adapter]


def _setup_logging(out: Path | None, verbose: bool) -> None:
    """Log to stderr and to ``run.log`` in ``out``; Python warnings go through logging too,
    and every handler scrubs credentials and escapes control characters
    (:func:`dspy_promptmii.console.protect_output`)."""
    from dspy_promptmii.console import protect_output

    root = logging.getLogger()
    root.setLevel(logging.INFO)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    console.setLevel(logging.INFO)
    if not verbose:
        # DSPy's optimizers log every step at INFO: keep them for the log file only.
        class _Quiet(logging.Filter):
            def filter(self, record: logging.LogRecord) -> bool:
                return record.levelno >= logging.WARNING or record.name.startswith(("benchmarks", "dspy_promptmii"))

        console.addFilter(_Quiet())
    root.addHandler(console)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(out / "run.log", encoding="utf-8")
        file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(file)
    protect_output(*root.handlers)
    logging.captureWarnings(True)  # warnings.warn(...) texts reach the handlers' filters too
    for noisy in ("LiteLLM", "litellm", "httpx", "httpcore", "urllib3", "optuna", "mlflow", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # DSPy logs through its own stderr handler and does not propagate: send its records
    # through ours instead, so that the optimizers' step-by-step messages reach run.log.
    dspy_logger = logging.getLogger("dspy")
    for handler in list(dspy_logger.handlers):
        dspy_logger.removeHandler(handler)
    dspy_logger.propagate = True


def _run(args: argparse.Namespace) -> int:
    """``run``. SIGTERM ends it as Ctrl-C does (exit 130; a run in progress records status
    ``interrupted``; no LM request starts after the signal). The results folder is checked
    and locked, and the tasks read, before any LM starts; the folder stays locked until
    the end: a second run on it exits at once naming the folder. Exit 0 only when every
    cell finished; 1 when some have no score (errors, retried by the next run)."""
    with contextlib.ExitStack() as stack:
        try:
            return _run_in(args, stack)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr, flush=True)
            return 130


def _follower_style(args: argparse.Namespace) -> str:
    """``RunConfig.follower_style`` from ``--constrained`` (``auto``: the endpoint's) and
    ``--no-constrained``."""
    if args.no_constrained:
        return "none"
    return "endpoint" if args.constrained == "auto" else args.constrained


def _check_routes(routes: list[str], api_base: str | None) -> None:
    """Each route once, before any model is pulled or server started: a misspelled or
    unroutable name is a one-line exit (:func:`dspy_promptmii.routes.check_route`)."""
    from dspy_promptmii.routes import check_route

    for route in dict.fromkeys(routes):
        try:
            check_route(route, api_base)
        except ValueError as error:
            raise SystemExit(str(error)) from None


def _run_in(args: argparse.Namespace, stack: contextlib.ExitStack) -> int:
    from benchmarks.runner import ConfigMismatch, Endpoints, RunConfig, load_splits, run_benchmark
    from dspy_promptmii.routes import LMPool

    values = _resolved(args)
    try:
        n_values = _int_list(values["n"])
    except argparse.ArgumentTypeError as error:
        raise SystemExit(f"--n: {error}") from None
    methods = [m.strip() for m in values["methods"].split(",") if m.strip()]
    extra_generators: list[str] = []
    for method in methods:
        try:
            _, options = parse_method(method)
        except ValueError as error:
            raise SystemExit(f"--methods: {error}") from None
        if options.get("generator") and options["generator"] not in extra_generators:
            extra_generators.append(options["generator"])
    from dspy_promptmii.protocol import load_template

    try:
        load_template(args.template)
    except (ValueError, TypeError) as error:
        raise SystemExit(f"--template: {error}") from None
    descriptions = _read_descriptions(args.descriptions)
    auto = None if values["miprov2_auto"] == "none" else values["miprov2_auto"]
    if auto is None and not (values["miprov2_candidates"] and values["miprov2_trials"]):
        raise SystemExit("--miprov2-auto none needs --miprov2-candidates and --miprov2-trials")
    budgets = Budgets(
        gepa_metric_calls=values["gepa_metric_calls"],
        miprov2_auto=auto,
        miprov2_candidates=None if auto else values["miprov2_candidates"],
        miprov2_trials=None if auto else values["miprov2_trials"],
        generator_max_tokens=values["generator_max_tokens"],
    )
    trained_routes = [args.generator_trained] if args.generator_trained else []
    # before --out is touched: a refused route leaves no lock or log behind
    _check_routes([args.follower, args.generator, *trained_routes, *extra_generators], args.api_base)
    default_name = f"{'quick' if args.quick else 'run'}-{date.today().isoformat()}"
    out = Path(args.out) if args.out else REPO_ROOT / "benchmarks" / "results" / default_name
    from benchmarks.store import FolderLocked, ResultStore
    from dspy_promptmii.files import check_writable

    try:
        check_writable(out, folder=True)
        stack.enter_context(ResultStore(out).lock())  # held until _run returns
    except (ValueError, FolderLocked) as error:
        raise SystemExit(f"--out: {error}") from None
    _setup_logging(out, args.verbose)
    try:
        tasks = resolve_tasks(
            args.data_dir, [t.strip() for t in values["tasks"].split(",")] if values["tasks"] else None
        )
    except FileNotFoundError as error:
        raise SystemExit(str(error)) from None

    sink = None
    if args.mlflow is not None:  # checked before any model is pulled or started
        from benchmarks.tracking import MlflowSink

        try:
            sink = MlflowSink(args.mlflow or None, out)
        except (ImportError, ValueError) as error:
            raise SystemExit(f"--mlflow: {error}") from None
    args.follower_max_tokens = _follower_max_tokens(args)
    recorded_args = {**vars(args), **values}
    config = RunConfig(
        out=out,
        tasks=tasks,
        n_values=n_values,
        methods=methods,
        test_rows=values["test_rows"],
        seed=args.seed,
        threads=args.threads,
        adapter=args.adapter,
        follower_style=_follower_style(args),
        follower_max_tokens=args.follower_max_tokens,
        template=args.template,
        descriptions=descriptions,
        budgets=budgets,
        progress=not args.no_progress,
        preset={"name": "quick", "description": QUICK_DESCRIPTION, "values": QUICK} if args.quick else None,
        args=recorded_args,
    )
    # Every task file is read and split before a model is pulled or a server started.
    splits = load_splits(config)
    pool_settings = {"n_ctx": args.n_ctx} if args.n_ctx else {}
    with LMPool(**pool_settings, n_threads=args.n_threads, api_base=args.api_base, timeout=args.timeout) as pool:
        endpoint = pool.endpoint
        logger.info("starting LMs: follower %s, generator %s", args.follower, args.generator)
        if args.adapter == "label":  # temperature and reply limit come from the run's protocol
            follower = endpoint(args.follower, cache=False)
        else:
            follower = endpoint(args.follower, temperature=0.0, max_tokens=args.follower_max_tokens, cache=False)
        # Generators carry no settings of their own: each method sets its calls' (the
        # optimizer: the paper's temperature 0 and the run's reply limit; the searches too).
        generator = endpoint(args.generator, cache=False)
        trained = endpoint(args.generator_trained, cache=False) if args.generator_trained else None
        extra = {route: endpoint(route, cache=False) for route in extra_generators}
        try:
            summary = run_benchmark(
                config, Endpoints(follower=follower, generator=generator, trained=trained, extra=extra), splits, sink
            )
        except ConfigMismatch as error:
            raise SystemExit(str(error)) from None
    if sink is not None:
        print(f"MLflow: experiment {sink.experiment_name!r} at {sink.uri} (mlflow ui --backend-store-uri {sink.uri})")
    print(
        f"{summary.status}: {summary.cells_run} cells run ({summary.by_status}), "
        f"{summary.cells_already_done} already done, {summary.cells_total} in all; {summary.wall_seconds:.0f} s. "
        f"Results in {out}; next: python -m benchmarks report {out}",
        flush=True,
    )
    if summary.cells_unfinished and summary.status != "interrupted":
        print(
            f"{summary.cells_unfinished} cell(s) have no score (see results.jsonl and the report); "
            "run the same command again to retry them",
            file=sys.stderr,
            flush=True,
        )
    return 0 if summary.status == "finished" else 130 if summary.status == "interrupted" else 1


def _report(args: argparse.Namespace) -> int:
    """``report``: report.md and pareto.png. Without scipy or matplotlib (the ``bench``
    extra), one line saying what to install, and nothing written."""
    from benchmarks.report import combine, write_report
    from dspy_promptmii.console import protect_output

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    protect_output(*logging.getLogger().handlers)
    if len(args.results_dir) > 1 and args.out is None:
        raise SystemExit("several results folders make one combined report: give --out FOLDER to write it into")
    try:
        paths = write_report(args.results_dir[0]) if args.out is None else combine(args.results_dir, args.out)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(str(error)) from None
    for path in paths:
        print(f"wrote {path}")
    return 0


def _read_descriptions(path: str | None) -> dict[str, dict[str, str]]:
    """The --descriptions file's ``tasks`` mapping; SystemExit naming the problem."""
    from dspy_promptmii.files import read_json

    if not path:
        return {}
    try:
        data = read_json(path)
    except (OSError, ValueError) as error:
        raise SystemExit(f"--descriptions: {path} cannot be read as JSON: {error}") from None
    tasks = data.get("tasks") if isinstance(data, dict) else None
    if not isinstance(tasks, dict) or not all(isinstance(v, dict) for v in tasks.values()):
        raise SystemExit(f"--descriptions: {path} needs a 'tasks' object mapping task names to objects")
    allowed = {"task", "text", "text_pair", "label"}
    for name, notes in tasks.items():
        unknown = sorted(set(notes) - allowed)
        if unknown or not all(isinstance(v, str) for v in notes.values()):
            keys = unknown or list(notes)
            raise SystemExit(f"--descriptions: task {name!r} has keys {keys}; allowed {sorted(allowed)}")
    return tasks


def _styles(text: str) -> tuple[str | bool, ...]:
    from dspy_promptmii.protocol import CONSTRAINED_STYLES

    styles: list[str | bool] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if part not in ("none", *CONSTRAINED_STYLES):
            raise SystemExit(f"--styles: unknown style {part!r}; known: none,{','.join(CONSTRAINED_STYLES)}")
        styles.append(False if part == "none" else part)
    if not styles:
        raise SystemExit("--styles: give at least one style")
    return tuple(styles)


def _speed(args: argparse.Namespace) -> int:
    from benchmarks.manifest import machine, model_info, now, versions
    from benchmarks.speed import SpeedConfig, format_speed, run_speed
    from dspy_promptmii.files import write_json
    from dspy_promptmii.routes import LMPool

    _check_routes([args.follower, *(args.generator or [])], args.api_base)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("LiteLLM", "litellm", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    config = SpeedConfig(
        queries=args.queries,
        styles=_styles(args.styles),
        n_examples=args.n,
        generator_max_tokens=args.generator_max_tokens,
        stack=not args.no_stack,
        prompt_processing=not args.no_prompt_processing,
        scoring=not args.no_scoring,
        load=not args.no_load,
    )
    started = now()
    pool_settings = {"n_ctx": args.n_ctx} if args.n_ctx else {}
    with LMPool(**pool_settings, n_threads=args.n_threads, api_base=args.api_base) as pool:
        follower = pool.endpoint(args.follower, cache=False)
        generators = []
        if not args.no_compile:
            for route in args.generator or [args.follower]:
                generators.append((route, pool.endpoint(route, cache=False)))
        result = run_speed(follower, generators, config, progress=lambda message: logger.info("measuring %s", message))
        report = {
            "benchmark": "python -m benchmarks speed",
            "started": started,
            "finished": now(),
            "machine": machine(),
            "versions": versions(),
            "follower": model_info(follower),
            "generators": {route: model_info(endpoint) for route, endpoint in generators},
            "settings": {**vars(args), "styles": [s or "none" for s in config.styles]},
            **result,
        }
    print(format_speed(result), flush=True)
    if args.out:
        from dspy_promptmii.secrets import redact

        write_json(redact(report), args.out)
        print(f"\nwritten to {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line. Ctrl-C and SIGTERM stop it (no LM request starts after them; see
    :mod:`dspy_promptmii.stopping`); an error is one line on stderr (exit 2), with its
    traceback only under ``-v``. Run as a program (``argv`` None), it does not wait for
    requests left in flight by a stop."""
    from dspy_promptmii.console import command

    args = build_parser().parse_args(argv)
    return command("benchmarks", lambda: _dispatch(args), verbose=args.verbose, program=argv is None)


def _dispatch(args: argparse.Namespace) -> int:
    from dspy_promptmii.console import fail

    try:
        if args.command == "run":
            return _run(args)
        if args.command == "speed":
            return _speed(args)
        return _report(args)
    except SystemExit as stop:  # the option checks' one-line messages, shown like every error (exit 2)
        if isinstance(stop.code, str):
            return fail("benchmarks", ValueError(stop.code))
        raise
