"""``PromptMIIOptimizer``: a DSPy teleprompter that writes each classification
predictor's instruction with ONE call to an instruction-generator LM (Prompt-MII)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import dspy
from dspy.teleprompt import Teleprompter

from dspy_promptmii.protocol import TEMPLATES, Protocol, choose_template
from dspy_promptmii.sampling import SAMPLING, Sampling, select_examples
from dspy_promptmii.task import ClassificationTask, LabelledExample, classification_tasks

logger = logging.getLogger(__name__)

__all__ = [
    "PromptMIIOptimizer",
    "GenerationError",
    "PromptBudgetError",
    "choose_template",
    "meta_prompt_budget",
    "CHAT_FRAMING",
    "DEFAULT_GENERATOR_MAX_TOKENS",
]

#: Tokens a chat template adds around the meta-prompt's one user message and the reply.
CHAT_FRAMING = 64
#: The generator's reply limit when neither the optimizer nor the LM sets one (the paper
#: lets the generator write up to about 1-2k tokens).
DEFAULT_GENERATOR_MAX_TOKENS = 1024


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

    Token counts are the generator's reported usage (``None`` on a cache hit);
    ``truncated`` is read from the reply's finish reason (``length``); ``copied_fraction``
    is the share of the reply's characters that copied the shown examples and were
    dropped; ``seconds`` is the generator call's wall time.
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
    prompt_tokens: int | None
    completion_tokens: int | None
    cached: bool
    finish_reason: str | None
    truncated: bool
    meta_prompt_tokens: int | None
    generation_settings: dict[str, Any]
    copied_lines: int
    copied_fraction: float
    reasoning_removed: bool
    seconds: float
    instruction: str
    raw_reply: str = field(repr=False, default="")


@dataclass
class _Plan:
    name: str
    predictor: dspy.Predict
    task: ClassificationTask
    examples: list[LabelledExample]
    n_available: int


def _positive_int(name: str, value: Any, allow_none: bool = False) -> None:
    """Raise ``TypeError`` (not an integer) or ``ValueError`` (below 1) naming ``name``."""
    if value is None and allow_none:
        return
    wanted = "a positive integer or None" if allow_none else "a positive integer"
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be {wanted}, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be {wanted}, got {value!r}")


def _refuses_temperature_0(model: str) -> bool:
    """Models that take no temperature but their default (OpenAI's reasoning models,
    by DSPy's own rule)."""
    try:
        from dspy.clients.lm import _is_openai_reasoning_model
    except ImportError:  # pragma: no cover - DSPy moved it
        return False
    return bool(_is_openai_reasoning_model(model))


def _finish_reason(response: Any) -> str | None:
    """The finish reason of a recorded LM response (DSPy's lm15 ``Response`` or an
    OpenAI/LiteLLM ``ModelResponse``), or None when it carries none."""
    reason = getattr(response, "finish_reason", None)
    if reason is None:
        choices = getattr(response, "choices", None)
        if choices is None and isinstance(response, dict):
            choices = response.get("choices")
        if choices:
            first = choices[0]
            reason = first.get("finish_reason") if isinstance(first, dict) else getattr(first, "finish_reason", None)
    return None if reason is None else str(getattr(reason, "value", reason))


class PromptMIIOptimizer(Teleprompter):
    """Write the instruction of every classification predictor of a DSPy program from
    labelled examples, with one generator call per predictor.

    For each predictor whose last output field is a ``Literal``, an ``Enum`` or a
    ``bool``, ``compile`` renders ``n`` labelled examples from the trainset into a
    meta-prompt, asks the generator LM once for an instruction, cleans the reply,
    appends the answer-format line, and sets it with ``signature.with_instructions``
    on a deep copy of the student. The student is never modified. Meta-prompt,
    cleaning and format line are the :class:`~dspy_promptmii.protocol.Protocol`'s.

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
        seed: Seed of the example order; a smaller ``n`` is a prefix of a larger one.
        sampling: ``"stratified"`` (every label shown when ``n`` allows) or ``"random"``.
        max_prompt_tokens: Token budget of the meta-prompt; examples are dropped from
            the end until it fits (the largest ``n`` that fits). ``None``: no budget.
        token_counter: Counts the tokens of a text for the budget. Defaults to
            LiteLLM's counter for the generator's model.
        temperature: Generator temperature. ``None`` (default): the LM's own setting; if
            it has none, the paper's 0, unless the model takes no temperature (OpenAI's
            reasoning models) or refuses it (then the call is retried without it).
        max_tokens: Generator reply limit. ``None`` (default): the LM's own setting; if it
            has none, :data:`DEFAULT_GENERATOR_MAX_TOKENS`.
        generation_kwargs: Further keyword arguments for the generator call.

    Raises:
        TypeError: an argument of the wrong type (named).
        ValueError: a bad value (named): ``n`` < 1, an unknown template or sampling, a
            template without its placeholders, ``protocol`` together with ``template``.
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
    ):
        super().__init__()
        if generator_lm is not None and not isinstance(generator_lm, dspy.BaseLM):
            raise TypeError(f"generator_lm must be a dspy.LM (or BaseLM), got {type(generator_lm).__name__}")
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
        if token_counter is not None and not callable(token_counter):
            raise TypeError(f"token_counter must be a function text -> int, got {type(token_counter).__name__}")
        if temperature is not None and (isinstance(temperature, bool) or not isinstance(temperature, (int, float))):
            raise TypeError(f"temperature must be a number or None, got {temperature!r}")
        if temperature is not None and temperature < 0:
            raise ValueError(f"temperature must not be negative, got {temperature!r}")
        if generation_kwargs is not None and not isinstance(generation_kwargs, dict):
            raise TypeError(f"generation_kwargs must be a dict or None, got {type(generation_kwargs).__name__}")
        self.generator_lm = generator_lm
        self.n = n
        self.seed = seed
        self.sampling = sampling
        self.max_prompt_tokens = max_prompt_tokens
        self.token_counter = token_counter
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.generation_kwargs = dict(generation_kwargs or {})
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
        instructions; the student is never modified.

        ``teacher`` and ``valset`` are accepted for API compatibility and not used:
        Prompt-MII needs no search and no validation calls.

        Raises:
            TypeError: ``student`` is not a ``dspy.Module``, ``trainset`` is not a list or
                tuple of ``dspy.Example``/dict, or an unexpected keyword argument.
            ValueError: no generator LM; an empty trainset, an example missing a field or
                with a label outside the label set (named by index); a program with no
                classification predictor, or one the protocol cannot render (e.g. a label
                spanning lines).
            PromptBudgetError: the meta-prompt does not fit ``max_prompt_tokens`` with even
                one example.
            GenerationError: a reply with no instruction left after cleaning.
            Any error the generator LM raises (e.g. ``dspy.utils.exceptions.LMError``).
        """
        if kwargs:
            raise TypeError(f"compile() got unexpected keyword arguments: {sorted(kwargs)}")
        if not isinstance(student, dspy.Module):
            raise TypeError(f"student must be a dspy.Module (e.g. dspy.Predict(...)), got {type(student).__name__}")
        if not isinstance(trainset, (list, tuple)):
            raise TypeError(f"trainset must be a list of dspy.Example, got {type(trainset).__name__}")
        if teacher is not None or valset is not None:
            logger.info("PromptMIIOptimizer ignores teacher and valset: it makes one generator call per predictor")
        generator = self._generator()
        program = student.deepcopy()

        # Task -> examples, for every classifier, before any LM call: bad input fails fast.
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
            plans.append(_Plan(name, predictor, task, examples, n_available=len(labelled)))
        if not plans:
            raise ValueError(
                "the program has no classification predictor: PromptMIIOptimizer needs a predictor whose last "
                "output field is a Literal[...], an Enum or a bool"
            )

        # Meta-prompt -> one generator call -> instruction, per classifier.
        reports, instructions = [], []
        for plan in plans:
            template, choice = self.protocol.resolve_template(generator.model)
            meta_prompt, shown, prompt_tokens = self._fit_meta_prompt(plan, generator.model)
            started = time.perf_counter()
            reply, usage, finish_reason, settings = self._generate(generator, meta_prompt)
            seconds = time.perf_counter() - started
            cleaned = self.protocol.clean(
                reply,
                plan.task.input_fields,
                labels=plan.task.labels,
                examples=shown,
                truncated=finish_reason == "length",
            )
            if not cleaned.text:
                raise GenerationError(
                    f"the generator's reply for predictor {plan.name!r} is empty after cleaning; raw reply: {reply!r}",
                    raw_reply=reply,
                )
            instructions.append(self.protocol.instruction(cleaned.text, plan.task.labels))
            reports.append(
                PredictorReport(
                    predictor=plan.name,
                    template=template if template in TEMPLATES else "custom",
                    template_choice=choice,
                    n_requested=self.n,
                    n_used=len(shown),
                    n_available=plan.n_available,
                    labels=list(plan.task.labels),
                    label_field=plan.task.label_field,
                    input_fields=list(plan.task.input_fields),
                    generator_model=generator.model,
                    generator_calls=1,
                    prompt_tokens=usage.get("prompt_tokens"),
                    completion_tokens=usage.get("completion_tokens"),
                    cached=not usage,
                    finish_reason=finish_reason,
                    truncated=finish_reason == "length",
                    meta_prompt_tokens=prompt_tokens,
                    generation_settings=settings,
                    copied_lines=cleaned.copied_lines,
                    copied_fraction=cleaned.copied_fraction,
                    reasoning_removed=cleaned.reasoning_removed,
                    seconds=round(seconds, 3),
                    instruction=instructions[-1],
                    raw_reply=reply or "",
                )
            )
            logger.info(
                "predictor %r: %d examples, template %s, instruction of %d characters%s",
                plan.name, len(shown), reports[-1].template, len(instructions[-1]),
                f", {cleaned.copied_lines} copied example line(s) dropped" if cleaned.copied_lines else "",
            )

        # Only now, with every instruction in hand, touch the copy.
        for plan, instruction in zip(plans, instructions):
            plan.predictor.signature = plan.predictor.signature.with_instructions(instruction)
        self.report = [asdict(r) for r in reports]
        program.promptmii_report = self.report
        program._compiled = True
        return program

    # -- steps ----------------------------------------------------------------------

    def _generator(self) -> dspy.BaseLM:
        lm = self.generator_lm or dspy.settings.lm
        if lm is None:
            raise ValueError(
                "no generator LM: pass generator_lm=dspy.LM(...) to PromptMIIOptimizer or call dspy.configure(lm=...)"
            )
        return lm

    def _count(self, text: str, model: str) -> int:
        if self.token_counter is not None:
            return int(self.token_counter(text))
        import litellm  # imported lazily: only a token budget needs it

        return int(litellm.token_counter(model=model, text=text))

    def _fit_meta_prompt(self, plan: _Plan, model: str) -> tuple[str, list[LabelledExample], int | None]:
        """The meta-prompt with the largest prefix of the examples that fits the budget."""
        task, examples = plan.task, plan.examples

        def render(k: int) -> str:
            return self.protocol.meta_prompt(
                task.labels,
                examples[:k],
                task.input_fields,
                generator_model=model,
                task_description=task.task_description,
                descriptions=task.descriptions,
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

    def _settings(self, lm: dspy.BaseLM) -> tuple[dict[str, Any], bool]:
        """The generator call's settings, and whether its temperature is the paper's
        default that the LM did not ask for (and may refuse)."""
        configured = getattr(lm, "kwargs", {}) or {}
        settings = dict(self.generation_kwargs)
        defaulted_temperature = False
        if self.temperature is not None:
            settings["temperature"] = self.temperature
        elif configured.get("temperature") is None and "temperature" not in settings:
            if not _refuses_temperature_0(lm.model):
                settings["temperature"] = 0.0
                defaulted_temperature = True
        if self.max_tokens is not None:
            settings["max_tokens"] = self.max_tokens
        elif not (configured.get("max_tokens") or configured.get("max_completion_tokens")) and not (
            "max_tokens" in settings or "max_completion_tokens" in settings
        ):
            settings["max_tokens"] = DEFAULT_GENERATOR_MAX_TOKENS
        return settings, defaulted_temperature

    def _generate(self, lm: dspy.BaseLM, meta_prompt: str) -> tuple[str, dict[str, Any], str | None, dict[str, Any]]:
        """The one generator call (the meta-prompt as a single user message): reply,
        usage, finish reason, and the settings sent on top of the LM's own."""
        settings, defaulted_temperature = self._settings(lm)
        try:
            outputs, usage = self._call(lm, meta_prompt, settings)
        except Exception as error:
            if not (defaulted_temperature and "temperature" in str(error).lower()):
                raise
            logger.warning("the generator refused temperature 0 (%s); calling it with its own setting", error)
            settings.pop("temperature")
            outputs, usage = self._call(lm, meta_prompt, settings)
        first = outputs[0] if outputs else None
        reply = first.get("text") if isinstance(first, dict) else first
        return reply or "", usage, self._last_finish_reason(lm, meta_prompt), settings

    @staticmethod
    def _call(lm: dspy.BaseLM, meta_prompt: str, settings: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
        with dspy.track_usage() as tracker:
            outputs = lm(meta_prompt, **settings)
        return outputs, tracker.get_total_tokens().get(lm.model, {})

    @staticmethod
    def _last_finish_reason(lm: dspy.BaseLM, meta_prompt: str) -> str | None:
        """The finish reason of this call, from the LM's history (None when DSPy keeps none)."""
        for entry in reversed(getattr(lm, "history", [])[-8:]):
            if entry.get("prompt") == meta_prompt or meta_prompt in str(entry.get("messages") or ""):
                return _finish_reason(entry.get("response"))
        return None
