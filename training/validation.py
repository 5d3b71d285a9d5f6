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
import statistics
import sys
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dspy_promptmii.files import check_writable, write_json, write_text
from training.rollouts import read_run

logger = logging.getLogger("training.validation")

__all__ = ["ValidationRun", "Comparison", "NAIVE", "load_runs", "compare", "render", "main"]

#: The name of the naive instruction in comparisons.
NAIVE = "naive"
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
    difference (a - b) with its 95% bootstrap interval, wins/ties/losses of ``a`` and the
    Wilcoxon p-value (None when every difference is zero)."""

    a: str
    b: str
    n: int
    mean_a: float
    mean_b: float
    mean_difference: float
    ci_low: float
    ci_high: float
    wins: int
    ties: int
    losses: int
    p_value: float | None


def _parse_named(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep:
        return Path(text).parent.name or text, Path(text)
    if not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=FOLDER or FOLDER, got {text!r}")
    return name, Path(path)


def load_runs(named: Sequence[tuple[str, str | Path]]) -> list[ValidationRun]:
    """Read validation runs, in the given order (the first is the baseline).

    Raises:
        FileNotFoundError: a folder is not a ``training.rollouts --out`` folder.
        ValueError: a name is given twice, a folder holds ``train`` rollouts or no finished
            context, or the runs used different followers or protocols.
    """
    runs: list[ValidationRun] = []
    reference: tuple[Any, Any, str] | None = None
    for name, path in named:
        if any(run.name == name for run in runs) or name == NAIVE:
            raise ValueError(f"run name {name!r} is {'reserved' if name == NAIVE else 'given twice'}: "
                             "name each run once (NAME=FOLDER)")
        records, settings = read_run(path)
        split = settings.get("config", {}).get("split", "train")
        if split != "valid":
            raise ValueError(f"{path} holds {split!r} rollouts: the validation curve compares "
                             "training.rollouts --split valid runs")
        scorer = (settings.get("follower"), settings.get("protocol"))
        if reference is None:
            reference = (*scorer, str(path))
        elif scorer != reference[:2]:
            raise ValueError(f"{path} was scored with another follower or protocol than {reference[2]}: "
                             "their rewards are not comparable")
        if not records:
            raise ValueError(f"{path} has no finished validation context yet")
        rewards, naive, tasks = {}, {}, {}
        for record in records:
            key = str(record["context_sha256"])
            rewards[key] = float(record["samples"][0]["reward"])  # greedy: one sample per context
            naive[key] = float(record["naive"]["reward"])
            tasks[key] = str(record["task"])
        runs.append(ValidationRun(name, str(path), settings.get("generator") or {}, rewards, naive, tasks))
    return runs


def _interval(differences: Sequence[float]) -> tuple[float, float]:
    if len(set(differences)) == 1:  # no spread: the bootstrap has nothing to resample
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
        raise ValueError(f"{a.name} and {b.name if b else NAIVE} share no validation context: "
                         "were they drawn with the same --split-seed, --m and --repeats?")
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


def naive_disagreements(runs: Sequence[ValidationRun]) -> list[tuple[str, str, float]]:
    """(run, context sha256, |difference|) where a run's naive reward differs from the first
    run's on the same context: the rows or the follower's scoring were not the same."""
    first = runs[0].naive
    return [(run.name, key, abs(value - first[key])) for run in runs[1:] for key, value in run.naive.items()
            if key in first and abs(value - first[key]) > 1e-6]


def _p(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def report(runs: Sequence[ValidationRun]) -> dict[str, Any]:
    """The figures of :func:`render` as a JSON-ready dict."""
    comparisons = [compare(run, runs[0]) for run in runs[1:]] + [compare(run, None) for run in runs]
    by_task: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        for key, reward in run.rewards.items():
            by_task[run.tasks[key]][run.name].append(reward)
    for key, reward in runs[0].naive.items():
        by_task[runs[0].tasks[key]][NAIVE].append(reward)
    return {
        "runs": [{"name": r.name, "path": r.path, "generator": dict(r.generator), "contexts": len(r.rewards),
                  "mean_reward": round(r.mean_reward, 4), "mean_naive_reward": round(r.mean_naive, 4)}
                 for r in runs],
        "comparisons": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(c).items()}
                        for c in comparisons],
        "by_task": {task: {name: round(statistics.fmean(v), 4) for name, v in cols.items()}
                    for task, cols in sorted(by_task.items())},
        "naive_disagreements": len(naive_disagreements(runs)),
    }


def render(runs: Sequence[ValidationRun]) -> str:
    """A Markdown report: each run's validation reward, the paired comparisons and a per-task
    table."""
    data = report(runs)
    lines = ["# Validation reward", "",
             "Greedy instruction per held-out context, the follower's macro-F1 on the context's held-out rows.",
             "", "| run | generator adapter | contexts | validation reward | naive (same rows) |",
             "|---|---|---:|---:|---:|"]
    for r in data["runs"]:
        adapter = (r["generator"].get("adapter_sha256") or "none (base)")[:12]
        lines.append(f"| {r['name']} | {adapter} | {r['contexts']} | {r['mean_reward']:.3f} | "
                     f"{r['mean_naive_reward']:.3f} |")
    lines += ["", "Paired over the contexts both finished: mean difference (a - b) with its 95% bootstrap "
              "interval (BCa), wins/ties/losses of a, two-sided Wilcoxon signed-rank p.", "",
              "| a | b | contexts | mean a | mean b | difference | 95% interval | W/T/L | Wilcoxon p |",
              "|---|---|---:|---:|---:|---:|---|---|---:|"]
    for c in data["comparisons"]:
        lines.append(f"| {c['a']} | {c['b']} | {c['n']} | {c['mean_a']:.3f} | {c['mean_b']:.3f} | "
                     f"{c['mean_difference']:+.3f} | [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}] | "
                     f"{c['wins']}/{c['ties']}/{c['losses']} | {_p(c['p_value'])} |")
    names = [r["name"] for r in data["runs"]] + [NAIVE]
    lines += ["", "Mean reward per held-out task:", "", "| task | " + " | ".join(names) + " |",
              "|---|" + "---:|" * len(names)]
    for task, cols in data["by_task"].items():
        lines.append(f"| {task} | " + " | ".join(f"{cols[n]:.3f}" if n in cols else "" for n in names) + " |")
    if data["naive_disagreements"]:
        lines += ["", f"Warning: on {data['naive_disagreements']} context(s) a run's naive reward differs from "
                  f"{runs[0].name}'s: the rows or the follower's scoring differed."]
    return "\n".join(lines) + "\n"


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
            if args.out.suffix != ".md":
                raise ValueError(f"--out names the Markdown report (a .md file; its figures go beside it as "
                                 f".json), got {args.out}")
            check_writable(args.out)
            check_writable(args.out.with_suffix(".json"))
        runs = load_runs(args.runs)
        text = render(runs)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from None
    sys.stdout.write(text)
    if args.out is not None:
        write_text(text, args.out)
        write_json(report(runs), args.out.with_suffix(".json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
