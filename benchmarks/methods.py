"""How each benchmarked method turns the same student program and the same ``n``
labelled examples into a compiled program.

Every method starts from ``dspy.Predict(text[, text_pair] -> label: Literal[...])`` and is
followed by the same follower LM through the same adapter; the compile step is the only
thing that differs. The protocol and the adapter travel as arguments, in the :class:`CompileContext`
(:attr:`~CompileContext.protocol`, :attr:`~CompileContext.adapter`); no method reads them
from ``dspy.settings``. The runner still calls a method inside ``dspy.context(lm=<metered
follower copy>, adapter=<the shared adapter>)``, for the predictors DSPy's own optimizers
run; a method that needs a generator gets its own metered copy in
:attr:`CompileContext.generator_lm`, so compile calls are counted per role.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import dspy

from dspy_promptmii.adapter import LabelAdapter
from dspy_promptmii.baselines import fit_icl_demos, icl_program, naive_program
from dspy_promptmii.estimate import CompileEstimate, count_messages, gepa_estimate, miprov2_estimate
from dspy_promptmii.evaluation import program_task
from dspy_promptmii.optimizer import (
    CHAT_FRAMING,
    GenerationError,
    PromptBudgetError,
    PromptMIIOptimizer,
    meta_prompt_budget,
)
from dspy_promptmii.params import SHARED
from dspy_promptmii.protocol import Protocol, label_list, naive_instruction
from dspy_promptmii.routes import Endpoint
from dspy_promptmii.secrets import protected_logger
from dspy_promptmii.task import ClassificationTask

logger = protected_logger(__name__)

__all__ = [
    "METHODS",
    "OPTIONS",
    "parse_method",
    "method_options",
    "PROMPTMII_DEFAULTS",
    "PROMPTMII_METHODS",
    "MethodSpec",
    "Budgets",
    "CompileContext",
    "Compiled",
    "MethodFailure",
    "label_metric",
    "feedback_metric",
    "train_val_split",
    "REPLY_ROOM",
    "estimate_record",
]

#: Tokens kept free in the follower's context for its reply and the chat template's framing.
REPLY_ROOM = 64


class MethodFailure(RuntimeError):
    """The method ran and produced no program (e.g. an empty generator reply): a result
    of the method, recorded as ``failed`` and not retried on resume."""


@dataclass
class Budgets:
    """Search budgets of the methods that search, and the generator's reply length."""

    gepa_metric_calls: int = 150
    miprov2_auto: str | None = "light"
    miprov2_candidates: int | None = None
    miprov2_trials: int | None = None
    generator_max_tokens: int = 1024

    def describe(self) -> dict[str, str]:
        if self.miprov2_auto:
            mipro = f"auto={self.miprov2_auto!r}, instruction-only (no demos)"
        else:
            mipro = (
                f"auto=None, num_candidates={self.miprov2_candidates}, num_trials={self.miprov2_trials}, "
                "instruction-only (no demos)"
            )
        return {
            "naive": "the protocol's naive instruction, no compile calls",
            "icl": "LabeledFewShot with the n examples as demos (largest prefix that fits the follower context)",
            "promptmii_zero": "PromptMIIOptimizer with an untrained generator (--generator unless the options name "
            "one) and the optimizer's defaults (one call, a 160-token instruction budget) unless the options say "
            "otherwise; with candidates > 1 the candidates are scored by the follower on up to val_size "
            "(default 20) of the n examples, the naive instruction included",
            "promptmii": "PromptMIIOptimizer with the trained generator (--generator-trained) and the optimizer's "
            "defaults unless the options say otherwise",
            "gepa": (
                f"dspy.GEPA, reflection LM = generator, max_metric_calls={self.gepa_metric_calls}, "
                "all n examples as its trainset (reflection minibatches) and valset (candidate selection); its "
                "metric returns textual feedback (gold label, predicted "
                "label or the raw unparseable reply, the label set); same follower, adapter and protocol as every "
                "method (an unparseable reply reaches the metric as no label instead of an adapter error)"
            ),
            "miprov2": f"dspy.MIPROv2, prompt model = generator, {mipro}, n examples split 1:2 into train/val",
        }


@dataclass
class CompileContext:
    """Everything one compile gets. ``protocol`` is the run's one protocol and
    ``adapter`` the one adapter every follower call goes through (None:
    ``LabelAdapter(protocol=protocol)``; see runner.make_protocol and runner.make_adapter)."""

    student: dspy.Module
    examples: list[dspy.Example]
    seed: int
    threads: int
    budgets: Budgets
    follower: Endpoint
    generator: Endpoint | None = None
    generator_lm: dspy.BaseLM | None = None  # a metered copy, for this compile only
    follower_lm: dspy.BaseLM | None = None  # the metered follower copy also set in dspy.context
    longest_input: dict[str, str] | None = None
    protocol: Protocol = field(default_factory=Protocol)
    options: dict[str, Any] = field(default_factory=dict)  # the method's options (see parse_method)
    adapter: dspy.Adapter | None = None

    def follower_adapter(self) -> dspy.Adapter:
        """The adapter of the follower's calls: :attr:`adapter`, else a ``LabelAdapter``
        with :attr:`protocol`."""
        return self.adapter if self.adapter is not None else LabelAdapter(protocol=self.protocol)


@dataclass
class Compiled:
    program: dspy.Module
    n_used: int
    details: dict[str, Any] = field(default_factory=dict)


def label_metric(task: ClassificationTask) -> Callable[..., float]:
    """1.0 when the prediction's label is the gold label, else 0.0 (an invalid, ``None``
    prediction scores 0). Accepts GEPA's five arguments and MIPROv2's three."""

    def metric(gold: Any, pred: Any, trace: Any = None, pred_name: Any = None, pred_trace: Any = None) -> float:
        want = task.label_of(gold[task.label_field])
        try:
            value = pred[task.label_field] if pred is not None else None
        except (KeyError, AttributeError, TypeError):
            value = None
        return 1.0 if value is not None and task.label_of(value) == want else 0.0

    return metric


def _predicted(task: ClassificationTask, pred: Any) -> str | None:
    try:
        value = pred[task.label_field] if pred is not None else None
    except (KeyError, AttributeError, TypeError):
        value = None
    return None if value is None else task.label_of(value)


def feedback_metric(task: ClassificationTask) -> Callable[..., dspy.Prediction]:
    """GEPA's metric: ``dspy.Prediction(score=1.0 or 0.0, feedback=...)``, where the
    feedback names the gold label, the predicted label (or the raw reply that named no
    label) and the label set, so that GEPA's reflection LM sees what went wrong."""
    labels = label_list(task.labels)

    def metric(
        gold: Any, pred: Any, trace: Any = None, pred_name: Any = None, pred_trace: Any = None
    ) -> dspy.Prediction:
        want = task.label_of(gold[task.label_field])
        got = _predicted(task, pred)
        if got == want:
            return dspy.Prediction(score=1.0, feedback=f"Correct: the label is {want}.")
        if got is None:
            raw = pred.get("invalid_reply") if isinstance(pred, dspy.Prediction) else None
            said = f"The reply {raw!r} names" if raw is not None else "The reply named"
            feedback = f"{said} none of the labels ({labels}); the correct label is {want}."
        else:
            feedback = f"Wrong: the predicted label is {got}, the correct label is {want} (labels: {labels})."
        return dspy.Prediction(score=0.0, feedback=feedback)

    return metric


def train_val_split(examples: list[dspy.Example]) -> tuple[list[dspy.Example], list[dspy.Example]]:
    """The n examples split 1:2 into train and val (every third one to train, so both keep
    the stratified order's mix); fewer than 3 examples serve as both."""
    if len(examples) < 3:
        return list(examples), list(examples)
    train = [ex for i, ex in enumerate(examples) if i % 3 == 0]
    val = [ex for i, ex in enumerate(examples) if i % 3 != 0]
    return train, val


def _search_lm(ctx: CompileContext) -> dspy.BaseLM:
    """The generator as the searches' proposer: greedy, replies capped at the run's
    generator limit (a copy keeps the usage meter)."""
    return ctx.generator_lm.copy(temperature=0.0, max_tokens=ctx.budgets.generator_max_tokens)


def _instruction_student(ctx: CompileContext) -> dspy.Module:
    """The searched methods start from the naive program (naive instruction + format line)."""
    return naive_program(ctx.student)


# --- the methods --------------------------------------------------------------------


def compile_naive(ctx: CompileContext) -> Compiled:
    return Compiled(naive_program(ctx.student), n_used=0)


def compile_icl(ctx: CompileContext) -> Compiled:
    examples = ctx.examples
    k = len(examples)
    details: dict[str, Any] = {"context_check": "none (the follower route gives no token counter)"}
    if ctx.follower.token_counter is not None and ctx.follower.context_tokens:
        budget = ctx.follower.context_tokens - REPLY_ROOM
        k = fit_icl_demos(
            ctx.student,
            examples,
            budget,
            ctx.follower.token_counter,
            longest_input=ctx.longest_input,
            protocol=ctx.protocol,
        )
        details = {
            "context_check": f"largest prefix whose prompt with the longest test input fits {budget} tokens",
            "context_tokens": ctx.follower.context_tokens,
        }
        if k < len(examples):
            logger.info("ICL: %d of %d examples fit the follower's context", k, len(examples))
    program = icl_program(ctx.student, examples[:k]) if k else naive_program(ctx.student)
    return Compiled(program, n_used=k, details=details)


def _promptmii_optimizer(ctx: CompileContext) -> PromptMIIOptimizer:
    """The optimizer a Prompt-MII cell compiles (and estimates) with."""
    if ctx.generator_lm is None or ctx.generator is None:
        raise ValueError("Prompt-MII needs a generator LM")
    options = {**PROMPTMII_DEFAULTS, **ctx.options}
    protocol = ctx.protocol
    if "template" in options:
        protocol = replace(protocol, template=options.pop("template"))
    options.pop("generator", None)
    limit = None if options.get("max_instruction_tokens") else ctx.budgets.generator_max_tokens
    budget = options.pop("max_prompt_tokens", None)  # as named, else the local server's room
    if budget is None and ctx.generator.token_counter is not None:
        budget = meta_prompt_budget(ctx.generator.context_tokens, limit or ctx.budgets.generator_max_tokens)
    # The reply limit without a budget is an LM setting (a copy keeps the usage meter);
    # with one, the optimizer caps the reply itself.
    generator_lm = ctx.generator_lm if limit is None else ctx.generator_lm.copy(max_tokens=limit)
    return PromptMIIOptimizer(
        generator_lm=generator_lm,
        n=len(ctx.examples),
        protocol=protocol,
        seed=ctx.seed,
        max_prompt_tokens=budget,
        token_counter=ctx.generator.token_counter,
        follower_lm=ctx.follower_lm,
        adapter=ctx.follower_adapter(),
        **options,
    )


def compile_promptmii(ctx: CompileContext) -> Compiled:
    """PromptMIIOptimizer on the n examples, with the method's options (exemplars,
    max_instruction_tokens, candidates, val_size, demos, template). With candidates > 1
    the candidates are scored on up to val_size of the same n examples (a benchmark cell
    has no other labelled rows; every method gets exactly these n)."""
    optimizer = _promptmii_optimizer(ctx)
    try:
        program = optimizer.compile(ctx.student, trainset=ctx.examples)
    except (GenerationError, PromptBudgetError) as error:
        raise MethodFailure(f"{type(error).__name__}: {error}") from error
    report = optimizer.report[0]
    details = {
        k: report[k]
        for k in (
            "template",
            "template_choice",
            "meta_prompt_tokens",
            "prompt_tokens",
            "completion_tokens",
            "finish_reason",
            "generation_settings",
            "exemplars",
            "copied_lines",
            "copied_fraction",
            "instruction_tokens",
            "unknown_labels",
            "demos",
            "chosen",
            "validation",
            "candidates",
            "generator_calls",
            "follower_calls",
            "raw_reply",
        )
    }
    return Compiled(program, n_used=report["n_used"], details=details)


def compile_gepa(ctx: CompileContext) -> Compiled:
    if ctx.generator_lm is None:
        raise ValueError("GEPA needs a reflection (generator) LM")
    student = _instruction_student(ctx)
    # GEPA reflects only on minibatches with an imperfect score: a small train split that
    # the seed instruction already labels right gives it nothing to learn from (with a
    # 7/13 split of n = 20 on snips it never called its reflection LM). So every example
    # serves both roles, as GEPA does when it gets no valset.
    train = val = list(ctx.examples)
    optimizer = dspy.GEPA(
        metric=feedback_metric(program_task(student)),
        reflection_lm=_search_lm(ctx),
        max_metric_calls=ctx.budgets.gepa_metric_calls,
        num_threads=ctx.threads,
        seed=ctx.seed,
        track_stats=False,
    )
    adapter = ctx.follower_adapter()
    if isinstance(adapter, LabelAdapter):
        # The same follower requests; an unparseable reply reaches the metric (and its
        # feedback) as no label with the raw reply, instead of an adapter error.
        adapter = LabelAdapter(protocol=adapter.protocol, fallback=adapter.fallback, on_invalid="none")
    with dspy.context(adapter=adapter):
        program = optimizer.compile(student, trainset=train, valset=val)
    details = {"train": len(train), "val": len(val), "max_metric_calls": ctx.budgets.gepa_metric_calls}
    return Compiled(program, n_used=len(ctx.examples), details=details)


def compile_miprov2(ctx: CompileContext) -> Compiled:
    if ctx.generator_lm is None:
        raise ValueError("MIPROv2 needs a prompt (generator) LM")
    student = _instruction_student(ctx)
    train, val = train_val_split(ctx.examples)
    b = ctx.budgets
    common = dict(
        metric=label_metric(program_task(student)),
        prompt_model=_search_lm(ctx),
        task_model=ctx.follower_lm,
        max_bootstrapped_demos=0,
        max_labeled_demos=0,
        num_threads=ctx.threads,
        seed=ctx.seed,
        verbose=False,
    )
    if b.miprov2_auto:
        optimizer = dspy.MIPROv2(auto=b.miprov2_auto, **common)
        program = optimizer.compile(student, trainset=train, valset=val)
    else:
        if not b.miprov2_candidates or not b.miprov2_trials:
            raise ValueError("MIPROv2 without auto needs miprov2_candidates and miprov2_trials")
        optimizer = dspy.MIPROv2(auto=None, num_candidates=b.miprov2_candidates, **common)
        # Minibatches larger than the valset are refused; with a small valset, full evals.
        program = optimizer.compile(
            student, trainset=train, valset=val, num_trials=b.miprov2_trials, minibatch=len(val) > 35
        )
    details = {"train": len(train), "val": len(val), "budget": b.describe()["miprov2"]}
    return Compiled(program, n_used=len(ctx.examples), details=details)


# --- what each method will cost, before it runs (no LM call) -----------------------------


def _follower_prompt_tokens(ctx: CompileContext) -> float | None:
    """Mean prompt tokens of one follower call with the naive instruction over the n
    examples (the follower's own tokenizer when it has one, else LiteLLM's counter); None
    when they cannot be counted."""
    task = program_task(ctx.student)
    protocol = ctx.protocol
    instruction = protocol.instruction(naive_instruction(task.labels), task.labels)
    counter = ctx.follower.token_counter
    try:
        counts = [
            count_messages(
                protocol.messages(
                    instruction, task.labels, {f: ex[f] for f in task.input_fields}, task.input_fields, (),
                    task.descriptions,
                ),
                ctx.follower.lm.model,
                counter,
                CHAT_FRAMING if counter is not None else 0,
            )
            for ex in ctx.examples
        ]
    except Exception as error:  # noqa: BLE001 - an estimate says "unknown" rather than fail
        logger.warning("cannot count the follower's prompt tokens: %s", error)
        return None
    return sum(counts) / len(counts) if counts else None


def estimate_nothing(ctx: CompileContext) -> CompileEstimate:
    """Methods that make no compile call."""
    return CompileEstimate([], counted_by="no compile call")


def estimate_promptmii(ctx: CompileContext) -> CompileEstimate:
    """PromptMIIOptimizer.estimate with the cell's optimizer (its meta-prompts counted)."""
    return _promptmii_optimizer(ctx).estimate(
        ctx.student, ctx.examples, follower_token_counter=ctx.follower.token_counter
    )


def estimate_gepa(ctx: CompileContext) -> CompileEstimate:
    """GEPA's budget rule for the cell: every example as trainset and valset."""
    task = program_task(ctx.student)
    return gepa_estimate(
        valset_size=len(ctx.examples),
        trainset_size=len(ctx.examples),
        max_metric_calls=ctx.budgets.gepa_metric_calls,
        reflection_model=getattr(ctx.generator_lm, "model", None),
        reflection_reply_limit=ctx.budgets.generator_max_tokens,
        follower_model=ctx.follower.lm.model,
        follower_prompt_tokens_per_call=_follower_prompt_tokens(ctx),
        follower_reply_limit=ctx.protocol.max_tokens(task.labels),
    )


def estimate_miprov2(ctx: CompileContext) -> CompileEstimate:
    """MIPROv2's rule for the cell: the 1:2 train/val split, the run's budget."""
    task = program_task(ctx.student)
    train, val = train_val_split(ctx.examples)
    b = ctx.budgets
    common = dict(
        trainset_size=len(train),
        valset_size=len(val),
        zeroshot=True,
        prompt_model=getattr(ctx.generator_lm, "model", None),
        prompt_reply_limit=b.generator_max_tokens,
        follower_model=ctx.follower.lm.model,
        follower_prompt_tokens_per_call=_follower_prompt_tokens(ctx),
        follower_reply_limit=ctx.protocol.max_tokens(task.labels),
    )
    if b.miprov2_auto:
        return miprov2_estimate(auto=b.miprov2_auto, **common)
    return miprov2_estimate(
        auto=None, num_candidates=b.miprov2_candidates, num_trials=b.miprov2_trials, minibatch=len(val) > 35, **common
    )


def estimate_record(estimate: CompileEstimate) -> dict[str, Any]:
    """An estimate as a result record keeps it: the total (calls, tokens, price), how it
    was counted, and its notes."""
    notes = list(dict.fromkeys(note for p in estimate.predictors for note in p.notes))
    return {**estimate.total(), "counted_by": estimate.counted_by, "notes": notes}


@dataclass(frozen=True)
class MethodSpec:
    name: str
    compile: Callable[[CompileContext], Compiled]
    #: Which generator the method calls: None, "generator" (--generator) or "trained".
    generator: str | None
    #: The options its name may carry (see parse_method).
    options: tuple[str, ...] = ()
    #: What a compile will cost, before it runs (no LM call).
    estimate: Callable[[CompileContext], CompileEstimate] = estimate_nothing


#: Option name -> type, for method names such as ``promptmii_zero:exemplars=2+candidates=4``.
OPTIONS: dict[str, type] = {
    "exemplars": int,
    "max_instruction_tokens": int,
    "candidates": int,
    "demos": int,
    "val_size": int,
    "include_naive": bool,
    "template": str,
    "generator": str,
    # the meta-prompt budget in tokens; a local generator's is its context less the reply, so
    # this is for a generator whose context the run cannot know (a remote route)
    "max_prompt_tokens": int,
}
_PROMPTMII_OPTIONS = tuple(OPTIONS)
#: Options that also take ``none`` (``max_instruction_tokens=none``: no instruction budget).
NONE_OPTIONS = ("max_instruction_tokens", "include_naive")
#: The methods that run PromptMIIOptimizer.
PROMPTMII_METHODS = ("promptmii_zero", "promptmii")
#: What a Prompt-MII method does for each option its name does not set: the optimizer's
#: own default (read off its signature), so that a bare name means the optimizer's
#: defaults. ``template`` and ``generator`` are the run's unless named.
PROMPTMII_DEFAULTS: dict[str, Any] = {
    name: parameter.default
    for name, parameter in inspect.signature(PromptMIIOptimizer.__init__).parameters.items()
    # max_prompt_tokens: the generator's context decides it unless a method names it
    if name in OPTIONS and name not in ("template", "max_prompt_tokens")
}


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec("naive", compile_naive, None),
        MethodSpec("icl", compile_icl, None),
        MethodSpec("promptmii_zero", compile_promptmii, "generator", _PROMPTMII_OPTIONS, estimate_promptmii),
        MethodSpec("promptmii", compile_promptmii, "trained", _PROMPTMII_OPTIONS, estimate_promptmii),
        MethodSpec("gepa", compile_gepa, "generator", ("generator",), estimate_gepa),
        MethodSpec("miprov2", compile_miprov2, "generator", ("generator",), estimate_miprov2),
    )
}


def _option_value(name: str, text: str) -> Any:
    kind = OPTIONS[name]
    if name in NONE_OPTIONS and text.lower() == "none":
        return None
    if kind is bool:
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            choices = "true, false or none" if name in NONE_OPTIONS else "true or false"
            raise ValueError(f"option {name} takes {choices}, got {text!r}")
        return text.lower() in ("true", "1", "yes")
    if kind is int:
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"option {name} takes an integer, got {text!r}") from None
        rule = SHARED.get(name)  # the optimizer's own rule for it (candidates >= 1, ...)
        if rule is not None:
            rule.check(f"option {name}", value)
        return value
    return text


def method_options(method: str) -> dict[str, Any]:
    """Everything a method name means: the options it names and, for a Prompt-MII method,
    the optimizer's defaults for the others. Every cell's record stores them (``options``),
    so a result keeps its meaning when a default changes.

    Raises ``ValueError`` as :func:`parse_method`.
    """
    spec, options = parse_method(method)
    if spec.name in PROMPTMII_METHODS:
        return {**PROMPTMII_DEFAULTS, **options}
    return options


def parse_method(text: str) -> tuple[MethodSpec, dict[str, Any]]:
    """A method name with options, ``base[:name=value+name=value...]`` (``+`` between
    options, since ``,`` separates methods on the command line), e.g.
    ``promptmii_zero:exemplars=2+max_instruction_tokens=160+candidates=4`` or
    ``gepa:generator=qwen2.5-coder-1.5b-instruct`` (a generator route of its own instead
    of --generator). The whole text names the method in results and reports.

    Raises ``ValueError`` naming an unknown method, an option the method does not take,
    or a value of the wrong type.
    """
    base, _, rest = text.strip().partition(":")
    spec = METHODS.get(base)
    if spec is None:
        raise ValueError(f"unknown method {base!r}; known: {', '.join(METHODS)}")
    options: dict[str, Any] = {}
    for part in (p for p in rest.split("+") if p.strip()) if rest else ():
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"method {text!r}: option {part!r} is not name=value")
        if name not in spec.options:
            raise ValueError(
                f"method {base!r} takes no option {name!r}; it takes {', '.join(spec.options) or 'none'}"
            )
        options[name] = _option_value(name, value.strip())
    return spec, options
