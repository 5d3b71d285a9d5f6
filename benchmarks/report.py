"""``python -m benchmarks report RESULTS_DIR``: report.md (means per method and n, cost
ratios, win rates, paired Wilcoxon tests) and pareto.png from a results folder.
``python -m benchmarks report A B --out C``: the same report over several folders of like
runs (a study whose tasks ran in more than one folder), written with its ``sources.json``
into ``C``.

Every figure is computed from the folder's ``results.jsonl`` (the last ``ok`` record of
each (task, n, method, seed) cell); the manifest supplies the header (models, machine,
settings). Cells whose last record is an ``error`` (no score: e.g. follower calls that
failed during the evaluation) are counted per method and n and listed with their error.
Control characters in labels and instructions are written escaped. The report needs
scipy and matplotlib (the ``bench`` extra); without them :class:`MissingDependency` is
raised before anything is written.
"""

from __future__ import annotations

import importlib
import itertools
import math
import os
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.methods import METHODS
from benchmarks.store import RESULTS, latest, read_manifest, read_records
from dspy_promptmii.console import escape_controls
from dspy_promptmii.files import read_json, write_json, write_text
from dspy_promptmii.secrets import protected_logger

logger = protected_logger(__name__)

__all__ = [
    "MissingDependency",
    "require_dependencies",
    "Row",
    "MIN_WILCOXON_PAIRS",
    "method_order",
    "summary_rows",
    "paired",
    "ratio",
    "win_rate",
    "wilcoxon_test",
    "EstimateRow",
    "estimate_rows",
    "render_report",
    "write_report",
    "SOURCES",
    "COMPARABLE_SETTINGS",
    "source_folders",
    "folder_records",
    "combine",
]

#: With fewer non-zero paired differences, a two-sided Wilcoxon signed-rank test cannot
#: reach p < 0.05 (its smallest exact p is 2 / 2**k), so the report says so instead.
MIN_WILCOXON_PAIRS = 6
#: The references the cost ratios are taken against, when present.
REFERENCES = ("icl", "gepa", "miprov2")

Cell = tuple[str, int, int]  # (task, n, seed)
#: A combined report's sources: ``{"sources": [folder, ...], "differences": [setting, ...]}``,
#: each folder relative to the combined one.
SOURCES = "sources.json"
#: The run settings (manifest ``settings``) that folders must share to be reported together:
#: what decides a score besides the method (the protocol, the follower, the test rows, the split).
COMPARABLE_SETTINGS = ("protocol", "adapter", "follower", "follower_max_tokens", "test_rows", "split_protocol")


class MissingDependency(ImportError):
    """A package the report needs is not installed."""


def require_dependencies() -> None:
    """Raise :class:`MissingDependency` naming the package and the install command when
    scipy (the Wilcoxon tests) or matplotlib (the Pareto plot) is missing."""
    for module, purpose in (("scipy.stats", "its Wilcoxon tests"), ("matplotlib", "its Pareto plot")):
        try:
            importlib.import_module(module)
        except ImportError:
            package = module.split(".")[0]
            raise MissingDependency(
                f"the report needs {package} for {purpose}, and it is not installed: "
                "pip install 'dspy-promptmii[bench]' (or pip install -e '.[bench]' in a clone)"
            ) from None


def method_order(records: Iterable[dict[str, Any]]) -> list[str]:
    """Methods present, in the canonical order (unknown names after, sorted)."""
    present = {r["method"] for r in records}
    return [m for m in METHODS if m in present] + sorted(present - set(METHODS))


def _mean(values: Iterable[float | None]) -> float | None:
    kept = [float(v) for v in values if v is not None]
    return statistics.fmean(kept) if kept else None


@dataclass
class Row:
    """Means over tasks (and seeds) of one method at one n."""

    method: str
    n: int
    cells: int
    tasks: int
    macro_f1: float | None
    accuracy: float | None
    invalid_rate: float | None
    tokens_per_query: float | None
    compile_calls: float | None
    compile_generator_calls: float | None
    compile_follower_calls: float | None
    compile_tokens: float | None
    compile_seconds: float | None
    eval_seconds: float | None
    n_used: float | None
    errors: int = 0


def summary_rows(records: Sequence[dict[str, Any]], errors: Sequence[dict[str, Any]] = ()) -> list[Row]:
    """One :class:`Row` per (method, n) present in ``records`` (scored cells) or
    ``errors`` (cells in error, counted in :attr:`Row.errors`), methods in canonical order,
    n ascending. Means are over the scored cells (None where there is none)."""
    rows = []
    for method in method_order([*records, *errors]):
        for n in sorted({r["n"] for r in [*records, *errors] if r["method"] == method}):
            group = [r for r in records if r["method"] == method and r["n"] == n]

            def mean(key: str, group: list[dict[str, Any]] = group) -> float | None:
                return _mean(r.get(key) for r in group)

            rows.append(
                Row(
                    method=method,
                    n=n,
                    errors=sum(r["method"] == method and r["n"] == n for r in errors),
                    cells=len(group),
                    tasks=len({r["task"] for r in group}),
                    macro_f1=mean("macro_f1"),
                    accuracy=mean("accuracy"),
                    invalid_rate=mean("invalid_rate"),
                    tokens_per_query=mean("prompt_tokens_per_query"),
                    compile_calls=mean("compile_calls"),
                    compile_generator_calls=mean("compile_generator_calls"),
                    compile_follower_calls=mean("compile_follower_calls"),
                    compile_tokens=mean("compile_tokens"),
                    compile_seconds=mean("compile_seconds"),
                    eval_seconds=mean("eval_seconds"),
                    n_used=mean("n_used"),
                )
            )
    return rows


@dataclass
class EstimateRow:
    """Means, over the cells of one method at one n that recorded an estimate, of the
    compile cost estimated before compile and the cost measured. Token means run over
    the cells whose estimate counts tokens (``token_cells``); ``price`` is the estimated
    price's text when every cell has one, else ``"unknown"``."""

    method: str
    n: int
    cells: int
    estimated_generator_calls: float
    estimated_follower_calls: float
    measured_generator_calls: float
    measured_follower_calls: float
    token_cells: int
    estimated_tokens: float | None
    measured_tokens: float | None
    price: str


def estimate_rows(records: Sequence[dict[str, Any]]) -> list[EstimateRow]:
    """One :class:`EstimateRow` per (method, n) whose scored cells recorded an estimate
    (``record["estimate"]``, written by runs since the estimate exists), methods in
    canonical order."""
    rows = []
    with_estimate = [r for r in records if isinstance(r.get("estimate"), dict) and "calls" in r["estimate"]]
    for method in method_order(with_estimate):
        for n in sorted({r["n"] for r in with_estimate if r["method"] == method}):
            group = [r for r in with_estimate if r["method"] == method and r["n"] == n]
            tokens = [
                r for r in group if r["estimate"].get("tokens") is not None and r.get("compile_tokens") is not None
            ]
            prices = [r["estimate"].get("price_usd") for r in group]
            rows.append(
                EstimateRow(
                    method=method,
                    n=n,
                    cells=len(group),
                    estimated_generator_calls=statistics.fmean(r["estimate"]["generator_calls"] for r in group),
                    estimated_follower_calls=statistics.fmean(r["estimate"]["follower_calls"] for r in group),
                    measured_generator_calls=statistics.fmean(r.get("compile_generator_calls") or 0 for r in group),
                    measured_follower_calls=statistics.fmean(r.get("compile_follower_calls") or 0 for r in group),
                    token_cells=len(tokens),
                    estimated_tokens=_mean(r["estimate"]["tokens"] for r in tokens),
                    measured_tokens=_mean(r["compile_tokens"] for r in tokens),
                    price="unknown" if any(p is None for p in prices) else f"${statistics.fmean(prices):.4f}",
                )
            )
    return rows


def _by_cell(records: Sequence[dict[str, Any]], method: str, n: int | None = None) -> dict[Cell, dict[str, Any]]:
    return {(r["task"], r["n"], r["seed"]): r for r in records if r["method"] == method and (n is None or r["n"] == n)}


def paired(
    records: Sequence[dict[str, Any]], a: str, b: str, key: str, n: int | None = None
) -> list[tuple[Cell, float, float]]:
    """(cell, a's value, b's value) for every cell where both methods have a value of ``key``."""
    left, right = _by_cell(records, a, n), _by_cell(records, b, n)
    out = []
    for cell in sorted(set(left) & set(right)):
        x, y = left[cell].get(key), right[cell].get(key)
        if x is not None and y is not None:
            out.append((cell, float(x), float(y)))
    return out


def ratio(records: Sequence[dict[str, Any]], method: str, reference: str, key: str, n: int) -> float | None:
    """Mean of ``key`` for ``method`` over the mean for ``reference``, over the cells at
    ``n`` where both have it; None when there is no such cell or the reference's mean is 0."""
    pairs = paired(records, method, reference, key, n)
    if not pairs:
        return None
    denominator = statistics.fmean(y for _, _, y in pairs)
    if denominator == 0:
        return None
    return statistics.fmean(x for _, x, _ in pairs) / denominator


def win_rate(records: Sequence[dict[str, Any]], a: str, b: str, key: str = "macro_f1") -> tuple[float | None, int]:
    """Share of paired cells where ``a`` scores higher than ``b`` (a tie counts half), and the pair count."""
    pairs = paired(records, a, b, key)
    if not pairs:
        return None, 0
    wins = sum(1.0 if x > y else 0.5 if x == y else 0.0 for _, x, y in pairs)
    return wins / len(pairs), len(pairs)


@dataclass
class WilcoxonResult:
    a: str
    b: str
    pairs: int
    nonzero: int
    mean_difference: float | None
    median_difference: float | None
    statistic: float | None
    p_value: float | None
    note: str


def wilcoxon_test(records: Sequence[dict[str, Any]], a: str, b: str, key: str = "macro_f1") -> WilcoxonResult:
    """Paired two-sided Wilcoxon signed-rank test of ``a`` against ``b`` over (task, n, seed) cells
    (``scipy.stats.wilcoxon`` with its defaults); a note instead when there are too few pairs."""
    pairs = paired(records, a, b, key)
    x = [p[1] for p in pairs]
    y = [p[2] for p in pairs]
    differences = [xi - yi for xi, yi in zip(x, y)]
    nonzero = sum(d != 0 for d in differences)
    mean_d = statistics.fmean(differences) if differences else None
    median_d = statistics.median(differences) if differences else None
    base = dict(a=a, b=b, pairs=len(pairs), nonzero=nonzero, mean_difference=mean_d, median_difference=median_d)
    if nonzero == 0 and pairs:
        return WilcoxonResult(**base, statistic=None, p_value=None, note="all paired differences are zero")
    from scipy.stats import wilcoxon  # the bench extra (see require_dependencies)

    if nonzero < MIN_WILCOXON_PAIRS:
        return WilcoxonResult(
            **base,
            statistic=None,
            p_value=None,
            note=(
                f"too few pairs: {nonzero} non-zero differences "
                f"(need at least {MIN_WILCOXON_PAIRS} for p < 0.05 to be possible)"
            ),
        )
    result = wilcoxon(x, y)
    return WilcoxonResult(**base, statistic=float(result.statistic), p_value=float(result.pvalue), note="")


# --- rendering ----------------------------------------------------------------------


def _f(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _num(value: float | None) -> str:
    """A mean count: whole numbers as such, others to one decimal."""
    if value is None:
        return "n/a"
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"


def _x(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3g}x"


def _loads(values: Sequence[float] | None) -> str:
    return "n/a" if not values else "/".join(f"{v:.2f}" for v in values)


def _table(header: Sequence[str], rows: Iterable[Sequence[str]], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---:" if a == "r" else ":---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _header(
    manifest: dict[str, Any] | None,
    records: Sequence[dict[str, Any]],
    all_records: Sequence[dict[str, Any]],
    title: str = "# Benchmark report",
) -> str:
    lines = [title, ""]
    if not manifest:
        lines += ["(no manifest.json in this folder)", ""]
        return "\n".join(lines)
    models = manifest.get("models", {})

    def model(name: str) -> str:
        info = models.get(name)
        if not info:
            return "none"
        local = info.get("local_server")
        text = f"`{info.get('route')}`"
        if local:
            name = Path(local.get("model_path") or "").name
            text += f" (llama.cpp, {name}, n_ctx {local.get('n_ctx')}, {local.get('n_threads')} threads)"
        return text

    runs = manifest.get("runs", [])
    machine = (runs[-1].get("machine") if runs else None) or {}
    versions = manifest.get("versions", {})
    adapter = manifest.get("adapter", {})
    unscored = latest(all_records, ("ok", "failed", "error"))
    errors = sum(r.get("status") == "error" for r in unscored)
    failed = sum(r.get("status") == "failed" for r in unscored)
    lines += [
        f"- results: `{RESULTS}` ({len(all_records)} records, {len(records)} finished cells scored)",
        f"- cells without a score: {errors} error(s) (the run could not finish them, e.g. LM calls that failed; "
        f"the next run retries them) and {failed} failed (the method produced no program); listed below",
        f"- created {manifest.get('created')}, updated {manifest.get('updated')}",
        f"- follower: {model('follower')}; generator: {model('generator')}; "
        f"trained generator: {model('generator_trained')}",
        f"- adapter: {adapter.get('kind')} (constrained: {adapter.get('constrained')}, "
        f"demos: {adapter.get('demos', 'n/a')})",
        f"- tasks: {', '.join(manifest.get('tasks', []))}; n: {manifest.get('n_values')}; "
        f"test rows per task: {manifest.get('test_rows')}; seeds: {manifest.get('seeds')}",
        f"- machine: {machine.get('cpus_usable')} CPU cores ({machine.get('cpu_model')}), "
        f"{machine.get('memory_gib')} GiB, GPUs: {', '.join(machine.get('gpus') or []) or 'none'}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v),
    ]
    if manifest.get("preset"):
        lines.append(f"- preset: {manifest['preset'].get('name')}: {manifest['preset'].get('description')}")
    for name, text in (manifest.get("methods") or {}).items():
        lines.append(f"- `{name}`: {text}")
    for run in runs:
        lines.append(
            f"- run {run.get('started')} -> {run.get('finished')}: {run.get('status')}, "
            f"{run.get('cells_run')} cells run, wall {run.get('wall_seconds')} s, load average (1/5/15 min) "
            f"at start {_loads((run.get('machine') or {}).get('load_average_at_start'))} "
            f"and end {_loads(run.get('load_average_at_end'))}"
        )
    for note in manifest.get("notes") or []:
        lines.append(f"- note: {note}")
    lines.append("")
    return "\n".join(lines)


def render_report(folder: str | Path, plot_name: str | None = "pareto.png") -> str:
    """The markdown report of a results folder (control characters escaped).

    Raises ``ValueError`` naming ``manifest.json`` when it is not a readable manifest."""
    return escape_controls(_render(Path(folder), plot_name, _read_folder(folder)))


def _problems(all_records: Sequence[dict[str, Any]]) -> list[str]:
    """The 'Cells without a score' section: each cell whose last record is an error (with
    how many test rows failed, when its evaluation was cut short) or a failure."""
    problems = [r for r in latest(all_records, ("ok", "failed", "error")) if r.get("status") != "ok"]
    if not problems:
        return []
    errors = sum(r.get("status") == "error" for r in problems)
    lines = [
        "## Cells without a score",
        "",
        f"{errors} error(s): the run could not finish these cells (no score is recorded; running the same command "
        f"again retries them); {len(problems) - errors} failed: the method ran and produced no program.",
        "",
    ]
    for r in problems:
        failed_rows = r.get("eval_rows_failed")
        rows = f" ({failed_rows} of {r.get('test_rows')} test rows failed)" if failed_rows else ""
        lines.append(
            f"- {r['task']} n={r['n']} {r['method']} seed={r['seed']}: {r['status']}{rows}: "
            f"{str(r.get('error', ''))[:300]}"
        )
    lines.append("")
    return lines


def _error_cells(all_records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The cells whose last record is an error."""
    return [r for r in latest(all_records, ("ok", "failed", "error")) if r.get("status") == "error"]


def source_folders(folder: str | Path) -> list[Path] | None:
    """The results folders a combined report reads (its :data:`SOURCES`), else None.

    Raises:
        ValueError: the file does not list folders (named).
        FileNotFoundError: a listed folder has no results (a source moved or renamed).
    """
    path = Path(folder) / SOURCES
    if not path.is_file():
        return None
    data = read_json(path)
    sources = data.get("sources") if isinstance(data, dict) else None
    if not isinstance(sources, list) or not sources or not all(isinstance(name, str) for name in sources):
        raise ValueError(f"{path}: needs a 'sources' list of results folders")
    folders = [(Path(folder) / name).resolve() for name in sources]  # as combine() wrote them: resolved
    for name, source in zip(sources, folders):
        if not (source / RESULTS).is_file():
            raise FileNotFoundError(f"{path}: its source {name} ({source}) has no {RESULTS}: was it moved?")
    return folders


def _read_folder(folder: str | Path) -> tuple[list[Path] | None, list[list[dict[str, Any]]]]:
    """A report folder's sources (None for a run's own folder) and the records of each
    results file it reads, each file read once."""
    sources = source_folders(folder)
    if sources is None:
        return None, [read_records(Path(folder) / RESULTS)]
    return sources, [read_records(source / RESULTS) for source in sources]


def folder_records(folder: str | Path) -> list[dict[str, Any]]:
    """Every record a report of ``folder`` reads, in order: its ``results.jsonl``, or for a
    combined folder each source's in turn (so :func:`latest` takes a cell found in several
    sources from the last one)."""
    return _joined(_read_folder(folder)[1])


def _joined(per_source: Sequence[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    return [record for records in per_source for record in records]


def _combined_header(folder: Path, sources: Sequence[Path], per_source: Sequence[list[dict[str, Any]]]) -> str:
    data = read_json(folder / SOURCES)
    differences = data.get("differences") or []
    lines = [
        "# Benchmark report (combined)",
        "",
        f"- combined from {len(sources)} results folders, in this order (a cell found in several is taken from "
        "the last): " + ", ".join(f"`{os.path.relpath(source, folder.resolve())}`" for source in sources),
        "- run settings that differ between them: "
        + (", ".join(differences) + " (see each folder's header below)" if differences else "none"),
        "",
    ]
    for source, all_records in zip(sources, per_source):
        title = f"## Source: {source.name}"
        lines += [_header(read_manifest(source), latest(all_records), all_records, title=title)]
    return "\n".join(lines)


def combine(sources: Sequence[str | Path], out: str | Path) -> list[Path]:
    """Write one report over several results folders of like runs into ``out`` (its
    ``sources.json``, report.md and pareto.png); return the paths written.

    Each cell is taken from the last folder that has it. The folders must share the
    :data:`COMPARABLE_SETTINGS` of their manifests; settings that differ otherwise (e.g. the
    route of the trained generator) are named in the report's header.

    Raises:
        FileNotFoundError: a source has no results.
        ValueError: fewer than one source, ``out`` is a source or a run's own folder, or the
            sources differ in a comparable setting (named, with the folders).
        MissingDependency: scipy or matplotlib is not installed (nothing is written).
    """
    folders = [Path(source) for source in sources]
    out = Path(out)
    if not folders:
        raise ValueError("a combined report needs at least one results folder")
    for folder in folders:
        if not (folder / RESULTS).is_file():
            raise FileNotFoundError(f"no {RESULTS} in {folder}: a combined report reads the folders of runs")
        if folder.resolve() == out.resolve():
            raise ValueError(f"--out {out} is one of the folders to combine: write the combined report elsewhere")
    if (out / RESULTS).is_file():
        raise ValueError(f"--out {out} holds a run's {RESULTS}: write the combined report into a folder of its own")
    require_dependencies()
    settings = [(read_manifest(folder) or {}).get("settings") or {} for folder in folders]
    for key in COMPARABLE_SETTINGS:
        values = [setting.get(key) for setting in settings]
        if any(value != values[0] for value in values):
            raise ValueError(
                f"the folders differ in the run setting {key!r} ({folders[0]} and "
                f"{folders[next(i for i, v in enumerate(values) if v != values[0])]}): "
                "their scores are not comparable"
            )
    keys = sorted({key for setting in settings for key in setting} - set(COMPARABLE_SETTINGS))
    differences = [key for key in keys if any(setting.get(key) != settings[0].get(key) for setting in settings)]
    out.mkdir(parents=True, exist_ok=True)
    relative = [os.path.relpath(folder.resolve(), out.resolve()) for folder in folders]
    write_json({"sources": relative, "differences": differences}, out / SOURCES)
    return [out / SOURCES, *write_report(out)]


def _render(
    folder: Path, plot_name: str | None, read: tuple[list[Path] | None, list[list[dict[str, Any]]]]
) -> str:
    """The report of ``folder`` from what :func:`_read_folder` read of it."""
    sources, per_source = read
    all_records = _joined(per_source)
    records = latest(all_records)
    if sources is None:
        parts = [_header(read_manifest(folder), records, all_records)]
    else:
        parts = [_combined_header(folder, sources, per_source)]
    errors = _error_cells(all_records)
    if not records:
        parts.append("No finished cell yet.\n")
        parts += _problems(all_records)
        return "\n".join(parts)
    methods = method_order(records)
    rows = summary_rows(records, errors)

    parts += [
        "## Mean over tasks, per method and n",
        "",
        "Macro-F1 and accuracy by the protocol's scorer (a reply that names no label is a miss for its gold "
        "label, not a class of its own; macro-F1 averages over the gold and the valid predicted labels); "
        "tokens/query: mean prompt tokens per test query reported by the follower; compile calls: LM calls "
        "to compile, generator + follower; n used: examples the method actually used (ICL: the largest "
        "prefix that fits the follower's context; Prompt-MII: the optimizer's n_used; naive: none); errors: "
        "cells without a score (see 'Cells without a score'), left out of every mean.",
        "",
        _table(
            [
                "method",
                "n",
                "tasks",
                "macro-F1",
                "accuracy",
                "invalid",
                "tokens/query",
                "compile calls (gen + fol)",
                "compile tokens",
                "compile s",
                "eval s",
                "n used",
                "errors",
            ],
            (
                [
                    r.method,
                    str(r.n),
                    str(r.tasks),
                    _f(r.macro_f1),
                    _f(r.accuracy),
                    _pct(r.invalid_rate),
                    _f(r.tokens_per_query, 0),
                    f"{_num(r.compile_calls)} ({_num(r.compile_generator_calls)} + {_num(r.compile_follower_calls)})",
                    _f(r.compile_tokens, 0),
                    _f(r.compile_seconds, 1),
                    _f(r.eval_seconds, 1),
                    _num(r.n_used),
                    str(r.errors),
                ]
                for r in rows
            ),
        ),
        "",
    ]

    references = [m for m in REFERENCES if m in methods]
    if references:
        parts += [
            "## Cost ratios",
            "",
            "Each method's mean over the reference's mean, over the (task, seed) cells at that n where both "
            "finished: below 1x the method costs less than the reference. Tokens are prompt tokens per test "
            "query; calls are compile LM calls (generator + follower); n/a where the reference spends none "
            "or has no cell.",
            "",
        ]
        header = ["method", "n"]
        columns = [(ref, "prompt_tokens_per_query", f"tokens/query vs {ref}") for ref in references]
        # ICL makes no compile call: a call ratio against it is never defined.
        columns += [(ref, "compile_calls", f"compile calls vs {ref}") for ref in references if ref != "icl"]
        header += [title for _, _, title in columns]
        table = []
        for r in (r for r in rows if r.cells):  # rows of cells in error alone have nothing to compare
            table.append(
                [r.method, str(r.n)] + [_x(ratio(records, r.method, ref, key, r.n)) for ref, key, _ in columns]
            )
        parts += [_table(header, table), ""]

    estimated = estimate_rows(records)
    if estimated:
        parts += [
            "## Compile cost: estimated before compile vs measured",
            "",
            "The estimate each cell recorded before its compile (no LM call: Prompt-MII's from its meta-prompts, "
            "counted; GEPA's and MIPROv2's from their own budget rules, whose proposer prompts are not counted) "
            "beside what the compile spent. Estimated completion tokens are each call's reply limit, a bound. "
            "Tokens: prompt + completion, over the cells whose estimate counts them; price: LiteLLM's model cost "
            "map, unknown for a route it does not know.",
            "",
            _table(
                [
                    "method",
                    "n",
                    "cells",
                    "calls estimated (gen + fol)",
                    "calls measured (gen + fol)",
                    "tokens estimated",
                    "tokens measured",
                    "measured / estimated tokens",
                    "price estimated",
                ],
                (
                    [
                        e.method,
                        str(e.n),
                        str(e.cells),
                        f"{_num(e.estimated_generator_calls + e.estimated_follower_calls)} "
                        f"({_num(e.estimated_generator_calls)} + {_num(e.estimated_follower_calls)})",
                        f"{_num(e.measured_generator_calls + e.measured_follower_calls)} "
                        f"({_num(e.measured_generator_calls)} + {_num(e.measured_follower_calls)})",
                        _f(e.estimated_tokens, 0),
                        _f(e.measured_tokens, 0),
                        "n/a" if not e.estimated_tokens or e.measured_tokens is None
                        else f"{e.measured_tokens / e.estimated_tokens:.2f}",
                        e.price,
                    ]
                    for e in estimated
                ),
            ),
            "",
        ]

    multi = [r for r in records if r.get("example_f1") is not None]
    if multi:
        parts += [
            "## Multi-label tasks",
            "",
            "Cells of multi-label tasks (`list[Literal[...]]`), by scikit-learn's multilabel metrics: example-F1 "
            "(each example's label set, averaged), micro-F1 (over all label decisions), macro-F1 (per label, over "
            "the labels used; the macro-F1 of the tables above) and exact match (the set exactly right; the "
            "accuracy above). An invalid reply counts as no label.",
            "",
            _table(
                ["method", "n", "tasks", "example-F1", "micro-F1", "macro-F1", "exact match"],
                (
                    [
                        method,
                        str(n),
                        str(len({r["task"] for r in group})),
                        _f(_mean(r["example_f1"] for r in group)),
                        _f(_mean(r.get("micro_f1") for r in group)),
                        _f(_mean(r["macro_f1"] for r in group)),
                        _f(_mean(r["accuracy"] for r in group)),
                    ]
                    for method in method_order(multi)
                    for n in sorted({r["n"] for r in multi if r["method"] == method})
                    for group in [[r for r in multi if r["method"] == method and r["n"] == n]]
                ),
            ),
            "",
        ]

    parts += [
        "## Win rates (macro-F1)",
        "",
        "Share of paired (task, n, seed) cells in which the row method's macro-F1 is higher than the column "
        "method's (a tie counts half); the number of pairs in brackets.",
        "",
    ]
    table = []
    for a in methods:
        line = [a]
        for b in methods:
            if a == b:
                line.append("-")
                continue
            rate, count = win_rate(records, a, b)
            line.append("n/a" if rate is None else f"{rate:.2f} ({count})")
        table.append(line)
    parts += [_table(["row beats column", *methods], table), ""]

    tasks = sorted({r["task"] for r in records})
    parts += [
        "## Per task (macro-F1, mean over n)",
        "",
        "The best method of each task in bold; the last row counts the tasks each method wins (ties split).",
        "",
    ]
    wins = {m: 0.0 for m in methods}
    table = []
    for task in tasks:
        means = {m: _mean(r["macro_f1"] for r in records if r["task"] == task and r["method"] == m) for m in methods}
        present = {m: v for m, v in means.items() if v is not None}
        best = max(present.values()) if present else None
        winners = [m for m, v in present.items() if v == best]
        for m in winners:
            wins[m] += 1 / len(winners)
        table.append([task] + [("**" + _f(means[m]) + "**") if m in winners else _f(means[m]) for m in methods])
    table.append(["tasks won"] + [f"{wins[m]:.3g} / {len(tasks)}" for m in methods])
    parts += [_table(["task", *methods], table), ""]

    parts += [
        "## Paired Wilcoxon signed-rank tests (macro-F1)",
        "",
        "Two-sided `scipy.stats.wilcoxon` over the (task, n, seed) cells both methods finished; "
        "difference = first minus second.",
        "",
    ]
    table = []
    for a, b in itertools.combinations(methods, 2):
        t = wilcoxon_test(records, a, b)
        table.append(
            [
                f"{a} vs {b}",
                str(t.pairs),
                _f(t.mean_difference),
                _f(t.median_difference),
                _f(t.statistic, 1),
                _f(t.p_value, 4),
                t.note or ("p < 0.05" if t.p_value < 0.05 else "not significant"),
            ]
        )
    parts += [_table(["pair", "pairs", "mean diff", "median diff", "W", "p", "reading"], table, "lrrrrrl"), ""]

    parts += _problems(all_records)

    if plot_name:
        parts += ["## Pareto plot", ""]
        if len({r.tasks for r in rows if r.cells}) > 1:
            parts += [
                "Each point is a mean over the tasks that method ran on (the `tasks` column above), and "
                "these differ between methods: compare points over the same tasks in the tables above.",
                "",
            ]
        parts += [f"![prompt tokens per query vs macro-F1]({plot_name})", ""]

    parts += ["## Instructions", "", "What each compiled program told the follower (before the format line).", ""]
    for r in sorted(records, key=lambda r: (r["task"], r["n"], methods.index(r["method"]), r["seed"])):
        text = (r.get("instruction") or "").strip()
        demos = f", {r['demos']} demos" if r.get("demos") else ""
        parts += [
            f"<details><summary>{r['task']} n={r['n']} {r['method']} (seed {r['seed']}{demos}): "
            f"macro-F1 {_f(r.get('macro_f1'))}</summary>",
            "",
            "```text",
            text.replace("```", "'''"),
            "```",
            "</details>",
            "",
        ]
    return "\n".join(parts)


def write_report(folder: str | Path) -> list[Path]:
    """Write report.md and pareto.png into ``folder`` (a run's folder, or a combined one
    with its ``sources.json``, see :func:`combine`); return their paths.

    Raises:
        FileNotFoundError: the folder has no results.
        MissingDependency: scipy or matplotlib is not installed (nothing is written).
        ValueError: its manifest is not readable (named).
    """
    folder = Path(folder)
    if not (folder / RESULTS).is_file() and not (folder / SOURCES).is_file():
        raise FileNotFoundError(f"no {RESULTS} in {folder}: run `python -m benchmarks run --out {folder}` first")
    require_dependencies()
    from benchmarks.plot import pareto_plot

    read = _read_folder(folder)  # once, for the plot and the report
    records = latest(_joined(read[1]))
    written = []
    plot = folder / "pareto.png"
    if records:
        pareto_plot(summary_rows(records), plot)
        written.append(plot)
    report = folder / "report.md"
    write_text(escape_controls(_render(folder, plot.name if records else None, read)), report)
    written.insert(0, report)
    return written
