"""``python -m training.build_library``: the instruction library, a learned, CPU-scale
form of what GRPO meta-training teaches the generator.

For every meta-training task (the ``train`` list of ``SPLITS.json``; never a ``dev``
task, and rows sharing a text with a dev task are left out, by the contamination
hashes of :mod:`training.contamination`), one context is sampled as the GRPO data
builder samples it (``n`` shown examples, ``m`` held-out test rows,
:func:`training.build_data.sample_context`) and written as a GRPO prompt line
(:func:`training.build_data.make_record`). The generator writes ``candidates``
instructions for it (for each of ``templates`` in turn, one decoded greedily and one
sampled with a seed, so that the two share the meta-prompt in the server's prefix
cache), each cleaned by the protocol as at compile time and scored by the SAME
reward code GRPO would use (:func:`training.follower.score_instruction`: the follower's
macro-F1 on the ``m`` held-out rows, with the protocol in the line). The naive
instruction is scored the same way. The best candidate of a task becomes a library
entry when it beats the naive instruction.

The output (default ``dspy_promptmii/data/instruction_library.json``, the packaged
library) holds the entries (task, labels, sample inputs where the dataset's licence
allows redistribution, the instruction, its reward and the naive reward, template,
generator, follower, seed) and every scored candidate: the rejection-sampling data a
GPU user can fine-tune a generator on (training/README.md). The build is a function of
its inputs and ``--seed``; the command that rebuilt it is recorded in the file.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import date
from pathlib import Path
from typing import Any

from dspy_promptmii.console import protect_output
from dspy_promptmii.data import TaskData
from dspy_promptmii.files import check_writable, write_json
from dspy_promptmii.generation import budget_limit, budget_words, generate, generator_settings
from dspy_promptmii.protocol import CONSTRAINED_STYLES, NAIVE_INSTRUCTION, TEMPLATES, Protocol
from dspy_promptmii.secrets import protected_logger
from training.build_data import BuildConfig, ContextSpec, context_seed, filter_reason, make_record, sample_context
from training.contamination import eval_hashes, overlapping_rows
from training.follower import Follower, FollowerConfig, HeldOutSet, parse_payload, score_instruction
from training.sources import load_local_tasks, read_splits, resolve_task_paths

logger = protected_logger("training.build_library")

__all__ = ["LibraryConfig", "build_library", "redistributable", "main", "DEFAULT_OUT"]

REPO_ROOT = Path(__file__).resolve().parents[1]
#: The packaged library.
DEFAULT_OUT = REPO_ROOT / "dspy_promptmii" / "data" / "instruction_library.json"
#: Licences under which sample inputs of a dataset may be shipped in the library.
_REDISTRIBUTABLE = ("CC BY", "CC0", "Apache-2.0", "MIT")
#: Sampling temperature of the candidates after the first two (greedy) ones.
SAMPLED_TEMPERATURE = 0.8


def redistributable(licence: str | None) -> bool:
    """Whether a dataset's licence text (INDEX.tsv) allows shipping sample inputs."""
    return bool(licence) and licence.strip().startswith(_REDISTRIBUTABLE)


@dataclass
class LibraryConfig:
    """What the build does (all of it is recorded in the output)."""

    n: int = 10
    m: int = 20
    candidates: int = 4
    templates: tuple[str, ...] = ("meta2", "label_defs")
    seed: int = 0
    max_instruction_tokens: int | None = 160
    inputs_per_entry: int = 2
    input_chars: int = 200
    protocol: Protocol = field(default_factory=Protocol)

    def __post_init__(self) -> None:
        for name in ("n", "m", "candidates"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.templates:
            raise ValueError("templates must name at least one template")
        unknown = [t for t in self.templates if t not in TEMPLATES]
        if unknown:
            raise ValueError(f"templates {unknown} are not built-in templates ({', '.join(TEMPLATES)})")
        if self.max_instruction_tokens is not None and self.max_instruction_tokens < 1:
            raise ValueError(f"max_instruction_tokens must be at least 1 or None, got {self.max_instruction_tokens}")


def _licences(datasets_dir: Path | None) -> dict[str, str]:
    index = datasets_dir / "INDEX.tsv" if datasets_dir else None
    if index is None or not index.is_file():
        return {}
    with index.open(encoding="utf-8", newline="") as handle:
        return {row["name"]: row.get("license", "") for row in csv.DictReader(handle, delimiter="\t")}


def _candidate_specs(config: LibraryConfig) -> list[dict[str, Any]]:
    """Per template in turn: a greedy candidate, then a sampled one (same meta-prompt)."""
    return [
        {
            "template": config.templates[(index // 2) % len(config.templates)],
            "temperature": 0.0 if index % 2 == 0 else SAMPLED_TEMPERATURE,
            "seed": config.seed + index,
        }
        for index in range(config.candidates)
    ]


async def _score(follower: Follower, instruction: str, tests: HeldOutSet) -> dict[str, Any]:
    result = await score_instruction(follower, instruction, tests)
    return {
        "reward": round(result.reward, 4),
        "accuracy": round(result.accuracy, 4),
        "invalid_rate": round(result.invalid_rate, 4),
        "follower_error": result.follower_error,
    }


async def _build_task(
    task: TaskData,
    source: str,
    excluded: set[int],
    config: LibraryConfig,
    generator: Any,
    follower: Follower,
    allow_inputs: bool,
) -> dict[str, Any]:
    """Candidates and scores for one task (see the module docstring)."""
    seed = context_seed(config.seed, task.name, config.n, 0)
    context_ids, test_ids = sample_context(task, config.n, seed, config.m, "stratified", excluded)
    spec = ContextSpec(task.name, config.n, 0, "library")
    record = make_record(task, source, spec, seed, context_ids, test_ids, config.protocol, "library")
    tests = parse_payload(record["label"])
    shown = list(tests.shown)
    max_words = budget_words(config.max_instruction_tokens)
    limit = budget_limit(config.max_instruction_tokens)
    candidates = []
    for index, spec in enumerate(_candidate_specs(config)):
        prompt = config.protocol.meta_prompt(
            task.labels, shown, list(task.input_fields), template=spec["template"], max_words=max_words
        )
        settings, _ = generator_settings(
            generator, temperature=spec["temperature"], max_tokens=limit, extra={"seed": spec["seed"]}
        )
        started = time.perf_counter()
        reply = generate(generator, prompt, settings)
        seconds = time.perf_counter() - started
        cleaned = config.protocol.clean(
            reply.text, task.input_fields, labels=task.labels, examples=shown, truncated=reply.truncated
        )
        score = await _score(follower, cleaned.text, tests) if cleaned.text else {"reward": 0.0, "empty": True}
        candidates.append(
            {
                "index": index,
                **spec,
                "instruction": cleaned.text,
                "completion_tokens": reply.usage.get("completion_tokens"),
                "finish_reason": reply.finish_reason,
                "copied_fraction": cleaned.copied_fraction,
                "seconds": round(seconds, 2),
                **score,
            }
        )
        logger.info("%s candidate %d (%s, T=%s): reward %.3f", task.name, index, spec["template"],
                    spec["temperature"], candidates[-1]["reward"])
    naive = await _score(follower, NAIVE_INSTRUCTION, tests)
    best = max(candidates, key=lambda c: (c["reward"], -len(c["instruction"]), -c["index"]))
    inputs = (
        [str(inputs[task.input_fields[0]])[: config.input_chars] for inputs, _ in shown[: config.inputs_per_entry]]
        if allow_inputs
        else []
    )
    return {
        "task": task.name,
        "source": source,
        "labels": list(task.labels),
        "input_fields": list(task.input_fields),
        "inputs": inputs,
        "naive_reward": naive["reward"],
        "best": best,
        "candidates": candidates,
        "context_ids": list(context_ids),
        "test_ids": list(test_ids),
    }


def build_library(
    tasks: Sequence[tuple[TaskData, str]],
    config: LibraryConfig,
    generator: Any,
    follower: Follower,
    *,
    eval_tasks: Sequence[TaskData] = (),
    licences: dict[str, str] | None = None,
    generator_name: str = "",
    follower_name: str = "",
) -> dict[str, Any]:
    """Build the library of ``tasks`` (see the module docstring) and return it as a dict.

    Raises ``ValueError`` when a task is also an evaluation task.
    """
    started = time.perf_counter()
    names = {task.name for task, _ in tasks}
    clash = sorted(names & {task.name for task in eval_tasks})
    if clash:
        raise ValueError(f"task(s) {', '.join(clash)} are evaluation tasks: they must not enter the library")
    hashes = eval_hashes(eval_tasks) if eval_tasks else set()
    licences = licences or {}
    filters = BuildConfig(m=config.m, base_shots=config.n)
    entries, per_task, skipped = [], [], {}

    async def run() -> None:
        try:
            for task, source in tasks:
                excluded = overlapping_rows(task, hashes) if hashes else set()
                reason = filter_reason(task, filters, len(task.rows) - len(excluded))
                if reason:
                    skipped[task.name] = reason
                    logger.info("skipping %s: %s", task.name, reason)
                    continue
                result = await _build_task(
                    task, source, excluded, config, generator, follower, redistributable(licences.get(task.name))
                )
                result["excluded_rows"] = len(excluded)
                per_task.append(result)
                best = result["best"]
                if best["reward"] > result["naive_reward"] and best["instruction"]:
                    entries.append(
                        {
                            "task": task.name,
                            "labels": result["labels"],
                            "input_fields": result["input_fields"],
                            "inputs": result["inputs"],
                            "instruction": best["instruction"],
                            "reward": best["reward"],
                            "naive_reward": result["naive_reward"],
                            "template": best["template"],
                            "temperature": best["temperature"],
                            "seed": best["seed"],
                            "generator": generator_name,
                            "follower": follower_name,
                        }
                    )
                else:
                    scores = f"{best['reward']:.3f} <= {result['naive_reward']:.3f}"
                    skipped[task.name] = f"no candidate beat the naive instruction ({scores})"
        finally:
            await follower.aclose()

    asyncio.run(run())
    return {
        "version": 1,
        "built": date.today().isoformat(),
        "generator": generator_name,
        "follower": follower_name,
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in config.__dict__.items() if k != "protocol"},
        "protocol": config.protocol.to_dict(),
        "entries": entries,
        "skipped": skipped,
        "contamination": {"eval_tasks": sorted(t.name for t in eval_tasks), "eval_texts": len(hashes)},
        "tasks": per_task,
        "seconds": round(time.perf_counter() - started, 1),
    }


def parser() -> argparse.ArgumentParser:
    from dspy_promptmii.cli import context_size

    p = argparse.ArgumentParser(prog="python -m training.build_library", description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", type=Path, default=None, help="folder of task folders (default ../shared/datasets)")
    p.add_argument("--tasks", nargs="*", default=None, help="task names (default: the 'train' list of SPLITS.json)")
    p.add_argument("--generator", default="qwen2.5-coder-1.5b-instruct", help="generator route (default 1.5B local)")
    p.add_argument("--follower", default="local", help="follower route (default: the embedded 0.5B model)")
    p.add_argument("--api-base", default=None, help="OpenAI-compatible base URL for non-local routes")
    p.add_argument(
        "--constrained",
        choices=["auto", "none", *CONSTRAINED_STYLES],
        default="auto",
        help="the follower's constrained decoding (default: the follower endpoint's default style)",
    )
    p.add_argument("--candidates", type=int, default=4, help="generator calls per task (default 4)")
    p.add_argument(
        "--templates",
        default="meta2,label_defs",
        help="templates the candidates cycle through (default meta2,label_defs)",
    )
    p.add_argument("--n", type=int, default=10, help="shown examples per task (default 10)")
    p.add_argument("--m", type=int, default=20, help="held-out rows scored per task (default 20)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--max-instruction-tokens", type=int, default=160, help="instruction budget (0 for none; default 160)"
    )
    p.add_argument("--n-ctx", type=context_size, default=8192, help="context size of local servers")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output file (default {DEFAULT_OUT})")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def _datasets_dir(given: Path | None) -> Path:
    folder = given or REPO_ROOT.parent / "shared" / "datasets"
    if not (folder / "SPLITS.json").is_file():
        raise SystemExit(f"no SPLITS.json in {folder}: pass --datasets DIR (the shared datasets folder)")
    return folder


def main(argv: Sequence[str] | None = None) -> int:
    """The command line. An error is one line on stderr (exit 2; the traceback only with
    ``--log-level DEBUG``); Ctrl-C and SIGTERM stop it (exit 130) and no LM request
    starts after them (:mod:`dspy_promptmii.stopping`)."""
    from dspy_promptmii.console import command

    args = parser().parse_args(argv)
    debug = args.log_level == "DEBUG"
    return command("python -m training.build_library", lambda: _main(args, argv), verbose=debug, program=argv is None)


def _main(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    protect_output(*logging.getLogger().handlers)  # no credential nor control character in a log line
    for noisy in ("LiteLLM", "litellm", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    datasets_dir = _datasets_dir(args.datasets)
    splits = read_splits(datasets_dir) or {}
    names = args.tasks or splits.get("train") or []
    if not names:
        raise SystemExit(f"no tasks: pass --tasks or give {datasets_dir}/SPLITS.json a 'train' list")
    dev = set(splits.get("dev") or [])
    # Every option and task is checked before a model is pulled or a server started.
    if args.max_instruction_tokens < 0:
        raise SystemExit(f"--max-instruction-tokens must be 0 (no budget) or more, got {args.max_instruction_tokens}")
    try:
        config = LibraryConfig(
            n=args.n,
            m=args.m,
            candidates=args.candidates,
            templates=tuple(t.strip() for t in args.templates.split(",") if t.strip()),
            seed=args.seed,
            max_instruction_tokens=args.max_instruction_tokens or None,
        )
        check_writable(args.out)
        tasks = load_local_tasks(resolve_task_paths(names, datasets_dir))
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from None
    # By name or by path (a task's name is its folder's or file's): no development task.
    both = sorted(dev & {task.name for task, _ in tasks})
    if both:
        raise SystemExit(f"--tasks names development task(s) {both}; the library takes train tasks only")
    eval_tasks = [t for t, _ in load_local_tasks(resolve_task_paths(sorted(dev), datasets_dir))] if dev else []

    from dspy_promptmii.routes import LMPool

    with LMPool(n_ctx=args.n_ctx, api_base=args.api_base) as pool:
        follow = pool.endpoint(args.follower, cache=False)
        generator = pool.endpoint(args.generator, cache=False)
        style = {"auto": follow.constrained_style, "none": False}.get(args.constrained, args.constrained)
        config = replace(config, protocol=Protocol(constrained=style))
        base_url = follow.server.base_url if follow.server else str(follow.lm.kwargs.get("api_base"))
        follower = Follower(
            FollowerConfig(base_url=base_url, model=follow.lm.model.split("/", 1)[-1], concurrency=1, timeout=300)
        )
        library = build_library(
            tasks,
            config,
            generator.lm,
            follower,
            eval_tasks=eval_tasks,
            licences=_licences(datasets_dir),
            generator_name=generator.route,
            follower_name=follow.route,
        )
    library["command"] = "python -m training.build_library " + " ".join(sys.argv[1:] if argv is None else argv)
    write_json(library, args.out)
    logger.info(
        "wrote %s: %d entries of %d tasks (%d skipped) in %.0f s",
        args.out, len(library["entries"]), len(library["tasks"]), len(library["skipped"]), library["seconds"],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
