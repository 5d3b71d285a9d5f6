"""evaluation.evaluate, usage.UsageMeter and the naive / ICL baselines, with fake LMs."""

from __future__ import annotations

from typing import Literal

import dspy
import pytest
from fakes import fake_lm, message_texts, word_count

from dspy_promptmii.adapter import LabelAdapter
from dspy_promptmii.baselines import MESSAGE_OVERHEAD, fit_icl_demos, icl_program, naive_program
from dspy_promptmii.evaluation import IncompleteEvaluation, evaluate, program_task
from dspy_promptmii.protocol import NAIVE_INSTRUCTION, Protocol, format_line
from dspy_promptmii.usage import metered


class Mood(dspy.Signature):
    """Original instruction."""

    text: str = dspy.InputField()
    label: Literal["pos", "neg"] = dspy.OutputField()


def examples(pairs):
    return [dspy.Example(text=t, label=y).with_inputs("text") for t, y in pairs]


TEST = examples([("good", "pos"), ("great", "pos"), ("bad", "neg"), ("awful", "neg")])


def by_keyword(request) -> str:
    text = message_texts(request.messages[-1])
    if "awful" in text:
        return "I cannot tell"  # unparseable: invalid
    return "neg" if "bad" in text else "pos"


def test_evaluate_scores_counts_invalid_and_reports_tokens_per_query():
    lm, engine = fake_lm(by_keyword, model="fake/follower", usage=(50, 1))
    result = evaluate(naive_program(dspy.Predict(Mood)), TEST, lm=lm, adapter=LabelAdapter(), progress=False)
    assert result.predictions == ["pos", "pos", "neg", None]
    # gold pos,pos,neg,neg vs pred pos,pos,neg,<none>: pos F1 1; neg P=1 R=1/2 F1 2/3; the
    # invalid reply is a miss for neg, not a class -> mean (1 + 2/3) / 2 = 5/6
    assert result.macro_f1 == pytest.approx(5 / 6)
    assert result.accuracy == pytest.approx(0.75)
    assert result.invalid_rate == pytest.approx(0.25)
    assert result.calls == engine.calls == 4
    assert result.prompt_tokens_per_query == pytest.approx(50.0)
    assert result.lm_errors == 0


class Boom(RuntimeError):
    pass


def test_evaluate_counts_lm_errors_as_errors_not_invalid_replies_and_says_so(caplog):
    def flaky(request):
        if "bad" in message_texts(request.messages[-1]):
            raise Boom("server went away")
        return "pos"

    lm, _ = fake_lm(flaky, model="fake/follower")
    lm.num_retries = 0
    with caplog.at_level("WARNING", logger="dspy_promptmii.evaluation"):
        # An LM error leaves the evaluation without a score (issue 21): never a miss.
        with pytest.raises(IncompleteEvaluation, match="1 of 4 examples raised") as raised:
            evaluate(dspy.Predict(Mood), TEST, lm=lm, adapter=LabelAdapter(), progress=False)
    result = raised.value.evaluation
    assert result.lm_errors == 1 and result.errors == 1
    assert result.invalid_rate == 0.0  # no reply came back: an error, not an invalid reply
    assert result.predictions[2] is None
    assert "server went away" in result.first_error
    assert "evaluation incomplete" in caplog.text and "server went away" in caplog.text


def test_evaluate_rejects_an_empty_test_set_and_a_non_classifier():
    lm, _ = fake_lm("pos", model="fake/follower")
    with pytest.raises(ValueError, match="no examples"):
        evaluate(dspy.Predict(Mood), [], lm=lm, progress=False)
    with pytest.raises(ValueError, match="no classification output field"):
        program_task(dspy.Predict("question -> answer"))


def test_usage_meter_counts_calls_tokens_and_copies_separately_per_role():
    follower, _ = fake_lm("pos", model="fake/follower", usage=(10, 2))
    generator, _ = fake_lm("write this", model="fake/generator", usage=(100, 20))
    f_lm, f_meter = metered(follower)
    g_lm, g_meter = metered(generator)
    f_lm("a")
    f_lm.copy(temperature=0.5)("b")  # a copy keeps the meter
    g_lm("c")
    assert (f_meter.snapshot().calls, f_meter.snapshot().prompt_tokens, f_meter.snapshot().completion_tokens) == (
        2,
        20,
        4,
    )
    assert (g_meter.snapshot().calls, g_meter.snapshot().prompt_tokens) == (1, 100)
    assert follower.callbacks == [] and generator.callbacks == []  # the originals are untouched


def test_naive_and_icl_programs_leave_the_student_alone():
    student = dspy.Predict(Mood)
    naive = naive_program(student)
    assert student.signature.instructions == "Original instruction."
    assert naive.signature.instructions == f"{NAIVE_INSTRUCTION}\n{format_line(['pos', 'neg'])}"
    demos = examples([("fine", "pos"), ("poor", "neg"), ("nice", "pos")])
    icl = icl_program(student, demos)
    assert [d.text for d in icl.demos] == ["fine", "poor", "nice"]  # the given order, all of them
    assert student.demos == []
    assert icl.signature.instructions == naive.signature.instructions


def test_fit_icl_demos_finds_the_largest_prefix_that_fits():
    student = dspy.Predict(Mood)
    demos = examples([(f"word{i} " * 5, "pos") for i in range(10)])

    def needed(k: int, style: str) -> int:
        protocol = Protocol(demo_style=style)
        return next(n for n in range(0, 10_000) if fit_icl_demos(student, demos, n, word_count, protocol=protocol) >= k)

    inline_4, inline_5 = needed(4, "inline"), needed(5, "inline")
    assert fit_icl_demos(student, demos, inline_5 - 1, word_count) == 4
    assert fit_icl_demos(student, demos, inline_5, word_count) == 5
    assert inline_5 - inline_4 == 8  # one demo: "Input:" + 5 words + "Label:" + "pos"
    # As chat turns every message costs its framing as well: two more messages per demo.
    turns_4, turns_5 = needed(4, "turns"), needed(5, "turns")
    assert turns_5 - turns_4 == 1 + 5 + 1 + 2 * MESSAGE_OVERHEAD  # "Input:" + 5 words; "pos"; framing
    assert fit_icl_demos(student, demos, 0, word_count) == 0
