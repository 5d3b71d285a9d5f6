"""``python -m training.rollouts``: rollouts of the current generator, scored by the follower.

The sampling half of rejection-sampling fine-tuning (expert iteration; the filtered-SFT
member of the policy-gradient family: GRPO's positive-advantage samples with weight 1).
For every context it writes what the GRPO reward would see for a group of ``k`` rollouts,
plus the naive instruction's reward as the baseline of the advantage:

* **Contexts** are drawn exactly as :mod:`training.build_data` draws them, by calling its
  :func:`~training.build_data.build` (the paper's filters; a 5-shot context for every task
  plus 10- and 20-shot ones for 30% and 20% of the tasks by default, ``--repeats``; m=20
  held-out rows per context; per-context seeds; the validation split of whole tasks by
  overlap group; rows sharing a text with a ``dev`` task left out). The tasks are the
  ``train`` list of ``SPLITS.json`` (tasks with opaque id labels included); a ``dev``
  task is never drawn. ``--split valid`` runs the held-out validation contexts instead
  (greedy, one sample: the validation reward of the paper's Figure 6).
* **Rollouts**: ``--samples`` k replies per context (default 6) from the generator (an
  OpenAI-compatible endpoint or the embedded llama.cpp server, optionally with a LoRA
  adapter), at ``--temperature`` (default 1.0, as GRPO samples) with a per-sample seed
  (a SHA-256 of the run seed, the context and the sample index), and the generation limit
  compile uses (:func:`~dspy_promptmii.generation.budget_limit`). The meta-prompt is sent as
  compile sends it (:func:`~dspy_promptmii.generation.generate`, one user message).
* **Reward**: each reply is cleaned by the line's :class:`~dspy_promptmii.protocol.Protocol`
  with the shown examples and the finish reason, as compile cleans it, and scored by
  :func:`training.follower.score_instruction` (the GRPO reward: the follower's macro-F1 on
  the m held-out rows). The naive instruction
  (:data:`~dspy_promptmii.protocol.NAIVE_INSTRUCTION`) is scored the same way. The
  follower's decoding style is the protocol's ``constrained`` (``--constrained``; ``auto``
  is the style of the follower's endpoint, ``choice`` for the embedded server).

Output folder (``--out``): ``rollouts.jsonl`` (one line per finished context, appended and
fsync'ed as each context finishes: a kill loses at most the context in flight, and a torn
last line is cut off on the next start), ``manifest.json`` (the settings: configuration,
protocol, generator and follower identities, sha256 of every task file, the plan), and
``summary.json`` (rewards so far). A restart with the same settings skips the finished
contexts; one with other settings, data or generator is refused, naming what differs.
A context where the follower failed is recorded with ``status: "error"`` and runs again.

Record (one JSON object a line)::

    {"version": 1, "status": "ok", "key": "train|sst2|5|0", "context_sha256": "...",
     "split": "train", "task": "sst2", "n_shot": 5, "repeat": 0, "context_seed": 123,
     "meta_prompt": "<what compile sends>", "label": {<the build_data line's label>},
     "protocol": {...}, "generator": {"kind": "local", "model": ..., "base_sha256": ...,
     "adapter": null, "adapter_sha256": null}, "follower": {...},
     "naive": {"instruction": ..., "reward": 0.41, "accuracy": ..., "invalid_rate": ...,
               "follower_error": null},
     "samples": [{"index": 0, "seed": 987, "temperature": 1.0, "raw_reply": "...",
                  "finish_reason": "stop", "instruction": "<cleaned>", "reward": 0.55, ...}],
     "seconds": 61.2, "finished": "2026-12-06T10:00:00+00:00"}

Example (the embedded 0.5B model as generator and follower, round 1 on a CPU)::

    python -m training.rollouts --out runs/rft/round1/rollouts --samples 6 --seed 1
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import hashlib
import logging
import math
import os
import random
import signal
import statistics
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tqdm import tqdm

from dspy_promptmii.data import TaskData
from dspy_promptmii.files import check_writable, read_json, write_json
from dspy_promptmii.generation import (
    DEFAULT_MAX_INSTRUCTION_TOKENS,
    budget_limit,
    generate,
    generator_settings,
)
from dspy_promptmii.local.pull import sha256_file
from dspy_promptmii.protocol import CONSTRAINED_STYLES, NAIVE_INSTRUCTION, TEMPLATES, Protocol, choose_template
from training.build_data import BuildConfig, build
from training.follower import (
    Follower,
    FollowerConfig,
    FollowerOutage,
    HeldOutSet,
    score_instruction,
)
from training.grpo_label import GRPOLabel
from training.runlog import JsonlLog, check_settings, digest, folder_lock
from training.sources import (
    default_datasets_dir,
    load_local_tasks,
    read_overlap_groups,
    read_splits,
    resolve_task_paths,
)
from training.tokens import TokenCounter, load_counter

logger = logging.getLogger("training.rollouts")

__all__ = [
    "RECORD_VERSION",
    "ROLLOUTS",
    "MANIFEST",
    "SUMMARY",
    "DEFAULT_EXTRA_SHOTS",
    "RolloutConfig",
    "Context",
    "ModelChoice",
    "plan_contexts",
    "sample_seed",
    "model_identity",
    "rollout_context",
    "run_rollouts",
    "finished_records",
    "read_run",
    "read_comparable_runs",
    "summarize",
    "main",
]

RECORD_VERSION = 1
ROLLOUTS = "rollouts.jsonl"
MANIFEST = "manifest.json"
SUMMARY = "summary.json"
#: Extra contexts (n -> fraction of tasks): the paper's 10- and 20-shot shares. Its 50-shot
#: contexts are left out by default: on these CPUs a 50-shot meta-prompt costs minutes per
#: sample, and the paper's base context is 5-shot.
DEFAULT_EXTRA_SHOTS: dict[int, float] = {10: 0.3, 20: 0.2}
DEFAULT_SAMPLES = {"train": 6, "valid": 1}
DEFAULT_TEMPERATURE = {"train": 1.0, "valid": 0.0}
SPLITS = ("train", "valid")


# --- configuration --------------------------------------------------------------------------


@dataclass(frozen=True)
class RolloutConfig:
    """Everything that decides which contexts are drawn and how they are sampled and scored
    (all of it is recorded in the manifest; a resume with any of it changed is refused).

    Args:
        split: ``train`` (k sampled rollouts per context) or ``valid`` (the held-out tasks'
            contexts: the validation reward, greedy by default).
        seed: Run seed: the train contexts (as ``build_data --seed``), sample seeds, order.
            Use a new one per round for new contexts.
        split_seed: Which tasks are held out (``valid_fraction``), and the ``valid``
            contexts: fixed across rounds (default 0), so that every round trains on the
            same tasks and every validation run measures the same contexts.
        repeats, base_shots, extra_shots, m, sampling, valid_fraction, valid_tasks,
        valid_shots, max_prompt_tokens, drop_contaminated: as ``training.build_data``.
        samples: k, the replies per context (>= 1; GRPO's group size).
        temperature: Sampling temperature of the generator (finite, >= 0).
        max_instruction_tokens: The budget stated in the meta-prompt and the generation
            limit, as compile's (None: no budget).
        template, constrained, reply_limit: The protocol every context carries
            (``template`` is resolved: ``meta1``/``meta2``/... or a template text).
        tokenizer: The token counter of the length filter (``approx`` or a path).

    Raises:
        ValueError: a value out of range, named.
    """

    split: str = "train"
    seed: int = 0
    split_seed: int = 0
    repeats: int = 1
    base_shots: int = 5
    extra_shots: dict[int, float] = field(default_factory=lambda: dict(DEFAULT_EXTRA_SHOTS))
    m: int = 20
    samples: int = DEFAULT_SAMPLES["train"]
    temperature: float = DEFAULT_TEMPERATURE["train"]
    max_instruction_tokens: int | None = DEFAULT_MAX_INSTRUCTION_TOKENS
    max_prompt_tokens: int = 4096
    valid_fraction: float = 0.1
    valid_tasks: tuple[str, ...] = ()
    valid_shots: tuple[int, ...] = (5, 20)
    sampling: str = "stratified"
    drop_contaminated: bool = True
    template: str = "meta2"
    constrained: str | bool = "choice"
    reply_limit: int | None = None
    tokenizer: str = "approx"

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 1:
            raise ValueError(f"samples (rollouts per context) must be an integer >= 1, got {self.samples!r}")
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature) or (
            self.temperature < 0
        ):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if self.temperature == 0 and self.samples > 1:
            raise ValueError(
                f"temperature 0 decodes greedily: the {self.samples} samples of a context would be the same reply; "
                "use --samples 1 or a temperature above 0"
            )
        if not 0 <= self.valid_fraction < 1:
            raise ValueError(f"valid_fraction must be in [0, 1), got {self.valid_fraction}")
        if self.split == "valid" and not self.valid_tasks and self.valid_fraction == 0:
            raise ValueError("--split valid needs held-out tasks: --valid-fraction above 0 or --valid-tasks")
        if self.max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be at least 1, got {self.max_prompt_tokens}")
        self.build_config()  # build_data's own checks (m, shots, repeats, sampling, protocol)

    def build_config(self) -> BuildConfig:
        """The :class:`~training.build_data.BuildConfig` that draws these contexts."""
        return BuildConfig(
            seed=self.seed,
            m=self.m,
            base_shots=self.base_shots,
            extra_shots=dict(self.extra_shots),
            repeats=self.repeats,
            sampling=self.sampling,
            template=self.template,
            max_prompt_tokens=self.max_prompt_tokens,
            valid_shots=tuple(self.valid_shots),
            datasource="promptmii-rollouts",
            drop_contaminated=self.drop_contaminated,
            constrained=self.constrained,
            reply_limit=self.reply_limit,
            max_instruction_tokens=self.max_instruction_tokens,
        )

    @property
    def protocol(self) -> Protocol:
        return self.build_config().protocol

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["extra_shots"] = {str(k): v for k, v in sorted(self.extra_shots.items())}
        data["valid_tasks"] = sorted(self.valid_tasks)
        data["valid_shots"] = list(self.valid_shots)
        return data


@dataclass(frozen=True)
class Context:
    """One drawn context: a ``training.build_data`` line and its identity."""

    record: Mapping[str, Any]

    @property
    def label(self) -> Mapping[str, Any]:
        return self.record["label"]

    @functools.cached_property
    def grpo(self) -> GRPOLabel:
        """The line's label read through its one schema."""
        return GRPOLabel.from_json(self.label)

    @property
    def key(self) -> str:
        label = self.grpo
        return f"{label.split}|{label.task}|{label.n_shot}|{label.repeat}"

    @property
    def meta_prompt(self) -> str:
        return self.record["prompt"][0]["content"]

    @property
    def sha256(self) -> str:
        """What the context is (prompt, shown and held-out rows, protocol), not where the
        task file lies (``source`` is left out, so a moved datasets folder resumes)."""
        label = {k: v for k, v in self.label.items() if k != "source"}
        return digest({"prompt": self.record["prompt"], "label": label})


def sample_seed(seed: int, key: str, index: int) -> int:
    """The seed of sample ``index`` of a context: a stable 31-bit SHA-256 of the run seed,
    the context key and the index (a rerun asks the generator for the same samples)."""
    data = hashlib.sha256(f"{seed}|{key}|sample|{index}".encode()).digest()
    return int.from_bytes(data[:4], "big") & 0x7FFFFFFF


def plan_contexts(
    tasks: Sequence[tuple[TaskData, str]],
    config: RolloutConfig,
    counter: TokenCounter,
    *,
    eval_tasks: Sequence[TaskData] = (),
    groups: Mapping[str, str] | None = None,
) -> tuple[list[Context], dict[str, Any]]:
    """The contexts of ``config.split``, in a seeded order, and build_data's summary.

    Drawn by :func:`training.build_data.build` over all ``tasks``: the held-out tasks are
    those build_data holds out with ``split_seed`` (unless ``valid_tasks`` names them), the
    train contexts (10-/20-shot draws included) those it draws with ``seed``, the validation
    contexts those it draws with ``split_seed``.

    Raises:
        ValueError: a task is also an evaluation task, every task was filtered out, two
            tasks share a name (build_data's checks).
    """
    build_config = config.build_config()
    valid_tasks = list(config.valid_tasks) or None
    if valid_tasks is None and config.valid_fraction > 0:
        probe = build(tasks, replace(build_config, seed=config.split_seed), counter, eval_tasks=eval_tasks,
                      groups=groups or {}, valid_fraction=config.valid_fraction, progress=False)
        valid_tasks = list(probe.summary["tasks"]["valid"]) or None
    if config.split == "valid":
        build_config = replace(build_config, seed=config.split_seed)
    result = build(
        tasks,
        build_config,
        counter,
        eval_tasks=eval_tasks,
        groups=groups or {},
        valid_tasks=valid_tasks,
        valid_fraction=0.0 if valid_tasks else config.valid_fraction,
        progress=False,
    )
    lines = result.train if config.split == "train" else result.valid
    contexts = [Context(line) for line in lines]
    random.Random(f"{config.seed}|rollout-order").shuffle(contexts)  # a cut-short run covers many tasks
    return contexts, result.summary


# --- generator and follower identities --------------------------------------------------------------


@dataclass(frozen=True)
class ModelChoice:
    """Where a model runs: the embedded llama.cpp server (``url`` None: ``model`` is a
    registry name, a trained-generator name or a ``.gguf`` path; ``lora`` an adapter file) or
    an OpenAI-compatible endpoint (``model`` is the served name; the weights it serves can
    only be declared: ``base_sha256``/``adapter_sha256``)."""

    model: str
    url: str | None = None
    lora: str | None = None
    api_key: str = "EMPTY"
    base_sha256: str | None = None
    adapter_sha256: str | None = None

    @property
    def local(self) -> bool:
        return self.url is None


def model_identity(choice: ModelChoice) -> dict[str, Any]:
    """What names the weights behind ``choice``: the base model's sha256 and the adapter's
    (None without one). For a local model the files are checked and hashed here (registry
    models carry their sha256), before any server starts.

    Raises:
        ValueError: an adapter with an endpoint or with a trained-generator name, or a
            declared sha256 that is not 64 hex digits.
        ValueError: an unknown local name (the message names the closest one).
        FileNotFoundError, ModelFileError: a missing or non-GGUF file (named).
    """
    from dspy_promptmii.local.adapters import resolve_adapter
    from dspy_promptmii.local.pull import check_gguf_file, is_model_path
    from dspy_promptmii.local.registry import ADAPTERS, REGISTRY, unknown_local_model
    from dspy_promptmii.routes import local_model

    for name, value in (("base_sha256", choice.base_sha256), ("adapter_sha256", choice.adapter_sha256)):
        if value is not None and (len(value) != 64 or any(c not in "0123456789abcdef" for c in value.lower())):
            raise ValueError(f"{name} must be 64 hex digits, got {value!r}")
    if not choice.local:
        if choice.lora:
            raise ValueError("a LoRA adapter applies to the embedded server only; an endpoint serves its own weights")
        return {
            "kind": "endpoint",
            "model": choice.model,
            "base_sha256": choice.base_sha256,
            "adapter": None,
            "adapter_sha256": choice.adapter_sha256,
        }
    model = local_model(choice.model)
    adapter = adapter_sha = None
    if model in ADAPTERS:
        if choice.lora:
            raise ValueError(f"{model!r} is a trained generator (base + adapter): pass no other adapter")
        spec = ADAPTERS[model]
        path = resolve_adapter(spec)
        adapter, adapter_sha = path.name, spec.sha256
        base_name, base_sha = spec.base, REGISTRY[spec.base].sha256
    elif model in REGISTRY:
        base_name, base_sha = model, REGISTRY[model].sha256
    elif is_model_path(model):
        path = check_gguf_file(model)
        base_name, base_sha = path.name, sha256_file(path)
    else:  # neither a local name nor a file: most likely a misspelled name
        raise ValueError(unknown_local_model(model))
    if choice.lora:
        lora = check_gguf_file(choice.lora)
        adapter, adapter_sha = lora.name, sha256_file(lora)
    return {
        "kind": "local",
        "model": base_name,
        "base_sha256": base_sha,
        "adapter": adapter,
        "adapter_sha256": adapter_sha,
    }


@dataclass
class Endpoints:
    """The generator LM and the follower client of a run, and the follower's default style."""

    generator: Any  # dspy.LM
    follower: Follower
    constrained_style: str


@contextlib.contextmanager
def open_endpoints(
    generator: ModelChoice,
    follower: ModelChoice,
    *,
    n_ctx: int,
    n_threads: int | None,
    follower_concurrency: int,
    follower_timeout: float,
) -> Iterator[Endpoints]:
    """Start the embedded servers needed (one when generator and follower are the same local
    model without an adapter, else one each: llama-cpp-python applies ``--lora_path`` to
    every request) and stop them at the end."""
    import dspy

    from dspy_promptmii.local.adapters import resolve_adapter
    from dspy_promptmii.local.registry import ADAPTERS
    from dspy_promptmii.local.server import FOLLOWER_STYLE, LocalServer
    from dspy_promptmii.routes import litellm_route, local_model

    def local_args(choice: ModelChoice) -> tuple[str, str | None]:
        model = local_model(choice.model)
        if model in ADAPTERS:
            return ADAPTERS[model].base, str(resolve_adapter(ADAPTERS[model]))
        return model, choice.lora

    with contextlib.ExitStack() as stack:
        servers: dict[tuple[str, str | None], LocalServer] = {}

        def server_for(choice: ModelChoice) -> LocalServer:
            model, lora = local_args(choice)
            if (model, lora) not in servers:
                server = LocalServer(model, n_ctx=n_ctx, n_threads=n_threads, auto_pull=True, lora=lora)
                server.start()
                stack.callback(server.stop)
                servers[(model, lora)] = server
            return servers[(model, lora)]

        if generator.local:
            generator_lm = server_for(generator).lm(cache=False)
        else:
            generator_lm = dspy.LM(
                litellm_route(generator.model, generator.url),
                api_base=generator.url,
                api_key=generator.api_key,
                cache=False,
            )
        if follower.local:
            server = server_for(follower)
            base_url, model, style = server.base_url, server.alias, FOLLOWER_STYLE
        else:
            base_url, model, style = follower.url, follower.model, "json_schema"
        client = Follower(
            FollowerConfig(
                base_url=base_url,
                model=model,
                api_key=follower.api_key,
                concurrency=follower_concurrency,
                timeout=follower_timeout,
                sample_timeout=max(600.0, follower_timeout * 25),
            )
        )
        yield Endpoints(generator_lm, client, style)


# --- one context ------------------------------------------------------------------------------------


async def rollout_context(
    context: Context,
    config: RolloutConfig,
    generator: Any,
    follower: Follower,
) -> dict[str, Any]:
    """The naive baseline and ``config.samples`` scored rollouts of one context (the record
    without its run identities; see the module docstring).

    Raises whatever the generator raises (a server that died stops the run: the context in
    flight is lost, the finished ones are on disk) and :class:`~training.follower.FollowerOutage`.
    Follower failures of single samples do not raise: they are recorded (``follower_error``)
    and make the record's ``status`` ``"error"`` (the context runs again on a restart).
    """
    started = time.perf_counter()
    tests: HeldOutSet = context.grpo.held_out()
    naive = await score_instruction(follower, NAIVE_INSTRUCTION, tests)
    limit = budget_limit(config.max_instruction_tokens)
    samples = []
    for index in range(config.samples):
        seed = sample_seed(config.seed, context.key, index)
        settings, filled = generator_settings(
            generator, temperature=config.temperature, max_tokens=limit, extra={"seed": seed}
        )
        generated = time.perf_counter()
        reply = generate(generator, context.meta_prompt, settings, {*filled, "seed"})
        generation_seconds = time.perf_counter() - generated
        cleaned = tests.protocol.clean(
            reply.text, tests.input_fields, labels=tests.labels, examples=tests.shown, truncated=reply.truncated
        )
        score = await score_instruction(follower, cleaned.text, tests)
        samples.append(
            {
                "index": index,
                "seed": seed,
                "temperature": config.temperature,
                "settings": reply.settings,
                "raw_reply": reply.text,
                "finish_reason": reply.finish_reason,
                "completion_tokens": reply.usage.get("completion_tokens"),
                "instruction": cleaned.text,
                "copied_lines": cleaned.copied_lines,
                "generation_seconds": round(generation_seconds, 3),
                **score.record(),
            }
        )
        logger.debug("%s sample %d: reward %.3f (naive %.3f)", context.key, index, score.reward, naive.reward)
    failed = naive.follower_error is not None or any(s["follower_error"] for s in samples)
    label = context.grpo
    return {
        "version": RECORD_VERSION,
        "status": "error" if failed else "ok",
        "key": context.key,
        "context_sha256": context.sha256,
        "split": label.split,
        "task": label.task,
        "n_shot": label.n_shot,
        "repeat": label.repeat,
        "context_seed": label.context_seed,
        "meta_prompt": context.meta_prompt,
        "label": dict(context.label),  # as the data builder wrote it
        "protocol": dict(context.label["protocol"]),
        "naive": {"instruction": NAIVE_INSTRUCTION, **naive.record()},
        "samples": samples,
        "seconds": round(time.perf_counter() - started, 2),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


# --- the run -----------------------------------------------------------------------------------------


def finished_records(records: Sequence[Mapping[str, Any]], settings_sha256: str) -> dict[str, dict[str, Any]]:
    """The last ``ok`` record of each context key made with these settings."""
    done: dict[str, dict[str, Any]] = {}
    for record in records:
        if record.get("status") == "ok" and record.get("settings_sha256") == settings_sha256:
            done[str(record["key"])] = dict(record)
    return done


def summarize(records: Sequence[Mapping[str, Any]], planned: int | None = None) -> dict[str, Any]:
    """Rewards of finished context records: mean sample reward (for a greedy ``valid`` run,
    the validation reward), mean naive reward, mean best-of-k, mean advantage (best - naive),
    how often any sample beat naive, and the same per task and per n."""

    def block(group: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        rewards = [s["reward"] for r in group for s in r["samples"]]
        naive = [r["naive"]["reward"] for r in group]
        best = [max(s["reward"] for s in r["samples"]) for r in group]
        return {
            "contexts": len(group),
            "samples": len(rewards),
            "mean_reward": round(statistics.fmean(rewards), 4) if rewards else None,
            "mean_naive_reward": round(statistics.fmean(naive), 4) if naive else None,
            "mean_best_reward": round(statistics.fmean(best), 4) if best else None,
            "mean_advantage": round(statistics.fmean(b - n for b, n in zip(best, naive)), 4) if best else None,
            "any_beat_naive": round(sum(b > n for b, n in zip(best, naive)) / len(group), 4) if group else None,
            "empty_rate": round(sum(bool(s.get("empty_instruction")) for r in group for s in r["samples"])
                                / len(rewards), 4) if rewards else None,
        }

    by_task: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    by_n: dict[int, list[Mapping[str, Any]]] = defaultdict(list)
    for record in records:
        by_task[str(record["task"])].append(record)
        by_n[int(record["n_shot"])].append(record)
    return {
        **({"planned": planned} if planned is not None else {}),
        **block(records),
        "by_n_shot": {str(n): block(by_n[n]) for n in sorted(by_n)},
        "by_task": {task: block(by_task[task]) for task in sorted(by_task)},
    }


def read_run(path: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The finished records of one rollout folder (or its rollouts.jsonl) and the settings of
    its manifest (``split``, generator, follower, protocol, ...).

    Raises:
        FileNotFoundError: ``path`` is not a ``training.rollouts --out`` folder.
        ValueError: its manifest is broken or not a manifest.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no rollouts folder or file at {path}: pass a training.rollouts --out folder")
    if path.is_file() and path.name != ROLLOUTS:
        raise FileNotFoundError(f"{path} is not a {ROLLOUTS}: pass a training.rollouts --out folder")
    folder = path if path.is_dir() else path.parent
    file = folder / ROLLOUTS if path.is_dir() else path
    manifest = folder / MANIFEST
    if not file.is_file():
        raise FileNotFoundError(f"no {ROLLOUTS} in {folder}: pass a training.rollouts --out folder")
    if not manifest.is_file():
        raise FileNotFoundError(f"no {MANIFEST} beside {file}: pass a training.rollouts --out folder")
    data = read_json(manifest)  # a broken file: ValueError naming it, with line and column
    settings = data.get("settings") if isinstance(data, dict) else None
    if not isinstance(settings, dict) or not isinstance(settings.get("config"), dict):
        raise ValueError(f"{manifest}: not a training.rollouts manifest (an object with settings and their config)")
    sha = data.get("settings_sha256") or digest(settings)
    return list(finished_records(JsonlLog(file).read(), sha).values()), settings


def read_comparable_runs(
    paths: Sequence[str | Path], split: str, why: str, hint: str = ""
) -> list[tuple[Path, list[dict[str, Any]], dict[str, Any]]]:
    """:func:`read_run` of each path, checked to hold ``split`` rollouts (``why`` ends the error
    otherwise) scored with the first one's follower and protocol (else their rewards are not
    comparable; ``hint`` ends that error). Raises what :func:`read_run` raises, and ``ValueError`` naming the folder."""
    runs = []
    for raw in paths:
        path = Path(raw)
        records, settings = read_run(path)
        found = settings["config"].get("split", "train")
        if found != split:
            raise ValueError(f"{path} holds {found!r} rollouts: {why}")
        if runs and (settings.get("follower"), settings.get("protocol")) != (
            runs[0][2].get("follower"), runs[0][2].get("protocol")
        ):
            raise ValueError(f"{path} was scored with another follower or protocol than {runs[0][0]}: their rewards "
                             f"are not comparable{hint}")
        runs.append((path, records, settings))
    return runs


def run_rollouts(
    contexts: Sequence[Context],
    config: RolloutConfig,
    generator: Any,
    follower: Follower,
    log: JsonlLog,
    *,
    identities: Mapping[str, Any],
    settings_sha256: str,
    limit: int | None = None,
    progress: bool = True,
) -> dict[str, int]:
    """Roll out the contexts not finished in ``log`` (at most ``limit`` of them), appending
    one record per context as it finishes; returns counts (``done_before``, ``run``,
    ``errors``, ``left``).

    Raises what :func:`rollout_context` raises; the records of finished contexts are on disk.
    """
    log.repair()
    done = finished_records(log.read(), settings_sha256)
    todo = [c for c in contexts if c.key not in done]
    if limit is not None:
        todo = todo[:limit]
    counts = {"done_before": sum(1 for c in contexts if c.key in done), "run": 0, "errors": 0}
    logger.info("%d of %d contexts finished before; running %d now", counts["done_before"], len(contexts), len(todo))

    async def run() -> None:
        try:
            bar = tqdm(todo, desc=f"rollouts ({config.split})", unit="context", disable=not progress)
            best_sum = naive_sum = 0.0
            for number, context in enumerate(bar, start=1):
                record = await rollout_context(context, config, generator, follower)
                record.update(identities)
                record["settings_sha256"] = settings_sha256
                log.append(record)
                counts["run"] += 1
                if record["status"] != "ok":
                    counts["errors"] += 1
                    logger.warning("%s: the follower failed; recorded as an error, it runs again next time",
                                   context.key)
                best_sum += max(s["reward"] for s in record["samples"])
                naive_sum += record["naive"]["reward"]
                bar.set_postfix(best=f"{best_sum / number:.3f}", naive=f"{naive_sum / number:.3f}")
        finally:
            await follower.aclose()

    asyncio.run(run())
    counts["left"] = len(contexts) - counts["done_before"] - counts["run"] + counts["errors"]
    return counts


# --- command line ------------------------------------------------------------------------------------


def _extra_shots(text: str) -> dict[int, float]:
    from training.build_data import _parse_extra_shots

    return _parse_extra_shots(text)


def _shots(text: str) -> tuple[int, ...]:
    from training.build_data import _parse_shots

    return _parse_shots(text)


def parser() -> argparse.ArgumentParser:
    from dspy_promptmii.cli import context_size, non_negative_int, positive_int

    p = argparse.ArgumentParser(
        prog="python -m training.rollouts",
        description="Sample k instructions per context from the current generator and score each, and the naive "
        "instruction, with the follower's reward (rejection-sampling fine-tuning data; resumable).",
    )
    p.add_argument("--out", type=Path, required=True, help="run folder (rollouts.jsonl, manifest.json, summary.json)")
    src = p.add_argument_group("contexts (drawn as training.build_data draws them)")
    src.add_argument("--datasets", type=Path, default=None,
                     help="task folders with SPLITS.json and INDEX.tsv (default: $PROMPTMII_SHARED_DATASETS or "
                     "../shared/datasets)")
    src.add_argument("--split", choices=SPLITS, default="train",
                     help="train: k sampled rollouts per training context (default); valid: the held-out tasks' "
                     "contexts, greedy (the validation reward)")
    src.add_argument("--tasks", nargs="*", default=None,
                     help="only the contexts of these tasks (the plan is still drawn over every train task)")
    src.add_argument("--limit", type=positive_int, default=None, help="run at most this many contexts now")
    src.add_argument("--seed", type=int, default=0,
                     help="train contexts, sample seeds and order (use a new one per round)")
    src.add_argument("--split-seed", type=int, default=0,
                     help="which tasks are held out, and the valid contexts (keep it across rounds; 0)")
    src.add_argument("--repeats", type=positive_int, default=1,
                     help="independent draws of every planned context (validation contexts too; repeat 0 stays "
                     "the same)")
    src.add_argument("--m", type=positive_int, default=20, help="held-out rows scored per context (20)")
    src.add_argument("--base-shots", type=positive_int, default=5, help="shots of every task's context (5)")
    src.add_argument("--extra-shots", type=_extra_shots, default=dict(DEFAULT_EXTRA_SHOTS),
                     help="extra contexts as N:FRACTION of tasks (default 10:0.3,20:0.2; 'none' for none)")
    src.add_argument("--valid-fraction", type=float, default=0.1,
                     help="share of the train tasks held out whole (by overlap group) for validation (0.1)")
    src.add_argument("--valid-tasks", nargs="*", default=None, help="held-out tasks, instead of --valid-fraction")
    src.add_argument("--valid-shots", type=_shots, default=(5, 20), help="contexts per held-out task (5,20)")
    src.add_argument("--keep-contaminated", action="store_true",
                     help="keep rows sharing a text with a dev task in the contexts (default: left out)")
    src.add_argument("--max-prompt-tokens", type=positive_int, default=4096,
                     help="drop contexts whose chat prompt is longer (4096)")
    src.add_argument("--tokenizer", default="approx",
                     help="token counter of the length filter: approx (default), a .gguf file or a tokenizer folder")
    gen = p.add_argument_group("generator (the policy being trained)")
    gen.add_argument("--generator", default="local",
                     help="local (the embedded default), a registry model, a trained generator, a .gguf path; "
                     "with --generator-url the served model name")
    gen.add_argument("--lora", default=None, help="LoRA adapter (.gguf, from training.export) on a local generator")
    gen.add_argument("--generator-url", default=None, help="OpenAI-compatible base URL of the generator")
    gen.add_argument("--generator-base-sha256", default=None, help="with --generator-url: sha256 of its base weights")
    gen.add_argument("--generator-adapter-sha256", default=None, help="with --generator-url: sha256 of its adapter")
    gen.add_argument("--samples", type=positive_int, default=None, help="k rollouts per context (train 6, valid 1)")
    gen.add_argument("--temperature", type=float, default=None, help="sampling temperature (train 1.0, valid 0)")
    gen.add_argument("--max-instruction-tokens", type=non_negative_int, default=DEFAULT_MAX_INSTRUCTION_TOKENS,
                     help=f"instruction budget as compile's, 0 for none ({DEFAULT_MAX_INSTRUCTION_TOKENS})")
    gen.add_argument("--template", default="auto",
                     help="meta-prompt template (auto: meta1 for Llama generators, meta2 otherwise, as compile)")
    fol = p.add_argument_group("follower (the reward)")
    fol.add_argument("--follower", default="local", help="local, a registry model or a .gguf path; with "
                     "--follower-url the served model name")
    fol.add_argument("--follower-url", default=None, help="OpenAI-compatible base URL of the follower")
    fol.add_argument("--constrained", choices=["auto", "none", *CONSTRAINED_STYLES], default="auto",
                     help="the follower's constrained decoding, part of the protocol (auto: the endpoint's style, "
                     "choice for the embedded server, json_schema for an endpoint)")
    fol.add_argument("--reply-limit", type=positive_int, default=None, help="the follower's max_tokens")
    fol.add_argument("--follower-concurrency", type=positive_int, default=1,
                     help="follower requests in flight (1: llama.cpp's server answers one at a time)")
    fol.add_argument("--follower-timeout", type=float, default=300.0, help="seconds per follower request (300)")
    run = p.add_argument_group("local servers and output")
    run.add_argument("--n-ctx", type=context_size, default=8192, help="context size of local servers (8192)")
    run.add_argument("--n-threads", type=positive_int, default=None, help="threads of each local server (all)")
    run.add_argument("--api-key-env", default=None, help="environment variable holding the endpoints' API key")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def _task_files(tasks: Sequence[tuple[TaskData, str]]) -> dict[str, str]:
    """Task name -> sha256 of its data file (what the contexts were drawn from)."""
    hashes = {}
    for task, source in tasks:
        path = Path(source.removeprefix("local:"))
        hashes[task.name] = sha256_file(path / "data.jsonl" if path.is_dir() else path)
    return hashes


@dataclass
class Prepared:
    """Everything checked and drawn before any server starts."""

    config: RolloutConfig
    contexts: list[Context]
    selected: list[Context]
    generator: ModelChoice
    follower: ModelChoice
    settings: dict[str, Any]
    identities: dict[str, Any]
    build_summary: dict[str, Any]


def prepare(args: argparse.Namespace) -> Prepared:
    """Check every option and input, draw the plan and compute the settings (no server).

    Raises:
        SystemExit: with a message naming the problem.
    """
    datasets = (args.datasets or default_datasets_dir()).expanduser().resolve()
    splits = read_splits(datasets) if datasets.is_dir() else None
    if not splits or not splits.get("train"):
        raise SystemExit(f"error: no SPLITS.json with a 'train' list in {datasets}: pass --datasets DIR")
    dev = sorted(splits.get("dev") or [])
    try:
        check_writable(args.out, folder=True)
    except ValueError as error:
        raise SystemExit(f"error: --out: {error}") from None
    api_key = "EMPTY"
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env) or ""
        if not api_key:
            raise SystemExit(f"error: --api-key-env {args.api_key_env} is not set")
    generator = ModelChoice(
        model=args.generator,
        url=args.generator_url,
        lora=args.lora,
        api_key=api_key,
        base_sha256=args.generator_base_sha256,
        adapter_sha256=args.generator_adapter_sha256,
    )
    follower = ModelChoice(model=args.follower, url=args.follower_url, api_key=api_key)
    if not generator.local and (args.generator == "local"):
        raise SystemExit("error: --generator-url needs --generator NAME, the served model name")
    if not follower.local and args.follower == "local":
        raise SystemExit("error: --follower-url needs --follower NAME, the served model name")
    if generator.local and (args.generator_base_sha256 or args.generator_adapter_sha256):
        raise SystemExit("error: --generator-*-sha256 declare an endpoint's weights; a local model is hashed here")
    try:
        identities = {"generator": model_identity(generator), "follower": model_identity(follower)}
    except (ValueError, KeyError, FileNotFoundError) as error:
        raise SystemExit(f"error: {str(error).strip(chr(39))}") from None
    if identities["follower"].get("adapter"):
        raise SystemExit("error: the follower is frozen: it takes no adapter")
    if generator.local and identities["generator"]["base_sha256"] is None:  # pragma: no cover - registry always has
        raise SystemExit("error: the generator's base weights have no sha256")
    if not generator.local and identities["generator"]["base_sha256"] is None:
        logger.warning("the generator endpoint's weights are not declared (--generator-base-sha256): the records "
                       "cannot name them, and a changed endpoint model goes unnoticed on resume")

    generator_name = generator.model if not generator.local else identities["generator"]["model"]
    try:
        template, why = choose_template(Protocol(template=args.template).template, generator_name)
    except (ValueError, TypeError) as error:
        raise SystemExit(f"error: --template: {error}") from None
    style: str | bool
    if args.constrained == "auto":
        from dspy_promptmii.local.server import FOLLOWER_STYLE

        style = FOLLOWER_STYLE if follower.local else "json_schema"
    else:
        style = False if args.constrained == "none" else args.constrained
    split = args.split
    try:
        config = RolloutConfig(
            split=split,
            seed=args.seed,
            split_seed=args.split_seed,
            repeats=args.repeats,
            base_shots=args.base_shots,
            extra_shots=args.extra_shots,
            m=args.m,
            samples=args.samples if args.samples is not None else DEFAULT_SAMPLES[split],
            temperature=args.temperature if args.temperature is not None else DEFAULT_TEMPERATURE[split],
            max_instruction_tokens=args.max_instruction_tokens or None,
            max_prompt_tokens=args.max_prompt_tokens,
            valid_fraction=args.valid_fraction,
            valid_tasks=tuple(args.valid_tasks or ()),
            valid_shots=tuple(args.valid_shots),
            drop_contaminated=not args.keep_contaminated,
            template=template,
            constrained=style,
            reply_limit=args.reply_limit,
            tokenizer=str(args.tokenizer),
        )
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    if split == "train" and config.samples < 6:
        logger.warning("--samples %d: the issue asks for k >= 6 rollouts per context on train", config.samples)
    logger.info("template %s (%s); follower decoding %s", template if template in TEMPLATES else "custom", why,
                style or "plain")

    try:
        tasks = load_local_tasks(resolve_task_paths(splits["train"], datasets))
        dev_tasks = load_local_tasks(resolve_task_paths(dev, datasets)) if dev else []
        eval_tasks = [task for task, _ in dev_tasks]
        counter = load_counter(args.tokenizer)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from None
    clash = sorted({t.name for t, _ in tasks} & set(dev))
    if clash:  # build() refuses it too; said here in the split file's terms
        raise SystemExit(f"error: {datasets}/SPLITS.json lists {clash} as both train and dev tasks")
    try:
        contexts, build_summary = plan_contexts(
            tasks, config, counter, eval_tasks=eval_tasks, groups=read_overlap_groups(datasets)
        )
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    if not contexts:
        raise SystemExit(f"error: no {split} contexts were drawn (see the log: filters, lengths)")

    selected = contexts
    if args.tasks:
        wanted = set(args.tasks)
        in_split = {c.grpo.task for c in contexts}
        problems = []
        for name in sorted(wanted - in_split):
            if name in dev:
                problems.append(f"{name} is a dev task (never drawn)")
            elif name in build_summary["tasks"]["filtered"]:
                problems.append(f"{name} was filtered out ({build_summary['tasks']['filtered'][name]})")
            elif name in build_summary["tasks"]["train"] + build_summary["tasks"]["valid"]:
                problems.append(f"{name} is not in the {split} split")
            else:
                problems.append(f"{name} is not a train task of {datasets}/SPLITS.json")
        if problems:
            raise SystemExit("error: --tasks: " + "; ".join(problems))
        selected = [c for c in contexts if c.grpo.task in wanted]

    settings = {
        "version": RECORD_VERSION,
        "config": config.to_dict(),
        "protocol": config.protocol.to_dict(),
        "generator": identities["generator"],
        "follower": identities["follower"],
        "data": {
            "splits_sha256": sha256_file(datasets / "SPLITS.json"),
            "tasks": _task_files([*tasks, *dev_tasks]),
        },
        "plan": {
            "contexts": len(contexts),
            "by_n_shot": dict(sorted(Counter(str(c.grpo.n_shot) for c in contexts).items())),
            "sha256": digest(sorted(c.sha256 for c in contexts)),
        },
    }
    return Prepared(config, contexts, selected, generator, follower, settings, identities, build_summary)


def _stop_on_sigterm() -> None:
    """SIGTERM (a session ending) stops the run like Ctrl-C: servers are stopped, finished
    contexts are on disk."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    with contextlib.suppress(ValueError):  # not the main thread
        signal.signal(signal.SIGTERM, handler)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("LiteLLM", "litellm", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.follower_timeout <= 0:
        raise SystemExit(f"error: --follower-timeout must be positive, got {args.follower_timeout}")
    if args.n_ctx < 512:
        raise SystemExit(f"error: --n-ctx must be at least 512, got {args.n_ctx}")
    prepared = prepare(args)
    out: Path = args.out
    from training.runlog import RunLocked, SettingsMismatch

    try:
        with folder_lock(out, "rollout run"):
            new = check_settings(
                out / MANIFEST,
                prepared.settings,
                what="rollouts",
                hint="run the same command to resume, or pass another --out (a new round, generator or seed "
                "gets its own folder)",
            )
            settings_sha256 = digest(json_settings(prepared.settings))
            log = JsonlLog(out / ROLLOUTS)
            logger.info("%s %s: %d %s contexts planned (%s), %d selected; generator %s; follower %s",
                        "new run" if new else "resuming", out, len(prepared.contexts), prepared.config.split,
                        prepared.settings["plan"]["by_n_shot"], len(prepared.selected),
                        _name(prepared.identities["generator"]), _name(prepared.identities["follower"]))
            _stop_on_sigterm()
            started = time.perf_counter()
            try:
                with open_endpoints(
                    prepared.generator,
                    prepared.follower,
                    n_ctx=args.n_ctx,
                    n_threads=args.n_threads,
                    follower_concurrency=args.follower_concurrency,
                    follower_timeout=args.follower_timeout,
                ) as endpoints:
                    counts = run_rollouts(
                        prepared.selected,
                        prepared.config,
                        endpoints.generator,
                        endpoints.follower,
                        log,
                        identities={**prepared.identities, "protocol": prepared.settings["protocol"]},
                        settings_sha256=settings_sha256,
                        limit=args.limit,
                        progress=not args.no_progress,
                    )
            except KeyboardInterrupt:
                logger.warning("interrupted: finished contexts are saved in %s; run the same command to resume",
                               log.path)
                write_summary(out, log, settings_sha256, len(prepared.contexts))
                return 130
            except FollowerOutage as error:
                write_summary(out, log, settings_sha256, len(prepared.contexts))
                raise SystemExit(f"error: {error}; finished contexts are saved in {log.path}") from None
            except Exception:
                logger.error("the run stopped on an error (the generator or its server?); finished contexts are "
                             "saved in %s, run the same command to resume", log.path)
                write_summary(out, log, settings_sha256, len(prepared.contexts))
                raise
            summary = write_summary(out, log, settings_sha256, len(prepared.contexts))
    except (RunLocked, SettingsMismatch, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
    logger.info(
        "ran %d contexts in %.0f s (%d follower errors, to rerun); %d of %d finished: mean sample reward %s, naive "
        "%s, best-of-k %s, any sample beat naive in %s of contexts",
        counts["run"], time.perf_counter() - started, counts["errors"], summary["contexts"], summary["planned"],
        summary["mean_reward"], summary["mean_naive_reward"], summary["mean_best_reward"], summary["any_beat_naive"],
    )
    return 0


def json_settings(settings: Mapping[str, Any]) -> Any:
    """Settings as they are on disk (tuples as lists), so digests agree with the manifest's."""
    import json

    return json.loads(json.dumps(settings, default=str))


def _name(identity: Mapping[str, Any]) -> str:
    text = str(identity.get("model"))
    if identity.get("adapter"):
        text += f" + {identity['adapter']}"
    return text


def write_summary(out: Path, log: JsonlLog, settings_sha256: str, planned: int) -> dict[str, Any]:
    """``summary.json`` of every finished context of the folder's settings; returns it."""
    records = list(finished_records(log.read(), settings_sha256).values())
    summary = summarize(records, planned)
    write_json(summary, out / SUMMARY)
    return summary


if __name__ == "__main__":
    sys.exit(main())
