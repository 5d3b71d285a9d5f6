"""``PromptMIIOptimizer``: a DSPy teleprompter that writes each classification
predictor's instruction with ONE call to an instruction-generator LM (Prompt-MII)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import dspy
from dspy.teleprompt import Teleprompter

from dspy_promptmii.adapter import LabelAdapter
from dspy_promptmii.estimate import CompileEstimate, PredictorEstimate, RoleCost, count_messages
from dspy_promptmii.generation import (
    DEFAULT_GENERATOR_MAX_TOKENS,
    DEFAULT_MAX_INSTRUCTION_TOKENS,
    Reply,
    budget_limit,
    budget_words,
    generate,
    generator_settings,
    refuses_temperature_0,
)
from dspy_promptmii.library import check_entries, load_library, select_exemplars
from dspy_promptmii.protocol import (
    TEMPLATES,
    Cleaned,
    Protocol,
    choose_template,
    format_line,
    naive_instruction,
    template_text,
    unknown_labels,
)
from dspy_promptmii.sampling import SAMPLING, Sampling, select_examples
from dspy_promptmii.secrets import protected_logger
from dspy_promptmii.selection import Candidate, as_examples, best_candidate, score_candidate, validation_rows
from dspy_promptmii.task import ClassificationTask, LabelledExample, classification_tasks
from dspy_promptmii.tracking import log_compile

logger = protected_logger(__name__)

__all__ = [
    "PromptMIIOptimizer",
    "GenerationError",
    "PromptBudgetError",
    "choose_template",
    "meta_prompt_budget",
    "CHAT_FRAMING",
    "DEFAULT_GENERATOR_MAX_TOKENS",
    "DEFAULT_MAX_INSTRUCTION_TOKENS",
]

#: Tokens a chat template adds around the meta-prompt's one user message and the reply.
CHAT_FRAMING = 64


def _template_name(spec: Mapping[str, Any]) -> str:
    """A candidate's template as reported: its built-in name, or ``"custom"``."""
    return spec["template"] if spec["template"] in TEMPLATES else "custom"


def meta_prompt_budget(context_tokens: int | None, max_tokens: int) -> int | None:
    """Meta-prompt tokens that fit a generator's context once its reply (``max_tokens``)
    and :data:`CHAT_FRAMING` are set aside; ``None`` when the context size is unknown."""
    if not context_tokens:
        return None
    return context_tokens - max_tokens - CHAT_FRAMING


class GenerationError(RuntimeError):
    """The generator's reply held no usable instruction."""

    def __init__(self, message: str, raw_reply: str | None):
        super().__init__(message)
        self.raw_reply = raw_reply


class PromptBudgetError(ValueError):
    """The meta-prompt does not fit ``max_prompt_tokens`` even with a single example."""


@dataclass
class PredictorReport:
    """What compile did for one classification predictor (JSON-serialisable via ``asdict``).

    Token counts are the generator's reported usage for the chosen candidate (``None`` on
    a cache hit); when the naive reference wins (its ``kind`` in ``candidates`` is
    ``"naive"``), ``template``, the token counts, ``n_used``, the cleaning figures and
    ``raw_reply`` describe generated candidate 0, which the naive instruction replaced;
    ``truncated`` comes from the reply's finish reason (``length``);
    ``copied_fraction`` is the share of the reply's characters that copied the shown
    examples and were dropped; ``instruction_tokens`` counts the instruction without the
    format line (by ``token_counter``, else LiteLLM's counter; None if neither works);
    ``unknown_labels`` are label-like names in the instruction that are not labels;
    ``generator_calls`` and ``follower_calls`` are what compile cost; ``candidates`` lists
    every candidate with its validation score when ``candidates`` > 1; ``seconds`` is
    the compile time of this predictor.
    """

    predictor: str
    template: str
    template_choice: str
    n_requested: int
    n_used: int
    n_available: int
    labels: list[str]
    label_field: str
    input_fields: list[str]
    generator_model: str
    generator_calls: int
    follower_calls: int
    prompt_tokens: int | None
    completion_tokens: int | None
    cached: bool
    finish_reason: str | None
    truncated: bool
    meta_prompt_tokens: int | None
    generation_settings: dict[str, Any]
    exemplars: list[str]
    copied_lines: int
    copied_fraction: float
    reasoning_removed: bool
    instruction_tokens: int | None
    unknown_labels: list[str]
    demos: int
    chosen: int
    validation: str | None
    candidates: list[dict[str, Any]]
    seconds: float
    instruction: str
    raw_reply: str = field(repr=False, default="")


@dataclass
class _Plan:
    name: str
    predictor: dspy.Predict
    task: ClassificationTask
    examples: list[LabelledExample]
    labelled: list[LabelledExample]
    valset: list[LabelledExample] | None


@dataclass
class _Written:
    """A generated candidate before scoring."""

    spec: dict[str, Any]
    meta_prompt_tokens: int | None
    shown: list[LabelledExample]
    reply: Reply
    cleaned: Cleaned
    instruction: str


def _positive_int(name: str, value: Any, allow_none: bool = False, allow_zero: bool = False) -> None:
    """Raise ``TypeError`` (not an integer) or ``ValueError`` (too small) naming ``name``."""
    if value is None and allow_none:
        return
    lowest = 0 if allow_zero else 1
    wanted = f"an integer >= {lowest}" + (" or None" if allow_none else "")
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be {wanted}, got {value!r}")
    if value < lowest:
        raise ValueError(f"{name} must be {wanted}, got {value!r}")


def _template_cycle(template: str) -> list[str]:
    """``template`` first, then the other built-in templates (a custom template alone)."""
    if template not in TEMPLATES:
        return [template]
    return [template, *(name for name in TEMPLATES if name != template)]


def _check_call(student: Any, trainset: Any, valset: Any) -> None:
    """``TypeError`` naming a student that is not a ``dspy.Module`` or a trainset (valset)
    that is not a list or tuple."""
    if not isinstance(student, dspy.Module):
        raise TypeError(f"student must be a dspy.Module (e.g. dspy.Predict(...)), got {type(student).__name__}")
    if not isinstance(trainset, (list, tuple)):
        raise TypeError(f"trainset must be a list of dspy.Example, got {type(trainset).__name__}")
    if valset is not None and not isinstance(valset, (list, tuple)):
        raise TypeError(f"valset must be a list of dspy.Example or None, got {type(valset).__name__}")


#: Sampling temperature of the candidates after the first two (which decode greedily).
CANDIDATE_TEMPERATURE = 0.7


class PromptMIIOptimizer(Teleprompter):
    """Write the instruction of every classification predictor of a DSPy program from
    labelled examples, with one generator call per predictor (by default).

    For each predictor whose last output field is a ``Literal``, an ``Enum`` or a
    ``bool`` (or a ``list`` of a ``Literal`` or an ``Enum``: multi-label), ``compile``
    renders ``n`` labelled examples from the trainset into a meta-prompt (with
    ``exemplars`` instructions of other tasks from the instruction library, if asked),
    asks the generator LM once for an instruction, cleans the reply, appends the
    answer-format line, and sets it with ``signature.with_instructions`` on
    a deep copy of the student. The student is never modified. Meta-prompt, cleaning and
    format line are the :class:`~dspy_promptmii.protocol.Protocol`'s.

    With ``candidates=k`` > 1 it makes k generator calls (varying template, exemplars and
    sampling; see :meth:`candidate_specs`), has the follower label held-out rows with
    each instruction (and with the naive one, as a reference), and keeps the best.

    Args:
        generator_lm: The instruction generator; any ``dspy.LM``. Defaults to the LM in
            ``dspy.settings`` at compile time.
        n: How many labelled examples the generator sees (default 20).
        template: ``"meta1"``, ``"meta2"``, ``"auto"`` (meta1 for Llama-family
            generators, meta2 otherwise), a template text containing ``{label_names}``
            and ``{examples}``, or a path to a file holding one. Shortcut for
            ``protocol=Protocol(template=...)``; default ``"auto"``.
        protocol: The whole protocol (template, cleaning, follower settings); not together
            with ``template``.
        seed: Seed of the example order (a smaller ``n`` is a prefix of a larger one) and
            of the sampled candidates.
        sampling: ``"stratified"`` (every label shown when ``n`` allows) or ``"random"``.
        max_prompt_tokens: Token budget of the meta-prompt; examples are dropped from
            the end until it fits (the largest ``n`` that fits). ``None``: no budget.
        token_counter: Counts the tokens of a text (meta-prompt budget, instruction
            length). Defaults to LiteLLM's counter for the generator's model.
        temperature: Generator temperature. ``None`` (default): the LM's own setting; if
            it has none, the paper's 0, unless the model takes no temperature (OpenAI's
            reasoning models) or refuses it (then the call is made without it).
        max_tokens: Generator reply limit. ``None`` (default): the LM's own setting; if it
            has none, :data:`DEFAULT_GENERATOR_MAX_TOKENS`, or with
            ``max_instruction_tokens`` a limit derived from it.
        generation_kwargs: Further keyword arguments for the generator call.
        exemplars: How many instructions of other tasks, from the instruction library, the
            meta-prompt shows as worked examples (default 0; chosen by similarity, see
            :mod:`dspy_promptmii.library`). Still one generator call.
        library: The instruction library: a file path, a list of entries, or ``None``
            for the packaged one.
        max_instruction_tokens: A length budget for the instruction: the template asks
            for it in words (three quarters of the tokens), and the generation limit (when
            neither the LM nor ``max_tokens`` sets one) is the budget plus
            :data:`~dspy_promptmii.generation.BUDGET_MARGIN`; a reply cut there loses its
            unfinished last line. Default :data:`DEFAULT_MAX_INSTRUCTION_TOKENS` (160,
            measured best on the dev tasks); ``None``: no budget.
        candidates: Generator calls per predictor (default 1). Above 1 the follower picks
            the best on validation rows.
        valset: Not a constructor argument: ``compile(valset=...)`` gives the validation
            rows for ``candidates`` > 1; without it, up to ``val_size`` trainset rows the
            generator did not see.
        val_size: Validation rows taken from the trainset when no valset is given (at
            most; default 20): unseen rows first, else shown rows. Each candidate costs
            this many follower calls.
        include_naive: With ``candidates`` > 1, also score the naive instruction and keep
            it if no generated one does better.
        demos: Keep this many of the shown examples as the predictor's demos, beside the
            instruction (default 0).
        follower_lm: The follower that scores candidates (default: ``dspy.settings.lm``
            at compile time).

    Raises:
        TypeError: an argument of the wrong type (named).
        ValueError: a bad value (named): ``n`` < 1, an unknown template or sampling, a
            template without its placeholders, ``protocol`` together with ``template``,
            exemplars with a template that has no ``{exemplars}`` placeholder, or a
            library that cannot be read.
    """

    def __init__(
        self,
        generator_lm: dspy.BaseLM | None = None,
        *,
        n: int = 20,
        template: str | os.PathLike[str] | None = None,
        protocol: Protocol | None = None,
        seed: int = 0,
        sampling: Sampling = "stratified",
        max_prompt_tokens: int | None = None,
        token_counter: Callable[[str], int] | None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
        generation_kwargs: dict[str, Any] | None = None,
        exemplars: int = 0,
        library: str | os.PathLike[str] | Sequence[Mapping[str, Any]] | None = None,
        max_instruction_tokens: int | None = DEFAULT_MAX_INSTRUCTION_TOKENS,
        candidates: int = 1,
        val_size: int = 20,
        include_naive: bool = True,
        demos: int = 0,
        follower_lm: dspy.BaseLM | None = None,
    ):
        super().__init__()
        for name, lm in (("generator_lm", generator_lm), ("follower_lm", follower_lm)):
            if lm is not None and not isinstance(lm, dspy.BaseLM):
                raise TypeError(f"{name} must be a dspy.LM (or BaseLM), got {type(lm).__name__}")
        _positive_int("n", n)
        if protocol is not None and not isinstance(protocol, Protocol):
            raise TypeError(f"protocol must be a dspy_promptmii.protocol.Protocol, got {type(protocol).__name__}")
        if protocol is not None and template is not None:
            raise ValueError("pass either template= or protocol= (which holds a template), not both")
        if protocol is None:
            protocol = Protocol(template="auto" if template is None else template)
        self.protocol = protocol
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an integer, got {seed!r}")
        if sampling not in SAMPLING:
            raise ValueError(f"sampling must be one of {SAMPLING}, got {sampling!r}")
        _positive_int("max_prompt_tokens", max_prompt_tokens, allow_none=True)
        _positive_int("max_tokens", max_tokens, allow_none=True)
        _positive_int("max_instruction_tokens", max_instruction_tokens, allow_none=True)
        _positive_int("exemplars", exemplars, allow_zero=True)
        _positive_int("candidates", candidates)
        _positive_int("val_size", val_size)
        _positive_int("demos", demos, allow_zero=True)
        if token_counter is not None and not callable(token_counter):
            raise TypeError(f"token_counter must be a function text -> int, got {type(token_counter).__name__}")
        if temperature is not None and (isinstance(temperature, bool) or not isinstance(temperature, (int, float))):
            raise TypeError(f"temperature must be a number or None, got {temperature!r}")
        if temperature is not None and not (0 <= temperature < float("inf")):
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
        if generation_kwargs is not None and not isinstance(generation_kwargs, dict):
            raise TypeError(f"generation_kwargs must be a dict or None, got {type(generation_kwargs).__name__}")
        if not isinstance(include_naive, bool):
            raise TypeError(f"include_naive must be True or False, got {include_naive!r}")
        if isinstance(library, bytes) or not isinstance(library, (str, os.PathLike, Sequence, type(None))):
            raise TypeError(f"library must be a path, a list of entries or None, got {type(library).__name__}")
        if exemplars:
            text = template_text(self.protocol.template) if self.protocol.template != "auto" else TEMPLATES["meta2"]
            if "{exemplars}" not in text:
                raise ValueError(
                    "exemplars > 0 needs a template with an {exemplars} placeholder (meta1 and meta2 have one)"
                )
            if library is None or isinstance(library, (str, os.PathLike)):
                self.library = load_library(library)
            else:
                self.library = check_entries(list(library), "library")
            if not self.library:
                raise ValueError(f"exemplars={exemplars} needs an instruction library with entries; this one has none")
        else:
            if library is not None:
                logger.warning("library= is unused with exemplars=0: the meta-prompt shows no library entry")
            self.library = []
        self.generator_lm = generator_lm
        self.follower_lm = follower_lm
        self.n = n
        self.seed = seed
        self.sampling = sampling
        self.max_prompt_tokens = max_prompt_tokens
        self.token_counter = token_counter
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.generation_kwargs = dict(generation_kwargs or {})
        self.exemplars = exemplars
        self.max_instruction_tokens = max_instruction_tokens
        self.candidates = candidates
        self.val_size = val_size
        self.include_naive = include_naive
        self.demos = demos
        self.report: list[dict[str, Any]] = []

    @property
    def template(self) -> str:
        """The protocol's template (a built-in name, ``"auto"``, or a template text)."""
        return self.protocol.template

    # -- the pipeline ---------------------------------------------------------------

    def compile(
        self,
        student: dspy.Module,
        *,
        trainset: Sequence[dspy.Example],
        teacher: dspy.Module | None = None,
        valset: Sequence[dspy.Example] | None = None,
        **kwargs: Any,
    ) -> dspy.Module:
        """Return a copy of ``student`` whose classification predictors carry induced
        instructions (and ``demos`` demos); the student is never modified.

        ``teacher`` is accepted for API compatibility and not used; ``valset`` is used
        only to choose among ``candidates`` > 1. :attr:`report` describes this compile
        once it succeeded; it is empty from the start of the call, so a failed compile
        never leaves the previous one's.

        Raises:
            TypeError: ``student`` is not a ``dspy.Module``, ``trainset`` (or ``valset``)
                is not a list or tuple of ``dspy.Example``/dict, or an unexpected keyword
                argument.
            ValueError: no generator LM (or, with ``candidates`` > 1, no follower LM); an
                empty trainset, an example missing a field or with a label outside the
                label set (named by index); a program with no classification predictor,
                or one the protocol cannot render (e.g. a label spanning lines).
            PromptBudgetError: the meta-prompt does not fit ``max_prompt_tokens`` with even
                one example.
            GenerationError: a reply with no instruction left after cleaning (with several
                candidates: every one of them).
            Any error the generator or follower LM raises (e.g. ``dspy.utils.exceptions.LMError``).
        """
        # A failed compile leaves no report: never the previous compile's.
        self.report = []
        if kwargs:
            raise TypeError(f"compile() got unexpected keyword arguments: {sorted(kwargs)}")
        _check_call(student, trainset, valset)
        if teacher is not None:
            logger.info("PromptMIIOptimizer ignores teacher")
        if valset is not None and self.candidates == 1:
            logger.info("PromptMIIOptimizer uses valset only to choose among candidates (candidates > 1)")
        generator = self._generator()
        follower = self._follower() if self.candidates > 1 else None
        program = student.deepcopy()

        # Task -> examples, for every classifier, before any LM call: bad input fails fast.
        plans = self._plans(program, trainset, valset)

        # Meta-prompt -> one generator call (or k, then the follower's choice) -> instruction.
        results = [self._induce(plan, generator, follower) for plan in plans]

        # Only now, with every instruction in hand, touch the copy.
        for plan, (instruction, demos, _) in zip(plans, results):
            plan.predictor.signature = plan.predictor.signature.with_instructions(instruction)
            if self.demos:
                plan.predictor.demos = demos
        self.report = [asdict(report) for _, _, report in results]
        program.promptmii_report = self.report
        program._compiled = True
        # Under mlflow.dspy.autolog(log_compiles=True): the report, instructions, calls, tokens.
        log_compile(self, self.report)
        return program

    # -- the cost, before any call ----------------------------------------------------

    def estimate(
        self,
        student: dspy.Module,
        trainset: Sequence[dspy.Example],
        *,
        valset: Sequence[dspy.Example] | None = None,
        follower_token_counter: Callable[[str], int] | None = None,
    ) -> CompileEstimate:
        """What :meth:`compile` with the same arguments will cost, without calling any LM.

        Per classification predictor: generator calls (``candidates``) and their prompt
        tokens, counted on the meta-prompts compile would send (the same examples,
        exemplars and templates; by ``token_counter`` plus :data:`CHAT_FRAMING` tokens of
        chat framing a call, else by LiteLLM's counter for the generator's model), with
        each call's reply limit as its completion bound; with ``candidates`` > 1 also the
        follower calls that score them (candidates + the naive instruction, times the
        validation rows), their prompt tokens (a generated instruction counted at the
        generator's reply limit, a bound) and completion bounds (the follower's reply
        limit). Prices come from LiteLLM's model cost map; a route it does not know (a
        local or self-hosted model) is priced ``None`` (shown ``unknown``), never 0.

        Args:
            student: The program ``compile`` would get (not modified).
            trainset: Its trainset; ``valset``: its valset (used with ``candidates`` > 1).
            follower_token_counter: Counts the follower's tokens (text -> int); default
                LiteLLM's counter for the follower's model.

        Returns:
            A :class:`~dspy_promptmii.estimate.CompileEstimate` (``.total()``,
            ``.format()``, ``.as_dict()``).

        Raises:
            The errors ``compile`` raises before its first LM call (a bad argument, no
            generator LM, an example missing a field, a program with no classifier, a
            meta-prompt over ``max_prompt_tokens``).
        """
        _check_call(student, trainset, valset)
        generator = self._generator()
        follower = self._follower() if self.candidates > 1 else None
        plans = self._plans(student, trainset, valset)
        if self.token_counter is not None:
            counted_by = f"the token_counter given, plus {CHAT_FRAMING} tokens of chat framing a call"
        else:
            counted_by = f"LiteLLM's token_counter for {generator.model!r}"
        estimate = CompileEstimate(
            [self._estimate_plan(plan, generator, follower, follower_token_counter) for plan in plans], counted_by
        )
        total = estimate.total()
        logger.info(
            "estimate: %d generator + %d follower calls, %s prompt tokens, at most %s completion tokens, price %s",
            total["generator_calls"], total["follower_calls"], total["prompt_tokens"], total["completion_tokens"],
            total["price"],
        )
        return estimate

    def _reply_limit(self, generator: dspy.BaseLM) -> int | None:
        """The ``max_tokens`` a generator call is sent with (or the LM's own limit)."""
        settings, _ = generator_settings(
            generator,
            temperature=self.temperature,
            max_tokens=self.max_tokens,
            default_max_tokens=budget_limit(self.max_instruction_tokens),
            extra=dict(self.generation_kwargs),
        )
        configured = getattr(generator, "kwargs", {}) or {}
        for source in (settings, configured):
            for key in ("max_tokens", "max_completion_tokens"):
                if source.get(key):
                    return int(source[key])
        return None

    def _estimate_plan(
        self,
        plan: _Plan,
        generator: dspy.BaseLM,
        follower: dspy.BaseLM | None,
        follower_token_counter: Callable[[str], int] | None,
    ) -> PredictorEstimate:
        task = plan.task
        notes: list[str] = []
        chosen_exemplars = select_exemplars(
            self.library, task.labels, [str(v) for inputs, _ in plan.examples for v in inputs.values()], self.exemplars
        )
        limit = self._reply_limit(generator)
        framing = CHAT_FRAMING if self.token_counter is not None else 0
        prompt_tokens: int | None = 0
        first: int | None = None
        n_used = 0
        specs = self.candidate_specs(generator.model)
        for spec in specs:
            exemplars = chosen_exemplars if spec["exemplars"] else []
            meta_prompt, shown, _ = self._fit_meta_prompt(plan, generator.model, spec["template"], exemplars)
            try:
                tokens = count_messages(
                    [{"role": "user", "content": meta_prompt}], generator.model, self.token_counter, framing
                )
            except Exception as error:  # noqa: BLE001 - an estimate says "unknown" rather than fail
                logger.warning("cannot count the meta-prompt's tokens for %r: %s", generator.model, error)
                tokens = None
            if spec["index"] == 0:
                first, n_used = tokens, len(shown)
            prompt_tokens = None if tokens is None or prompt_tokens is None else prompt_tokens + tokens
        if limit is None:
            notes.append("the generator's reply limit is unknown (the LM sets none): completion tokens unknown")
        else:
            notes.append(f"completion tokens are each call's reply limit ({limit} for the generator), a bound")
        generator_cost = RoleCost(
            model=generator.model,
            calls=len(specs),
            prompt_tokens=prompt_tokens,
            completion_tokens=None if limit is None else limit * len(specs),
        ).priced()

        follower_cost = RoleCost(model=getattr(follower, "model", None))
        rows: list[LabelledExample] = []
        scored = len(specs) + (1 if self.include_naive else 0)
        if follower is not None and scored > 1:
            rows, _ = validation_rows(plan.labelled, plan.examples, self.val_size, self.seed, plan.valset)
            follower_cost = self._estimate_scoring(plan, follower, rows, limit, follower_token_counter, notes)
        return PredictorEstimate(
            predictor=plan.name,
            n_used=n_used,
            meta_prompt_tokens=first,
            generator=generator_cost,
            follower=follower_cost.priced(),
            validation_rows=len(rows),
            notes=notes,
        )

    def _estimate_scoring(
        self,
        plan: _Plan,
        follower: dspy.BaseLM,
        rows: Sequence[LabelledExample],
        instruction_bound: int | None,
        token_counter: Callable[[str], int] | None,
        notes: list[str],
    ) -> RoleCost:
        """The follower calls that score the candidates (and the naive instruction) on ``rows``."""
        task = plan.task
        adapter = dspy.settings.adapter
        protocol = adapter.protocol if isinstance(adapter, LabelAdapter) else self.protocol
        if adapter is not None and not isinstance(adapter, LabelAdapter):
            notes.append(f"follower prompts counted as LabelAdapter's; the configured {type(adapter).__name__} differs")
        if self.demos:
            demos = list(plan.examples[: self.demos])
        else:
            demos = [
                ({name: demo[name] for name in task.input_fields}, task.label_of(demo[task.label_field]))
                for demo in plan.predictor.demos
                if demo.get(task.label_field) is not None and task.label_of(demo[task.label_field]) is not None
            ]
        framing = CHAT_FRAMING if token_counter is not None else 0
        reply = LabelAdapter(protocol=protocol)._lm_kwargs(follower, {}, task).get("max_tokens")
        reply = reply or (getattr(follower, "kwargs", {}) or {}).get("max_tokens")
        generated = self.candidates
        naive = naive_instruction(task.labels) if self.include_naive else None
        prompt: int | None = 0
        def count(instruction: str, inputs: Mapping[str, Any]) -> int:
            messages = protocol.messages(
                protocol.instruction(instruction, task.labels), task.labels, inputs, task.input_fields, demos,
                task.descriptions,
            )
            return count_messages(messages, follower.model, token_counter, framing)

        try:
            if instruction_bound is None:
                raise ValueError("the generator's reply limit is unknown")
            for inputs, _ in rows:
                prompt += generated * (count("", inputs) + instruction_bound + 1)
                prompt += count(naive, inputs) if naive else 0
        except Exception as error:  # noqa: BLE001 - an estimate says "unknown" rather than fail
            logger.warning("cannot count the follower's prompt tokens for %r: %s", follower.model, error)
            prompt = None
        notes.append(
            "each generated candidate is scored with its instruction counted at the generator's reply limit, a bound"
        )
        calls = (generated + (1 if naive else 0)) * len(rows)
        return RoleCost(
            model=follower.model,
            calls=calls,
            prompt_tokens=prompt,
            completion_tokens=None if reply is None else int(reply) * calls,
        )

    # -- steps ----------------------------------------------------------------------

    def _generator(self) -> dspy.BaseLM:
        lm = self.generator_lm or dspy.settings.lm
        if lm is None:
            raise ValueError(
                "no generator LM: pass generator_lm=dspy.LM(...) to PromptMIIOptimizer or call dspy.configure(lm=...)"
            )
        return lm

    def _follower(self) -> dspy.BaseLM:
        lm = self.follower_lm or dspy.settings.lm
        if lm is None:
            raise ValueError(
                "candidates > 1 needs a follower LM to score them: pass follower_lm=dspy.LM(...) or call "
                "dspy.configure(lm=...)"
            )
        return lm

    def _plans(
        self, program: dspy.Module, trainset: Sequence[Any], valset: Sequence[Any] | None
    ) -> list[_Plan]:
        plans = []
        for name, predictor, task in classification_tasks(program):
            if task is None:
                logger.info("predictor %r has no classification output field; its instruction is left as is", name)
                continue
            problem = task.rendering_problem()
            if problem:
                raise ValueError(f"predictor {name!r} cannot be written as a Prompt-MII task: {problem}")
            labelled = task.examples(trainset)
            examples = select_examples(labelled, self.n, self.seed, self.sampling)
            validation = task.examples(valset, "valset") if valset else None
            plans.append(_Plan(name, predictor, task, examples, labelled, validation))
        if not plans:
            raise ValueError(
                "the program has no classification predictor: PromptMIIOptimizer needs a predictor whose last "
                "output field is a Literal[...], an Enum or a bool, or a list of a Literal or an Enum (multi-label)"
            )
        return plans

    def candidate_specs(self, generator_model: str) -> list[dict[str, Any]]:
        """What each of the ``candidates`` generator calls varies. Candidate 0 is the
        plain call (the protocol's template, the exemplars, greedy); the next ones, one
        per other built-in template (meta1, meta2, label_defs; none for a custom
        template), also greedy; after those, candidates are sampled at
        :data:`CANDIDATE_TEMPERATURE` with seed ``seed + index``, cycling through the
        templates, every other one without the exemplars."""
        template, _ = self.protocol.resolve_template(generator_model)
        cycle = _template_cycle(template)
        specs = []
        for index in range(self.candidates):
            sampled = index >= len(cycle)
            specs.append(
                {
                    "index": index,
                    "template": cycle[index % len(cycle)],
                    "exemplars": not (sampled and (index - len(cycle)) % 2 == 0),
                    "temperature": CANDIDATE_TEMPERATURE if sampled else None,
                    "seed": self.seed + index if sampled else None,
                }
            )
        return specs

    def _induce(
        self, plan: _Plan, generator: dspy.BaseLM, follower: dspy.BaseLM | None
    ) -> tuple[str, list[dspy.Example], PredictorReport]:
        started = time.perf_counter()
        task = plan.task
        chosen_exemplars = select_exemplars(
            self.library, task.labels, [str(v) for inputs, _ in plan.examples for v in inputs.values()], self.exemplars
        )
        written: list[_Written] = []
        for spec in self.candidate_specs(generator.model):
            exemplars = chosen_exemplars if spec["exemplars"] else []
            written.append(self._write(plan, generator, spec, exemplars))
        usable = [w for w in written if w.cleaned.text]
        if not usable:
            raw = written[0].reply.text
            raise GenerationError(
                f"the generator's reply for predictor {plan.name!r} is empty after cleaning; raw reply: {raw!r}",
                raw_reply=raw,
            )
        demos = as_examples(plan.examples[: self.demos], task) if self.demos else []
        candidates = [
            Candidate(
                index=w.spec["index"],
                kind="generated",
                instruction=w.instruction,
                template=_template_name(w.spec),
                exemplars=[e["task"] for e in chosen_exemplars] if w.spec["exemplars"] else [],
                # what was sent: a model that takes no temperature is not sampled
                temperature=w.reply.settings.get("temperature") if w.spec["seed"] is not None else None,
                seed=w.reply.settings.get("seed") if w.spec["seed"] is not None else None,
                tokens=self._tokens(w.cleaned.text, generator.model),
            )
            for w in usable
        ]
        validation, follower_calls = None, 0
        if follower is not None and self.include_naive:
            naive = self.protocol.instruction(naive_instruction(task.labels), task.labels)
            candidates.append(Candidate(index=len(written), kind="naive", instruction=naive))
        # Replies that cleaned to nothing are reported, never scored.
        empty = [
            Candidate(
                index=w.spec["index"],
                kind="empty",
                instruction="",
                template=_template_name(w.spec),
            )
            for w in written
            if not w.cleaned.text
        ]
        if empty:
            logger.warning("predictor %r: %d of %d generator replies were empty after cleaning",
                           plan.name, len(empty), len(written))
        if follower is not None and len(candidates) > 1:
            rows, validation = validation_rows(plan.labelled, plan.examples, self.val_size, self.seed, plan.valset)
            val_examples = as_examples(rows, task)
            adapter = dspy.settings.adapter or LabelAdapter(protocol=self.protocol)
            scorer = plan.predictor.deepcopy()
            scorer.lm = None  # the follower scores, not an LM the student's predictor carries
            scorer.demos = demos if self.demos else list(plan.predictor.demos)
            failed: list[str] = []
            for candidate in candidates:
                try:
                    candidate.score = score_candidate(
                        scorer, candidate.instruction, val_examples, lm=follower, adapter=adapter
                    )
                except RuntimeError as error:  # every validation row raised with this instruction
                    failed.append(str(error))
                    logger.warning("predictor %r: candidate %d failed on every validation row: %s",
                                   plan.name, candidate.index, error)
                    candidate.score = {"macro_f1": -1.0, "accuracy": 0.0, "invalid_rate": 1.0,
                                       "calls": len(val_examples), "errors": len(val_examples), "failed": str(error)}
                follower_calls += candidate.score["calls"]
            if len(failed) == len(candidates):
                raise RuntimeError(
                    f"predictor {plan.name!r}: the follower failed on every candidate; first: {failed[0]}"
                )
            best = best_candidate(candidates)
        else:
            best = candidates[0]
        origin = next((w for w in usable if w.spec["index"] == best.index), usable[0])
        reported = sorted([*candidates, *empty], key=lambda c: c.index)
        report = self._report(plan, generator, written, origin, best, reported, validation, follower_calls, started)
        logger.info(
            "predictor %r: %d example(s), template %s, instruction of %d characters%s%s",
            plan.name, len(origin.shown), report.template, len(best.instruction),
            f", candidate {best.index} of {len(candidates)} ({best.kind})" if follower is not None else "",
            f", {origin.cleaned.copied_lines} copied example line(s) dropped" if origin.cleaned.copied_lines else "",
        )
        return best.instruction, demos, report

    def _write(
        self, plan: _Plan, generator: dspy.BaseLM, spec: dict[str, Any], exemplars: list[dict[str, Any]]
    ) -> _Written:
        """One candidate: meta-prompt, one generator call, cleaning."""
        meta_prompt, shown, prompt_tokens = self._fit_meta_prompt(plan, generator.model, spec["template"], exemplars)
        limit = self.max_tokens
        limit_default = budget_limit(self.max_instruction_tokens)
        extra = dict(self.generation_kwargs)
        temperature = self.temperature
        if spec["temperature"] is not None and not refuses_temperature_0(generator.model):
            temperature = spec["temperature"]
            extra["seed"] = spec["seed"]
        settings, filled = generator_settings(
            generator, temperature=temperature, max_tokens=limit, default_max_tokens=limit_default, extra=extra
        )
        if "seed" in extra:
            filled = {*filled, "seed"}
        reply = generate(generator, meta_prompt, settings, filled)
        cleaned = self.protocol.clean(
            reply.text, plan.task.input_fields, labels=plan.task.labels, examples=shown, truncated=reply.truncated
        )
        instruction = self.protocol.instruction(cleaned.text, plan.task.labels) if cleaned.text else ""
        return _Written(spec, prompt_tokens, shown, reply, cleaned, instruction)

    def _report(
        self,
        plan: _Plan,
        generator: dspy.BaseLM,
        written: list[_Written],
        origin: _Written,
        best: Candidate,
        candidates: list[Candidate],
        validation: str | None,
        follower_calls: int,
        started: float,
    ) -> PredictorReport:
        task = plan.task
        naive_won = best.kind == "naive"
        text = (
            best.instruction.removesuffix(format_line(task.labels)).rstrip()
            if not naive_won
            else naive_instruction(task.labels)
        )
        tokens = self._tokens(text, generator.model)
        # The budget's generation limit allows a margin over it; only an instruction past
        # that (the LM or max_tokens set a larger limit, so the budget was only asked for
        # in words) is worth a warning.
        if (
            self.max_instruction_tokens
            and tokens is not None
            and tokens > budget_limit(self.max_instruction_tokens)
        ):
            logger.warning(
                "predictor %r: the instruction has %d tokens, over max_instruction_tokens=%d and its margin "
                "(the generation limit was %s)",
                plan.name,
                tokens,
                self.max_instruction_tokens,
                origin.reply.settings.get("max_tokens", "the LM's own"),
            )
        return PredictorReport(
            predictor=plan.name,
            template=_template_name(origin.spec),
            template_choice=self.protocol.resolve_template(generator.model)[1],
            n_requested=self.n,
            n_used=len(origin.shown),
            n_available=len(plan.labelled),
            labels=list(task.labels),
            label_field=task.label_field,
            input_fields=list(task.input_fields),
            generator_model=generator.model,
            generator_calls=len(written),
            follower_calls=follower_calls,
            prompt_tokens=origin.reply.usage.get("prompt_tokens"),
            completion_tokens=origin.reply.usage.get("completion_tokens"),
            cached=not origin.reply.usage,
            finish_reason=origin.reply.finish_reason,
            truncated=origin.reply.truncated,
            meta_prompt_tokens=origin.meta_prompt_tokens,
            generation_settings=origin.reply.settings,
            exemplars=best.exemplars,
            copied_lines=origin.cleaned.copied_lines,
            copied_fraction=origin.cleaned.copied_fraction,
            reasoning_removed=origin.cleaned.reasoning_removed,
            instruction_tokens=tokens,
            unknown_labels=unknown_labels(text, task.labels),
            demos=self.demos and min(self.demos, len(plan.examples)),
            chosen=best.index,
            validation=validation,
            candidates=[c.summary() for c in candidates] if len(candidates) > 1 else [],
            seconds=round(time.perf_counter() - started, 3),
            instruction=best.instruction,
            raw_reply=origin.reply.text,
        )

    def _count(self, text: str, model: str) -> int:
        if self.token_counter is not None:
            return int(self.token_counter(text))
        import litellm  # imported lazily: only a token budget needs it

        return int(litellm.token_counter(model=model, text=text))

    def _tokens(self, text: str, model: str) -> int | None:
        """Tokens of ``text`` for the report; None when no counter works (offline, unknown model)."""
        try:
            return self._count(text, model)
        except Exception as error:  # noqa: BLE001 - a report figure must not fail a compile
            logger.debug("cannot count tokens of the instruction: %s", error)
            return None

    def _fit_meta_prompt(
        self, plan: _Plan, model: str, template: str, exemplars: list[dict[str, Any]]
    ) -> tuple[str, list[LabelledExample], int | None]:
        """The meta-prompt with the largest prefix of the examples that fits the budget."""
        task, examples = plan.task, plan.examples
        max_words = budget_words(self.max_instruction_tokens)

        def render(k: int) -> str:
            return self.protocol.meta_prompt(
                task.labels,
                examples[:k],
                task.input_fields,
                generator_model=model,
                task_description=task.task_description,
                descriptions=task.descriptions,
                exemplars=exemplars,
                max_words=max_words,
                template=template,
            )

        if self.max_prompt_tokens is None:
            return render(len(examples)), examples, None
        tokens = self._count(render(len(examples)), model)
        if tokens <= self.max_prompt_tokens:
            return render(len(examples)), examples, tokens
        one = self._count(render(1), model)
        if one > self.max_prompt_tokens:
            raise PromptBudgetError(
                f"the meta-prompt for predictor {plan.name!r} needs {one} tokens with a single example "
                f"(and {tokens} with {len(examples)}), over max_prompt_tokens={self.max_prompt_tokens}"
            )
        # Token counts grow with k: binary search for the largest k that fits.
        low, high = 1, len(examples) - 1
        while low < high:
            mid = (low + high + 1) // 2
            if self._count(render(mid), model) <= self.max_prompt_tokens:
                low = mid
            else:
                high = mid - 1
        logger.info(
            "predictor %r: meta-prompt budget %d tokens fits %d of %d examples",
            plan.name, self.max_prompt_tokens, low, len(examples),
        )
        return render(low), examples[:low], self._count(render(low), model)
