"""The compile pipeline's parts (plan -> write -> choose -> apply) and the typed values
they pass: the writer's specs and writings, the selector's scores, its failure contract,
and the parameter rules (fake LMs only)."""

from __future__ import annotations

import dataclasses
from typing import Any

import dspy
import pytest
from fakes import fake_lm, message_texts
from support.reviews import GOOD, Review, reviews

from dspy_promptmii import PromptMIIOptimizer
from dspy_promptmii.params import SHARED, Integer, Number, check_params
from dspy_promptmii.plan import make_plans
from dspy_promptmii.protocol import Protocol
from dspy_promptmii.selection import (
    Candidate,
    CandidateFailed,
    Score,
    SelectionError,
    Selector,
    best_candidate,
)
from dspy_promptmii.task import LabelledExample
from dspy_promptmii.writer import CANDIDATE_TEMPERATURE, CandidateSpec, InstructionWriter, Written


def _obeying(request: Any) -> str:
    text = message_texts(request.messages[-1])
    if "Praise means pos" in text:
        return "pos" if "loved" in text.rsplit("Input:", 1)[-1] else "neg"
    return "neg"


def _plan(n: int = 4, rows: int = 12, demos: int = 0):
    program = dspy.Predict(Review)
    (plan,) = make_plans(program, reviews(rows), None, n=n, seed=0, sampling="stratified", demos=demos)
    return program, plan


def test_the_plan_holds_one_labelled_example_type_and_frozen_values() -> None:
    _, plan = _plan(demos=2)
    assert all(isinstance(row, LabelledExample) for row in (*plan.examples, *plan.labelled))
    inputs, label = plan.examples[0]
    assert plan.examples[0].inputs == inputs and plan.examples[0].label == label
    assert len(plan.demos) == 2 and all(isinstance(demo, dspy.Example) for demo in plan.demos)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.name = "other"  # type: ignore[misc]


def test_the_writer_specs_are_greedy_per_template_then_sampled() -> None:
    writer = InstructionWriter(Protocol(template="meta2"), candidates=5, seed=7)
    specs = writer.specs("openai/some-model")
    assert [s.template for s in specs] == ["meta2", "meta1", "label_defs", "meta2", "meta1"]
    assert [s.sampled for s in specs] == [False, False, False, True, True]
    assert [s.with_exemplars for s in specs] == [True, True, True, False, True]
    assert specs[3] == CandidateSpec(3, "meta2", False, CANDIDATE_TEMPERATURE, 10)
    assert InstructionWriter(Protocol(template="Labels {label_names}\n{examples}"), candidates=2).specs("m")[1].sampled


def test_the_writer_returns_frozen_candidates_and_never_calls_the_follower() -> None:
    _, plan = _plan()
    generator, engine = fake_lm([GOOD, ""])
    writing = InstructionWriter(Protocol(), candidates=2).write(plan, generator)
    assert engine.calls == 2 and [w.empty for w in writing.written] == [False, True]
    assert isinstance(writing.usable[0], Written) and writing.usable[0].instruction.startswith(GOOD)
    with pytest.raises(dataclasses.FrozenInstanceError):
        writing.written[0].instruction = "x"  # type: ignore[misc]


def test_the_selector_scores_with_typed_values_and_keeps_the_best() -> None:
    _, plan = _plan()
    generator, _ = fake_lm(["Say something.", GOOD])
    follower, _ = fake_lm(_obeying, model="fake/follower")
    writing = InstructionWriter(Protocol(), candidates=2).write(plan, generator)
    choice = Selector(Protocol()).choose(plan, writing, follower)
    assert choice.best.index == 1 and isinstance(choice.best.score, Score)
    assert [c.kind for c in choice.candidates] == ["generated", "generated", "naive"]
    assert choice.follower_calls == sum(c.score.calls for c in choice.candidates)


def test_a_failed_candidate_carries_its_error_and_no_score() -> None:
    def reply(request: Any) -> str:
        if "RUNAWAY" in message_texts(request.messages[-1]):
            raise RuntimeError("context length exceeded")
        return _obeying(request)

    _, plan = _plan()
    generator, _ = fake_lm([GOOD, "RUNAWAY " * 20])
    follower, _ = fake_lm(reply, model="fake/follower", num_retries=0)
    writing = InstructionWriter(Protocol(), candidates=2).write(plan, generator)
    choice = Selector(Protocol(), include_naive=False).choose(plan, writing, follower)
    failed = choice.candidates[1]
    assert failed.score is None and "context length exceeded" in failed.failed and choice.best.index == 0


def test_every_candidate_failing_is_a_selection_error_and_the_student_is_untouched() -> None:
    generator, _ = fake_lm([GOOD, "Other words."])
    follower, _ = fake_lm(lambda request: (_ for _ in ()).throw(RuntimeError("down")), model="fake/f", num_retries=0)
    student = dspy.Predict(Review)
    before = student.signature.instructions
    optimizer = PromptMIIOptimizer(generator_lm=generator, follower_lm=follower, candidates=2, n=4)
    with pytest.raises(SelectionError, match="the follower failed on every candidate") as caught:
        optimizer.compile(student, trainset=reviews(12))
    assert student.signature.instructions == before and optimizer.report == []
    assert isinstance(caught.value.__cause__, CandidateFailed)  # the first failure's traceback is kept


def test_a_bug_in_the_adapter_on_a_row_propagates_instead_of_failing_one_candidate() -> None:
    from dspy_promptmii.adapter import LabelAdapter
    from dspy_promptmii.evaluation import IncompleteEvaluation

    class BrokenParse(LabelAdapter):  # the LM answers; the code after it breaks
        def parse(self, signature: Any, completion: str) -> dict[str, Any]:
            if "Other words" in str(signature.instructions):
                raise TypeError("'NoneType' object is not subscriptable")
            return super().parse(signature, completion)

    generator, _ = fake_lm([GOOD, "Other words."])
    follower, _ = fake_lm(_obeying, model="fake/follower", num_retries=0)
    optimizer = PromptMIIOptimizer(generator_lm=generator, follower_lm=follower, candidates=2, n=4,
                                   adapter=BrokenParse())
    with pytest.raises(IncompleteEvaluation, match="TypeError") as caught:
        optimizer.compile(dspy.Predict(Review), trainset=reviews(12))
    assert not isinstance(caught.value, (CandidateFailed, SelectionError))


def test_a_bug_while_scoring_is_not_taken_for_a_failed_candidate(monkeypatch: pytest.MonkeyPatch) -> None:
    import dspy_promptmii.selection as selection

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug, not a follower failure")

    monkeypatch.setattr(selection, "evaluate", broken)
    generator, _ = fake_lm([GOOD, "Other words."])
    follower, _ = fake_lm(_obeying, model="fake/follower")
    optimizer = PromptMIIOptimizer(generator_lm=generator, follower_lm=follower, candidates=2, n=4)
    with pytest.raises(RuntimeError, match="a bug") as caught:
        optimizer.compile(dspy.Predict(Review), trainset=reviews(12))
    assert not isinstance(caught.value, (CandidateFailed, SelectionError))


def test_best_candidate_needs_a_score_and_breaks_ties_by_length_then_index() -> None:
    score = Score(macro_f1=0.5, accuracy=0.5, invalid_rate=0.0, calls=4)
    short = Candidate(index=2, kind="generated", instruction="short", score=score)
    long = Candidate(index=0, kind="generated", instruction="much longer", score=score)
    failed = Candidate(index=1, kind="generated", instruction="x", failed="down")
    assert best_candidate([long, failed, short]) is short
    with pytest.raises(ValueError, match="no candidate has a score"):
        best_candidate([failed])


@pytest.mark.parametrize(
    ("name", "value", "error", "message"),
    [
        ("n", 0, ValueError, "n must be an integer >= 1, got 0"),
        ("n", True, TypeError, "n must be an integer >= 1, got True"),
        ("max_tokens", "5", TypeError, "max_tokens must be an integer >= 1 or None"),
        ("exemplars", -1, ValueError, "exemplars must be an integer >= 0"),
        ("temperature", float("inf"), ValueError, "temperature must be a finite number >= 0"),
        ("temperature", False, TypeError, "temperature must be a number or None"),
        ("include_naive", 1, TypeError, "include_naive must be True or False"),
    ],
)
def test_one_rule_per_parameter_names_the_culprit(name: str, value: Any, error: type, message: str) -> None:
    with pytest.raises(error, match=message.replace("(", r"\(")):
        check_params({name: value}, SHARED)
    with pytest.raises(error, match=message.replace("(", r"\(")):
        PromptMIIOptimizer(**{name: value})


def test_the_rules_accept_their_boundaries() -> None:
    check_params({"n": 1, "max_tokens": None, "exemplars": 0, "temperature": 0, "seed": -3}, SHARED)
    assert Integer(low=1, none=True).describe() == "an integer >= 1 or None"
    Number(low=0).check("t", 0.5)


def test_the_constructor_stores_what_it_is_given() -> None:
    optimizer = PromptMIIOptimizer(n=3, exemplars=2, library="/nonexistent/library.json", candidates=2)
    assert (optimizer.n, optimizer.exemplars, optimizer.library, optimizer.candidates) == (
        3, 2, "/nonexistent/library.json", 2
    )


# --- the protocol and the adapter travel as arguments; the GRPO label has one schema ----


def test_no_benchmark_or_training_module_reads_the_adapter_from_dspy_settings() -> None:
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    readers = [
        str(path.relative_to(root))
        for folder in ("benchmarks", "training")
        for path in (root / folder).rglob("*.py")
        if "results" not in path.parts and "rft" not in path.parts and "settings.adapter" in path.read_text("utf-8")
    ]
    assert readers == []


def test_a_benchmark_cell_hands_its_adapter_to_the_optimizer() -> None:
    from benchmarks.methods import Budgets, CompileContext, _promptmii_optimizer
    from dspy_promptmii import LabelAdapter
    from dspy_promptmii.routes import Endpoint

    generator, _ = fake_lm([GOOD])
    endpoint = Endpoint(
        lm=generator, route="local", token_counter=None, context_tokens=None, constrained_style="json_schema"
    )
    protocol = Protocol(constrained="json_schema")
    adapter = LabelAdapter(protocol=protocol)
    ctx = CompileContext(
        student=dspy.Predict(Review), examples=reviews(4), seed=0, threads=1, budgets=Budgets(), follower=endpoint,
        generator=endpoint, generator_lm=generator, follower_lm=generator, protocol=protocol, adapter=adapter,
    )
    with dspy.context(adapter=dspy.ChatAdapter()):  # what DSPy has configured does not matter
        assert _promptmii_optimizer(ctx).adapter is adapter
    bare = dataclasses.replace(ctx, adapter=None).follower_adapter()
    assert isinstance(bare, LabelAdapter) and bare.protocol == protocol


def test_the_grpo_label_round_trips_and_names_what_is_wrong() -> None:
    import json

    from training.grpo_label import GRPOLabel

    label = GRPOLabel(
        task="t", labels=("a", "b"), input_fields=("text",), test_inputs=(("x",), ("y",)), test_labels=("a", "b"),
        protocol=Protocol(), n_shot=5, context_inputs=(("z",),), context_labels=("b",),
    )
    data = label.to_json()
    assert GRPOLabel.from_json(data) == label and GRPOLabel.from_json(json.dumps(data)) == label
    held = label.held_out()
    assert held.test_inputs() == [{"text": "x"}, {"text": "y"}] and held.shown == (({"text": "z"}, "b"),)
    with pytest.raises(ValueError, match="label has no 'protocol'"):
        GRPOLabel.from_json({k: v for k, v in data.items() if k != "protocol"})
    with pytest.raises(ValueError, match="2 test inputs but 1 test labels"):
        GRPOLabel.from_json({**data, "test_labels": ["a"]})


def test_the_adapter_takes_demo_style_and_warns_about_its_old_name() -> None:
    from dspy_promptmii import LabelAdapter

    assert LabelAdapter(demo_style="turns").demo_style == "turns"
    with pytest.warns(DeprecationWarning, match="demo_style"):
        assert LabelAdapter(demos="turns").protocol.demo_style == "turns"
    with pytest.raises(ValueError, match="not both"):
        LabelAdapter(demo_style="turns", protocol=Protocol())


def test_an_empty_valset_is_refused_not_taken_for_none() -> None:
    generator, engine = fake_lm([GOOD, "Other words."])
    follower, _ = fake_lm(_obeying, model="fake/follower")
    optimizer = PromptMIIOptimizer(generator_lm=generator, follower_lm=follower, candidates=2, n=4)
    with pytest.raises(ValueError, match="valset is empty"):
        optimizer.compile(dspy.Predict(Review), trainset=reviews(12), valset=[])
    assert engine.calls == 0
