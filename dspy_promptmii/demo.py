"""``promptmii demo``: the main job on the embedded model, end to end, offline.

A ``dspy.Predict`` intent classifier (SNIPS, shipped with the package) is compiled by
PromptMIIOptimizer with the trained generator (``promptmii-qwen2.5-0.5b``: the local model
plus the shipped Prompt-MII LoRA; ``--generator local`` gives the untrained Prompt-MII-Zero),
and compared on held-out rows with a naive instruction and with ICL on the same labelled
examples, all followed by the local model through ``LabelAdapter``.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from importlib import resources
from typing import Any

import dspy

from dspy_promptmii.adapter import FOLLOWER_REPLY_LIMIT, LabelAdapter
from dspy_promptmii.baselines import icl_program, naive_program
from dspy_promptmii.data import TaskData, load_jsonl, split_rows
from dspy_promptmii.evaluation import evaluate
from dspy_promptmii.generation import budget_limit
from dspy_promptmii.local.registry import ADAPTERS, DEFAULT_GENERATOR, REGISTRY
from dspy_promptmii.local.server import DEFAULT_N_CTX, LocalServer
from dspy_promptmii.optimizer import (
    DEFAULT_MAX_INSTRUCTION_TOKENS,
    PromptMIIOptimizer,
    meta_prompt_budget,
)
from dspy_promptmii.protocol import Protocol, follower_decoding, follower_style_from_constrained
from dspy_promptmii.routes import LMPool, check_route, is_local, local_model
from dspy_promptmii.sampling import select_examples
from dspy_promptmii.secrets import protected_logger
from dspy_promptmii.usage import metered

logger = protected_logger(__name__)

__all__ = ["demo_task", "run_demo", "demo_generator", "generator_name", "format_table", "format_cost"]

#: The demo's Prompt-MII settings: the optimizer's defaults, which the dev-task studies chose
#: (README, "Which settings are the defaults, and why"; benchmarks/results/dev12-2026-11-29,
#: dev12-choice-2026-12-05): the trained generator on the 0.5B model (the untrained 1.5B one
#: scored lower), no exemplars (no gain, twice the compile time), the 160-token instruction
#: budget, one generator call.
DEMO_GENERATOR: str = DEFAULT_GENERATOR  # with a local follower; else the follower's route
DEMO_EXEMPLARS = 0
DEMO_MAX_INSTRUCTION_TOKENS: int | None = DEFAULT_MAX_INSTRUCTION_TOKENS
DEMO_CANDIDATES = 1


def demo_task() -> TaskData:
    """The packaged SNIPS sample (420 rows, 7 intents, CC0)."""
    path = resources.files("dspy_promptmii") / "data" / "snips_demo.jsonl"
    with resources.as_file(path) as file:
        return TaskData(name="snips", rows=load_jsonl(file))


@dataclass
class MethodResult:
    method: str
    macro_f1: float
    invalid_rate: float
    prompt_tokens_per_query: float | None
    compile_calls: int
    compile_seconds: float
    eval_seconds: float
    n_examples: int


def run_demo(
    *,
    follower: str = "local",
    generator: str | None = None,
    n: int = 20,
    test_rows: int = 100,
    seed: int = 0,
    follower_style: str = "endpoint",
    adapter: str = "label",
    n_ctx: int = DEFAULT_N_CTX,
    progress: bool = True,
    exemplars: int = 0,
    max_instruction_tokens: int | None = DEFAULT_MAX_INSTRUCTION_TOKENS,
    candidates: int = 1,
    timeout: float | None = None,
    constrained: bool | str | None = None,
) -> dict[str, Any]:
    """Run the demo and return its results (instruction, per-method rows, settings).

    ``generator`` (None): with a local follower the trained generator :data:`DEMO_GENERATOR`,
    else the follower's route; a local generator's server runs only for the compile, and
    what would stop it starting is checked before any evaluation. ``follower_style``: the follower's
    constrained decoding with LabelAdapter, as ``RunConfig.follower_style`` takes it
    (:data:`~dspy_promptmii.protocol.FOLLOWER_STYLES`): ``"endpoint"`` for the follower
    endpoint's own style, ``"none"``, or a style name. ``constrained`` is its deprecated
    spelling (``True``: ``"endpoint"``, ``False``: ``"none"``, or a style name). ``exemplars``,
    ``max_instruction_tokens`` and ``candidates`` are PromptMIIOptimizer's; with
    ``candidates`` > 1 they are scored on labelled rows the generator did not see (never
    a test row). ``timeout`` is each LM request's limit in seconds (default: the
    route's, see :func:`dspy_promptmii.routes.default_timeout`).

    Raises:
        ValueError: a bad adapter, follower style, row count or an empty generator.
        ServerError, FileNotFoundError, ModelFileError, CorruptModelError, PullError: a
            local follower or generator cannot start (see ``LocalServer.prepare``).
        IncompleteEvaluation: follower calls failed while a method was evaluated (no
            score is made up from the rows that got a reply).
        KeyboardInterrupt: Ctrl-C or SIGTERM under :func:`dspy_promptmii.stopping.stop_on_signals`.
    """
    if adapter not in ("label", "chat"):
        raise ValueError(f"adapter must be 'label' or 'chat', got {adapter!r}")
    if constrained is not None:
        warnings.warn(
            "run_demo(constrained=...) is deprecated: use follower_style='endpoint', 'none' or a style name",
            DeprecationWarning,
            stacklevel=2,
        )
        follower_style = follower_style_from_constrained(constrained)
    follower_decoding(follower_style, None)  # a bad style fails here, before any server starts
    if isinstance(generator, str) and not generator.strip():
        raise ValueError("generator must be a route, a registry model, a trained generator or None, got ''")
    # a misspelled name or a wrong type fails here, before any server starts
    for route in (follower, *([generator] if generator is not None else [])):
        check_route(route)
    generator_route = demo_generator(generator, follower)
    if is_local(generator_route) and generator_route != follower:
        # Its server starts only for the compile; whatever would stop it starting (no
        # llama.cpp, a missing or damaged model or adapter) fails here, before any evaluation.
        LocalServer(local_model(generator_route), auto_pull=True).prepare()
    task = demo_task()
    if not 1 <= test_rows <= len(task.rows) - n:
        raise ValueError(
            f"test_rows must be between 1 and {len(task.rows) - n} (the demo task has {len(task.rows)} rows "
            f"and n={n} of them are the labelled examples), got {test_rows}"
        )
    # Held-out test rows first; the n labelled examples every method sees are a
    # stratified sample of the rest.
    pool_rows, test_rows_ = split_rows(task.rows, train=len(task.rows) - test_rows, test=test_rows, seed=seed)
    labelled = task.examples(pool_rows)
    shown = [ex for ex, _ in select_examples([(ex, ex.label) for ex in labelled], n, seed)]
    test = task.examples(test_rows_)
    student = dspy.Predict(task.signature())

    with LMPool(n_ctx=n_ctx, timeout=timeout) as pool:
        # With LabelAdapter the follower's temperature and reply limit are the protocol's.
        limit = FOLLOWER_REPLY_LIMIT[adapter]
        follow = pool.endpoint(follower, cache=False, **({"temperature": 0.0, "max_tokens": limit} if limit else {}))
        # ICL's demos go in as chat turns: the 0.5B follower copes with 20 of them far
        # better than inline (README). Methods without demos get the one-message prompt.
        style = follower_decoding(follower_style, follow.constrained_style) if adapter == "label" else False
        protocol = Protocol(constrained=style, demo_style="turns")
        chosen = LabelAdapter(protocol=protocol) if adapter == "label" else dspy.ChatAdapter()

        rows: list[MethodResult] = []

        def run(method: str, program: dspy.Module, calls: int, seconds: float) -> None:
            logger.info("evaluating %s on %d rows", method, len(test))
            result = evaluate(program, test, lm=follow.lm, adapter=chosen, progress=progress)
            rows.append(
                MethodResult(
                    method=method,
                    macro_f1=result.macro_f1,
                    invalid_rate=result.invalid_rate,
                    prompt_tokens_per_query=result.prompt_tokens_per_query,
                    compile_calls=calls,
                    compile_seconds=round(seconds, 1),
                    eval_seconds=result.seconds,
                    n_examples=len(shown),
                )
            )

        run("naive", naive_program(student), 0, 0.0)
        run(f"icl (n={len(shown)})", icl_program(student, shown), 0, 0.0)

        # The generator's reply limit enforces the instruction budget (budget + margin). A
        # generator other than the follower's model gets its own server, for the compile only.
        gen = pool.endpoint(generator_route, max_tokens=budget_limit(max_instruction_tokens), cache=False)
        generator_lm, meter = metered(gen.lm)
        follower_lm, follower_meter = metered(follow.lm)
        budget = meta_prompt_budget(gen.context_tokens, budget_limit(max_instruction_tokens))
        optimizer = PromptMIIOptimizer(
            generator_lm=generator_lm,
            n=n,
            protocol=protocol,
            seed=seed,
            max_prompt_tokens=budget,
            token_counter=gen.token_counter,
            exemplars=exemplars,
            max_instruction_tokens=max_instruction_tokens,
            candidates=candidates,
            follower_lm=follower_lm,
            adapter=chosen,
        )
        # What the compile will cost, before it runs (no LM call; the generator's own tokenizer).
        estimate = optimizer.estimate(student, labelled, follower_token_counter=follow.token_counter)
        started = time.perf_counter()
        # The whole pool: the optimizer shows the generator the same n examples ICL gets
        # (same seeded order) and, with several candidates, scores them on the rest.
        compiled = optimizer.compile(student, trainset=labelled)
        compile_seconds = time.perf_counter() - started
        if gen.server is not None and gen.server is not follow.server:
            gen.server.stop()
        spent = [meter.snapshot(), follower_meter.snapshot()]
        calls = sum(usage.calls for usage in spent)
        measured = {
            "generator_calls": spent[0].calls,
            "follower_calls": spent[1].calls,
            "calls": calls,
            "prompt_tokens": sum(usage.prompt_tokens for usage in spent),
            "completion_tokens": sum(usage.completion_tokens for usage in spent),
            "calls_without_usage": sum(usage.calls_without_usage for usage in spent),
        }
        written_by = generator_name(generator_route)
        run(f"prompt-mii (n={optimizer.report[0]['n_used']}, {written_by})", compiled, calls, compile_seconds)

    return {
        "task": task.name,
        "follower": follow.route,
        "generator": gen.route,
        "generator_name": written_by,
        "optimizer": {
            "exemplars": exemplars,
            "max_instruction_tokens": max_instruction_tokens,
            "candidates": candidates,
        },
        "adapter": adapter,
        "constrained": protocol.constrained,
        "n": n,
        "test_rows": len(test),
        "seed": seed,
        "instruction": compiled.predictors()[0].signature.instructions,
        "report": optimizer.report,
        "estimate": estimate.as_dict(),
        "measured": measured,
        "results": [row.__dict__ for row in rows],
    }


def demo_generator(generator: str | None, follower: str) -> str:
    """The demo's generator route: ``generator`` if given, else the trained generator
    :data:`DEMO_GENERATOR` with a local follower, else the follower's route (a remote
    follower's run needs no llama.cpp)."""
    return generator or (DEMO_GENERATOR if is_local(follower) else follower)


def generator_name(route: str) -> str:
    """How the demo's table names a generator: a trained generator by its name, the
    registry's base models as untrained (Prompt-MII-Zero), any other route as given."""
    if route in ADAPTERS:
        return route
    if route == "local" or route in REGISTRY:
        return f"{local_model(route)}, untrained"
    return route


def format_table(results: list[dict[str, Any]]) -> str:
    """A plain-text table of per-method results."""
    header = ("method", "macro-F1", "invalid", "prompt tok/query", "compile LM calls", "compile s", "eval s")
    lines = [header]
    for row in results:
        tokens = row["prompt_tokens_per_query"]
        lines.append(
            (
                row["method"],
                f"{row['macro_f1']:.3f}",
                f"{row['invalid_rate']:.1%}",
                "n/a" if tokens is None else f"{tokens:.0f}",
                str(row["compile_calls"]),
                f"{row['compile_seconds']:.1f}",
                f"{row['eval_seconds']:.1f}",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for k, line in enumerate(lines):
        out.append("  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(line)))
        if k == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def format_cost(estimate: dict[str, Any], measured: dict[str, Any]) -> str:
    """The compile's estimate (made before it, :meth:`PromptMIIOptimizer.estimate`) and
    what it spent, one line each: calls, prompt tokens, completion tokens (estimated: the
    reply limits, a bound), price."""
    total = estimate["total"]

    def tokens(value: Any) -> str:
        return "unknown" if value is None else f"{value:,}"

    return "\n".join(
        [
            f"compile, estimated before it: {total['generator_calls']} generator + {total['follower_calls']} follower "
            f"calls, {tokens(total['prompt_tokens'])} prompt tokens, at most {tokens(total['completion_tokens'])} "
            f"completion tokens, price {total['price']} ({estimate['counted_by']})",
            f"compile, measured:            {measured['generator_calls']} generator + {measured['follower_calls']} "
            f"follower calls, {measured['prompt_tokens']:,} prompt tokens, {measured['completion_tokens']:,} "
            "completion tokens",
        ]
    )
