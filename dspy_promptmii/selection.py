"""The choose step of a compile (``PromptMIIOptimizer(candidates=k)``): a
:class:`Selector` has the follower label held-out rows with each written candidate (and
with the naive instruction, as a reference), scores each by the protocol's macro-F1 and
keeps the best (ties: the shorter instruction, then the earlier candidate).

Error contract, written once here: scoring one candidate either gives a :class:`Score`
or raises :class:`CandidateFailed` (an LM call on some validation row raised: a server
gone, a context overflow, whatever the LM client raises); a failed candidate is reported
with its error and is never chosen. When every candidate failed, :meth:`Selector.choose`
raises :class:`SelectionError` (chained to the first failure). A row that fails although
its LM call did not (the adapter's or the program's code) raises the
:class:`~dspy_promptmii.evaluation.IncompleteEvaluation` itself: a bug is never a failed
candidate. Anything else (an interrupt) propagates unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import dspy

from dspy_promptmii.adapter import LabelAdapter
from dspy_promptmii.estimate import RoleCost, count_messages
from dspy_promptmii.evaluation import IncompleteEvaluation, evaluate
from dspy_promptmii.plan import Plan, as_examples
from dspy_promptmii.protocol import Protocol, naive_instruction
from dspy_promptmii.sampling import select_examples
from dspy_promptmii.secrets import protected_logger
from dspy_promptmii.task import LabelledExample
from dspy_promptmii.writer import CHAT_FRAMING, Writing

logger = protected_logger(__name__)

__all__ = [
    "Candidate",
    "CandidateFailed",
    "Choice",
    "Score",
    "SelectionError",
    "Selector",
    "as_examples",
    "best_candidate",
    "score_candidate",
    "validation_rows",
]


@dataclass(frozen=True)
class Score:
    """The follower's scores for one instruction on the validation rows (rounded to 4
    places), with the follower calls made and the rows whose reply named no label
    counted in ``invalid_rate``."""

    macro_f1: float
    accuracy: float
    invalid_rate: float
    calls: int
    errors: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class CandidateFailed(RuntimeError):
    """Scoring a candidate failed: some validation row raised with its instruction.
    ``calls`` is the follower calls it made."""

    def __init__(self, message: str, calls: int):
        super().__init__(message)
        self.calls = calls


class SelectionError(RuntimeError):
    """The follower failed on every candidate: there is nothing to choose from."""


@dataclass(frozen=True)
class Candidate:
    """One candidate instruction and how it was made and scored.

    ``kind`` is ``"generated"``, ``"naive"`` (the naive instruction, kept as a
    reference so that selection never prefers an instruction that the follower does
    worse with than with no induction at all) or ``"empty"`` (a generator reply with
    nothing left after cleaning: reported, never scored). ``exemplar_tasks`` names the
    library entries its meta-prompt showed. ``score`` is None until it is
    scored; ``failed`` is the error of a candidate whose scoring failed.
    """

    index: int
    kind: str
    instruction: str
    template: str | None = None
    exemplar_tasks: tuple[str, ...] = ()
    temperature: float | None = None
    seed: int | None = None
    tokens: int | None = None
    score: Score | None = None
    failed: str | None = None

    def summary(self) -> dict[str, Any]:
        """The candidate as a report lists it (``failed`` only when it failed)."""
        summary = {
            "index": self.index,
            "kind": self.kind,
            "instruction": self.instruction,
            "template": self.template,
            "exemplars": list(self.exemplar_tasks),
            "temperature": self.temperature,
            "seed": self.seed,
            "tokens": self.tokens,
            "score": None if self.score is None else self.score.as_dict(),
        }
        if self.failed is not None:
            summary["failed"] = self.failed
        return summary


@dataclass(frozen=True)
class Choice:
    """What the selector chose for one plan: the chosen candidate, every candidate in
    index order (generated, empty and the naive reference), where the validation rows
    came from (None when nothing was scored) and the follower calls made."""

    best: Candidate
    candidates: tuple[Candidate, ...]
    validation: str | None = None
    follower_calls: int = 0


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
) -> Score:
    """The follower's scores for ``predictor`` (its demos kept) with ``instruction``.

    Raises:
        CandidateFailed: some LM call raised on a row (the evaluation has no score).
        IncompleteEvaluation: some row raised outside the LM call (in the adapter or the
            program: a bug, never a failed candidate).
    """
    program = predictor.deepcopy()
    program.signature = program.signature.with_instructions(instruction)
    try:
        result = evaluate(program, rows, lm=lm, adapter=adapter, progress=False)
    except IncompleteEvaluation as error:
        if error.evaluation.errors > error.evaluation.lm_errors:
            raise  # a row failed although its LM call did not: not the candidate's failure
        raise CandidateFailed(str(error), calls=error.evaluation.calls) from error
    return Score(
        macro_f1=round(result.macro_f1, 4),
        accuracy=round(result.accuracy, 4),
        invalid_rate=round(result.invalid_rate, 4),
        calls=result.calls,
        errors=result.errors,
    )


def best_candidate(candidates: Sequence[Candidate]) -> Candidate:
    """The scored candidate with the highest validation macro-F1; ties go to the shorter
    instruction, then to the earlier candidate.

    Raises:
        ValueError: no candidate has a score.
    """
    scored = [c for c in candidates if c.score is not None]
    if not scored:
        raise ValueError("no candidate has a score")
    return max(scored, key=lambda c: (c.score.macro_f1, -len(c.instruction), -c.index))


class Selector:
    """Chooses among the written candidates of a plan with the follower.

    Args:
        protocol: Gives the naive instruction and its format line.
        adapter: The follower's adapter while scoring (default: ``LabelAdapter`` with
            ``protocol``).
        val_size: Validation rows taken from the trainset when there is no valset.
        seed: Seed of that choice (``seed + 1``).
        include_naive: Also score the naive instruction and keep it if no generated one
            does better.
    """

    def __init__(
        self,
        protocol: Protocol,
        *,
        adapter: dspy.Adapter | None = None,
        val_size: int = 20,
        seed: int = 0,
        include_naive: bool = True,
    ):
        self.protocol = protocol
        self.adapter = adapter if adapter is not None else LabelAdapter(protocol=protocol)
        self.val_size = val_size
        self.seed = seed
        self.include_naive = include_naive

    def candidates(self, writing: Writing, plan: Plan, with_naive: bool) -> list[Candidate]:
        """The candidates of a writing in index order: each usable reply, each empty one,
        and (with ``with_naive`` and ``include_naive``) the naive reference last."""
        out = [
            Candidate(
                index=w.spec.index,
                kind="empty" if w.empty else "generated",
                instruction=w.instruction,
                template=w.spec.template_name,
                exemplar_tasks=writing.exemplar_tasks if w.spec.with_exemplars and not w.empty else (),
                temperature=None if w.empty else w.sent_temperature,
                seed=None if w.empty else w.sent_seed,
                tokens=None if w.empty else w.tokens,
            )
            for w in writing.written
        ]
        if with_naive and self.include_naive:
            naive = self.protocol.instruction(naive_instruction(plan.task.labels), plan.task.labels)
            out.append(Candidate(index=len(writing.written), kind="naive", instruction=naive))
        return out

    def choose(self, plan: Plan, writing: Writing, follower: dspy.BaseLM | None) -> Choice:
        """The best candidate of ``writing`` (the first usable one without a follower, or
        when only one candidate is left to score).

        Raises:
            SelectionError: the follower failed on every candidate.
        """
        candidates = self.candidates(writing, plan, with_naive=follower is not None)
        scorable = [c for c in candidates if c.kind != "empty"]
        if follower is None or len(scorable) < 2:
            return Choice(best=scorable[0], candidates=tuple(candidates))
        rows, validation = validation_rows(plan.labelled, plan.examples, self.val_size, self.seed, plan.valset)
        examples = as_examples(rows, plan.task)
        scorer = plan.predictor.deepcopy()
        scorer.lm = None  # the follower scores, not an LM the student's predictor carries
        scorer.demos = list(plan.demos) if plan.demos is not None else list(plan.predictor.demos)
        scored: dict[int, Candidate] = {}
        calls = 0
        first_failure: CandidateFailed | None = None
        for candidate in scorable:
            try:
                score = score_candidate(scorer, candidate.instruction, examples, lm=follower, adapter=self.adapter)
            except CandidateFailed as error:
                logger.warning("predictor %r: candidate %d failed on the validation rows: %s",
                               plan.name, candidate.index, error)
                scored[candidate.index] = replace(candidate, failed=str(error))
                calls += error.calls
                first_failure = first_failure or error
                continue
            scored[candidate.index] = replace(candidate, score=score)
            calls += score.calls
        every = tuple(scored.get(c.index, c) for c in candidates)
        if all(c.failed is not None for c in scored.values()):
            first = next(iter(scored.values())).failed
            raise SelectionError(
                f"predictor {plan.name!r}: the follower failed on every candidate; first: {first}"
            ) from first_failure
        return Choice(best_candidate(every), every, validation, calls)

    def estimate(
        self,
        plan: Plan,
        follower: dspy.BaseLM,
        generated: int,
        instruction_bound: int | None,
        token_counter: Callable[[str], int] | None,
    ) -> tuple[RoleCost, int, list[str]]:
        """What :meth:`choose` will cost, without a call: the follower calls that score
        ``generated`` candidates (and the naive instruction) on the validation rows, with
        a generated instruction counted at ``instruction_bound`` tokens (the generator's
        reply limit, a bound); the number of rows, and notes. Nothing to score (a single
        candidate): no calls."""
        if generated + (1 if self.include_naive else 0) < 2:
            return RoleCost(model=follower.model), 0, []
        task = plan.task
        rows, _ = validation_rows(plan.labelled, plan.examples, self.val_size, self.seed, plan.valset)
        notes: list[str] = []
        adapter = self.adapter
        protocol = adapter.protocol if isinstance(adapter, LabelAdapter) else self.protocol
        if not isinstance(adapter, LabelAdapter):
            notes.append(f"follower prompts counted as LabelAdapter's; the configured {type(adapter).__name__} differs")
        if plan.demos is not None:
            demos = list(plan.examples[: len(plan.demos)])
        else:
            demos = [
                LabelledExample({name: demo[name] for name in task.input_fields}, task.label_of(demo[task.label_field]))
                for demo in plan.predictor.demos
                if demo.get(task.label_field) is not None and task.label_of(demo[task.label_field]) is not None
            ]
        framing = CHAT_FRAMING if token_counter is not None else 0
        reply = LabelAdapter(protocol=protocol)._lm_kwargs(follower, {}, task).get("max_tokens")
        reply = reply or (getattr(follower, "kwargs", {}) or {}).get("max_tokens")
        naive = naive_instruction(task.labels) if self.include_naive else None

        def count(instruction: str, inputs: Mapping[str, Any]) -> int:
            messages = protocol.messages(
                protocol.instruction(instruction, task.labels), task.labels, inputs, task.input_fields, demos,
                task.descriptions,
            )
            return count_messages(messages, follower.model, token_counter, framing)

        prompt: int | None = 0
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
        cost = RoleCost(
            model=follower.model,
            calls=calls,
            prompt_tokens=prompt,
            completion_tokens=None if reply is None else int(reply) * calls,
        )
        return cost, len(rows), notes
