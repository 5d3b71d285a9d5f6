"""What a compile did for one classification predictor: the :class:`PredictorReport`
that ``PromptMIIOptimizer.report`` lists (as dicts), built from the plan, the writing
and the choice."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dspy_promptmii.plan import Plan
from dspy_promptmii.protocol import format_line, naive_instruction, unknown_labels
from dspy_promptmii.selection import Choice
from dspy_promptmii.writer import Writing, Written

__all__ = ["PredictorReport", "predictor_report", "origin_of"]


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
    every candidate with its validation score (and ``failed``, the error of one the
    follower could not be scored with) when ``candidates`` > 1; ``seconds`` is the
    compile time of this predictor.
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


def origin_of(writing: Writing, choice: Choice) -> Written:
    """The written candidate the report describes: the chosen one, or (when the naive
    reference was chosen) the first usable one."""
    usable = writing.usable
    return next((w for w in usable if w.spec.index == choice.best.index), usable[0])


def chosen_text(plan: Plan, choice: Choice) -> str:
    """The chosen instruction without its format line (the naive text for the naive reference)."""
    labels = plan.task.labels
    if choice.best.kind == "naive":
        return naive_instruction(labels)
    return choice.best.instruction.removesuffix(format_line(labels)).rstrip()


def predictor_report(
    plan: Plan,
    writing: Writing,
    choice: Choice,
    *,
    generator_model: str,
    template_choice: str,
    n_requested: int,
    instruction_tokens: int | None,
    seconds: float,
) -> PredictorReport:
    """The report of one predictor's compile; ``instruction_tokens`` counts
    :func:`chosen_text`."""
    task, best = plan.task, choice.best
    origin = origin_of(writing, choice)
    return PredictorReport(
        predictor=plan.name,
        template=origin.spec.template_name,
        template_choice=template_choice,
        n_requested=n_requested,
        n_used=len(origin.shown),
        n_available=len(plan.labelled),
        labels=list(task.labels),
        label_field=task.label_field,
        input_fields=list(task.input_fields),
        generator_model=generator_model,
        generator_calls=len(writing.written),
        follower_calls=choice.follower_calls,
        prompt_tokens=origin.reply.usage.get("prompt_tokens"),
        completion_tokens=origin.reply.usage.get("completion_tokens"),
        cached=not origin.reply.usage,
        finish_reason=origin.reply.finish_reason,
        truncated=origin.reply.truncated,
        meta_prompt_tokens=origin.meta_prompt_tokens,
        generation_settings=origin.reply.settings,
        exemplars=list(best.exemplar_tasks),
        copied_lines=origin.cleaned.copied_lines,
        copied_fraction=origin.cleaned.copied_fraction,
        reasoning_removed=origin.cleaned.reasoning_removed,
        instruction_tokens=instruction_tokens,
        unknown_labels=unknown_labels(chosen_text(plan, choice), task.labels),
        demos=0 if plan.demos is None else len(plan.demos),
        chosen=best.index,
        validation=choice.validation,
        candidates=[c.summary() for c in choice.candidates] if len(choice.candidates) > 1 else [],
        seconds=seconds,
        instruction=best.instruction,
        raw_reply=origin.reply.text,
    )
