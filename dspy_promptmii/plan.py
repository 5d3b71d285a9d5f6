"""The first step of a compile: which predictors get an instruction, and from which
labelled examples. Everything here is checked before any LM call, so that a bad
trainset, valset or program fails fast and names its culprit."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import dspy

from dspy_promptmii.sampling import Sampling, select_examples
from dspy_promptmii.secrets import protected_logger
from dspy_promptmii.task import ClassificationTask, LabelledExample, classification_tasks

logger = protected_logger(__name__)

__all__ = ["Plan", "make_plans", "check_call", "as_examples"]


@dataclass(frozen=True)
class Plan:
    """One classification predictor and the examples compile uses for it.

    ``examples`` are the ``n`` the generator is shown (a seeded order of ``labelled``,
    see :mod:`dspy_promptmii.sampling`), ``labelled`` every trainset example,
    ``valset`` the valset's examples (None without a valset), and ``demos`` the examples
    the compiled predictor keeps as demos (None: it keeps its own).
    ``predictor`` is the predictor of the copy that compile will change.
    """

    name: str
    predictor: dspy.Predict
    task: ClassificationTask
    examples: tuple[LabelledExample, ...]
    labelled: tuple[LabelledExample, ...]
    valset: tuple[LabelledExample, ...] | None
    demos: tuple[dspy.Example, ...] | None


def as_examples(rows: Sequence[LabelledExample], task: ClassificationTask) -> list[dspy.Example]:
    """Labelled rows as ``dspy.Example`` objects with the task's inputs declared (what
    DSPy's ``Evaluate`` and a predictor's demos take)."""
    return [
        dspy.Example(**inputs, **{task.label_field: task.value_of(label)}).with_inputs(*task.input_fields)
        for inputs, label in rows
    ]


def check_call(student: Any, trainset: Any, valset: Any) -> None:
    """Raise ``TypeError`` naming a student that is not a ``dspy.Module`` or a trainset
    (valset) that is not a list or tuple, and ``ValueError`` for an empty valset (None,
    not an empty list, means "no valset")."""
    if not isinstance(student, dspy.Module):
        raise TypeError(f"student must be a dspy.Module (e.g. dspy.Predict(...)), got {type(student).__name__}")
    if not isinstance(trainset, (list, tuple)):
        raise TypeError(f"trainset must be a list of dspy.Example, got {type(trainset).__name__}")
    if valset is not None and not isinstance(valset, (list, tuple)):
        raise TypeError(f"valset must be a list of dspy.Example or None, got {type(valset).__name__}")
    if valset is not None and not valset:
        raise ValueError("valset is empty: pass None to score candidates on trainset rows the generator did not see")


def make_plans(
    program: dspy.Module,
    trainset: Sequence[Any],
    valset: Sequence[Any] | None,
    *,
    n: int,
    seed: int,
    sampling: Sampling,
    demos: int,
) -> list[Plan]:
    """A :class:`Plan` for every classification predictor of ``program``, in order.

    Raises:
        ValueError: a program without a classification predictor, one the protocol
            cannot render (e.g. a label spanning lines), an empty trainset, or an example
            missing a field or with a label outside the label set (named by index).
        TypeError: an example that is neither a ``dspy.Example`` nor a dict.
    """
    plans = []
    for name, predictor, task in classification_tasks(program):
        if task is None:
            logger.info("predictor %r has no classification output field; its instruction is left as is", name)
            continue
        problem = task.rendering_problem()
        if problem:
            raise ValueError(f"predictor {name!r} cannot be written as a Prompt-MII task: {problem}")
        labelled = task.labelled_examples(trainset)
        examples = select_examples(labelled, n, seed, sampling)
        validation = task.labelled_examples(valset, "valset") if valset else None
        plans.append(
            Plan(
                name=name,
                predictor=predictor,
                task=task,
                examples=tuple(examples),
                labelled=tuple(labelled),
                valset=None if validation is None else tuple(validation),
                demos=tuple(as_examples(examples[:demos], task)) if demos else None,
            )
        )
    if not plans:
        raise ValueError(
            "the program has no classification predictor: PromptMIIOptimizer needs a predictor whose last "
            "output field is a Literal[...], an Enum or a bool, or a list of a Literal or an Enum (multi-label)"
        )
    return plans
