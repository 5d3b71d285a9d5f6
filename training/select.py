"""``python -m training.select``: SFT pairs from scored rollouts (the rejection step of
rejection-sampling fine-tuning / expert iteration).

Per context (one line of ``python -m training.rollouts``; lines of several rollout folders
with the same context are merged, so samples of another generator, e.g. the 1.5B model,
join as off-policy data and the reward decides), the candidates are the k samples and
the naive instruction, and the target is the best of them by reward: GRPO's advantage
against the naive baseline, with weight 0 or 1; what ``PromptMIIOptimizer(candidates=k)``
with the naive reference keeps at compile time.

* **A sample is the target** when it beats the naive instruction by at least ``--margin``
  (default :data:`DEFAULT_MARGIN` = 0.05 macro-F1). Why 0.05: the reward is a macro-F1 on
  m=20 held-out rows; one more row labelled right moves it by about 0.05 on a balanced
  binary task (1/20 of accuracy) and less on tasks with more labels. A smaller win is
  within what one row, or the follower's constrained decoding flipping on a borderline
  input, gives either way; teaching it would fit the noise of 20 rows, not a better
  instruction. Ties go to the shorter instruction, then the earlier sample.
* **Where the naive instruction wins** by at least the margin (the generator's best
  instruction made the follower worse, as Prompt-MII-Zero does on snli: 0.155 against
  0.377), ``--naive-target keep`` (default) makes the naive text the target: it teaches the
  generator to stay plain where its instructions hurt. ``--naive-target drop`` drops those
  contexts. Naive targets are capped at ``--max-naive-share`` of the kept pairs (default
  :data:`DEFAULT_MAX_NAIVE_SHARE` = 0.25; those with the largest naive lead are kept):
  on a set dominated by one sentence the generator learns to write only it, and the
  trained generator then scores the naive baseline, never above it. Read the report's
  "naive won" counts per task to decide.
* Contexts where neither wins by the margin are dropped (no clear signal). Samples whose
  follower calls failed, or that cleaned to nothing, are never targets; nor are samples that
  repeat ``--quote-chars`` (default :data:`DEFAULT_QUOTE_CHARS` = 30) characters of a shown
  input in a row: the meta-prompt asks for general rules, not rules about the shown texts,
  and a generator trained on such targets learns to quote (round 1 did: on opaque labels it
  gave shown inputs as the labels' definitions). Compile's cleaning drops lines made of a
  shown input; a quote inside a sentence of the instruction stays, so it is checked here.

Output (``--out``): ``pairs.jsonl`` (``{"prompt": <the meta-prompt exactly as compile
sends it>, "target": <the instruction text>, "task", "n_shot", "key", "source":
"sample"|"naive", "reward", "naive_reward", "advantage", ...}``), ``selection.json`` and
``selection.txt`` (kept fraction, mean advantage, how often any sample beat naive, per-task
and per-n counts).

Example::

    python -m training.select --rollouts runs/rft/round1/rollouts --out runs/rft/round1/select
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import sys
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dspy_promptmii.console import write_stdout
from dspy_promptmii.files import check_writable, read_json, write_json, write_jsonl, write_text
from dspy_promptmii.protocol import NAIVE_INSTRUCTION
from training.rollouts import read_comparable_runs
from training.runlog import JsonlLog, digest

logger = logging.getLogger("training.select")

__all__ = [
    "DEFAULT_MARGIN",
    "DEFAULT_MAX_NAIVE_SHARE",
    "DEFAULT_QUOTE_CHARS",
    "NAIVE_TARGETS",
    "SelectionConfig",
    "Decision",
    "load_rollouts",
    "decide",
    "select",
    "report_text",
    "main",
]

#: A sample must beat the naive instruction by this much macro-F1 to become a target
#: (about one more of the m=20 held-out rows right; see the module docstring).
DEFAULT_MARGIN = 0.05
#: A sample repeating this many characters of a shown input in a row is never a target.
DEFAULT_QUOTE_CHARS = 30
#: Most naive targets as a share of the kept pairs (see the module docstring).
DEFAULT_MAX_NAIVE_SHARE = 0.25
NAIVE_TARGETS = ("keep", "drop")
_EPS = 1e-9


@dataclass(frozen=True)
class SelectionConfig:
    """How targets are chosen (recorded in the report).

    Raises:
        ValueError: a margin outside [0, 1], an unknown ``naive_target``, or a
            ``max_naive_share`` outside [0, 1], or a negative ``quote_chars``.
    """

    margin: float = DEFAULT_MARGIN
    naive_target: str = "keep"
    max_naive_share: float = DEFAULT_MAX_NAIVE_SHARE
    quote_chars: int = DEFAULT_QUOTE_CHARS  # 0: no quote check

    def __post_init__(self) -> None:
        if not (isinstance(self.margin, (int, float)) and math.isfinite(self.margin) and 0 <= self.margin <= 1):
            raise ValueError(f"margin must be in [0, 1] (macro-F1), got {self.margin!r}")
        if self.naive_target not in NAIVE_TARGETS:
            raise ValueError(f"naive_target must be one of {NAIVE_TARGETS}, got {self.naive_target!r}")
        if not 0 <= self.max_naive_share <= 1:
            raise ValueError(f"max_naive_share must be in [0, 1], got {self.max_naive_share!r}")
        if not isinstance(self.quote_chars, int) or isinstance(self.quote_chars, bool) or self.quote_chars < 0:
            raise ValueError(f"quote_chars must be a whole number >= 0 (0: off), got {self.quote_chars!r}")


@dataclass
class Decision:
    """What one context gives: ``kind`` is ``sample``, ``naive`` or ``drop`` (with ``reason``)."""

    context: dict[str, Any]
    kind: str
    reason: str
    best: dict[str, Any] | None
    advantage: float  # best scored sample's reward (0 without one) - naive reward, quoting samples included
    confirmation: dict[str, Any] | None = None  # the training.confirm record of its target (kept or not)

    @property
    def target(self) -> str:
        if self.kind == "sample":
            return str(self.best["instruction"])
        if self.kind == "naive":
            return NAIVE_INSTRUCTION
        raise ValueError("a dropped context has no target")


@dataclass
class Loaded:
    """Merged contexts (by content) and what each input held."""

    contexts: list[dict[str, Any]]
    inputs: list[dict[str, Any]] = field(default_factory=list)
    settings: list[dict[str, Any]] = field(default_factory=list)  # each folder's manifest settings


def load_rollouts(paths: Sequence[str | Path]) -> Loaded:
    """Finished ``train`` contexts of one or more rollout folders, merged by content: the
    samples of every folder (each tagged with its folder's generator), the naive reward of
    the first.

    Raises:
        FileNotFoundError: a path is not a rollout folder.
        ValueError: a folder holds ``valid`` rollouts (held-out tasks are never training
            data), or the folders used different followers or protocols (their rewards are
            not comparable).
    """
    merged: dict[str, dict[str, Any]] = {}
    inputs = []
    all_settings = []
    runs = read_comparable_runs(paths, "train", "held-out validation contexts are never SFT data",
                                "; select them separately")
    for path, records, settings in runs:
        generator = settings.get("generator")
        all_settings.append(settings)
        inputs.append({"path": str(path), "contexts": len(records), "generator": generator,
                       "settings_sha256": digest(settings)})
        for record in records:
            samples = [{**s, "generator": generator} for s in record["samples"]]
            key = record["context_sha256"]
            if key in merged:
                merged[key]["samples"].extend(samples)
            else:
                merged[key] = {**record, "samples": samples}
    contexts = sorted(merged.values(), key=lambda r: r["key"])
    return Loaded(contexts, inputs, all_settings)


def _wins(lead: float, margin: float) -> bool:
    """A strictly positive lead of at least ``margin``."""
    return lead > _EPS and lead >= margin - _EPS


def _squeezed(text: str) -> str:
    return " ".join(text.split()).casefold()


def _wide(text: str) -> bool:
    """Mostly East Asian wide characters (Chinese, Japanese, Korean): about a word each."""
    letters = [c for c in text if not c.isspace()]
    return bool(letters) and sum(unicodedata.east_asian_width(c) in "WF" for c in letters) * 2 >= len(letters)


def quoted_input(instruction: str, inputs: Sequence[str], chars: int = DEFAULT_QUOTE_CHARS) -> str | None:
    """The first run of one of ``inputs`` that ``instruction`` repeats (ignoring case and runs
    of white space), or None (also when ``chars`` is 0).

    A run is ``chars`` characters, a third of that in wide scripts (a Chinese character is
    about a word); a shown input shorter than a run counts when repeated whole and at least
    half a run long (shorter ones are phrases anyone may write)."""
    if chars <= 0:
        return None
    text = _squeezed(instruction)
    for raw in inputs:
        shown = _squeezed(raw)
        run = -(-chars // 3) if _wide(shown) else chars
        if len(shown) * 2 < run:
            continue
        need = min(run, len(shown))
        for start in range(len(shown) - need + 1):
            if shown[start:start + need] in text:
                return shown[start:start + need]
    return None


def _shown_inputs(context: Mapping[str, Any]) -> list[str]:
    """Every input field value of the context's shown examples."""
    return [str(value) for row in (context.get("label") or {}).get("context_inputs") or () for value in row]


def decide(context: Mapping[str, Any], config: SelectionConfig) -> Decision:
    """The target of one context before the naive cap (see the module docstring).

    A sample target is the best sample that does not quote a shown input; a naive target
    needs naive to beat every scored sample, quoting ones included (their rewards still say
    whether an instruction helps; they only may not be taught). ``Decision.best`` is the
    target (sample targets) or the best scored sample (otherwise; None without one), and
    ``Decision.advantage`` the best scored sample's reward minus naive's."""
    shown = _shown_inputs(context)
    scored = [s for s in context["samples"] if not s.get("follower_error") and s.get("instruction", "").strip()]
    eligible = [s for s in scored if quoted_input(s["instruction"], shown, config.quote_chars) is None]
    naive = float(context["naive"]["reward"])

    def best_of(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
        found = max(samples, key=lambda s: (s["reward"], -len(s["instruction"]), -s["index"]), default=None)
        return dict(found) if found is not None else None

    best, best_eligible = best_of(scored), best_of(eligible)
    # Without a usable sample the best reward is what the reward gave them: 0.
    advantage = (float(best["reward"]) if best is not None else 0.0) - naive
    ctx = dict(context)
    if best_eligible is not None and _wins(float(best_eligible["reward"]) - naive, config.margin):
        return Decision(ctx, "sample", "a sample beat naive by the margin", best_eligible, advantage)
    if _wins(advantage, config.margin):
        return Decision(ctx, "drop", "only samples quoting a shown input beat naive by the margin", best, advantage)
    if _wins(-advantage, config.margin):
        if config.naive_target == "keep":
            return Decision(ctx, "naive", "naive beat every sample by the margin", best, advantage)
        return Decision(ctx, "drop", "naive won (--naive-target drop)", best, advantage)
    return Decision(ctx, "drop", "within the margin", best, advantage)


def load_confirmations(paths: Sequence[str | Path], config: SelectionConfig) -> dict[str, dict[str, Any]]:
    """The finished records of ``training.confirm`` folders, by context sha256 (the last wins).

    Raises:
        FileNotFoundError: a path holds no ``confirm.jsonl`` and ``manifest.json``.
        ValueError: a folder was made with another margin or quote check than ``config``
            (it confirmed the targets of another selection).
    """
    found: dict[str, dict[str, Any]] = {}
    for raw in paths:
        folder = Path(raw)
        file, manifest = folder / "confirm.jsonl", folder / "manifest.json"
        if not file.is_file() or not manifest.is_file():
            raise FileNotFoundError(f"no confirm.jsonl and manifest.json in {raw}: pass a training.confirm --out")
        data = read_json(manifest)
        settings = data.get("settings", {}) if isinstance(data, dict) else {}
        for key, ours in (("margin", config.margin), ("quote_chars", config.quote_chars)):
            if key in settings and settings[key] != ours:
                option = "--" + key.replace("_", "-")
                raise ValueError(f"{raw} confirmed the targets of {option} {settings[key]}, this selection uses "
                                 f"{option} {ours}: run training.confirm with the same options")
        sha = data.get("settings_sha256") or digest(settings)
        for record in JsonlLog(file).read():
            if record.get("status") == "ok" and record.get("settings_sha256") == sha:
                found[str(record["context_sha256"])] = record
    return found


def apply_confirmation(decisions: Sequence[Decision], confirmations: Mapping[str, Mapping[str, Any]]) -> None:
    """Keep a target only where ``training.confirm``'s fresh rows agree with the ranking rows:
    a sample target must beat naive again, a naive target must beat the best sample again
    (a strictly positive lead; the fresh rows are an unbiased estimate, the ranking rows chose
    the winner). Other kept decisions become drops naming why (in place); a decision whose
    target was scored gets its record (``Decision.confirmation``), confirmed or not."""
    from training.confirm import instruction_sha256

    for decision in decisions:
        if decision.kind == "drop":
            continue
        record = confirmations.get(str(decision.context["context_sha256"]))
        if record is None:
            decision.kind, decision.reason = "drop", "no confirmation on fresh rows"
            continue
        if (
            decision.best is None
            or record.get("kind") != decision.kind
            or record.get("instruction_sha256") != instruction_sha256(str(decision.best["instruction"]))
        ):
            decision.kind, decision.reason = "drop", "its confirmation scored another target"
            continue
        decision.confirmation = dict(record)
        sign = 1 if decision.kind == "sample" else -1
        if sign * float(record["fresh_advantage"]) <= _EPS:
            decision.kind, decision.reason = "drop", "not confirmed on fresh rows"
    missing = sum(d.reason == "no confirmation on fresh rows" for d in decisions)
    if missing:
        logger.warning("%d kept targets have no confirmation record (an unfinished training.confirm run, or "
                       "rollouts added since?); they are dropped", missing)


def select(
    contexts: Sequence[Mapping[str, Any]],
    config: SelectionConfig,
    confirmations: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[Decision]:
    """Decisions for every context (with ``confirmations``, only targets the fresh rows
    confirm: :func:`apply_confirmation`), with naive targets capped at ``max_naive_share``
    of the kept pairs (those where naive leads most are kept; ties by context key)."""
    decisions = [decide(c, config) for c in contexts]
    if confirmations is not None:
        apply_confirmation(decisions, confirmations)
    samples = sum(d.kind == "sample" for d in decisions)
    naive = sorted((d for d in decisions if d.kind == "naive"), key=lambda d: (d.advantage, d.context["key"]))
    share = config.max_naive_share
    allowed = len(naive) if share >= 1 else math.floor(share / (1 - share) * samples + _EPS)
    for decision in naive[allowed:]:
        decision.kind, decision.reason = "drop", "naive target over --max-naive-share"
    return decisions


def pair(decision: Decision) -> dict[str, Any]:
    """The SFT pair of a kept decision."""
    context = decision.context
    naive = float(context["naive"]["reward"])
    reward = float(decision.best["reward"]) if decision.kind == "sample" else naive
    return {
        "prompt": context["meta_prompt"],
        "target": decision.target,
        "task": context["task"],
        "n_shot": context["n_shot"],
        "key": context["key"],
        "context_sha256": context["context_sha256"],
        "source": decision.kind,
        "reward": reward,
        "naive_reward": naive,
        "advantage": round(reward - naive, 6) if decision.kind == "sample" else round(-decision.advantage, 6),
        "sample": (
            {k: decision.best.get(k) for k in ("index", "seed", "temperature", "generator")}
            if decision.kind == "sample"
            else None
        ),
        "protocol": context.get("protocol"),
        "fresh_advantage": decision.confirmation["fresh_advantage"] if decision.confirmation else None,
    }


def report(decisions: Sequence[Decision], config: SelectionConfig, inputs: Sequence[Mapping[str, Any]]) -> dict:
    """Counts and rewards of a selection (see the module docstring)."""

    def block(group: Sequence[Decision]) -> dict[str, Any]:
        n = len(group)
        kinds = Counter(d.kind for d in group)
        naive = [float(d.context["naive"]["reward"]) for d in group]
        # The best scored sample (quoting ones included), as ``advantage`` counts it.
        best = [float(d.context["naive"]["reward"]) + d.advantage if d.best else None for d in group]
        advantages = [d.advantage for d in group]
        kept_adv = [float(d.best["reward"]) - float(d.context["naive"]["reward"]) for d in group if d.kind == "sample"]
        return {
            "contexts": n,
            "kept": kinds["sample"] + kinds["naive"],
            "kept_fraction": round((kinds["sample"] + kinds["naive"]) / n, 4) if n else None,
            "sample_targets": kinds["sample"],
            "naive_targets": kinds["naive"],
            "dropped": kinds["drop"],
            "mean_naive_reward": round(statistics.fmean(naive), 4) if n else None,
            "mean_best_reward": round(statistics.fmean(b for b in best if b is not None), 4)
            if any(b is not None for b in best) else None,
            "mean_advantage": round(statistics.fmean(advantages), 4) if advantages else None,
            "mean_advantage_of_sample_targets": round(statistics.fmean(kept_adv), 4) if kept_adv else None,
            "any_sample_beat_naive": round(sum(a > _EPS for a in advantages) / n, 4) if n else None,
            "sample_beat_naive_by_margin": round(sum(_wins(a, config.margin) for a in advantages) / n, 4)
            if n else None,
            "naive_won_by_margin": round(sum(_wins(-a, config.margin) for a in advantages) / n, 4) if n else None,
        }

    by_task: dict[str, list[Decision]] = defaultdict(list)
    by_n: dict[int, list[Decision]] = defaultdict(list)
    for d in decisions:
        by_task[str(d.context["task"])].append(d)
        by_n[int(d.context["n_shot"])].append(d)
    samples = [s for d in decisions for s in d.context["samples"]]
    return {
        "config": asdict(config),
        "inputs": list(inputs),
        **block(decisions),
        "samples": len(samples),
        "mean_sample_reward": round(statistics.fmean(s["reward"] for s in samples), 4) if samples else None,
        "unusable_samples": sum(bool(s.get("follower_error")) or not s.get("instruction", "").strip()
                                for s in samples),
        "quoting_samples": sum(quoted_input(s.get("instruction", ""), _shown_inputs(d.context), config.quote_chars)
                               is not None for d in decisions for s in d.context["samples"]),
        "dropped_by_reason": dict(Counter(d.reason for d in decisions if d.kind == "drop")),
        "by_n_shot": {str(n): block(by_n[n]) for n in sorted(by_n)},
        "by_task": {t: block(by_task[t]) for t in sorted(by_task)},
    }


def _confirmation_lines(confirmation: Mapping[str, Any] | None) -> list[str]:
    if not confirmation:
        return []
    lines = [f"Confirmation on fresh rows ({', '.join(confirmation['folders'])}): {confirmation['contexts']} targets "
             f"scored; {confirmation['kept_without_record']} kept targets without a record (dropped)"]
    for kind in ("sample", "naive"):
        b = confirmation[kind]
        if b["contexts"]:
            lines.append(f"  {kind} targets: {b['confirmed']} of {b['contexts']} confirmed; mean advantage "
                         f"{b['mean_ranking_advantage']:.3f} on the ranking rows, {b['mean_fresh_advantage']:.3f} "
                         "on fresh rows")
    return lines


def report_text(summary: Mapping[str, Any]) -> str:
    """The report as readable text."""
    c = summary["config"]

    def f(value: Any) -> str:
        return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = [
        f"Selection: margin {c['margin']}, naive target {c['naive_target']}, max naive share {c['max_naive_share']}, "
        f"quote chars {c.get('quote_chars', 0)}",
        "Inputs: " + "; ".join(f"{i['path']} ({i['contexts']} contexts)" for i in summary["inputs"]),
        f"Contexts {summary['contexts']}, samples {summary['samples']} ({summary['unusable_samples']} unusable, "
        f"{summary.get('quoting_samples', 0)} quoting a shown input), "
        f"mean sample reward {f(summary['mean_sample_reward'])}",
        f"Kept {summary['kept']} ({f(summary['kept_fraction'])}): {summary['sample_targets']} sample targets, "
        f"{summary['naive_targets']} naive targets; dropped {summary['dropped']} {summary['dropped_by_reason']}",
        f"Mean naive {f(summary['mean_naive_reward'])}, mean best-of-k {f(summary['mean_best_reward'])}, "
        f"mean advantage (best - naive) {f(summary['mean_advantage'])} "
        f"(of sample targets {f(summary['mean_advantage_of_sample_targets'])})",
        f"Any sample beat naive in {f(summary['any_sample_beat_naive'])} of contexts, by the margin in "
        f"{f(summary['sample_beat_naive_by_margin'])}; naive beat every sample by the margin in "
        f"{f(summary['naive_won_by_margin'])}",
        *_confirmation_lines(summary.get("confirmation")),
        "",
        f"{'n':>4} {'contexts':>8} {'sample':>6} {'naive':>5} {'drop':>5} {'naive_F1':>8} {'best_F1':>7} {'adv':>6}",
    ]
    for n, b in summary["by_n_shot"].items():
        lines.append(f"{n:>4} {b['contexts']:>8} {b['sample_targets']:>6} {b['naive_targets']:>5} {b['dropped']:>5} "
                     f"{f(b['mean_naive_reward']):>8} {f(b['mean_best_reward']):>7} {f(b['mean_advantage']):>6}")
    width = max([len("task"), *(len(t) for t in summary["by_task"])])
    lines += ["", f"{'task':<{width}} {'contexts':>8} {'sample':>6} {'naive':>5} {'drop':>5} {'naive_F1':>8} "
              f"{'best_F1':>7} {'adv':>6} {'any_beat':>8}"]
    for task, b in summary["by_task"].items():
        lines.append(f"{task:<{width}} {b['contexts']:>8} {b['sample_targets']:>6} {b['naive_targets']:>5} "
                     f"{b['dropped']:>5} {f(b['mean_naive_reward']):>8} {f(b['mean_best_reward']):>7} "
                     f"{f(b['mean_advantage']):>6} {f(b['any_sample_beat_naive']):>8}")
    return "\n".join(lines) + "\n"


def parser() -> argparse.ArgumentParser:
    from dspy_promptmii.cli import non_negative_int

    p = argparse.ArgumentParser(prog="python -m training.select", description=__doc__.split("\n\n")[0])
    p.add_argument("--rollouts", nargs="+", type=Path, required=True,
                   help="training.rollouts --out folders (several: their samples of the same context are merged)")
    p.add_argument("--out", type=Path, required=True, help="folder for pairs.jsonl, selection.json, selection.txt")
    p.add_argument("--margin", type=float, default=DEFAULT_MARGIN,
                   help=f"macro-F1 by which a sample must beat naive to be a target ({DEFAULT_MARGIN})")
    p.add_argument("--naive-target", choices=NAIVE_TARGETS, default="keep",
                   help="where naive beats every sample by the margin: keep the naive text as the target "
                   "(default) or drop the context")
    p.add_argument("--max-naive-share", type=float, default=DEFAULT_MAX_NAIVE_SHARE,
                   help=f"most naive targets as a share of the kept pairs ({DEFAULT_MAX_NAIVE_SHARE}; 1: no cap)")
    p.add_argument("--quote-chars", type=non_negative_int, default=DEFAULT_QUOTE_CHARS,
                   help=f"a sample repeating this many characters of a shown input is never a target "
                   f"({DEFAULT_QUOTE_CHARS}; 0: no check)")
    p.add_argument("--confirm", nargs="+", type=Path, default=None,
                   help="training.confirm --out folders: keep only targets their fresh rows confirm")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = SelectionConfig(args.margin, args.naive_target, args.max_naive_share, args.quote_chars)
        check_writable(args.out, folder=True)
        loaded = load_rollouts(args.rollouts)
        confirmations = load_confirmations(args.confirm, config) if args.confirm else None
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from None
    if not loaded.contexts:
        raise SystemExit(f"error: no finished train contexts in {', '.join(map(str, args.rollouts))}")
    decisions = select(loaded.contexts, config, confirmations)
    pairs = [pair(d) for d in decisions if d.kind != "drop"]
    summary = report(decisions, config, loaded.inputs)
    if confirmations is not None:
        from training.confirm import summarize as summarize_confirmations

        summary["confirmation"] = {
            "folders": [str(p) for p in args.confirm],
            **summarize_confirmations([d.confirmation for d in decisions if d.confirmation]),
            "kept_without_record": sum(d.reason == "no confirmation on fresh rows" for d in decisions),
        }
    summary["pairs"] = len(pairs)
    summary["command"] = "python -m training.select " + " ".join(sys.argv[1:] if argv is None else argv)
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(pairs, args.out / "pairs.jsonl")
    write_json(summary, args.out / "selection.json")
    text = report_text(summary)
    write_text(text, args.out / "selection.txt")
    logger.info("wrote %d pairs to %s", len(pairs), args.out / "pairs.jsonl")
    return 0 if write_stdout(text) else 1


if __name__ == "__main__":
    sys.exit(main())
