"""Evaluate a classification program on labelled examples through DSPy's ``Evaluate``:
the protocol's metrics, invalid-output rate and prompt tokens per query."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import dspy
from dspy.utils.exceptions import AdapterParseError

from dspy_promptmii.protocol import score
from dspy_promptmii.task import ClassificationTask, signature_task
from dspy_promptmii.usage import metered

logger = logging.getLogger(__name__)

__all__ = ["Evaluation", "evaluate", "program_task"]


@dataclass
class Evaluation:
    """Scores of one program on one test set."""

    macro_f1: float
    accuracy: float
    invalid_rate: float
    n: int
    prompt_tokens_per_query: float | None
    calls: int
    lm_errors: int
    seconds: float
    predictions: list[str | None] = field(repr=False, default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "predictions"}


def program_task(program: dspy.Module) -> ClassificationTask:
    """The classification task of a program's LAST predictor (its final answer)."""
    predictors = program.named_predictors()
    if not predictors:
        raise ValueError("the program has no predictor")
    name, predictor = predictors[-1]
    task = signature_task(predictor.signature, name)
    if task is None:
        raise ValueError(f"the last predictor of the program ({name!r}) has no classification output field")
    return task


class _Guarded(dspy.Module):
    """Runs the program, turning an unparseable reply into an invalid (None) label."""

    def __init__(self, program: dspy.Module, label_field: str):
        super().__init__()
        self.program = program
        self.label_field = label_field

    def forward(self, **inputs: Any) -> dspy.Prediction:
        try:
            return self.program(**inputs)
        except AdapterParseError as error:
            return dspy.Prediction(**{self.label_field: None}, unparsed=error.lm_response)


def evaluate(
    program: dspy.Module,
    examples: Sequence[dspy.Example],
    *,
    lm: dspy.BaseLM,
    adapter: dspy.Adapter | None = None,
    threads: int = 1,
    progress: bool = True,
) -> Evaluation:
    """Run ``program`` on every example with ``lm`` (and ``adapter``) and score it.

    An unparseable reply counts as invalid, its own wrong class (protocol.score); so does
    an LM call that raised, counted in ``lm_errors`` and logged as a warning. Prompt
    tokens per query come from the LM's reported usage; they are ``None`` when some
    calls reported none (e.g. cache hits: pass an LM with ``cache=False`` to measure).
    """
    if not examples:
        raise ValueError("no examples to evaluate on")
    task = program_task(program)
    counted_lm, meter = metered(lm)
    evaluator = dspy.Evaluate(
        devset=list(examples),
        metric=lambda example, prediction, trace=None: float(
            task.label_of(example[task.label_field]) == _label(task, prediction)
        ),
        num_threads=threads,
        display_progress=progress,
        max_errors=len(examples) + 1,
        provide_traceback=True,
    )
    started = time.perf_counter()
    with dspy.context(lm=counted_lm, **({"adapter": adapter} if adapter is not None else {})):
        result = evaluator(_Guarded(program, task.label_field))
    seconds = time.perf_counter() - started
    gold = [task.label_of(example[task.label_field]) for example, _, _ in result.results]
    predicted = [_label(task, prediction) for _, prediction, _ in result.results]
    usage = meter.snapshot()
    scores = score(gold, predicted)
    tokens = None if usage.calls_without_usage or not usage.calls else usage.prompt_tokens / len(examples)
    if usage.errors:
        logger.warning(
            "%d of %d LM calls raised during evaluation and were scored as invalid; last: %s",
            usage.errors, usage.calls, usage.last_error,
        )
    return Evaluation(
        macro_f1=scores["macro_f1"],
        accuracy=scores["accuracy"],
        invalid_rate=scores["invalid_rate"],
        n=len(examples),
        prompt_tokens_per_query=tokens,
        calls=usage.calls,
        lm_errors=usage.errors,
        seconds=round(seconds, 3),
        predictions=predicted,
    )


def _label(task: ClassificationTask, prediction: Any) -> str | None:
    value = prediction.get(task.label_field) if prediction is not None else None
    return None if value is None else task.label_of(value)
