"""``python -m training.confirm``: score the chosen target and the naive instruction again on
fresh held-out rows (the winner's-curse check of rejection-sampling fine-tuning).

Why: :mod:`training.select` picks the best of k samples by a macro-F1 on the same m=20
rows that rank them. The maximum of k noisy scores overstates the winner (the winner's
curse), so part of "a sample beat naive by 0.05" is luck of those 20 rows, and training on
lucky targets teaches nothing. Here every context that :func:`training.select.decide` would
keep (a sample target or a naive target) is scored once more: the chosen sample and the
naive instruction, on ``--m`` rows of the same task drawn afresh (disjoint from the
context's shown and held-out rows and, as in :mod:`training.build_data`, from rows sharing
a text with a ``dev`` task), with the same follower and Protocol. The fresh rows are an
unbiased estimate of the target's advantage; ``python -m training.select --confirm DIR``
keeps a target only when the fresh rows agree (see :func:`training.select.apply_confirmation`).

Output folder (``--out``): ``confirm.jsonl`` (one line per context, appended as each
finishes; a restart skips the finished ones), ``manifest.json`` (settings: the rollout
folders' settings digests, m, margin, follower, protocol) and ``summary.json`` (how many
targets the fresh rows confirmed; the mean advantage on the ranking rows against the fresh
ones).

Record::

    {"version": 1, "key": "train|sst2|5|0", "context_sha256": "...", "kind": "sample",
     "instruction_sha256": "...", "rows": [3, 17, ...], "ranking_advantage": 0.15,
     "target": {"reward": 0.5, ...}, "naive": {"reward": 0.4, ...}, "fresh_advantage": 0.1}

``ranking_advantage`` and ``fresh_advantage`` are the chosen sample's reward minus the naive
reward (for a naive target, the best sample's; there ``target`` is the best sample).

Example::

    python -m training.confirm --rollouts training/rft/round1/rollouts --out training/rft/round1/confirm
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import random
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from dspy_promptmii.data import TaskData
from dspy_promptmii.files import check_writable, write_json
from dspy_promptmii.local.pull import sha256_file
from dspy_promptmii.protocol import NAIVE_INSTRUCTION
from training.contamination import eval_hashes, overlapping_rows
from training.follower import Follower, FollowerOutage, HeldOutSet, score_instruction
from training.grpo_label import GRPOLabel
from training.rollouts import ModelChoice, model_identity, open_endpoints
from training.runlog import JsonlLog, RunLocked, SettingsMismatch, check_settings, digest, folder_lock
from training.select import DEFAULT_MARGIN, DEFAULT_QUOTE_CHARS, SelectionConfig, decide, load_rollouts
from training.sources import default_datasets_dir, load_local_tasks, read_splits, resolve_task_paths

logger = logging.getLogger("training.confirm")

__all__ = ["CONFIRM", "RECORD_VERSION", "fresh_rows", "fresh_held_out", "confirm_context", "summarize", "main"]

CONFIRM = "confirm.jsonl"
MANIFEST = "manifest.json"
SUMMARY = "summary.json"
RECORD_VERSION = 1
#: Fewest fresh rows worth scoring: below this a task has too few rows left to say anything.
MIN_FRESH_ROWS = 10


def instruction_sha256(text: str) -> str:
    """What names a target's text in a confirmation record."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def fresh_rows(task: TaskData, label: GRPOLabel, m: int, excluded: set[int]) -> list[int]:
    """Up to ``m`` row ids of ``task`` that the context neither showed nor scored on and that
    are not in ``excluded`` (rows sharing a text with a dev task), drawn by a shuffle seeded
    with the context's seed (a rerun draws the same rows). Sorted.

    Raises:
        ValueError: a label without row ids (an older data builder's line), or fewer than
            :data:`MIN_FRESH_ROWS` such rows.
    """
    if not label.test_ids or label.context_seed is None or len(label.context_ids) != (label.n_shot or 0):
        raise ValueError(f"{task.name}: the context's label lacks its row ids or seed: rebuild it with build_data")
    used = set(label.context_ids) | set(label.test_ids) | excluded
    usable = [i for i in range(len(task.rows)) if i not in used]
    if len(usable) < MIN_FRESH_ROWS:
        raise ValueError(f"{task.name}: {len(usable)} fresh rows left, fewer than {MIN_FRESH_ROWS}")
    if len(usable) < m:
        logger.warning("%s: only %d fresh rows left; scoring those instead of %d", task.name, len(usable), m)
    random.Random(f"{label.context_seed}|confirm").shuffle(usable)
    return sorted(usable[:m])


def fresh_held_out(task: TaskData, label: GRPOLabel, rows: Sequence[int]) -> HeldOutSet:
    """The context's held-out set with its test rows replaced by ``rows`` of ``task`` (same
    labels, shown examples and Protocol)."""
    fields = label.input_fields
    return replace(
        label.held_out(),
        inputs=tuple(tuple(str(task.rows[i][f]) for f in fields) for i in rows),
        gold=tuple(str(task.rows[i]["label"]) for i in rows),
    )


async def confirm_context(
    context: Mapping[str, Any], kind: str, target: Mapping[str, Any], tests: HeldOutSet, rows: Sequence[int],
    follower: Follower,
) -> dict[str, Any]:
    """Score ``target`` (a sample of the context) and the naive instruction on ``tests``."""
    naive = await score_instruction(follower, NAIVE_INSTRUCTION, tests)
    scored = await score_instruction(follower, str(target["instruction"]), tests)
    failed = naive.follower_error is not None or scored.follower_error is not None
    return {
        "version": RECORD_VERSION,
        "status": "error" if failed else "ok",
        "key": context["key"],
        "context_sha256": context["context_sha256"],
        "task": context["task"],
        "kind": kind,
        "instruction_sha256": instruction_sha256(str(target["instruction"])),
        "sample_index": target.get("index"),
        "rows": list(rows),
        "ranking_advantage": round(float(target["reward"]) - float(context["naive"]["reward"]), 6),
        "target": scored.record(),
        "naive": naive.record(),
        "fresh_advantage": round(float(scored.reward) - float(naive.reward), 6),
    }


def summarize(records: Sequence[Mapping[str, Any]], skipped: int | None = None) -> dict[str, Any]:
    """How many targets the fresh rows confirmed (a sample target: it beat naive again; a
    naive target: naive beat the best sample again), by kind, and the mean advantage on the
    ranking rows against the fresh rows; ``skipped``: targets that could not be scored."""
    out: dict[str, Any] = {"contexts": len(records), **({"skipped": skipped} if skipped is not None else {})}
    for kind, sign in (("sample", 1), ("naive", -1)):
        group = [r for r in records if r["kind"] == kind]
        confirmed = [r for r in group if sign * r["fresh_advantage"] > 0]
        out[kind] = {
            "contexts": len(group),
            "confirmed": len(confirmed),
            "mean_ranking_advantage": round(statistics.fmean(r["ranking_advantage"] for r in group), 4)
            if group else None,
            "mean_fresh_advantage": round(statistics.fmean(r["fresh_advantage"] for r in group), 4)
            if group else None,
        }
    return out


def score_all(
    todo: Sequence[tuple[Mapping[str, Any], str, Mapping[str, Any], HeldOutSet, list[int]]],
    follower: ModelChoice,
    args: argparse.Namespace,
    log: JsonlLog,
    settings_sha256: str,
) -> None:
    """Score every (context, kind, target, fresh rows) of ``todo`` with one follower server,
    appending a record as each finishes."""
    with open_endpoints(follower, follower, n_ctx=args.n_ctx, n_threads=args.n_threads, follower_concurrency=1,
                        follower_timeout=args.follower_timeout) as endpoints:

        async def run() -> None:
            try:
                for context, kind, target, tests, rows in tqdm(todo, desc="confirm", unit="context",
                                                               disable=args.no_progress):
                    record = await confirm_context(context, kind, target, tests, rows, endpoints.follower)
                    record["settings_sha256"] = settings_sha256
                    log.append(record)
            finally:
                await endpoints.follower.aclose()

        asyncio.run(run())


def parser() -> argparse.ArgumentParser:
    from dspy_promptmii.cli import context_size, non_negative_int, positive_float, positive_int
    from dspy_promptmii.params import Integer

    p = argparse.ArgumentParser(prog="python -m training.confirm", description=__doc__.split("\n\n")[0])
    p.add_argument("--rollouts", nargs="+", type=Path, required=True, help="training.rollouts --out folders")
    p.add_argument("--out", type=Path, required=True, help="folder for confirm.jsonl, manifest.json, summary.json")
    p.add_argument("--datasets", type=Path, default=None,
                   help="the rollouts' task folders (default: $PROMPTMII_SHARED_DATASETS or ../shared/datasets)")
    p.add_argument("--m", type=Integer(low=MIN_FRESH_ROWS).argparse_type("fresh_rows"), default=20,
                   help=f"fresh rows scored per context (20; at least {MIN_FRESH_ROWS})")
    p.add_argument("--margin", type=float, default=DEFAULT_MARGIN,
                   help=f"the selection margin: which contexts have a target to confirm ({DEFAULT_MARGIN})")
    p.add_argument("--quote-chars", type=non_negative_int, default=DEFAULT_QUOTE_CHARS,
                   help=f"the selection's quote check, as training.select's ({DEFAULT_QUOTE_CHARS})")
    p.add_argument("--follower", default="local", help="the rollouts' follower: local, a registry model or a .gguf")
    p.add_argument("--n-ctx", type=context_size, default=8192, help="context size of the local server (8192)")
    p.add_argument("--n-threads", type=positive_int, default=None, help="threads of the local server (all)")
    p.add_argument("--follower-timeout", type=positive_float, default=300.0, help="seconds per follower request (300)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("LiteLLM", "litellm", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    datasets = (args.datasets or default_datasets_dir()).expanduser().resolve()
    try:
        config = SelectionConfig(margin=args.margin, quote_chars=args.quote_chars)
        check_writable(args.out, folder=True)
        loaded = load_rollouts(args.rollouts)
        splits = read_splits(datasets) if datasets.is_dir() else None
        if not splits:
            raise ValueError(f"no SPLITS.json in {datasets}: pass --datasets DIR")
        follower = ModelChoice(model=args.follower)
        identity = model_identity(follower)
    except (ValueError, FileNotFoundError, KeyError) as error:
        raise SystemExit(f"error: {error}") from None
    first = loaded.settings[0]
    rollout_follower = first.get("follower")
    if rollout_follower != identity:
        raise SystemExit(f"error: --follower {args.follower} is not the follower that scored the rollouts "
                         f"({rollout_follower}); fresh rewards would not be comparable")
    kept = [(c, d) for c in loaded.contexts if (d := decide(c, config)).kind != "drop"]
    if not kept:
        raise SystemExit("error: no context has a target to confirm (see python -m training.select)")

    tasks_needed = sorted({c["task"] for c, _ in kept})
    dev_names = sorted(splits.get("dev") or [])
    try:
        tasks = {t.name: t for t, _ in load_local_tasks(resolve_task_paths(tasks_needed, datasets))}
        dev = [t for t, _ in load_local_tasks(resolve_task_paths(dev_names, datasets))]
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from None
    data = first.get("data", {})
    recorded = data.get("tasks", {})
    for name in [*tasks_needed, *dev_names]:  # dev tasks decide which rows are left out
        path = datasets / name / "data.jsonl"
        if recorded.get(name) and path.is_file() and sha256_file(path) != recorded[name]:
            raise SystemExit(f"error: {path} changed since the rollouts were drawn: its rows are not the same")
    if data.get("splits_sha256") and sha256_file(datasets / "SPLITS.json") != data["splits_sha256"]:
        raise SystemExit(f"error: {datasets / 'SPLITS.json'} changed since the rollouts were drawn")
    hashes = eval_hashes(dev) if dev else set()
    excluded = {name: overlapping_rows(task, hashes) if hashes else set() for name, task in tasks.items()}
    todo, skipped = [], 0
    for context, decision in kept:
        if decision.best is None:  # a naive target where every sample failed: nothing to score against
            logger.warning("%s: no scored sample to compare naive with; not confirmed", context["key"])
            skipped += 1
            continue
        task = tasks[context["task"]]
        label = GRPOLabel.from_json(context["label"])
        try:
            rows = fresh_rows(task, label, args.m, excluded[task.name])
        except ValueError as error:
            logger.warning("%s: %s; not confirmed", context["key"], error)
            skipped += 1
            continue
        todo.append((context, decision.kind, decision.best, fresh_held_out(task, label, rows), rows))

    settings = {
        "version": RECORD_VERSION,
        "rollouts": sorted(i["settings_sha256"] for i in loaded.inputs),
        "m": args.m,
        "margin": args.margin,
        "quote_chars": args.quote_chars,
        "follower": identity,
        "protocol": first.get("protocol"),
    }
    out: Path = args.out
    try:
        with folder_lock(out, "confirmation run"):
            check_settings(out / MANIFEST, settings, what="confirmation",
                           hint="run the same command to resume, or pass another --out")
            sha = digest(settings)
            log = JsonlLog(out / CONFIRM)
            log.repair()
            done = {r["context_sha256"] for r in log.read()
                    if r.get("status") == "ok" and r.get("settings_sha256") == sha}
            left = [t for t in todo if t[0]["context_sha256"] not in done]
            logger.info("%d contexts with a target (%d cannot be scored), %d scored before; scoring %d now",
                        len(kept), skipped, len(todo) - len(left), len(left))
            started = time.perf_counter()
            try:
                if left:
                    score_all(left, follower, args, log, sha)
            except KeyboardInterrupt:
                logger.warning("interrupted: finished contexts are saved in %s; run the same command to resume",
                               log.path)
                return 130
            except FollowerOutage as error:
                raise SystemExit(f"error: {error}; finished contexts are saved in {log.path}") from None
            records = [r for r in log.read() if r.get("status") == "ok" and r.get("settings_sha256") == sha]
            summary = summarize(records, skipped)
            write_json(summary, out / SUMMARY)
    except (RunLocked, SettingsMismatch, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
    logger.info("confirmed in %.0f s: sample targets %s; naive targets %s", time.perf_counter() - started,
                summary["sample"], summary["naive"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
