"""``PromptMIIOptimizer``: a DSPy teleprompter that writes each classification
predictor's instruction with ONE call to an instruction-generator LM (Prompt-MII).

``compile`` is the paper's pipeline in four named steps: plan (:mod:`.plan`: the task
and its examples, all checked), write (:class:`~dspy_promptmii.writer.InstructionWriter`:
the candidate instructions), choose (:class:`~dspy_promptmii.selection.Selector`: the
follower's pick when there are several) and apply (on a deep copy of the student, only
after every step succeeded for every predictor)."""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from typing import Any, ClassVar

import dspy
from dspy.teleprompt import Teleprompter

from dspy_promptmii.estimate import CompileEstimate, PredictorEstimate, RoleCost
from dspy_promptmii.generation import DEFAULT_GENERATOR_MAX_TOKENS, DEFAULT_MAX_INSTRUCTION_TOKENS
from dspy_promptmii.library import check_entries, load_library
from dspy_promptmii.params import SHARED, Constraint, InstanceOf, OneOf, check_params
from dspy_promptmii.plan import Plan, check_call, make_plans
from dspy_promptmii.protocol import (
    TEMPLATES,
    Protocol,
    check_template_file,
    choose_template,
    names_a_file,
    template_text,
)
from dspy_promptmii.report import PredictorReport, chosen_text, origin_of, predictor_report
from dspy_promptmii.sampling import SAMPLING, Sampling
from dspy_promptmii.secrets import protected_logger
from dspy_promptmii.selection import Selector
from dspy_promptmii.tracking import log_compile
from dspy_promptmii.writer import (
    CHAT_FRAMING,
    GenerationError,
    InstructionWriter,
    PromptBudgetError,
    meta_prompt_budget,
)

logger = protected_logger(__name__)

__all__ = [
    "PromptMIIOptimizer",
    "PredictorReport",
    "GenerationError",
    "PromptBudgetError",
    "choose_template",
    "meta_prompt_budget",
    "CHAT_FRAMING",
    "DEFAULT_GENERATOR_MAX_TOKENS",
    "DEFAULT_MAX_INSTRUCTION_TOKENS",
]


def _check_takes_exemplars(protocol: Protocol, exemplars: int) -> None:
    """Raises ``ValueError`` when ``exemplars`` > 0 and the template has no place for them."""
    text = template_text(protocol.template) if protocol.template != "auto" else TEMPLATES["meta2"]
    if exemplars and "{exemplars}" not in text:
        raise ValueError("exemplars > 0 needs a template with an {exemplars} placeholder (meta1 and meta2 have one)")


def _warn_deprecated_settings(**given: Any) -> None:
    """A ``DeprecationWarning`` for each generator setting passed to the optimizer instead
    of set on the LM (DSPy's convention: GEPA and MIPROv2 take LMs, configured with
    ``lm.copy(...)``)."""
    for name, value in given.items():
        if value is None:
            continue
        replacement = "**generation_kwargs" if name == "generation_kwargs" else f"{name}={value!r}"
        warnings.warn(
            f"PromptMIIOptimizer({name}=...) is deprecated: set it on the generator LM instead, "
            f"generator_lm=generator_lm.copy({replacement}), as DSPy's own optimizers take LMs",
            DeprecationWarning,
            stacklevel=3,
        )


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
    sampling; see :meth:`~dspy_promptmii.writer.InstructionWriter.specs`), has the
    follower label held-out rows with each instruction (and with the naive one, as a
    reference), and keeps the best (:class:`~dspy_promptmii.selection.Selector`). With
    one candidate and ``include_naive=True`` it does the same for that one instruction and
    the naive one: a naive check.

    Args:
        generator_lm: The instruction generator; any ``dspy.LM``. Defaults to the LM in
            ``dspy.settings`` at compile time.
        n: How many labelled examples the generator sees (default 20).
        template: ``"meta1"``, ``"meta2"``, ``"auto"`` (meta1 for Llama-family
            generators, meta2 otherwise), a template text containing ``{label_names}``
            and ``{examples}``, or a path to a file holding one (read by ``compile`` and
            ``estimate``, each time, not here). Shortcut for
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
        temperature, max_tokens, generation_kwargs: Deprecated (a ``DeprecationWarning``;
            still applied as before, over the LM's own settings). Generator settings are
            the LM's, as for DSPy's own optimizers: pass
            ``generator_lm=lm.copy(temperature=..., max_tokens=..., **generation_kwargs)``.
            Where the LM sets no temperature the paper's 0 is sent, unless the model takes
            none (OpenAI's reasoning models) or refuses it (then the call is made without
            it); where it sets no reply limit the optimizer sets its own (see
            ``max_instruction_tokens``).
        exemplars: How many instructions of other tasks, from the instruction library, the
            meta-prompt shows as worked examples (default 0; chosen by similarity, see
            :mod:`dspy_promptmii.library`). Still one generator call.
        library: The instruction library: a file path, a list of entries, or ``None``
            for the packaged one.
        max_instruction_tokens: A length budget for the instruction: the template asks
            for it in words (three quarters of the tokens), and, when the generator LM sets
            no ``max_tokens`` of its own, the optimizer caps the reply at the budget plus
            :data:`~dspy_promptmii.generation.BUDGET_MARGIN` (without a budget, at
            :data:`DEFAULT_GENERATOR_MAX_TOKENS`); a reply cut there loses its unfinished
            last line. This cap is the optimizer's, not an LM setting. Default
            :data:`DEFAULT_MAX_INSTRUCTION_TOKENS` (160, measured best on the dev tasks);
            ``None``: no budget.
        candidates: Generator calls per predictor (default 1). Above 1 the follower picks
            the best on validation rows.
        valset: Not a constructor argument: ``compile(valset=...)`` gives the validation
            rows for ``candidates`` > 1 or ``include_naive=True``; without it, up to
            ``val_size`` trainset rows the generator did not see.
        val_size: Validation rows taken from the trainset when no valset is given (at
            most; default 20): unseen rows first, else shown rows. Each candidate costs
            this many follower calls.
        include_naive: Also score the naive instruction and keep it if no generated one
            does better. ``None`` (default): with ``candidates`` > 1 only, so that one
            candidate stays one generator call and nothing else. ``True`` with one
            candidate: a naive check, 2 x ``val_size`` follower calls that keep the
            generated instruction only where the follower labels the validation rows
            better with it than with the naive one (a tie keeps the shorter instruction,
            as every choice does: usually the naive one). ``False``: never.
        demos: Keep this many of the shown examples as the predictor's demos, beside the
            instruction (default 0).
        follower_lm: The follower that scores candidates (default: ``dspy.settings.lm``
            at compile time).
        adapter: The follower's adapter while scoring candidates (default: the adapter
            in ``dspy.settings`` at compile time, else ``LabelAdapter(protocol=protocol)``).

    Raises:
        TypeError: an argument of the wrong type (named).
        ValueError: a bad value (named): ``n`` < 1, an unknown template or sampling, a
            template without its placeholders, ``protocol`` together with ``template``,
            exemplars with a template that has no ``{exemplars}`` placeholder, or an
            empty or malformed library given as a list, or a template that is no built-in
            name, no template text and no existing file (a misspelled ``"meta3"``). Files
            (a library, a template) are read by ``compile`` and ``estimate``, before any LM
            call, and their errors raised there.
    """

    #: Each constructor argument's rule (see :mod:`dspy_promptmii.params`).
    _parameter_constraints: ClassVar[dict[str, Constraint]] = {
        **SHARED,
        "generator_lm": InstanceOf((dspy.BaseLM,), "a dspy.LM (or BaseLM)", none=True),
        "follower_lm": InstanceOf((dspy.BaseLM,), "a dspy.LM (or BaseLM)", none=True),
        "protocol": InstanceOf((Protocol,), "a dspy_promptmii.protocol.Protocol", none=True),
        "adapter": InstanceOf((dspy.Adapter,), "a dspy.Adapter", none=True),
        "sampling": OneOf(SAMPLING),
        "token_counter": InstanceOf((callable,), "a function text -> int", none=True),
        "generation_kwargs": InstanceOf((dict,), "a dict or None", none=True),
        "library": InstanceOf((str, os.PathLike, Sequence), "a path, a list of entries or None", none=True,
                              exclude=(bytes,)),
    }

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
        include_naive: bool | None = None,
        demos: int = 0,
        follower_lm: dspy.BaseLM | None = None,
        adapter: dspy.Adapter | None = None,
    ):
        super().__init__()
        arguments = {name: value for name, value in locals().items() if name not in ("self", "__class__")}
        check_params(arguments, self._parameter_constraints)
        _warn_deprecated_settings(temperature=temperature, max_tokens=max_tokens, generation_kwargs=generation_kwargs)
        if protocol is not None and template is not None:
            raise ValueError("pass either template= or protocol= (which holds a template), not both")
        # A template file is read when it is used (compile, estimate), not here; but a name
        # that is no file (a misspelled built-in, "meta3") is refused now.
        self._template_file = template if protocol is None and names_a_file(template) else None
        if self._template_file is not None:
            check_template_file(self._template_file)
        if protocol is None and self._template_file is None:
            protocol = Protocol(template="auto" if template is None else template)
        #: The protocol; with a template file, None until compile or estimate reads it.
        self.protocol: Protocol | None = protocol
        if protocol is not None:
            _check_takes_exemplars(protocol, exemplars)
        if exemplars:
            if library is not None and not isinstance(library, (str, os.PathLike)):
                library = check_entries(list(library), "library")
                if not library:
                    raise ValueError(
                        f"exemplars={exemplars} needs an instruction library with entries; this one has none"
                    )
        elif library is not None:
            logger.warning("library= is unused with exemplars=0: the meta-prompt shows no library entry")
        self.generator_lm, self.follower_lm, self.adapter = generator_lm, follower_lm, adapter
        self.n, self.seed, self.sampling = n, seed, sampling
        self.max_prompt_tokens, self.token_counter = max_prompt_tokens, token_counter
        self.temperature, self.max_tokens = temperature, max_tokens
        self.generation_kwargs = dict(generation_kwargs or {})
        self.exemplars, self.library = exemplars, library
        self.max_instruction_tokens = max_instruction_tokens
        self.candidates, self.val_size, self.include_naive = candidates, val_size, include_naive
        self.demos = demos
        self.report: list[dict[str, Any]] = []

    @property
    def selects(self) -> bool:
        """Whether compile has the follower choose: several candidates, or one and the
        naive instruction (``include_naive=True``)."""
        return self.candidates > 1 or bool(self.include_naive)

    @property
    def scores_naive(self) -> bool:
        """Whether the naive instruction is among the candidates the follower scores."""
        return self.candidates > 1 if self.include_naive is None else self.include_naive

    @property
    def template(self) -> str:
        """The protocol's template (a built-in name, ``"auto"``, or a template text); a
        template file's path until compile or estimate reads it."""
        if self.protocol is None:
            return os.fspath(self._template_file)
        return self.protocol.template

    def _read_protocol(self) -> Protocol:
        """The protocol of this compile or estimate: a template file is read now, at each
        call, before any LM call (the errors ``Protocol(template=path)`` raises)."""
        if self._template_file is not None:
            protocol = Protocol(template=self._template_file)
            _check_takes_exemplars(protocol, self.exemplars)
            self.protocol = protocol
        return self.protocol

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
        only to choose among candidates (``candidates`` > 1 or ``include_naive=True``).
        :attr:`report` describes this compile once it succeeded; it is empty from the start
        of the call, so a failed compile never leaves the previous one's.

        Raises:
            TypeError: ``student`` is not a ``dspy.Module``, ``trainset`` (or ``valset``)
                is not a list or tuple of ``dspy.Example``/dict, or an unexpected keyword
                argument.
            ValueError: no generator LM (or, with ``candidates`` > 1 or
                ``include_naive=True``, no follower LM); an empty trainset or valset, an
                example missing a field or with a label outside the label set (named by
                index); a program with no classification predictor, or one the protocol
                cannot render (e.g. a label spanning lines); a
                library that cannot be read.
            PromptBudgetError: the meta-prompt does not fit ``max_prompt_tokens`` with even
                one example.
            GenerationError: a reply with no instruction left after cleaning (with several
                candidates: every one of them).
            SelectionError: with several candidates, the follower failed on every one.
            Any error the generator or follower LM raises (e.g. ``dspy.utils.exceptions.LMError``).
        """
        self.report = []  # a failed compile leaves no report: never the previous compile's
        if kwargs:
            raise TypeError(f"compile() got unexpected keyword arguments: {sorted(kwargs)}")
        if teacher is not None:
            logger.info("PromptMIIOptimizer ignores teacher")
        if valset is not None and not self.selects:
            logger.info(
                "PromptMIIOptimizer uses valset only to choose among candidates (candidates > 1 or include_naive=True)"
            )
        check_call(student, trainset, valset)
        program = student.deepcopy()
        plans, generator, follower = self._plan(program, trainset, valset)  # 1. plan
        writer, selector = self._writer(), self._selector()
        results = []
        for plan in plans:
            started = time.perf_counter()
            writing = writer.write(plan, generator)  # 2. write
            choice = selector.choose(plan, writing, follower)  # 3. choose
            tokens = writer.tokens(chosen_text(plan, choice), generator.model)
            writer.check_length(plan.name, tokens, origin_of(writing, choice).reply)
            report = predictor_report(
                plan, writing, choice, generator_model=generator.model, n_requested=self.n,
                template_choice=self.protocol.resolve_template(generator.model)[1], instruction_tokens=tokens,
                seconds=round(time.perf_counter() - started, 3),
            )
            logger.info("predictor %r: %d example(s), template %s, candidate %d of %d (%s), %d characters",
                        plan.name, report.n_used, report.template, choice.best.index, len(choice.candidates),
                        choice.best.kind, len(choice.best.instruction))
            results.append((plan, choice.best.instruction, report))
        for plan, instruction, _ in results:  # 4. apply, only now that every step succeeded
            plan.predictor.signature = plan.predictor.signature.with_instructions(instruction)
            if plan.demos is not None:
                plan.predictor.demos = list(plan.demos)
        self.report = [asdict(report) for _, _, report in results]
        program.promptmii_report = self.report
        program._compiled = True
        log_compile(self, self.report)  # under mlflow.dspy.autolog(log_compiles=True)
        return program

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
        tokens, counted on the meta-prompts compile would send (by ``token_counter`` plus
        :data:`CHAT_FRAMING` tokens a call, else LiteLLM's counter for the generator's
        model), each call's reply limit as its completion bound; with ``candidates`` > 1
        (or ``include_naive=True``) also the follower calls that score them (see
        :meth:`Selector.estimate <dspy_promptmii.selection.Selector.estimate>`). Prices come from LiteLLM's model
        cost map; a route it does not know is priced ``None`` (shown ``unknown``), never 0.

        Args:
            student: The program ``compile`` would get (not modified).
            trainset: Its trainset; ``valset``: its valset (used when the follower chooses).
            follower_token_counter: Counts the follower's tokens (text -> int); default
                LiteLLM's counter for the follower's model.

        Returns:
            A :class:`~dspy_promptmii.estimate.CompileEstimate`.

        Raises:
            The errors ``compile`` raises before its first LM call.
        """
        plans, generator, follower = self._plan(student, trainset, valset)
        writer, selector = self._writer(), self._selector()
        predictors = []
        for plan in plans:
            cost, n_used, first, notes = writer.estimate(plan, generator)
            scoring, rows = None, 0
            if follower is not None:
                bound = writer.reply_limit(generator)
                scoring, rows, more = selector.estimate(plan, follower, self.candidates, bound, follower_token_counter)
                notes = [*notes, *more]
            predictors.append(
                PredictorEstimate(
                    predictor=plan.name, n_used=n_used, meta_prompt_tokens=first, generator=cost,
                    follower=(scoring or RoleCost(model=None)).priced(), validation_rows=rows, notes=notes,
                )
            )
        if self.token_counter is not None:
            counted_by = f"the token_counter given, plus {CHAT_FRAMING} tokens of chat framing a call"
        else:
            counted_by = f"LiteLLM's token_counter for {generator.model!r}"
        estimate = CompileEstimate(predictors, counted_by)
        total = estimate.total()
        logger.info(
            "estimate: %d generator + %d follower calls, %s prompt tokens, at most %s completion tokens, price %s",
            total["generator_calls"], total["follower_calls"], total["prompt_tokens"], total["completion_tokens"],
            total["price"],
        )
        return estimate

    # -- the parts, built from the parameters at each call --------------------------------

    def _plan(
        self, program: Any, trainset: Any, valset: Any
    ) -> tuple[list[Plan], dspy.BaseLM, dspy.BaseLM | None]:
        """The plans, the generator and the follower (None when nothing is chosen), all
        checked before any LM call."""
        check_call(program, trainset, valset)
        self._read_protocol()
        generator = self.generator_lm or dspy.settings.lm
        if generator is None:
            raise ValueError(
                "no generator LM: pass generator_lm=dspy.LM(...) to PromptMIIOptimizer or call dspy.configure(lm=...)"
            )
        follower = None
        if self.selects:
            follower = self.follower_lm or dspy.settings.lm
            if follower is None:
                why = "candidates > 1" if self.candidates > 1 else "include_naive=True"
                raise ValueError(
                    f"{why} needs a follower LM to score the candidates: pass follower_lm=dspy.LM(...) or call "
                    "dspy.configure(lm=...)"
                )
        plans = make_plans(
            program, trainset, valset, n=self.n, seed=self.seed, sampling=self.sampling, demos=self.demos
        )
        return plans, generator, follower

    def _library(self) -> list[dict[str, Any]]:
        """The checked library entries (read from its file now; none with ``exemplars`` = 0).

        Raises:
            ValueError: a library that cannot be read, or one without entries.
        """
        if not self.exemplars:
            return []
        library = self.library
        entries = load_library(library) if library is None or isinstance(library, (str, os.PathLike)) else library
        entries = check_entries(list(entries), "library")
        if not entries:
            raise ValueError(f"exemplars={self.exemplars} needs an instruction library with entries; this one has none")
        return entries

    def _writer(self) -> InstructionWriter:
        return InstructionWriter(
            self.protocol, candidates=self.candidates, seed=self.seed, n_exemplars=self.exemplars,
            library=self._library(), max_prompt_tokens=self.max_prompt_tokens,
            max_instruction_tokens=self.max_instruction_tokens, token_counter=self.token_counter,
            temperature=self.temperature, max_tokens=self.max_tokens, generation_kwargs=self.generation_kwargs,
        )

    def _selector(self) -> Selector:
        # DSPy's convention, as for the LMs: an adapter not given is the one configured.
        adapter = self.adapter or dspy.settings.adapter
        return Selector(
            self.protocol, adapter=adapter, val_size=self.val_size, seed=self.seed, include_naive=self.scores_naive
        )
