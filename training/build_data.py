"""``python -m training.build_data``: OpenRLHF prompt files for Prompt-MII meta-training.

For every training task (local folders in the shared format, and HF hub datasets when
online) it applies the paper's filters, samples the paper's contexts -- a 5-shot context
for every dataset, extra 10-, 20- and 50-shot contexts for 30%, 20% and 10% of the
datasets -- each with m=20 test examples disjoint from the context, renders the
generator's meta-prompt with the protocol code the optimizer uses
(:func:`dspy_promptmii.protocol.build_meta_prompt`, examples chosen by
:func:`dspy_promptmii.sampling.example_order`), and writes:

* ``train.jsonl`` and ``valid.jsonl``: one prompt a line,
  ``{"prompt": [{"role": "user", "content": <meta-prompt>}], "label": {...}, "datasource": ...}``,
  for ``--data.input_key prompt --data.label_key label --data.apply_chat_template``;
  the label dict carries the label set, input fields, the m test examples and metadata
  (see :func:`make_record`);
* ``summary.json``: filters, proportions, dropped prompts, token counts, contamination.

Prompts over ``--max-prompt-tokens`` are dropped (OpenRLHF would truncate them) and
counted. The output is a function of the inputs and ``--seed`` only.

Example::

    python -m training.build_data --datasets ../shared/datasets --out data/promptmii --seed 0 \\
        --tokenizer /root/.cache/dspy_promptmii/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
import statistics
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from dspy_promptmii.cli import non_negative_int
from dspy_promptmii.console import protect_output
from dspy_promptmii.data import TaskData
from dspy_promptmii.files import write_json, write_jsonl
from dspy_promptmii.generation import DEFAULT_MAX_INSTRUCTION_TOKENS, budget_words
from dspy_promptmii.params import SHARED, check_params
from dspy_promptmii.protocol import CONSTRAINED_STYLES, TEMPLATES, Protocol, choose_template
from dspy_promptmii.sampling import SAMPLING, example_order
from dspy_promptmii.secrets import protected_logger
from training.contamination import eval_hashes, overlapping_rows
from training.grpo_label import GRPOLabel
from training.sources import (
    default_datasets_dir,
    load_hub_task,
    load_local_tasks,
    read_overlap_groups,
    read_splits,
    resolve_task_paths,
)
from training.tokens import TokenCounter, load_counter

logger = protected_logger("training.build_data")

__all__ = [
    "BuildConfig",
    "ContextSpec",
    "BuildResult",
    "filter_reason",
    "split_valid",
    "plan_contexts",
    "context_seed",
    "sample_context",
    "make_record",
    "build",
    "write_outputs",
    "main",
]

#: Default extra contexts: n-shot -> fraction of datasets that get one (paper).
PAPER_EXTRA_SHOTS: dict[int, float] = {10: 0.3, 20: 0.2, 50: 0.1}
#: Default generator whose family picks the template under ``--template auto`` (paper: Qwen -> meta2).
DEFAULT_GENERATOR = "Qwen/Qwen2.5-7B-Instruct"
#: OpenRLHF turns ``<image>`` in a prompt into an image placeholder; such prompts are dropped.
IMAGE_TAG = "<image>"


@dataclass
class BuildConfig:
    """Everything that decides which prompts are written (all of it goes into the summary)."""

    seed: int = 0
    m: int = 20
    base_shots: int = 5
    extra_shots: dict[int, float] = field(default_factory=lambda: dict(PAPER_EXTRA_SHOTS))
    repeats: int = 1
    sampling: str = "stratified"
    template: str = "meta2"
    max_prompt_tokens: int = 4096
    max_unique_label_ratio: float = 0.5
    min_rows: int | None = None
    valid_shots: tuple[int, ...] = (5, 20)
    datasource: str = "promptmii"
    drop_contaminated: bool = False
    #: The reward follower's constrained decoding (json_schema: vLLM) and reply limit
    #: (None: the protocol's default); with the template they make the lines' protocol.
    constrained: str | bool = "json_schema"
    reply_limit: int | None = None
    #: The instruction budget the meta-prompts state as a length rule, as compile's
    #: default does (None: no rule), so that the policy trains on the prompt it will get.
    max_instruction_tokens: int | None = DEFAULT_MAX_INSTRUCTION_TOKENS

    def __post_init__(self) -> None:
        if self.m < 1:
            raise ValueError(f"m (test examples per context) must be at least 1, got {self.m}")
        if self.base_shots < 1:
            raise ValueError(f"base_shots must be at least 1, got {self.base_shots}")
        if self.repeats < 1:
            raise ValueError(f"repeats must be at least 1, got {self.repeats}")
        if self.sampling not in SAMPLING:
            raise ValueError(f"sampling must be one of {SAMPLING}, got {self.sampling!r}")
        for k, fraction in self.extra_shots.items():
            if k < 1 or not 0 <= fraction <= 1:
                raise ValueError(f"extra shot {k}:{fraction} needs n >= 1 and a fraction in [0, 1]")
        if any(k < 1 for k in self.valid_shots):
            raise ValueError(f"valid shots must be positive, got {self.valid_shots}")
        if not 0 < self.max_unique_label_ratio <= 1:
            raise ValueError(f"max_unique_label_ratio must be in (0, 1], got {self.max_unique_label_ratio}")
        check_params({"max_instruction_tokens": self.max_instruction_tokens}, SHARED)  # None: no length rule
        if self.constrained not in (False, *CONSTRAINED_STYLES):
            raise ValueError(f"constrained must be False or one of {CONSTRAINED_STYLES}, got {self.constrained!r}")
        _ = self.protocol  # validates the template and the reply limit

    @property
    def protocol(self) -> Protocol:
        """The protocol every line carries: the reward renders, cleans, calls the follower
        and scores with exactly this value (a template file is read into its text)."""
        return Protocol(template=self.template, constrained=self.constrained, reply_limit=self.reply_limit)

    @property
    def required_rows(self) -> int:
        """Rows a dataset needs to be kept: ``min_rows``, default base_shots + m."""
        return self.min_rows if self.min_rows is not None else self.base_shots + self.m


@dataclass(frozen=True)
class ContextSpec:
    """One context to sample: task, number of shots, repeat index, and split."""

    task: str
    n_shot: int
    repeat: int
    split: str


@dataclass
class BuildResult:
    train: list[dict[str, Any]]
    valid: list[dict[str, Any]]
    summary: dict[str, Any]


# --- filters and plans ------------------------------------------------------------------


def filter_reason(task: TaskData, config: BuildConfig, available_rows: int | None = None) -> str | None:
    """Why the paper's filters drop ``task``, or None to keep it: fewer than two labels,
    more than ``max_unique_label_ratio`` distinct labels per row, or too few rows."""
    rows = len(task.rows) if available_rows is None else available_rows
    n_labels = len(task.labels)
    if n_labels < 2:
        return f"only {n_labels} label"
    if n_labels / max(1, len(task.rows)) > config.max_unique_label_ratio:
        limit = f"{config.max_unique_label_ratio:.0%}"
        return f"{n_labels} labels over {len(task.rows)} rows is more than {limit} unique labels"
    if rows < config.required_rows:
        return (
            f"{rows} usable rows, fewer than {config.required_rows} ({config.base_shots}-shot context + m={config.m})"
        )
    return None


def split_valid(
    names: Sequence[str],
    groups: Mapping[str, str],
    valid_tasks: Sequence[str] | None,
    valid_fraction: float,
    seed: int,
) -> tuple[list[str], list[str]]:
    """(train, valid) task names. ``valid_tasks`` when given, else whole overlap groups
    drawn with a seeded shuffle until about ``valid_fraction`` of the tasks are held out.
    A task given as valid pulls its whole overlap group along."""
    names = sorted(names)
    unit_of = {name: groups.get(name, name) for name in names}
    if valid_tasks:
        unknown = sorted(set(valid_tasks) - set(names))
        if unknown:
            raise ValueError(f"--valid-tasks names tasks that are not being built: {', '.join(unknown)}")
        units = {unit_of[name] for name in valid_tasks}
    elif valid_fraction > 0:
        target = max(1, round(valid_fraction * len(names)))
        ordered = sorted(set(unit_of.values()))
        random.Random(f"{seed}|valid").shuffle(ordered)
        units, taken = set(), 0
        for unit in ordered:
            if taken >= target:
                break
            units.add(unit)
            taken += sum(1 for n in names if unit_of[n] == unit)
    else:
        units = set()
    valid = [n for n in names if unit_of[n] in units]
    train = [n for n in names if unit_of[n] not in units]
    if not train:
        raise ValueError("the validation split took every task: lower --valid-fraction or name fewer --valid-tasks")
    return train, valid


def plan_contexts(available: Mapping[str, int], config: BuildConfig, split: str) -> list[ContextSpec]:
    """The contexts to sample. Train: a ``base_shots`` context per task, plus for each extra
    n a seeded draw of round(fraction x tasks) tasks among those with at least n + m rows;
    each ``repeats`` times. Valid: every ``valid_shots`` n that the task's rows allow, ``repeats``
    times (repeat 0 is the same context whatever ``repeats``, so a larger validation set keeps
    the smaller one's contexts)."""
    names = sorted(available)
    specs: list[ContextSpec] = []
    if split == "valid":
        for name in names:
            for k in sorted(set(config.valid_shots)):
                if available[name] >= k + config.m:
                    specs.extend(ContextSpec(name, k, r, split) for r in range(config.repeats))
        return specs
    for name in names:
        specs.extend(ContextSpec(name, config.base_shots, r, split) for r in range(config.repeats))
    for k, fraction in sorted(config.extra_shots.items()):
        wanted = round(fraction * len(names))
        eligible = [name for name in names if available[name] >= k + config.m]
        if len(eligible) < wanted:
            logger.info(
                "%d-shot contexts: %d tasks wanted, only %d have %d rows", k, wanted, len(eligible), k + config.m
            )
        chosen = random.Random(f"{config.seed}|extra|{k}").sample(eligible, min(wanted, len(eligible)))
        for name in sorted(chosen):
            specs.extend(ContextSpec(name, k, r, split) for r in range(config.repeats))
    return specs


def context_seed(seed: int, task: str, n_shot: int, repeat: int) -> int:
    """A stable 31-bit seed for one context (independent of Python's hash randomisation)."""
    digest = hashlib.sha256(f"{seed}|{task}|{n_shot}|{repeat}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def sample_context(
    task: TaskData,
    n_shot: int,
    seed: int,
    m: int,
    sampling: str = "stratified",
    excluded: set[int] | frozenset[int] = frozenset(),
) -> tuple[list[int], list[int]]:
    """(context row ids, test row ids) for one context, disjoint by construction.

    The m test rows are drawn first (a seeded shuffle of the usable rows). The context is
    then chosen exactly as :class:`~dspy_promptmii.PromptMIIOptimizer` chooses examples
    from a trainset: the pool is the remaining rows in file order, and the first
    ``n_shot`` of :func:`~dspy_promptmii.sampling.example_order` (same seed) are shown.
    So ``optimizer(n=n_shot, seed=seed).compile(..., trainset=pool)`` renders the same
    meta-prompt.
    """
    usable = [i for i in range(len(task.rows)) if i not in excluded]
    if len(usable) < n_shot + m:
        raise ValueError(f"{task.name}: {len(usable)} usable rows, fewer than {n_shot} shots + {m} test examples")
    shuffled = list(usable)
    random.Random(seed).shuffle(shuffled)
    test_ids = sorted(shuffled[:m])
    held = set(test_ids)
    pool = [i for i in usable if i not in held]
    order = example_order([task.rows[i]["label"] for i in pool], seed, sampling)
    return [pool[j] for j in order[:n_shot]], test_ids


def make_record(
    task: TaskData,
    source: str,
    spec: ContextSpec,
    seed: int,
    context_ids: Sequence[int],
    test_ids: Sequence[int],
    protocol: Protocol,
    datasource: str,
    max_instruction_tokens: int | None = None,
) -> dict[str, Any]:
    """One OpenRLHF prompt line, its meta-prompt rendered by ``protocol``; its ``label``
    is a :class:`~training.grpo_label.GRPOLabel` (see there for each field), which the
    reward reads back with :meth:`~training.grpo_label.GRPOLabel.from_json`."""
    fields = list(task.input_fields)
    examples = [({f: task.rows[i][f] for f in fields}, task.rows[i]["label"]) for i in context_ids]
    template, _ = protocol.resolve_template()
    prompt = protocol.meta_prompt(task.labels, examples, fields, max_words=budget_words(max_instruction_tokens))
    label = GRPOLabel(
        task=task.name,
        source=source,
        split=spec.split,
        labels=tuple(task.labels),
        input_fields=tuple(fields),
        n_shot=spec.n_shot,
        repeat=spec.repeat,
        template=template if template in TEMPLATES else "custom",
        context_seed=seed,
        context_ids=tuple(context_ids),
        test_ids=tuple(test_ids),
        context_inputs=tuple(tuple(str(task.rows[i][f]) for f in fields) for i in context_ids),
        context_labels=tuple(task.rows[i]["label"] for i in context_ids),
        test_inputs=tuple(tuple(str(task.rows[i][f]) for f in fields) for i in test_ids),
        test_labels=tuple(task.rows[i]["label"] for i in test_ids),
        protocol=protocol,
    )
    return {"prompt": [{"role": "user", "content": prompt}], "label": label.to_json(), "datasource": datasource}


# --- the build ---------------------------------------------------------------------------


def _stats(values: Sequence[int]) -> dict[str, float]:
    if not values:
        return {"count": 0}
    ordered = sorted(values)
    return {
        "count": len(values),
        "min": ordered[0],
        "median": statistics.median(ordered),
        "mean": round(statistics.fmean(ordered), 1),
        "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
        "max": ordered[-1],
    }


def build(
    tasks: Sequence[tuple[TaskData, str]],
    config: BuildConfig,
    counter: TokenCounter,
    *,
    eval_tasks: Sequence[TaskData] = (),
    groups: Mapping[str, str] | None = None,
    valid_tasks: Sequence[str] | None = None,
    valid_fraction: float = 0.0,
    progress: bool = True,
) -> BuildResult:
    """Filter, split, sample, render and length-filter; returns records and a summary."""
    started = time.perf_counter()
    names = [task.name for task, _ in tasks]
    duplicates = sorted(name for name, count in Counter(names).items() if count > 1)
    if duplicates:
        raise ValueError(f"two tasks share the name(s) {', '.join(duplicates)}")
    clashes = sorted(set(names) & {t.name for t in eval_tasks})
    if clashes:
        raise ValueError(
            f"training task(s) {', '.join(clashes)} are also evaluation tasks; remove them from the training "
            "tasks or pass other --eval-tasks"
        )
    by_name = {task.name: (task, source) for task, source in tasks}

    # Contamination: which rows share a text with the evaluation tasks.
    hashes = eval_hashes(eval_tasks) if eval_tasks else set()
    overlap = {name: overlapping_rows(task, hashes) if hashes else set() for name, (task, _) in by_name.items()}
    excluded = overlap if config.drop_contaminated else {name: set() for name in by_name}

    # Paper filters.
    filtered: dict[str, str] = {}
    available: dict[str, int] = {}
    for name, (task, _) in by_name.items():
        usable = len(task.rows) - len(excluded[name])
        reason = filter_reason(task, config, usable)
        if reason:
            filtered[name] = reason
            logger.info("dropping task %s: %s", name, reason)
        else:
            available[name] = usable
    if not available:
        raise ValueError(f"every task was filtered out: {filtered}")

    train_names, valid_names = split_valid(sorted(available), groups or {}, valid_tasks, valid_fraction, config.seed)
    specs = plan_contexts({n: available[n] for n in train_names}, config, "train")
    specs += plan_contexts({n: available[n] for n in valid_names}, config, "valid")

    records: dict[str, list[dict[str, Any]]] = {"train": [], "valid": []}
    tokens: dict[str, list[int]] = {"train": [], "valid": []}
    too_long: Counter[str] = Counter()
    image_tag = 0
    used: set[tuple[str, int]] = set()
    protocol = config.protocol
    for spec in tqdm(specs, desc="contexts", unit="prompt", disable=not progress):
        task, source = by_name[spec.task]
        seed = context_seed(config.seed, spec.task, spec.n_shot, spec.repeat)
        context_ids, test_ids = sample_context(
            task, spec.n_shot, seed, config.m, config.sampling, frozenset(excluded[spec.task])
        )
        record = make_record(
            task, source, spec, seed, context_ids, test_ids, protocol, config.datasource, config.max_instruction_tokens
        )
        content = record["prompt"][0]["content"]
        if IMAGE_TAG in content:
            image_tag += 1
            logger.info(
                "dropping %s %d-shot context %d: it contains %s", spec.task, spec.n_shot, spec.repeat, IMAGE_TAG
            )
            continue
        count = counter.count_chat(record["prompt"])
        if count > config.max_prompt_tokens:
            too_long[f"{spec.split}:{spec.n_shot}"] += 1
            logger.info(
                "dropping %s %d-shot context %d: %d prompt tokens > %d",
                spec.task,
                spec.n_shot,
                spec.repeat,
                count,
                config.max_prompt_tokens,
            )
            continue
        records[spec.split].append(record)
        tokens[spec.split].append(count)
        used.update((spec.task, i) for i in (*context_ids, *test_ids))

    rows_checked = sum(len(by_name[n][0].rows) for n in available)
    rows_overlapping = sum(len(overlap[n]) for n in available)
    used_overlapping = sum(1 for name, i in used if i in overlap[name])
    summary: dict[str, Any] = {
        "config": {**asdict(config), "extra_shots": {str(k): v for k, v in config.extra_shots.items()}},
        "protocol": protocol.to_dict(),
        "tokenizer": {"name": counter.name, "exact": counter.exact},
        "tasks": {
            "given": len(tasks),
            "train": train_names,
            "valid": valid_names,
            "filtered": filtered,
            "rows": {n: len(by_name[n][0].rows) for n in sorted(by_name)},
            "sources": {n: by_name[n][1] for n in sorted(by_name)},
        },
        "prompts": {
            split: {
                "written": len(records[split]),
                "planned": sum(1 for s in specs if s.split == split),
                "by_n_shot": dict(sorted(Counter(r["label"]["n_shot"] for r in records[split]).items())),
                "tasks_by_n_shot": {
                    str(k): len({s.task for s in specs if s.split == split and s.n_shot == k})
                    for k in sorted({s.n_shot for s in specs if s.split == split})
                },
                "tokens": _stats(tokens[split]),
            }
            for split in ("train", "valid")
        },
        "dropped": {
            "too_long": dict(sorted(too_long.items())),
            "too_long_total": sum(too_long.values()),
            "image_tag": image_tag,
            "max_prompt_tokens": config.max_prompt_tokens,
        },
        "contamination": {
            "eval_tasks": sorted(t.name for t in eval_tasks),
            "eval_texts": len(hashes),
            "rows_checked": rows_checked,
            "rows_overlapping": rows_overlapping,
            "row_overlap_rate": rows_overlapping / rows_checked if rows_checked else 0.0,
            "examples_used": len(used),
            "examples_used_overlapping": used_overlapping,
            "used_overlap_rate": used_overlapping / len(used) if used else 0.0,
            "per_task": {n: len(overlap[n]) for n in sorted(available) if overlap[n]},
            "overlapping_rows_dropped": config.drop_contaminated,
        },
        "seconds": round(time.perf_counter() - started, 2),
    }
    return BuildResult(records["train"], records["valid"], summary)


def write_outputs(out_dir: str | Path, result: BuildResult) -> dict[str, Path]:
    """Write ``train.jsonl``, ``valid.jsonl`` and ``summary.json`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"train": out / "train.jsonl", "valid": out / "valid.jsonl", "summary": out / "summary.json"}
    write_jsonl(result.train, paths["train"])
    write_jsonl(result.valid, paths["valid"])
    result.summary["files"] = {
        "train": str(paths["train"].resolve()),
        "valid": str(paths["valid"].resolve()),
    }
    result.summary["openrlhf_flags"] = [
        "--data.prompt_dataset",
        str(paths["train"].resolve()),
        *(["--eval.dataset", str(paths["valid"].resolve())] if result.valid else []),
        "--data.input_key",
        "prompt",
        "--data.label_key",
        "label",
        "--data.apply_chat_template",
    ]
    write_json(result.summary, paths["summary"])
    return paths


# --- command line --------------------------------------------------------------------------


def _parse_extra_shots(text: str) -> dict[int, float]:
    """``"10:0.3,20:0.2,50:0.1"`` -> {10: 0.3, 20: 0.2, 50: 0.1}; ``""`` or ``"none"`` -> {}."""
    if text.strip().lower() in ("", "none"):
        return {}
    extra: dict[int, float] = {}
    for item in text.split(","):
        k, sep, fraction = item.partition(":")
        if not sep:
            raise argparse.ArgumentTypeError(f"extra shot {item!r} is not N:FRACTION (e.g. 10:0.3)")
        try:
            extra[int(k)] = float(fraction)
        except ValueError:
            raise argparse.ArgumentTypeError(f"extra shot {item!r} is not N:FRACTION (e.g. 10:0.3)") from None
    return extra


def _parse_shots(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(k) for k in text.split(",") if k.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.build_data",
        description="Build OpenRLHF prompt files (train.jsonl, valid.jsonl, summary.json) for Prompt-MII GRPO.",
    )
    src = p.add_argument_group("tasks")
    src.add_argument(
        "--datasets",
        type=Path,
        default=None,
        help="folder of task folders (<name>/data.jsonl) with SPLITS.json and INDEX.tsv "
        "(default: $PROMPTMII_SHARED_DATASETS or ../shared/datasets)",
    )
    src.add_argument(
        "--tasks",
        nargs="*",
        default=None,
        help="task names under --datasets or paths (default: the 'train' list of SPLITS.json, else every task folder)",
    )
    src.add_argument(
        "--hf-datasets",
        nargs="*",
        default=[],
        help="HF hub datasets as NAME[:CONFIG][@SPLIT] (needs `datasets` and a network)",
    )
    src.add_argument("--hf-max-rows", type=int, default=3000, help="cap on rows per hub dataset (seeded sample)")
    src.add_argument(
        "--detect-lm",
        default=None,
        help="LiteLLM route of an LM that picks hub dataset columns (e.g. openai/gpt-4o-mini); "
        "heuristics are used without it or when its answer is unusable",
    )
    src.add_argument("--detect-api-base", default=None, help="api_base for --detect-lm")
    src.add_argument(
        "--eval-tasks",
        nargs="*",
        default=None,
        help="evaluation tasks for the contamination check (default: the 'dev' list of SPLITS.json)",
    )
    src.add_argument("--no-contamination-check", action="store_true", help="skip the contamination check")
    src.add_argument(
        "--drop-contaminated",
        action="store_true",
        help="leave training rows that share a text with an evaluation task out of all contexts",
    )
    smp = p.add_argument_group("sampling")
    smp.add_argument("--seed", type=int, default=0)
    smp.add_argument("--m", type=int, default=20, help="test examples per context (reward set), default 20")
    smp.add_argument("--base-shots", type=int, default=5, help="shots of the context every dataset gets (5)")
    smp.add_argument(
        "--extra-shots",
        type=_parse_extra_shots,
        default=dict(PAPER_EXTRA_SHOTS),
        help="extra contexts as N:FRACTION of datasets (default 10:0.3,20:0.2,50:0.1; 'none' for none)",
    )
    smp.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="independent draws of every planned context (more prompts from few datasets; validation contexts too)",
    )
    smp.add_argument(
        "--sampling",
        choices=SAMPLING,
        default="stratified",
        help="context example order, as PromptMIIOptimizer(sampling=...)",
    )
    smp.add_argument(
        "--max-unique-label-ratio",
        type=float,
        default=0.5,
        help="drop datasets with more distinct labels per row than this (0.5)",
    )
    smp.add_argument(
        "--min-rows", type=int, default=None, help="drop datasets with fewer rows (default base shots + m)"
    )
    spl = p.add_argument_group("validation split")
    spl.add_argument("--valid-tasks", nargs="*", default=None, help="tasks held out for valid.jsonl")
    spl.add_argument(
        "--valid-fraction",
        type=float,
        default=0.1,
        help="without --valid-tasks: fraction of tasks (whole overlap groups) held out (0.1; 0 for none)",
    )
    spl.add_argument("--valid-shots", type=_parse_shots, default=(5, 20), help="contexts per validation task (5,20)")
    prm = p.add_argument_group("prompts")
    prm.add_argument(
        "--template",
        default="auto",
        help="meta1, meta2, auto (meta1 for a Llama-family --generator-model, else meta2, as in the paper), "
        "a template file or a template text",
    )
    prm.add_argument(
        "--constrained",
        choices=["none", *CONSTRAINED_STYLES],
        default="json_schema",
        help="the reward follower's constrained decoding, written into every line's protocol: json_schema "
        "(vLLM, default), json_object or grammar (llama.cpp's server), choice (dspy-promptmii's embedded "
        "server: the label read off the log-probabilities), none; evaluate with the same",
    )
    prm.add_argument(
        "--reply-limit",
        type=int,
        default=None,
        help="the reward follower's max_tokens (default: the protocol's, room for the longest label)",
    )
    prm.add_argument(
        "--generator-model",
        default=DEFAULT_GENERATOR,
        help=f"the policy being trained; picks the template under --template auto ({DEFAULT_GENERATOR})",
    )
    prm.add_argument(
        "--tokenizer",
        default=None,
        help="policy tokenizer for the length filter: a HF tokenizer folder, a .gguf file, or "
        "'approx' (default; an over-estimate, see training/tokens.py)",
    )
    prm.add_argument(
        "--max-instruction-tokens",
        type=non_negative_int,
        default=DEFAULT_MAX_INSTRUCTION_TOKENS,
        help="instruction budget stated in every meta-prompt as compile states it, 0 for none "
        f"(default {DEFAULT_MAX_INSTRUCTION_TOKENS}, compile's default)",
    )
    prm.add_argument("--max-prompt-tokens", type=int, default=4096, help="drop prompts longer than this (4096)")
    prm.add_argument("--datasource", default="promptmii", help="datasource field of every line (eval metric name)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def _load_tasks(args: argparse.Namespace, datasets_dir: Path | None) -> list[tuple[TaskData, str]]:
    splits = read_splits(datasets_dir) if datasets_dir else None
    names = args.tasks
    if names is None:
        if splits and splits.get("train"):
            names = splits["train"]
            logger.info("tasks: the %d 'train' tasks of %s/SPLITS.json", len(names), datasets_dir)
        elif datasets_dir is not None and datasets_dir.is_dir():
            names = sorted(p.name for p in datasets_dir.iterdir() if (p / "data.jsonl").is_file())
            logger.info("tasks: all %d task folders in %s", len(names), datasets_dir)
        else:
            names = []
    tasks = load_local_tasks(resolve_task_paths(names, datasets_dir)) if names else []
    if args.hf_datasets:
        detect_lm = None
        if args.detect_lm:
            import dspy

            detect_lm = dspy.LM(args.detect_lm, api_base=args.detect_api_base, temperature=0.0, cache=False)
        for spec in tqdm(args.hf_datasets, desc="hub datasets", disable=args.no_progress):
            task, source, _ = load_hub_task(
                spec,
                max_rows=args.hf_max_rows,
                seed=args.seed,
                detect_lm=detect_lm,
                max_label_ratio=args.max_unique_label_ratio,
            )
            tasks.append((task, source))
    if not tasks:
        raise SystemExit(
            "no training tasks: pass --datasets DIR (with SPLITS.json or task folders), --tasks, or --hf-datasets"
        )
    return tasks


def main(argv: Sequence[str] | None = None) -> int:
    """The command line. An error is one line on stderr (exit 2; the traceback only with
    ``--log-level DEBUG``); Ctrl-C and SIGTERM stop it (exit 130)."""
    from dspy_promptmii.console import command

    args = parser().parse_args(argv)
    debug = args.log_level == "DEBUG"
    return command("python -m training.build_data", lambda: _main(args), verbose=debug, program=argv is None)


def _main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    protect_output(*logging.getLogger().handlers)  # no credential nor control character in a log line
    started = time.perf_counter()
    try:
        template, why = choose_template(Protocol(template=args.template).template, args.generator_model)
    except (ValueError, TypeError) as error:
        raise SystemExit(f"--template: {error}") from None
    logger.info("template %s (%s)", template if template in TEMPLATES else "custom", why)
    datasets_dir = args.datasets or default_datasets_dir()
    if not datasets_dir.is_dir():
        if args.datasets is not None:
            raise SystemExit(f"--datasets {datasets_dir} is not a folder")
        datasets_dir = None
    tasks = _load_tasks(args, datasets_dir)

    eval_tasks: list[TaskData] = []
    if not args.no_contamination_check:
        eval_names = args.eval_tasks
        if eval_names is None:
            splits = read_splits(datasets_dir) if datasets_dir else None
            eval_names = (splits or {}).get("dev", [])
            if not eval_names:
                logger.warning("no --eval-tasks and no 'dev' list in SPLITS.json: contamination is not checked")
        eval_tasks = [task for task, _ in load_local_tasks(resolve_task_paths(eval_names, datasets_dir))]

    config = BuildConfig(
        seed=args.seed,
        m=args.m,
        base_shots=args.base_shots,
        extra_shots=args.extra_shots,
        repeats=args.repeats,
        sampling=args.sampling,
        template=template,
        max_prompt_tokens=args.max_prompt_tokens,
        max_unique_label_ratio=args.max_unique_label_ratio,
        min_rows=args.min_rows,
        valid_shots=args.valid_shots,
        datasource=args.datasource,
        drop_contaminated=args.drop_contaminated,
        constrained=False if args.constrained == "none" else args.constrained,
        reply_limit=args.reply_limit,
        max_instruction_tokens=args.max_instruction_tokens or None,
    )
    counter = load_counter(args.tokenizer)
    if not counter.exact:
        logger.warning("no --tokenizer: prompt lengths are estimated (%s), which over-counts", counter.name)
    result = build(
        tasks,
        config,
        counter,
        eval_tasks=eval_tasks,
        groups=read_overlap_groups(datasets_dir) if datasets_dir else {},
        valid_tasks=args.valid_tasks,
        valid_fraction=args.valid_fraction,
        progress=not args.no_progress,
    )
    result.summary["template_choice"] = why
    result.summary["generator_model"] = args.generator_model
    result.summary["total_seconds"] = round(time.perf_counter() - started, 2)
    paths = write_outputs(args.out, result)
    s = result.summary
    logger.info(
        "wrote %d train and %d valid prompts to %s; dropped %d over %d tokens; %d tasks filtered; "
        "contamination: %.2f%% of rows, %.2f%% of used examples",
        len(result.train),
        len(result.valid),
        args.out,
        s["dropped"]["too_long_total"],
        config.max_prompt_tokens,
        len(s["tasks"]["filtered"]),
        100 * s["contamination"]["row_overlap_rate"],
        100 * s["contamination"]["used_overlap_rate"],
    )
    print(json.dumps({k: str(v) for k, v in paths.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
