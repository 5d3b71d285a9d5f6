"""``PromptMIIOptimizer``: a DSPy teleprompter that writes each classification
predictor's instruction with ONE call to an instruction-generator LM (Prompt-MII)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import dspy
from dspy.teleprompt import Teleprompter

from dspy_promptmii.protocol import TEMPLATES, build_meta_prompt, check_template, clean_instruction, with_format_line
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
]

#: Tokens a chat template adds around the meta-prompt's one user message and the reply.
CHAT_FRAMING = 64


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


def choose_template(template: str, generator_model: str) -> tuple[str, str]:
    """Resolve ``template`` to a template name (or custom text) and say why.

    ``"auto"`` gives ``meta1`` for Llama-family generators and ``meta2`` for any other
    (the paper used meta1 with Llama and meta2 with Qwen).
    """
    if template != "auto":
        return template, "given" if template in TEMPLATES else "custom"
    if "llama" in generator_model.lower():
        return "meta1", f"auto: generator {generator_model!r} is Llama-family"
    return "meta2", f"auto: generator {generator_model!r} is not Llama-family"


@dataclass
class PredictorReport:
    """What compile did for one classification predictor (JSON-serialisable via ``asdict``)."""

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
    truncated: bool
    meta_prompt_tokens: int | None
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


class PromptMIIOptimizer(Teleprompter):
    """Write the instruction of every classification predictor of a DSPy program from
    labelled examples, with one generator call per predictor.

    For each predictor whose last output field is a ``Literal``, an ``Enum`` or a
    ``bool``, ``compile`` renders ``n`` labelled examples from the trainset into a
    meta-prompt, asks the generator LM once for an instruction, cleans the reply,
    appends the answer-format line, and sets it with ``signature.with_instructions``
    on a deep copy of the student. The student is never modified.

    Args:
        generator_lm: The instruction generator; any ``dspy.LM``. Defaults to the LM in
            ``dspy.settings`` at compile time.
        n: How many labelled examples the generator sees (default 20).
        template: ``"meta1"``, ``"meta2"``, ``"auto"`` (meta1 for Llama-family
            generators, meta2 otherwise) or a custom template containing
            ``{label_names}`` and ``{examples}``.
        seed: Seed of the example order; a smaller ``n`` is a prefix of a larger one.
        sampling: ``"stratified"`` (every label shown when ``n`` allows) or ``"random"``.
        max_prompt_tokens: Token budget of the meta-prompt; examples are dropped from
            the end until it fits (the largest ``n`` that fits). ``None``: no budget.
        token_counter: Counts the tokens of a text for the budget. Defaults to
            LiteLLM's counter for the generator's model.
        temperature: Generator temperature (default 0, as in the paper's evaluation).
        max_tokens: Most tokens the generator may write (default 1024).
        generation_kwargs: Further keyword arguments for the generator call.
    """

    def __init__(
        self,
        generator_lm: dspy.BaseLM | None = None,
        *,
        n: int = 20,
        template: str = "auto",
        seed: int = 0,
        sampling: Sampling = "stratified",
        max_prompt_tokens: int | None = None,
        token_counter: Callable[[str], int] | None = None,
        temperature: float | None = 0.0,
        max_tokens: int = 1024,
        generation_kwargs: dict[str, Any] | None = None,
    ):
        super().__init__()
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        if template not in (*TEMPLATES, "auto"):
            check_template(template)
        if sampling not in SAMPLING:
            raise ValueError(f"sampling must be one of {SAMPLING}, got {sampling!r}")
        if max_prompt_tokens is not None and max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be positive or None, got {max_prompt_tokens!r}")
        if generator_lm is not None and not isinstance(generator_lm, dspy.BaseLM):
            raise TypeError(f"generator_lm must be a dspy.LM (or BaseLM), got {type(generator_lm).__name__}")
        self.generator_lm = generator_lm
        self.n = n
        self.template = template
        self.seed = seed
        self.sampling = sampling
        self.max_prompt_tokens = max_prompt_tokens
        self.token_counter = token_counter
        self.generation_kwargs = {"temperature": temperature, "max_tokens": max_tokens, **(generation_kwargs or {})}
        self.report: list[dict[str, Any]] = []

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
        instructions. ``teacher`` and ``valset`` are accepted for API compatibility and
        not used: Prompt-MII needs no search and no validation calls."""
        if kwargs:
            raise TypeError(f"compile() got unexpected keyword arguments: {sorted(kwargs)}")
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
            template, choice = choose_template(self.template, generator.model)
            meta_prompt, shown, prompt_tokens = self._fit_meta_prompt(plan, template, generator.model)
            started = time.perf_counter()
            reply, usage = self._generate(generator, meta_prompt)
            seconds = time.perf_counter() - started
            max_tokens = self.generation_kwargs.get("max_tokens")
            truncated = bool(max_tokens) and (usage.get("completion_tokens") or 0) >= max_tokens
            instruction = clean_instruction(
                reply, plan.task.input_fields, truncated=truncated, examples=shown, labels=plan.task.labels
            )
            if not instruction:
                raise GenerationError(
                    f"the generator's reply for predictor {plan.name!r} is empty after cleaning; raw reply: {reply!r}",
                    raw_reply=reply,
                )
            instructions.append(with_format_line(instruction, plan.task.labels))
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
                    truncated=truncated,
                    meta_prompt_tokens=prompt_tokens,
                    seconds=round(seconds, 3),
                    instruction=instructions[-1],
                    raw_reply=reply or "",
                )
            )
            logger.info(
                "predictor %r: %d examples, template %s, instruction of %d characters",
                plan.name, len(shown), reports[-1].template, len(instructions[-1]),
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

    def _fit_meta_prompt(
        self, plan: _Plan, template: str, model: str
    ) -> tuple[str, list[LabelledExample], int | None]:
        """The meta-prompt with the largest prefix of the examples that fits the budget."""
        task, examples = plan.task, plan.examples

        def render(k: int) -> str:
            return build_meta_prompt(template, task.labels, examples[:k], task.input_fields)

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

    def _generate(self, lm: dspy.BaseLM, meta_prompt: str) -> tuple[str, dict[str, Any]]:
        """The one generator call: the meta-prompt as a single user message."""
        kwargs = {k: v for k, v in self.generation_kwargs.items() if v is not None}
        with dspy.track_usage() as tracker:
            outputs = lm(meta_prompt, **kwargs)
        usage = tracker.get_total_tokens().get(lm.model, {})
        first = outputs[0] if outputs else None
        reply = first.get("text") if isinstance(first, dict) else first
        return reply or "", usage
