"""The validation curve: the validation reward of several generators (rounds of rejection-sampling
fine-tuning), paired by context, with the paired statistics that say whether a change is real.

Each input is a ``training.rollouts --split valid`` folder: one greedy instruction per held-out
context, scored by the follower (macro-F1 on the context's m held-out rows), beside the naive
instruction's reward on the same rows. This is the curve of the paper's Figure 6 (validation
reward per step of meta-training), measured on the held-out tasks of ``training.rollouts``.
Every run is compared, over the contexts both finished, with the first run (the baseline: round
0, the untrained generator) and with the naive instruction:

* wins / ties / losses and the mean difference of the rewards;
* a 95% confidence interval of the mean difference (``scipy.stats.bootstrap``, BCa, seeded);
* the two-sided Wilcoxon signed-rank test (``scipy.stats.wilcoxon``; zero differences dropped,
  so at least 6 non-zero ones are needed before p < 0.05 is possible).

Usage::

    python -m training.validation round0=training/rft/round0/valid_large \\
        round1c=training/rft/round1c/valid_large --out training/rft/valid_large.md

Writes the report (Markdown) to stdout and, with ``--out``, to that file and the same figures
as JSON beside it (``.json``). Runs made with another follower or protocol are refused: their
rewards are not comparable.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import statistics
import sys
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dspy_promptmii.console import write_stdout
from dspy_promptmii.files import check_writable, write_json, write_text
from training.rollouts import read_comparable_runs

logger = logging.getLogger("training.validation")

__all__ = ["ValidationRun", "Comparison", "NAIVE", "load_runs", "compare", "render", "main"]

#: The name of the naive instruction in comparisons.
NAIVE = "naive"
NAME = re.compile(r"[\w.+\- ]+")
#: Non-zero paired differences below which the Wilcoxon test cannot reach p < 0.05 (two-sided).
MIN_WILCOXON_PAIRS = 6
BOOTSTRAP_SEED = 0


@dataclass(frozen=True)
class ValidationRun:
    """One generator's validation run: ``rewards`` and ``naive`` map a context's sha256 to the
    greedy instruction's and the naive instruction's reward (macro-F1 in [0, 1])."""

    name: str
    path: str
    generator: Mapping[str, Any]
    rewards: Mapping[str, float]
    naive: Mapping[str, float]
    tasks: Mapping[str, str]

    @property
    def mean_reward(self) -> float:
        return statistics.fmean(self.rewards.values())

    @property
    def mean_naive(self) -> float:
        return statistics.fmean(self.naive.values())


@dataclass(frozen=True)
class Comparison:
    """``a`` against ``b`` over the ``n`` contexts both finished: mean rewards, the mean
    difference (a - b) with its 95% bootstrap interval (None for one context), wins/ties/losses
    of ``a`` and the Wilcoxon p-value (None when every difference is zero)."""

    a: str
    b: str
    n: int
    mean_a: float
    mean_b: float
    mean_difference: float
    ci_low: float | None
    ci_high: float | None
    wins: int
    ties: int
    losses: int
    p_value: float | None


def _parse_named(text: str) -> tuple[str, Path]:
    """``NAME=FOLDER``, or a bare ``FOLDER`` (also one whose path holds ``=``) named by the folder
    above the run folder (``training/rft/round0/valid``: ``round0``)."""
    if not Path(text).exists():
        name, sep, path = text.partition("=")
        if sep:
            if not name or not path:
                raise argparse.ArgumentTypeError(f"expected NAME=FOLDER or FOLDER, got {text!r}")
            if not NAME.fullmatch(name):
                raise argparse.ArgumentTypeError(
                    f"run name {name!r}: use letters, digits, spaces and . _ + - (it goes into Markdown tables)")
            return name, Path(path)
    folder = Path(os.path.realpath(text))
    if folder.is_file():
        folder = folder.parent
    return folder.parent.name or str(folder), Path(text)


def load_runs(named: Sequence[tuple[str, str | Path]]) -> list[ValidationRun]:
    """Read validation runs, in the given order (the first is the baseline).

    Raises:
        FileNotFoundError: a folder is not a ``training.rollouts --out`` folder.
        ValueError: a name is given twice, a folder holds ``train`` rollouts or no finished
            context, or the runs used different followers or protocols.
    """
    runs: list[ValidationRun] = []
    names = [name for name, _ in named]
    for name in names:
        if names.count(name) > 1 or name == NAIVE:
            raise ValueError(f"run name {name!r} is {'reserved' if name == NAIVE else 'given twice'}: "
                             "name each run once (NAME=FOLDER)")
    read = read_comparable_runs([path for _, path in named], "valid",
                                "the validation curve compares training.rollouts --split valid runs")
    for name, (path, records, settings) in zip(names, read):
        config = settings["config"]
        if config.get("samples", 1) != 1 or config.get("temperature", 0.0) != 0:
            raise ValueError(f"{path} sampled {config.get('samples')} instruction(s) per context at temperature "
                             f"{config.get('temperature')}: the validation reward is one greedy instruction "
                             "(training.rollouts --split valid with its defaults)")
        if not records:
            raise ValueError(f"{path} has no finished validation context yet")
        rewards, naive, tasks = {}, {}, {}
        for record in records:
            key, reward, naive_reward, task = _context_fields(record, path)
            if key in rewards:
                raise ValueError(f"{path}: context {record.get('key')!r} repeats another's context_sha256")
            rewards[key], naive[key], tasks[key] = reward, naive_reward, task
        runs.append(ValidationRun(name, str(path), settings.get("generator") or {}, rewards, naive, tasks))
    return runs


def _reward(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"{what} is {value!r}, not a macro-F1 in [0, 1]")
    return float(value)


def _context_fields(record: Mapping[str, Any], path: str | Path) -> tuple[str, float, float, str]:
    """(context sha256, greedy reward, naive reward, task) of one finished record; ValueError
    naming the run and context when the record is not a validation record."""
    where = f"{path}: context {record.get('key')!r}"
    samples, naive = record.get("samples"), record.get("naive")
    if not isinstance(samples, list) or len(samples) != 1 or not isinstance(samples[0], dict):
        raise ValueError(f"{where}: a validation record has one (greedy) sample, got {samples!r:.80}")
    if not isinstance(naive, dict):
        raise ValueError(f"{where}: no naive reward")
    key, task = record.get("context_sha256"), record.get("task")
    if not isinstance(key, str) or not key or not isinstance(task, str):
        raise ValueError(f"{where}: no context_sha256 or task")
    return (key, _reward(samples[0].get("reward"), f"{where}: the sample's reward"),
            _reward(naive.get("reward"), f"{where}: the naive reward"), task)


def _interval(differences: Sequence[float]) -> tuple[float | None, float | None]:
    if len(differences) < 2:  # nothing to resample
        return None, None
    if len(set(differences)) == 1:  # no spread: every resample has the same mean
        return differences[0], differences[0]
    import numpy as np
    from scipy.stats import bootstrap

    result = bootstrap((np.asarray(differences),), np.mean, confidence_level=0.95,
                       rng=np.random.default_rng(BOOTSTRAP_SEED))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def compare(a: ValidationRun, b: ValidationRun | None) -> Comparison:
    """``a``'s rewards against ``b``'s (``None``: against the naive instruction's, read from
    ``a``), over the contexts both finished.

    Raises:
        ValueError: the runs share no context (they were drawn with other settings).
    """
    other = a.naive if b is None else b.rewards
    keys = sorted(set(a.rewards) & set(other))
    if not keys:
        raise ValueError(f"{a.name} and {b.name if b else NAIVE} share no validation context: draw them from the "
                         "same datasets with the same --split-seed, --valid-fraction/--valid-tasks, --valid-shots, "
                         "--repeats and --m")
    x = [a.rewards[k] for k in keys]
    y = [other[k] for k in keys]
    differences = [xi - yi for xi, yi in zip(x, y)]
    p_value = None
    if any(differences):
        from scipy.stats import wilcoxon

        p_value = float(wilcoxon(x, y).pvalue)
    low, high = _interval(differences)
    return Comparison(
        a=a.name, b=b.name if b else NAIVE, n=len(keys), mean_a=statistics.fmean(x), mean_b=statistics.fmean(y),
        mean_difference=statistics.fmean(differences), ci_low=low, ci_high=high,
        wins=sum(d > 0 for d in differences), ties=sum(d == 0 for d in differences),
        losses=sum(d < 0 for d in differences), p_value=p_value,
    )


def naive_disagreements(runs: Sequence[ValidationRun]) -> dict[str, float]:
    """Context sha256 -> the largest |difference| between a run's naive reward and the first
    run's on that context, where one differs: the rows or the follower's scoring differed."""
    first, found = runs[0].naive, {}
    for run in runs[1:]:
        for key, value in run.naive.items():
            if key in first and abs(value - first[key]) > 1e-6:
                found[key] = max(found.get(key, 0.0), abs(value - first[key]))
    return found


def _p(value: float | None) -> str:
    return "n/a" if value is None else "<0.001" if value < 0.001 else f"{value:.3f}"


def _d(value: float | None) -> str:
    return "n/a" if value is None else f"{round(value, 3) + 0.0:+.3f}"  # + 0.0: no "-0.000"


def report(runs: Sequence[ValidationRun]) -> dict[str, Any]:
    """The figures of :func:`render`, unrounded: the runs, each comparison, and the mean reward
    per held-out task over the contexts every run finished (paired), naive included."""
    comparisons = [compare(run, runs[0]) for run in runs[1:]] + [compare(run, None) for run in runs]
    common = sorted(set.intersection(*(set(run.rewards) for run in runs)))
    by_task: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for key in common:
        task = runs[0].tasks[key]
        for run in runs:
            by_task[task][run.name].append(run.rewards[key])
        by_task[task][NAIVE].append(runs[0].naive[key])
    return {
        "runs": [{"name": r.name, "path": r.path, "generator": dict(r.generator), "contexts": len(r.rewards),
                  "mean_reward": r.mean_reward, "mean_naive_reward": r.mean_naive} for r in runs],
        "comparisons": [asdict(c) for c in comparisons],
        "common_contexts": len(common),
        "by_task": {task: {name: statistics.fmean(v) for name, v in cols.items()}
                    for task, cols in sorted(by_task.items())},
        "naive_disagreements": len(naive_disagreements(runs)),
    }


def render(runs: Sequence[ValidationRun], data: Mapping[str, Any] | None = None) -> str:
    """A Markdown report of :func:`report`'s figures: each run's validation reward, the paired
    comparisons and a per-task table."""
    data = data or report(runs)
    lines = ["# Validation reward", "",
             "One greedy instruction per held-out context; its reward is the follower's macro-F1 on the "
             "context's held-out rows.", "",
             "| run | generator adapter | contexts | validation reward | naive (same rows) |",
             "|---|---|---:|---:|---:|"]
    for r in data["runs"]:
        adapter = (r["generator"].get("adapter_sha256") or "none (base)")[:12]
        lines.append(f"| {r['name']} | {adapter} | {r['contexts']} | {r['mean_reward']:.3f} | "
                     f"{r['mean_naive_reward']:.3f} |")
    lines += ["", "Paired over the contexts both finished: mean difference (a - b) with its 95% bootstrap "
              "interval (BCa; n/a for one context), wins/ties/losses of a, two-sided Wilcoxon signed-rank p "
              f"(below {MIN_WILCOXON_PAIRS} non-zero differences it cannot reach 0.05).", "",
              "| a | b | contexts | mean a | mean b | difference | 95% interval | W/T/L | Wilcoxon p |",
              "|---|---|---:|---:|---:|---:|---|---|---:|"]
    for c in data["comparisons"]:
        interval = "n/a" if c["ci_low"] is None else f"[{_d(c['ci_low'])}, {_d(c['ci_high'])}]"
        lines.append(f"| {c['a']} | {c['b']} | {c['n']} | {c['mean_a']:.3f} | {c['mean_b']:.3f} | "
                     f"{_d(c['mean_difference'])} | {interval} | {c['wins']}/{c['ties']}/{c['losses']} | "
                     f"{_p(c['p_value'])} |")
    names = [r["name"] for r in data["runs"]] + [NAIVE]
    lines += ["", f"Mean reward per held-out task, over the {data['common_contexts']} contexts every run finished:",
              "", "| task | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for task, cols in data["by_task"].items():
        lines.append(f"| {task} | " + " | ".join(f"{cols[n]:.3f}" for n in names) + " |")
    if data["naive_disagreements"]:
        lines += ["", f"Warning: on {data['naive_disagreements']} context(s) a run's naive reward differs from "
                  f"{runs[0].name}'s: the rows or the follower's scoring differed."]
    return "\n".join(lines) + "\n"


def _check_out(out: Path, runs: Sequence[tuple[str, Path]]) -> None:
    if out.suffix != ".md":
        raise ValueError(f"--out names the Markdown report (a .md file; its figures go beside it as .json), got {out}")
    folders = {Path(os.path.realpath(p if Path(p).is_dir() else Path(p).parent)) for _, p in runs}
    for target in (out, out.with_suffix(".json")):
        if Path(os.path.realpath(target)).parent in folders:
            raise ValueError(f"cannot write {target}: it is inside a run folder given as input, which is never "
                             "written; give a file elsewhere")
        check_writable(target)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.validation", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=_parse_named, metavar="NAME=FOLDER",
                   help="training.rollouts --split valid folders, the baseline (round 0) first; a bare FOLDER is named "
                   "by its parent folder (training/rft/round0/valid: round0)")
    p.add_argument("--out", type=Path, default=None,
                   help="also write the report to this .md file and its figures beside it (.json)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.out is not None:
            _check_out(args.out, args.runs)
        runs = load_runs(args.runs)
        data = report(runs)
        text = render(runs, data)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from None
    if args.out is not None:
        write_text(text, args.out)
        write_json(data, args.out.with_suffix(".json"))
        logger.info("wrote %s and %s", args.out, args.out.with_suffix(".json"))
    return 0 if write_stdout(text) else 1


if __name__ == "__main__":
    sys.exit(main())
