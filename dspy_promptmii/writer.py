"""The write step of a compile: an :class:`InstructionWriter` turns a
:class:`~dspy_promptmii.plan.Plan` into candidate instructions, one generator call each.

The writer owns what varies between candidates (:class:`CandidateSpec`), the meta-prompt
and its token budget (the largest prefix of the examples that fits), the exemplars from
the instruction library, the generator's settings and the instruction budget, the call
itself and the cleaning of its reply. It returns a :class:`Writing`: every candidate as
a frozen :class:`Written`. It never calls the follower; choosing is the
:class:`~dspy_promptmii.selection.Selector`'s job.

Error contract (raised before anything is applied to the program):
:class:`PromptBudgetError` when the meta-prompt does not fit ``max_prompt_tokens`` even
with one example; :class:`GenerationError` when every reply is empty after cleaning;
whatever the generator LM raises.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import dspy

from dspy_promptmii.estimate import RoleCost, count_messages
from dspy_promptmii.generation import (
    Reply,
    budget_limit,
    budget_words,
    generate,
    generator_settings,
    refuses_temperature_0,
)
from dspy_promptmii.library import select_exemplars
from dspy_promptmii.plan import Plan
from dspy_promptmii.protocol import TEMPLATES, Cleaned, Protocol
from dspy_promptmii.secrets import protected_logger
from dspy_promptmii.task import LabelledExample

logger = protected_logger(__name__)

__all__ = [
    "CHAT_FRAMING",
    "CANDIDATE_TEMPERATURE",
    "CandidateSpec",
    "GenerationError",
    "InstructionWriter",
    "PromptBudgetError",
    "Written",
    "Writing",
    "meta_prompt_budget",
]

#: Tokens a chat template adds around the meta-prompt's one user message and the reply.
CHAT_FRAMING = 64
#: Sampling temperature of the candidates after the greedy ones (one per template).
CANDIDATE_TEMPERATURE = 0.7


def meta_prompt_budget(context_tokens: int | None, max_tokens: int) -> int | None:
    """Meta-prompt tokens that fit a generator's context once its reply (``max_tokens``)
    and :data:`CHAT_FRAMING` are set aside; ``None`` when the context size is unknown."""
    if not context_tokens:
        return None
    return context_tokens - max_tokens - CHAT_FRAMING


class GenerationError(RuntimeError):
    """The generator's reply held no usable instruction (``raw_reply`` is what it said)."""

    def __init__(self, message: str, raw_reply: str | None):
        super().__init__(message)
        self.raw_reply = raw_reply


class PromptBudgetError(ValueError):
    """The meta-prompt does not fit ``max_prompt_tokens`` even with a single example."""


@dataclass(frozen=True)
class CandidateSpec:
    """What one generator call varies: the template (a built-in name or a template
    text), whether the library's exemplars are shown, and, for a sampled candidate, its
    temperature and seed (both None for a greedy one)."""

    index: int
    template: str
    with_exemplars: bool
    temperature: float | None = None
    seed: int | None = None

    @property
    def sampled(self) -> bool:
        return self.seed is not None

    @property
    def template_name(self) -> str:
        """The template as reported: its built-in name, or ``"custom"``."""
        return self.template if self.template in TEMPLATES else "custom"


@dataclass(frozen=True)
class Written:
    """One generated candidate: its spec, the meta-prompt's token count (None without a
    budget), the examples it showed, the reply, the cleaning, the instruction (cleaned
    text plus format line; empty when nothing was left) and the cleaned text's tokens
    (None when no counter works)."""

    spec: CandidateSpec
    meta_prompt_tokens: int | None
    shown: tuple[LabelledExample, ...]
    reply: Reply
    cleaned: Cleaned
    instruction: str
    tokens: int | None

    @property
    def empty(self) -> bool:
        return not self.cleaned.text

    @property
    def sent_temperature(self) -> float | None:
        """The sampling temperature sent (None for a greedy call, or a model that takes none)."""
        return self.reply.settings.get("temperature") if self.spec.sampled else None

    @property
    def sent_seed(self) -> int | None:
        return self.reply.settings.get("seed") if self.spec.sampled else None


@dataclass(frozen=True)
class Writing:
    """Every candidate written for one plan, in spec order, with the task names of the
    library entries that the candidates ``with_exemplars`` showed. At least one
    candidate is not empty."""

    written: tuple[Written, ...]
    exemplar_tasks: tuple[str, ...] = field(default=())

    @property
    def usable(self) -> tuple[Written, ...]:
        return tuple(w for w in self.written if not w.empty)


@dataclass(frozen=True)
class _Fitted:
    meta_prompt: str
    shown: tuple[LabelledExample, ...]
    tokens: int | None


def _template_cycle(template: str) -> list[str]:
    """``template`` first, then the other built-in templates (a custom template alone)."""
    if template not in TEMPLATES:
        return [template]
    return [template, *(name for name in TEMPLATES if name != template)]


class InstructionWriter:
    """Writes candidate instructions for a plan with a generator LM.

    Args:
        protocol: The meta-prompt templates and the cleaning.
        candidates: Generator calls per plan (>= 1).
        seed: Seed of the sampled candidates (``seed + index``).
        n_exemplars: Library entries shown as worked examples (0: none).
        library: The checked library entries (empty with ``n_exemplars`` = 0).
        max_prompt_tokens: The meta-prompt's token budget (None: none).
        max_instruction_tokens: The instruction's budget (None: none): asked for in
            words, and the reply limit when neither the LM nor ``max_tokens`` sets one.
        token_counter: Counts a text's tokens (default LiteLLM's counter for the model).
        temperature, max_tokens: Generator settings (None: the LM's own, else defaults).
        generation_kwargs: Further keyword arguments of the generator call.
    """

    def __init__(
        self,
        protocol: Protocol,
        *,
        candidates: int = 1,
        seed: int = 0,
        n_exemplars: int = 0,
        library: Sequence[Mapping[str, Any]] = (),
        max_prompt_tokens: int | None = None,
        max_instruction_tokens: int | None = None,
        token_counter: Callable[[str], int] | None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
        generation_kwargs: Mapping[str, Any] | None = None,
    ):
        self.protocol = protocol
        self.candidates = candidates
        self.seed = seed
        self.n_exemplars = n_exemplars
        self.library = list(library)
        self.max_prompt_tokens = max_prompt_tokens
        self.max_instruction_tokens = max_instruction_tokens
        self.token_counter = token_counter
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.generation_kwargs = dict(generation_kwargs or {})

    # -- what varies -------------------------------------------------------------------

    def specs(self, generator_model: str) -> list[CandidateSpec]:
        """What each of the ``candidates`` generator calls varies. Candidate 0 is the
        plain call (the protocol's template, the exemplars, greedy); the next ones, one
        per other built-in template (none for a custom template), are also greedy; after
        those, candidates are sampled at :data:`CANDIDATE_TEMPERATURE` with seed
        ``seed + index``, cycling through the templates, every other one without the
        exemplars."""
        template, _ = self.protocol.resolve_template(generator_model)
        cycle = _template_cycle(template)
        specs = []
        for index in range(self.candidates):
            sampled = index >= len(cycle)
            specs.append(
                CandidateSpec(
                    index=index,
                    template=cycle[index % len(cycle)],
                    with_exemplars=not (sampled and (index - len(cycle)) % 2 == 0),
                    temperature=CANDIDATE_TEMPERATURE if sampled else None,
                    seed=self.seed + index if sampled else None,
                )
            )
        return specs

    def exemplars_for(self, plan: Plan) -> list[dict[str, Any]]:
        """The library entries most similar to the plan's task (none with ``n_exemplars`` = 0)."""
        inputs = [str(value) for example in plan.examples for value in example.inputs.values()]
        return select_exemplars(self.library, plan.task.labels, inputs, self.n_exemplars)

    # -- the call ----------------------------------------------------------------------

    def write(self, plan: Plan, generator: dspy.BaseLM) -> Writing:
        """Every candidate for ``plan``, one generator call each.

        Raises:
            PromptBudgetError: the meta-prompt does not fit with a single example.
            GenerationError: every reply is empty after cleaning (the first reply quoted).
            Whatever the generator LM raises.
        """
        chosen = self.exemplars_for(plan)
        written = tuple(
            self._write_one(plan, generator, spec, chosen if spec.with_exemplars else [])
            for spec in self.specs(generator.model)
        )
        writing = Writing(written, tuple(entry["task"] for entry in chosen))
        if not writing.usable:
            raw = written[0].reply.text
            raise GenerationError(
                f"the generator's reply for predictor {plan.name!r} is empty after cleaning; raw reply: {raw!r}",
                raw_reply=raw,
            )
        empty = len(written) - len(writing.usable)
        if empty:
            logger.warning("predictor %r: %d of %d generator replies were empty after cleaning",
                           plan.name, empty, len(written))
        return writing

    def _write_one(
        self, plan: Plan, generator: dspy.BaseLM, spec: CandidateSpec, exemplars: list[dict[str, Any]]
    ) -> Written:
        """One candidate: meta-prompt, one generator call, cleaning."""
        fitted = self.fit(plan, generator.model, spec.template, exemplars)
        extra = dict(self.generation_kwargs)
        temperature = self.temperature
        if spec.sampled and not refuses_temperature_0(generator.model):
            temperature = spec.temperature
            extra["seed"] = spec.seed
        settings, filled = generator_settings(
            generator,
            temperature=temperature,
            max_tokens=self.max_tokens,
            default_max_tokens=budget_limit(self.max_instruction_tokens),
            extra=extra,
        )
        if "seed" in extra:
            filled = {*filled, "seed"}
        reply = generate(generator, fitted.meta_prompt, settings, filled)
        task = plan.task
        cleaned = self.protocol.clean(
            reply.text, task.input_fields, labels=task.labels, examples=fitted.shown, truncated=reply.truncated
        )
        instruction = self.protocol.instruction(cleaned.text, task.labels) if cleaned.text else ""
        tokens = self.tokens(cleaned.text, generator.model) if cleaned.text else None
        return Written(spec, fitted.tokens, fitted.shown, reply, cleaned, instruction, tokens)

    def reply_limit(self, generator: dspy.BaseLM) -> int | None:
        """The ``max_tokens`` a generator call is sent with (or the LM's own limit; None
        when neither sets one)."""
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

    # -- budgets -----------------------------------------------------------------------

    def count(self, text: str, model: str) -> int:
        """Tokens of ``text`` (``token_counter``, else LiteLLM's counter for ``model``).
        Raises whatever the counter raises."""
        if self.token_counter is not None:
            return int(self.token_counter(text))
        import litellm  # imported lazily: only a token budget needs it

        return int(litellm.token_counter(model=model, text=text))

    def tokens(self, text: str, model: str) -> int | None:
        """Tokens of ``text`` for a report; None when no counter works (offline, unknown model)."""
        try:
            return self.count(text, model)
        except Exception as error:  # noqa: BLE001 - a report figure must not fail a compile
            logger.debug("cannot count tokens of the instruction: %s", error)
            return None

    def check_length(self, predictor: str, tokens: int | None, reply: Reply) -> None:
        """Warn when an instruction runs past its budget and the margin the generation
        limit allows (the LM or ``max_tokens`` set a larger limit, so the budget was only
        asked for in words)."""
        budget = self.max_instruction_tokens
        if budget and tokens is not None and tokens > budget_limit(budget):
            logger.warning(
                "predictor %r: the instruction has %d tokens, over max_instruction_tokens=%d and its margin "
                "(the generation limit was %s)",
                predictor, tokens, budget, reply.settings.get("max_tokens", "the LM's own"),
            )

    def fit(self, plan: Plan, model: str, template: str, exemplars: list[dict[str, Any]]) -> _Fitted:
        """The meta-prompt with the largest prefix of the plan's examples that fits
        ``max_prompt_tokens`` (all of them without a budget).

        Raises:
            PromptBudgetError: not even one example fits.
        """
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
            return _Fitted(render(len(examples)), examples, None)
        tokens = self.count(render(len(examples)), model)
        if tokens <= self.max_prompt_tokens:
            return _Fitted(render(len(examples)), examples, tokens)
        one = self.count(render(1), model)
        if one > self.max_prompt_tokens:
            raise PromptBudgetError(
                f"the meta-prompt for predictor {plan.name!r} needs {one} tokens with a single example "
                f"(and {tokens} with {len(examples)}), over max_prompt_tokens={self.max_prompt_tokens}"
            )
        # Token counts grow with k: binary search for the largest k that fits.
        low, high = 1, len(examples) - 1
        while low < high:
            mid = (low + high + 1) // 2
            if self.count(render(mid), model) <= self.max_prompt_tokens:
                low = mid
            else:
                high = mid - 1
        logger.info(
            "predictor %r: meta-prompt budget %d tokens fits %d of %d examples",
            plan.name, self.max_prompt_tokens, low, len(examples),
        )
        return _Fitted(render(low), examples[:low], self.count(render(low), model))

    # -- the cost, before any call -------------------------------------------------------

    def estimate(self, plan: Plan, generator: dspy.BaseLM) -> tuple[RoleCost, int, int | None, list[str]]:
        """What :meth:`write` will cost for ``plan``, without a call: the generator's
        cost (prompt tokens counted on the meta-prompts it would send, completion tokens
        bounded by the reply limit), the examples candidate 0 shows, candidate 0's
        meta-prompt tokens (None when they cannot be counted), and notes.

        Raises:
            PromptBudgetError: as :meth:`write`.
        """
        chosen = self.exemplars_for(plan)
        limit = self.reply_limit(generator)
        framing = CHAT_FRAMING if self.token_counter is not None else 0
        prompt_tokens: int | None = 0
        first: int | None = None
        n_used = 0
        specs = self.specs(generator.model)
        for spec in specs:
            fitted = self.fit(plan, generator.model, spec.template, chosen if spec.with_exemplars else [])
            try:
                tokens = count_messages(
                    [{"role": "user", "content": fitted.meta_prompt}], generator.model, self.token_counter, framing
                )
            except Exception as error:  # noqa: BLE001 - an estimate says "unknown" rather than fail
                logger.warning("cannot count the meta-prompt's tokens for %r: %s", generator.model, error)
                tokens = None
            if spec.index == 0:
                first, n_used = tokens, len(fitted.shown)
            prompt_tokens = None if tokens is None or prompt_tokens is None else prompt_tokens + tokens
        if limit is None:
            notes = ["the generator's reply limit is unknown (the LM sets none): completion tokens unknown"]
        else:
            notes = [f"completion tokens are each call's reply limit ({limit} for the generator), a bound"]
        cost = RoleCost(
            model=generator.model,
            calls=len(specs),
            prompt_tokens=prompt_tokens,
            completion_tokens=None if limit is None else limit * len(specs),
        ).priced()
        return cost, n_used, first, notes
