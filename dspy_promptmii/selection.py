"""Choosing among candidate instructions (``PromptMIIOptimizer(candidates=k)``): each is
followed by the follower on held-out labelled rows and scored by the protocol's macro-F1;
the best is kept (ties: the shorter instruction)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import dspy

from dspy_promptmii.evaluation import evaluate
from dspy_promptmii.sampling import select_examples
from dspy_promptmii.secrets import protected_logger
from dspy_promptmii.task import ClassificationTask, LabelledExample

logger = protected_logger(__name__)

__all__ = ["Candidate", "validation_rows", "score_candidate", "best_candidate", "as_examples"]


@dataclass
class Candidate:
    """One candidate instruction and how it was made and scored.

    ``kind`` is ``"generated"``, ``"naive"`` (the naive instruction, kept as a
    reference so that selection never prefers an instruction that the follower does
    worse with than with no induction at all) or ``"empty"`` (a generator reply with
    nothing left after cleaning: reported, never scored). ``score`` holds the follower's
    ``macro_f1``, ``accuracy``, ``invalid_rate`` and ``calls`` on the validation rows.
    """

    index: int
    kind: str
    instruction: str
    template: str | None = None
    exemplars: list[str] = field(default_factory=list)
    temperature: float | None = None
    seed: int | None = None
    tokens: int | None = None
    score: dict[str, Any] | None = None

    def summary(self) -> dict[str, Any]:
        return dict(self.__dict__)


def as_examples(rows: Sequence[LabelledExample], task: ClassificationTask) -> list[dspy.Example]:
    """Labelled rows as ``dspy.Example`` objects with the task's inputs declared."""
    return [
        dspy.Example(**inputs, **{task.label_field: task.value_of(label)}).with_inputs(*task.input_fields)
        for inputs, label in rows
    ]


def _row_key(row: LabelledExample) -> tuple[Any, ...]:
    """A row's content: a duplicate of a shown row counts as shown."""
    inputs, label = row
    return (tuple(sorted((name, repr(value)) for name, value in inputs.items())), label)


def validation_rows(
    labelled: Sequence[LabelledExample],
    shown: Sequence[LabelledExample],
    size: int,
    seed: int,
    valset: Sequence[LabelledExample] | None = None,
) -> tuple[list[LabelledExample], str]:
    """The rows candidates are scored on, and where they come from: ``valset`` when given
    (its rows the generator did not see, with a warning when it saw some; all of it if
    it saw every one), else up to ``size`` trainset rows the generator did not see (a
    seeded, stratified choice; a row equal to a shown one counts as seen), else (every
    row was shown) up to ``size`` of the shown rows themselves (the same kind of choice)."""
    seen = {_row_key(row) for row in shown}
    if valset:
        fresh = [row for row in valset if _row_key(row) not in seen]
        if len(fresh) == len(valset):
            return list(valset), f"valset ({len(valset)} rows)"
        if fresh:
            logger.warning(
                "%d of %d valset rows were shown to the generator; candidates are scored on the other %d",
                len(valset) - len(fresh), len(valset), len(fresh),
            )
            return fresh, f"valset ({len(fresh)} of {len(valset)} rows: those the generator did not see)"
        logger.warning("every valset row was shown to the generator: this favours instructions that copy them")
        return list(valset), f"valset ({len(valset)} rows, all shown to the generator)"
    unseen = [row for row in labelled if _row_key(row) not in seen]
    if unseen:
        chosen = select_examples(unseen, size, seed + 1)
        return chosen, f"{len(chosen)} trainset rows the generator did not see"
    chosen = select_examples(list(shown), size, seed + 1) if len(shown) > size else list(shown)
    logger.warning(
        "every trainset row was shown to the generator and no valset was given: candidates are scored on %d "
        "shown rows, which favours instructions that copy them; pass valset= or a larger trainset",
        len(chosen),
    )
    return chosen, f"{len(chosen)} of the {len(shown)} shown rows (no unseen row and no valset)"


def score_candidate(
    predictor: dspy.Predict,
    instruction: str,
    rows: Sequence[dspy.Example],
    *,
    lm: dspy.BaseLM,
    adapter: dspy.Adapter,
) -> dict[str, Any]:
    """The follower's scores for ``predictor`` (its demos kept) with ``instruction``."""
    program = predictor.deepcopy()
    program.signature = program.signature.with_instructions(instruction)
    result = evaluate(program, rows, lm=lm, adapter=adapter, progress=False)
    return {
        "macro_f1": round(result.macro_f1, 4),
        "accuracy": round(result.accuracy, 4),
        "invalid_rate": round(result.invalid_rate, 4),
        "calls": result.calls,
        "errors": result.errors,
    }


def best_candidate(candidates: Sequence[Candidate]) -> Candidate:
    """The candidate with the highest validation macro-F1; ties go to the shorter
    instruction, then to the earlier candidate."""
    return max(
        candidates,
        key=lambda c: ((c.score or {}).get("macro_f1", -1.0), -len(c.instruction), -c.index),
    )
