"""Evaluate a classification program on labelled examples through DSPy's ``Evaluate``:
the protocol's metrics (macro-F1, accuracy, invalid-reply rate) and prompt tokens per
query. A score is complete or there is none: an example whose program raised (an LM call
that failed, a bug) is never scored as a miss; :func:`evaluate` raises
:class:`IncompleteEvaluation` instead, carrying what was counted."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import dspy
from dspy.utils.exceptions import AdapterParseError

from dspy_promptmii.dspy_private import declared_inputs
from dspy_promptmii.protocol import score
from dspy_promptmii.secrets import protected_logger
from dspy_promptmii.task import ClassificationTask, signature_task
from dspy_promptmii.usage import metered

logger = protected_logger(__name__)

__all__ = ["Evaluation", "IncompleteEvaluation", "evaluate", "program_task", "check_examples"]


@dataclass
class Evaluation:
    """Scores of one program on one test set.

    ``invalid_rate`` is the share of examples whose follower reply named no label (a
    miss for its gold label). ``errors`` counts examples whose program raised anything
    else (an LM call that failed, a bug), described by ``first_error``; ``lm_errors``
    counts the LM calls that raised. :func:`evaluate` returns an evaluation only when
    ``errors`` is 0; the scores of one with errors (in :class:`IncompleteEvaluation`)
    are not a result. ``prompt_tokens_per_query`` is the LM-reported prompt tokens
    divided by ``n``. For a multi-label program, ``macro_f1`` is F1 per label averaged
    over the labels used, ``accuracy`` the exact-match rate, and ``example_f1`` and
    ``micro_f1`` are set (None otherwise); see
    :func:`~dspy_promptmii.protocol.multilabel_score`.
    """

    macro_f1: float
    accuracy: float
    invalid_rate: float
    n: int
    prompt_tokens_per_query: float | None
    calls: int
    lm_errors: int
    seconds: float
    errors: int = 0
    first_error: str | None = None
    example_f1: float | None = None
    micro_f1: float | None = None
    predictions: list[str | None] = field(repr=False, default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "predictions"}


class IncompleteEvaluation(RuntimeError):
    """Some examples raised (an LM call failed, a bug): the evaluation has no score.
    ``evaluation`` holds what was counted (``errors``, ``lm_errors``, ``calls``,
    ``first_error``); its ``macro_f1`` and ``accuracy`` count the failed examples as
    misses and must not be reported as a result."""

    def __init__(self, message: str, evaluation: Evaluation):
        super().__init__(message)
        self.evaluation = evaluation


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
    """Runs the program; an unparseable reply becomes an invalid (None) label, any other
    exception a None label with the error's text."""

    def __init__(self, program: dspy.Module, label_field: str):
        super().__init__()
        self.program = program
        self.label_field = label_field

    def forward(self, **inputs: Any) -> dspy.Prediction:
        try:
            return self.program(**inputs)
        except AdapterParseError as error:
            return dspy.Prediction(**{self.label_field: None}, unparsed=error.lm_response)
        except Exception as error:  # noqa: BLE001 - counted and reported by evaluate()
            return dspy.Prediction(**{self.label_field: None}, error=f"{type(error).__name__}: {error}"[:1000])


def check_examples(examples: Sequence[Any], task: ClassificationTask) -> None:
    """Raise ``ValueError`` naming the first example that is not a ``dspy.Example`` with
    declared inputs (``.with_inputs(...)``) covering the task's input fields, or whose
    label is missing or outside the task's labels."""
    for index, example in enumerate(examples):
        if not isinstance(example, dspy.Example):
            raise ValueError(f"examples[{index}] is a {type(example).__name__}; expected a dspy.Example")
        declared = declared_inputs(example)
        if not declared:
            raise ValueError(
                f"examples[{index}] has no declared inputs: build it with "
                f".with_inputs({', '.join(repr(f) for f in task.input_fields)})"
            )
        missing = [name for name in task.input_fields if name not in declared or example.get(name) is None]
        if missing:
            owner = task.predictor_name or "the program"
            raise ValueError(f"examples[{index}] lacks the input field(s) {missing} of {owner}")
        if example.get(task.label_field) is None or task.label_of(example[task.label_field]) is None:
            raise ValueError(
                f"examples[{index}] has label {example.get(task.label_field)!r} in {task.label_field!r}, "
                f"not one of {list(task.labels)}"
            )


def evaluate(
    program: dspy.Module,
    examples: Sequence[dspy.Example],
    *,
    lm: dspy.BaseLM,
    adapter: dspy.Adapter | None = None,
    threads: int = 1,
    progress: bool = True,
) -> Evaluation:
    """Run ``program`` on every example with ``lm`` (and ``adapter``) and score it with
    the protocol's :func:`~dspy_promptmii.protocol.score`.

    An unparseable reply is invalid: a miss for its gold label. An example whose program
    raised (an LM call that failed, a bug) leaves the evaluation without a score: it is
    never counted as a miss; :class:`IncompleteEvaluation` is raised, naming how many
    examples raised and the first error. Prompt tokens per query come from the LM's
    reported usage; they are ``None`` when some calls reported none (e.g. cache hits:
    pass an LM with ``cache=False`` to measure).

    Args:
        program: A DSPy program whose last predictor is a classifier.
        examples: ``dspy.Example`` objects with declared inputs and a valid label.
        lm: The follower LM; a metered copy is used.
        adapter: The adapter (e.g. ``LabelAdapter``); default: DSPy's configured one.
        threads: Parallel calls.
        progress: Show DSPy's progress bar.

    Returns:
        An :class:`Evaluation` of every example (``errors`` is 0).

    Raises:
        ValueError: no examples, an example without declared inputs or a valid label
            (named by index), or a program whose last predictor is not a classifier.
        IncompleteEvaluation: some examples raised (a ``RuntimeError``; the message
            counts them and quotes the first error; ``.evaluation`` has the counts).
        KeyboardInterrupt: a stop (:mod:`dspy_promptmii.stopping`) or Ctrl-C.
    """
    if not examples:
        raise ValueError("no examples to evaluate on")
    task = program_task(program)
    check_examples(examples, task)
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
    failures = [_error(prediction) for _, prediction, _ in result.results]
    failures = [text for text in failures if text]
    usage = meter.snapshot()
    invalid = sum(p is None for p in predicted) - len(failures)
    scores = score(gold, predicted, task.labels)
    tokens = None if usage.calls_without_usage or not usage.calls else usage.prompt_tokens / len(examples)
    evaluation = Evaluation(
        macro_f1=scores["macro_f1"],
        accuracy=scores["accuracy"],
        invalid_rate=invalid / len(examples),
        n=len(examples),
        prompt_tokens_per_query=tokens,
        calls=usage.calls,
        lm_errors=usage.errors,
        seconds=round(seconds, 3),
        errors=len(failures),
        first_error=failures[0] if failures else None,
        example_f1=scores.get("example_f1"),
        micro_f1=scores.get("micro_f1"),
        predictions=predicted,
    )
    if failures:
        if len(failures) == len(examples):
            message = f"every one of the {len(examples)} examples raised; the first: {failures[0]}"
        else:
            message = (
                f"{len(failures)} of {len(examples)} examples raised ({usage.errors} LM call errors), so the "
                f"evaluation has no score; the first: {failures[0]}"
            )
        logger.warning("evaluation incomplete: %s", message)
        raise IncompleteEvaluation(message, evaluation)
    return evaluation


def _error(prediction: Any) -> str | None:
    return prediction.get("error") if isinstance(prediction, dspy.Prediction) else None


def _label(task: ClassificationTask, prediction: Any) -> str | None:
    value = prediction.get(task.label_field) if prediction is not None else None
    return None if value is None else task.label_of(value)
