"""PromptMIIOptimizer and task introspection, against a recording fake generator LM."""

from __future__ import annotations

import copy
import enum
import json
import logging
import re
import time
import warnings
from typing import Literal

import dspy
import pytest
from fakes import fake_lm, word_count

from dspy_promptmii import GenerationError, PromptBudgetError, PromptMIIOptimizer, choose_template
from dspy_promptmii.generation import BUDGET_MARGIN, DEFAULT_MAX_INSTRUCTION_TOKENS
from dspy_promptmii.protocol import TEMPLATES, build_meta_prompt, format_line, task_notes
from dspy_promptmii.sampling import select_examples
from dspy_promptmii.task import classification_tasks, signature_task

REPLY = "Decide whether the review is positive or negative.\n\nPraise means pos; complaints mean neg."
INSTRUCTION = REPLY + "\n" + format_line(["pos", "neg"])
#: What the meta-prompt shows of Sentiment's own instructions (its docstring).
SENTIMENT_NOTES = task_notes("Classify the review.", {}, ["text"])


class Sentiment(dspy.Signature):
    """Classify the review."""

    text: str = dspy.InputField()
    label: Literal["pos", "neg"] = dspy.OutputField()


class Entailment(dspy.Signature):
    """Does the premise entail the hypothesis?"""

    premise: str = dspy.InputField()
    hypothesis: str = dspy.InputField()
    label: Literal["entailment", "neutral", "contradiction"] = dspy.OutputField()


def sentiment_trainset(n: int = 12) -> list[dspy.Example]:
    return [
        dspy.Example(text=f"review number {i} {'loved' if i % 2 else 'hated'} it", label="pos" if i % 2 else "neg")
        .with_inputs("text")
        for i in range(n)
    ]


def snapshot(program: dspy.Module):
    """Everything compile must leave alone on the student, per predictor."""
    return [
        (name, p.signature, p.signature.instructions, copy.deepcopy([dict(d) for d in p.demos]))
        for name, p in program.named_predictors()
    ]


def student_with_demos() -> dspy.Predict:
    program = dspy.Predict(Sentiment)
    program.demos = [dspy.Example(text="a fine film", label="pos")]
    return program


# --- one call, its settings, and the instruction ------------------------------------


def test_one_generator_call_with_the_meta_prompt_as_one_user_message():
    lm, engine = fake_lm([REPLY])
    trainset = sentiment_trainset(12)
    compiled = PromptMIIOptimizer(generator_lm=lm, n=6, template="meta1").compile(
        dspy.Predict(Sentiment), trainset=trainset
    )
    assert engine.calls == 1
    assert engine.roles(0) == ["user"]
    assert engine.requests[0].system is None
    labelled = [({"text": ex.text}, ex.label) for ex in trainset]
    # the default instruction budget (160 tokens) is asked for in words: three quarters of it
    expected = build_meta_prompt(
        "meta1", ["pos", "neg"], select_examples(labelled, 6, 0), ["text"], SENTIMENT_NOTES, max_words=120
    )
    assert engine.prompt(0) == expected
    assert engine.prompt(0).count("\nLabel: ") == 6
    assert compiled.signature.instructions == INSTRUCTION


def test_generator_defaults_temperature_0_and_the_budget_limit():
    lm, engine = fake_lm([REPLY])
    PromptMIIOptimizer(generator_lm=lm).compile(dspy.Predict(Sentiment), trainset=sentiment_trainset())
    config = engine.configs[0]
    assert config.temperature == 0
    assert config.max_tokens == 160 + 64  # the default instruction budget plus its margin
    assert "under 120 words" in engine.prompt(0)


def test_without_a_budget_the_generator_gets_1024_tokens_and_no_length_rule():
    lm, engine = fake_lm([REPLY])
    optimizer = PromptMIIOptimizer(generator_lm=lm, max_instruction_tokens=None)
    optimizer.compile(dspy.Predict(Sentiment), trainset=sentiment_trainset())
    assert engine.configs[0].max_tokens == 1024
    assert "words" not in engine.prompt(0)


def test_generator_settings_are_the_lms_own_as_in_dspy():
    lm, engine = fake_lm([REPLY])
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        optimizer = PromptMIIOptimizer(generator_lm=lm.copy(temperature=0.7, max_tokens=300, top_p=0.9))
    optimizer.compile(dspy.Predict(Sentiment), trainset=sentiment_trainset())
    config = engine.configs[0]
    assert (config.temperature, config.max_tokens, config.top_p) == (0.7, 300, 0.9)


@pytest.mark.parametrize(
    ("kwargs", "replacement"),
    [
        ({"temperature": 0.7}, "generator_lm.copy(temperature=0.7)"),
        ({"max_tokens": 300}, "generator_lm.copy(max_tokens=300)"),
        ({"generation_kwargs": {"top_p": 0.9}}, "generator_lm.copy(**generation_kwargs)"),
    ],
)
def test_generator_settings_given_to_the_optimizer_are_deprecated_and_still_applied(kwargs, replacement):
    lm, engine = fake_lm([REPLY], temperature=0.2, max_tokens=900)  # the option still wins over the LM's own
    with pytest.warns(DeprecationWarning, match=re.escape(replacement)) as caught:
        optimizer = PromptMIIOptimizer(generator_lm=lm, **kwargs)
    assert caught[0].filename == __file__  # the warning points at the caller
    optimizer.compile(dspy.Predict(Sentiment), trainset=sentiment_trainset())
    config = engine.configs[0]
    expected = {"temperature": 0.2, "max_tokens": 900, "top_p": None, **kwargs, **kwargs.get("generation_kwargs", {})}
    assert (config.temperature, config.max_tokens, getattr(config, "top_p", None)) == (
        expected["temperature"], expected["max_tokens"], expected["top_p"]
    )


def test_the_instruction_budget_caps_the_reply_only_when_the_lm_sets_no_limit():
    lm, engine = fake_lm([REPLY, REPLY])
    PromptMIIOptimizer(generator_lm=lm).compile(dspy.Predict(Sentiment), trainset=sentiment_trainset())
    PromptMIIOptimizer(generator_lm=lm.copy(max_tokens=500)).compile(
        dspy.Predict(Sentiment), trainset=sentiment_trainset()
    )
    assert [c.max_tokens for c in engine.configs] == [DEFAULT_MAX_INSTRUCTION_TOKENS + BUDGET_MARGIN, 500]


def test_generator_from_dspy_settings_when_not_given():
    lm, engine = fake_lm([REPLY])
    with dspy.context(lm=lm):
        compiled = PromptMIIOptimizer().compile(dspy.Predict(Sentiment), trainset=sentiment_trainset())
    assert engine.calls == 1
    assert compiled.signature.instructions == INSTRUCTION


def test_no_generator_at_all_is_a_clear_error():
    with dspy.context(lm=None):
        with pytest.raises(ValueError, match="no generator LM"):
            PromptMIIOptimizer().compile(dspy.Predict(Sentiment), trainset=sentiment_trainset())


class TwoClassifiers(dspy.Module):
    def __init__(self):
        super().__init__()
        self.sentiment = dspy.Predict(Sentiment)
        self.topic = dspy.Predict("text -> topic: Literal['film', 'book', 'music']")

    def forward(self, text):
        return self.sentiment(text=text), self.topic(text=text)


def test_one_call_per_classification_predictor():
    lm, engine = fake_lm(["Sentiment rules.", "Topic rules."])
    trainset = [
        dspy.Example(text=f"t{i}", label=["pos", "neg"][i % 2], topic=["film", "book", "music"][i % 3]).with_inputs(
            "text"
        )
        for i in range(9)
    ]
    optimizer = PromptMIIOptimizer(generator_lm=lm, n=6)
    compiled = optimizer.compile(TwoClassifiers(), trainset=trainset)
    assert engine.calls == 2
    assert compiled.sentiment.signature.instructions == "Sentiment rules.\n" + format_line(["pos", "neg"])
    assert compiled.topic.signature.instructions == "Topic rules.\n" + format_line(["film", "book", "music"])
    assert "film, book, music" in engine.prompt(1)
    assert [r["predictor"] for r in optimizer.report] == ["sentiment", "topic"]
    assert all(r["generator_calls"] == 1 for r in optimizer.report)


# --- the student is never modified --------------------------------------------------


def test_student_and_its_signature_class_are_unchanged():
    lm, _ = fake_lm([REPLY])
    student = student_with_demos()
    before = snapshot(student)
    compiled = PromptMIIOptimizer(generator_lm=lm).compile(student, trainset=sentiment_trainset())
    assert snapshot(student) == before
    assert student.signature is Sentiment
    assert Sentiment.instructions == "Classify the review."
    assert compiled is not student
    assert compiled.signature is not Sentiment
    assert compiled.signature.instructions == INSTRUCTION
    # What is not the instruction is kept on the copy: fields and demos.
    assert list(compiled.signature.fields) == list(Sentiment.fields)
    assert [dict(d) for d in compiled.demos] == [dict(d) for d in student.demos]
    assert getattr(student, "_compiled", False) is False
    assert compiled._compiled is True
    assert not hasattr(student, "promptmii_report")


def test_student_unchanged_when_generation_fails():
    lm, _ = fake_lm(["Sentiment rules.", "```\n```"])
    trainset = [
        dspy.Example(text=f"t{i}", label=["pos", "neg"][i % 2], topic=["film", "book", "music"][i % 3]).with_inputs(
            "text"
        )
        for i in range(9)
    ]
    student = TwoClassifiers()
    before = snapshot(student)
    with pytest.raises(GenerationError):
        PromptMIIOptimizer(generator_lm=lm).compile(student, trainset=trainset)
    assert snapshot(student) == before
    assert Sentiment.instructions == "Classify the review."


@pytest.mark.parametrize(
    "trainset",
    [[], [dspy.Example(text="x", label="maybe").with_inputs("text")], [dspy.Example(label="pos")]],
    ids=["empty", "unknown-label", "missing-input"],
)
def test_student_unchanged_when_the_trainset_is_bad(trainset):
    lm, engine = fake_lm([REPLY])
    student = student_with_demos()
    before = snapshot(student)
    with pytest.raises(ValueError):
        PromptMIIOptimizer(generator_lm=lm).compile(student, trainset=trainset)
    assert snapshot(student) == before
    assert engine.calls == 0  # bad input fails before any LM call


# --- bad input: clear errors --------------------------------------------------------


def test_empty_trainset():
    lm, _ = fake_lm([REPLY])
    with pytest.raises(ValueError, match="trainset is empty"):
        PromptMIIOptimizer(generator_lm=lm).compile(dspy.Predict(Sentiment), trainset=[])


def test_missing_input_field_names_the_first_offending_index():
    lm, _ = fake_lm([REPLY])
    trainset = sentiment_trainset(4) + [dspy.Example(label="pos"), dspy.Example(label="neg")]
    with pytest.raises(ValueError, match=r"trainset\[4\].*\['text'\]"):
        PromptMIIOptimizer(generator_lm=lm).compile(dspy.Predict(Sentiment), trainset=trainset)


def test_missing_label_field_names_the_index_and_field():
    lm, _ = fake_lm([REPLY])
    trainset = sentiment_trainset(2) + [{"text": "no label here"}]
    with pytest.raises(ValueError, match=r"trainset\[2\].*\['label'\]"):
        PromptMIIOptimizer(generator_lm=lm).compile(dspy.Predict(Sentiment), trainset=trainset)


def test_labels_outside_the_literal_set_are_all_listed():
    lm, _ = fake_lm([REPLY])
    trainset = sentiment_trainset(4) + [
        dspy.Example(text="a", label="meh"),
        dspy.Example(text="b", label="positive"),
        dspy.Example(text="c", label="meh"),
    ]
    with pytest.raises(ValueError, match="outside the label set") as info:
        PromptMIIOptimizer(generator_lm=lm).compile(dspy.Predict(Sentiment), trainset=trainset)
    message = str(info.value)
    assert "'meh'" in message and "'positive'" in message
    assert "allowed: ['pos', 'neg']" in message


def test_trainset_items_must_be_examples_or_dicts():
    lm, _ = fake_lm([REPLY])
    with pytest.raises(TypeError, match=r"trainset\[0\] is a tuple"):
        PromptMIIOptimizer(generator_lm=lm).compile(dspy.Predict(Sentiment), trainset=[("x", "pos")])


def test_program_without_a_classification_predictor():
    lm, engine = fake_lm([REPLY])
    trainset = [dspy.Example(question="q", answer="a").with_inputs("question")]
    with pytest.raises(ValueError, match="no classification predictor"):
        PromptMIIOptimizer(generator_lm=lm).compile(dspy.Predict("question -> answer"), trainset=trainset)
    assert engine.calls == 0


@pytest.mark.parametrize(
    ("template", "missing"),
    [("Examples:\n{examples}\nWrite one.", r"\{label_names\}"), ("Labels {label_names}", r"\{examples\}")],
)
def test_custom_template_without_placeholder_fails_at_construction(template, missing):
    with pytest.raises(ValueError, match=r"missing the placeholder\(s\) " + missing + ";"):
        PromptMIIOptimizer(template=template)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n": 0},
        {"sampling": "balanced"},
        {"max_prompt_tokens": 0},
        {"max_tokens": 0},
        {"temperature": -1},
        {"temperature": float("nan")},
        {"temperature": float("inf")},
    ],
)
def test_bad_settings_fail_at_construction(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        PromptMIIOptimizer(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n": True},
        {"n": 2.5},
        {"n": "20"},
        {"max_prompt_tokens": "100"},
        {"max_tokens": 1.5},
        {"seed": "0"},
        {"temperature": "hot"},
        {"token_counter": 5},
        {"generation_kwargs": ["top_p"]},
        {"protocol": {"template": "meta1"}},
        {"library": 42},
        {"library": b"library.json"},
    ],
)
def test_wrongly_typed_settings_name_the_argument(kwargs):
    with pytest.raises(TypeError, match=next(iter(kwargs))):
        PromptMIIOptimizer(**kwargs)


@pytest.mark.parametrize("student", [lambda text: "pos", "text -> label", None, Sentiment])
def test_compile_names_a_student_that_is_not_a_module(student):
    lm, engine = fake_lm([REPLY])
    with pytest.raises(TypeError, match="student must be a dspy.Module"):
        PromptMIIOptimizer(generator_lm=lm).compile(student, trainset=sentiment_trainset())
    assert engine.calls == 0


@pytest.mark.parametrize("trainset", [None, "examples", {"text": "a", "label": "pos"}, (e for e in [])])
def test_compile_names_a_trainset_that_is_not_a_list(trainset):
    lm, engine = fake_lm([REPLY])
    with pytest.raises(TypeError, match="trainset must be a list"):
        PromptMIIOptimizer(generator_lm=lm).compile(dspy.Predict(Sentiment), trainset=trainset)
    assert engine.calls == 0


def test_generator_lm_must_be_an_lm():
    with pytest.raises(TypeError, match="generator_lm"):
        PromptMIIOptimizer(generator_lm="openai/gpt-4o-mini")


def test_unexpected_compile_keyword_is_an_error():
    lm, _ = fake_lm([REPLY])
    with pytest.raises(TypeError, match="max_demos"):
        PromptMIIOptimizer(generator_lm=lm).compile(dspy.Predict(Sentiment), trainset=sentiment_trainset(), max_demos=3)


@pytest.mark.parametrize("reply", ["", "   \n", "Instruction:", "```\n```", '""'])
def test_reply_empty_after_cleaning_is_a_generation_error(reply):
    lm, engine = fake_lm([reply])
    student = student_with_demos()
    before = snapshot(student)
    optimizer = PromptMIIOptimizer(generator_lm=lm)
    with pytest.raises(GenerationError, match="empty after cleaning") as info:
        optimizer.compile(student, trainset=sentiment_trainset())
    assert info.value.raw_reply == reply
    assert repr(reply) in str(info.value)
    assert engine.calls == 1
    assert snapshot(student) == before
    assert optimizer.report == []


def test_single_label_trainset_warns_and_still_compiles(caplog):
    lm, engine = fake_lm([REPLY])
    trainset = [dspy.Example(text=f"t{i}", label="pos").with_inputs("text") for i in range(5)]
    with caplog.at_level(logging.WARNING, logger="dspy_promptmii"):
        compiled = PromptMIIOptimizer(generator_lm=lm).compile(dspy.Predict(Sentiment), trainset=trainset)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name.startswith("dspy_promptmii")]
    assert len(warnings) == 1
    assert "single label" in warnings[0].getMessage() and "pos" in warnings[0].getMessage()
    assert engine.calls == 1
    assert compiled.signature.instructions == INSTRUCTION


def test_two_labels_do_not_warn(caplog):
    lm, _ = fake_lm([REPLY])
    with caplog.at_level(logging.WARNING, logger="dspy_promptmii"):
        PromptMIIOptimizer(generator_lm=lm).compile(dspy.Predict(Sentiment), trainset=sentiment_trainset())
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# --- templates ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "template"),
    [
        ("openai/llama-3.1-8b", "meta1"),
        ("hosted_vllm/Meta-Llama-3.1-8B-Instruct", "meta1"),
        ("openai/qwen2.5-7b", "meta2"),
    ],
)
def test_auto_template_follows_the_generator_family(model, template):
    lm, engine = fake_lm([REPLY], model=model)
    optimizer = PromptMIIOptimizer(generator_lm=lm, template="auto")
    optimizer.compile(dspy.Predict(Sentiment), trainset=sentiment_trainset())
    report = optimizer.report[0]
    assert report["template"] == template
    assert report["template_choice"].startswith("auto")
    assert report["generator_model"] == model
    head = TEMPLATES[template].split("{label_names}")[0]
    assert engine.prompt(0).startswith(head)
    other = TEMPLATES["meta2" if template == "meta1" else "meta1"].split("{label_names}")[0]
    assert not engine.prompt(0).startswith(other)


def test_choose_template():
    assert choose_template("auto", "openai/LLaMA-3")[0] == "meta1"
    assert choose_template("auto", "openai/qwen2.5-7b")[0] == "meta2"
    assert choose_template("meta2", "openai/llama-3.1-8b") == ("meta2", "given")
    assert choose_template("Mine: {label_names} {examples}", "x")[1] == "custom"


def test_explicit_template_overrides_auto():
    lm, engine = fake_lm([REPLY], model="openai/llama-3.1-8b")
    optimizer = PromptMIIOptimizer(generator_lm=lm, template="meta2")
    optimizer.compile(dspy.Predict(Sentiment), trainset=sentiment_trainset())
    assert optimizer.report[0]["template"] == "meta2"
    assert engine.prompt(0).startswith(TEMPLATES["meta2"].split("{label_names}")[0])


def test_custom_template_used_verbatim_with_placeholders_filled():
    template = "LABELS <{label_names}>\n---\n{examples}\n---\nWrite {one} instruction."
    lm, engine = fake_lm([REPLY])
    trainset = [
        dspy.Example(text="good", label="pos").with_inputs("text"),
        dspy.Example(text="bad", label="neg").with_inputs("text"),
    ]
    optimizer = PromptMIIOptimizer(generator_lm=lm, template=template, sampling="random", seed=0)
    optimizer.compile(dspy.Predict(Sentiment), trainset=trainset)
    shown = select_examples([({"text": "good"}, "pos"), ({"text": "bad"}, "neg")], 20, 0, "random")
    body = "\n\n".join(f"Input: {x['text']}\nLabel: {y}" for x, y in shown)
    assert engine.prompt(0) == f"LABELS <pos, neg>\n---\n{body}\n---\nWrite {{one}} instruction."
    assert optimizer.report[0]["template"] == "custom"
    assert optimizer.report[0]["template_choice"] == "custom"


# --- example choice and budget ------------------------------------------------------


def _shown_texts(prompt: str) -> list[str]:
    return [line[len("Input: ") :] for line in prompt.splitlines() if line.startswith("Input: ")]


def test_compile_shows_every_label_and_is_reproducible_by_seed():
    trainset = [dspy.Example(text=f"t{i}", label="pos").with_inputs("text") for i in range(40)] + [
        dspy.Example(text="the only neg", label="neg").with_inputs("text")
    ]
    prompts = {}
    for seed in (0, 0, 1, 2, 3):
        lm, engine = fake_lm([REPLY])
        PromptMIIOptimizer(generator_lm=lm, n=3, seed=seed).compile(dspy.Predict(Sentiment), trainset=trainset)
        assert "Label: neg" in engine.prompt(0) and "Label: pos" in engine.prompt(0)
        prompts.setdefault(seed, []).append(_shown_texts(engine.prompt(0)))
    assert prompts[0][0] == prompts[0][1]
    assert any(prompts[s][0] != prompts[0][0] for s in (1, 2, 3))


def test_smaller_n_is_a_prefix_of_larger_n_in_the_meta_prompt():
    shown = {}
    for n in (3, 8):
        lm, engine = fake_lm([REPLY])
        PromptMIIOptimizer(generator_lm=lm, n=n, seed=5).compile(
            dspy.Predict(Sentiment), trainset=sentiment_trainset(20)
        )
        shown[n] = _shown_texts(engine.prompt(0))
    assert len(shown[3]) == 3 and len(shown[8]) == 8
    assert shown[8][:3] == shown[3]


def _budget_setup(n: int = 10):
    trainset = sentiment_trainset(n)
    labelled = [({"text": ex.text}, ex.label) for ex in trainset]
    order = select_examples(labelled, n, 0)

    def render(k: int) -> str:
        return build_meta_prompt("meta2", ["pos", "neg"], order[:k], ["text"], SENTIMENT_NOTES)

    return trainset, render


def _budget_optimizer(lm: dspy.LM, max_prompt_tokens: int) -> PromptMIIOptimizer:
    """A meta-prompt budget in words, without the instruction budget's length rule (so the
    prompts match ``_budget_setup``'s renderings)."""
    return PromptMIIOptimizer(
        generator_lm=lm,
        n=10,
        template="meta2",
        max_prompt_tokens=max_prompt_tokens,
        max_instruction_tokens=None,
        token_counter=word_count,
    )


def test_budget_drops_examples_from_the_end():
    trainset, render = _budget_setup(10)
    budget = word_count(render(6)) + 2  # fits 6 examples, not 7
    assert word_count(render(7)) > budget
    lm, engine = fake_lm([REPLY])
    optimizer = _budget_optimizer(lm, budget)
    compiled = optimizer.compile(dspy.Predict(Sentiment), trainset=trainset)
    report = optimizer.report[0]
    assert (report["n_requested"], report["n_used"], report["n_available"]) == (10, 6, 10)
    assert engine.calls == 1
    assert engine.prompt(0) == render(6)
    assert word_count(engine.prompt(0)) <= budget
    assert report["meta_prompt_tokens"] == word_count(render(6))
    assert compiled.promptmii_report[0]["n_used"] == 6


def test_budget_that_fits_everything_keeps_every_example():
    trainset, render = _budget_setup(10)
    lm, engine = fake_lm([REPLY])
    optimizer = _budget_optimizer(lm, word_count(render(10)))
    optimizer.compile(dspy.Predict(Sentiment), trainset=trainset)
    assert optimizer.report[0]["n_used"] == 10
    assert engine.prompt(0) == render(10)


def test_budget_too_small_for_one_example_is_a_budget_error():
    trainset, render = _budget_setup(10)
    budget = word_count(render(1)) - 1
    lm, engine = fake_lm([REPLY])
    student = dspy.Predict(Sentiment)
    optimizer = _budget_optimizer(lm, budget)
    with pytest.raises(PromptBudgetError) as info:
        optimizer.compile(student, trainset=trainset)
    message = str(info.value)
    assert f"needs {word_count(render(1))} tokens with a single example" in message
    assert f"{word_count(render(10))} with 10" in message
    assert f"max_prompt_tokens={budget}" in message
    assert isinstance(info.value, ValueError)
    assert engine.calls == 0
    assert student.signature is Sentiment


# --- the report ---------------------------------------------------------------------


def test_report_on_optimizer_and_program():
    lm, engine = fake_lm([REPLY], model="openai/qwen2.5-7b", usage=(321, 54))
    optimizer = PromptMIIOptimizer(generator_lm=lm, n=5)
    started = time.perf_counter()
    compiled = optimizer.compile(dspy.Predict(Sentiment), trainset=sentiment_trainset(12))
    wall = time.perf_counter() - started
    assert compiled.promptmii_report == optimizer.report
    (report,) = optimizer.report
    assert report["predictor"] == "self"
    assert report["template"] == "meta2"
    assert report["n_requested"] == 5 and report["n_used"] == 5 and report["n_available"] == 12
    assert report["labels"] == ["pos", "neg"]
    assert report["label_field"] == "label" and report["input_fields"] == ["text"]
    assert report["generator_model"] == "openai/qwen2.5-7b"
    assert report["generator_calls"] == 1 == engine.calls
    assert report["prompt_tokens"] == 321
    assert report["completion_tokens"] == 54
    assert report["cached"] is False
    assert report["truncated"] is False
    assert isinstance(report["seconds"], float) and 0 <= report["seconds"] <= wall + 0.001  # rounded to 3 places
    assert report["instruction"] == INSTRUCTION == compiled.signature.instructions
    assert report["raw_reply"] == REPLY
    assert json.loads(json.dumps(compiled.promptmii_report)) == optimizer.report


def test_a_reply_cut_at_the_token_limit_loses_its_unfinished_last_line():
    reply = "Decide whether the review is positive or negative.\nPraise means pos.\n- Sarcasm can look like"
    lm, _ = fake_lm([reply], usage=(100, 64), finish_reason="length", max_tokens=64)
    optimizer = PromptMIIOptimizer(generator_lm=lm, n=5)
    compiled = optimizer.compile(dspy.Predict(Sentiment), trainset=sentiment_trainset(8))
    assert optimizer.report[0]["truncated"] is True
    assert optimizer.report[0]["finish_reason"] == "length"
    expected = "Decide whether the review is positive or negative.\nPraise means pos."
    assert compiled.signature.instructions == f"{expected}\n{format_line(['pos', 'neg'])}"


def test_a_long_reply_that_ended_normally_keeps_every_line():
    # The finish reason decides truncation, never a token count: 3,000 completion tokens
    # against a limit the LM never received is a normal reply of a reasoning model.
    reply = "Decide whether the review is positive or negative.\nPraise means pos.\n- Sarcasm can look like praise"
    lm, _ = fake_lm([reply], usage=(100, 3000), finish_reason="stop")
    optimizer = PromptMIIOptimizer(generator_lm=lm, n=5)
    compiled = optimizer.compile(dspy.Predict(Sentiment), trainset=sentiment_trainset(8))
    assert optimizer.report[0]["truncated"] is False
    assert compiled.signature.instructions == f"{reply}\n{format_line(['pos', 'neg'])}"


def test_n_larger_than_trainset_reports_what_was_used():
    lm, _ = fake_lm([REPLY])
    optimizer = PromptMIIOptimizer(generator_lm=lm, n=50)
    optimizer.compile(dspy.Predict(Sentiment), trainset=sentiment_trainset(7))
    assert (optimizer.report[0]["n_requested"], optimizer.report[0]["n_used"]) == (50, 7)


# --- DSPy integration ---------------------------------------------------------------


def test_save_and_load_round_trip(tmp_path):
    lm, _ = fake_lm([REPLY])
    compiled = PromptMIIOptimizer(generator_lm=lm).compile(dspy.Predict(Sentiment), trainset=sentiment_trainset())
    path = tmp_path / "p.json"
    compiled.save(str(path))
    fresh = dspy.Predict(Sentiment)
    assert fresh.signature.instructions == "Classify the review."
    fresh.load(str(path))
    assert fresh.signature.instructions == INSTRUCTION
    assert Sentiment.instructions == "Classify the review."


def test_chain_of_thought_classifier():
    lm, engine = fake_lm([REPLY])
    student = dspy.ChainOfThought(Sentiment)
    before = snapshot(student)
    optimizer = PromptMIIOptimizer(generator_lm=lm)
    compiled = optimizer.compile(student, trainset=sentiment_trainset())
    assert engine.calls == 1
    (report,) = optimizer.report
    assert report["label_field"] == "label" and report["labels"] == ["pos", "neg"]
    (name, predictor), = compiled.named_predictors()
    assert report["predictor"] == name
    assert list(predictor.signature.output_fields) == ["reasoning", "label"]
    assert predictor.signature.instructions == INSTRUCTION
    assert "reasoning" not in engine.prompt(0).lower()
    assert snapshot(student) == before


class SummariseThenClassify(dspy.Module):
    def __init__(self):
        super().__init__()
        self.summarise = dspy.Predict("text -> summary")
        self.classify = dspy.Predict(Sentiment)

    def forward(self, text):
        return self.classify(text=self.summarise(text=text).summary)


def test_only_the_classifier_gets_an_instruction(caplog):
    lm, engine = fake_lm([REPLY])
    student = SummariseThenClassify()
    other_before = student.summarise.signature.instructions
    optimizer = PromptMIIOptimizer(generator_lm=lm)
    with caplog.at_level(logging.INFO, logger="dspy_promptmii"):
        compiled = optimizer.compile(student, trainset=sentiment_trainset())
    assert engine.calls == 1
    assert compiled.classify.signature.instructions == INSTRUCTION
    assert compiled.summarise.signature.instructions == other_before
    assert [r["predictor"] for r in optimizer.report] == ["classify"]
    assert any("summarise" in r.getMessage() and "classification" in r.getMessage() for r in caplog.records)


def test_pair_inputs_render_each_field_by_name():
    lm, engine = fake_lm(["Decide whether the hypothesis follows from the premise."])
    trainset = [
        dspy.Example(premise=f"premise {i}", hypothesis=f"hypothesis {i}", label=lab).with_inputs(
            "premise", "hypothesis"
        )
        for i, lab in enumerate(["entailment", "neutral", "contradiction"] * 2)
    ]
    optimizer = PromptMIIOptimizer(generator_lm=lm, n=6)
    compiled = optimizer.compile(dspy.Predict(Entailment), trainset=trainset)
    prompt = engine.prompt(0)
    for i in range(6):
        assert f"Premise: premise {i}\nHypothesis: hypothesis {i}\nLabel: " in prompt
    assert "Input:" not in prompt
    assert "entailment, neutral, contradiction" in prompt
    assert optimizer.report[0]["input_fields"] == ["premise", "hypothesis"]
    assert compiled.signature.instructions.endswith(format_line(["entailment", "neutral", "contradiction"]))


class Stars(dspy.Signature):
    """Rate."""

    text: str = dspy.InputField()
    stars: Literal[1, 2, 3] = dspy.OutputField()


class Mood(enum.Enum):
    HAPPY = "happy"
    SAD = "sad"


class MoodSig(dspy.Signature):
    """Mood."""

    text: str = dspy.InputField()
    mood: Mood = dspy.OutputField()


class Spam(dspy.Signature):
    """Spam?"""

    text: str = dspy.InputField()
    is_spam: bool = dspy.OutputField()


@pytest.mark.parametrize(
    ("signature", "field", "values", "labels"),
    [
        (Stars, "stars", [1, 2, 3, "2"], ["1", "2", "3"]),
        (MoodSig, "mood", [Mood.HAPPY, Mood.SAD, "happy", "SAD"], ["happy", "sad"]),
        (Spam, "is_spam", [True, False, "true", "False"], ["True", "False"]),
    ],
    ids=["literal-int", "enum", "bool"],
)
def test_int_enum_and_bool_label_fields(signature, field, values, labels):
    lm, engine = fake_lm([REPLY])
    trainset = [dspy.Example(text=f"t{i}", **{field: v}).with_inputs("text") for i, v in enumerate(values)]
    optimizer = PromptMIIOptimizer(generator_lm=lm)
    compiled = optimizer.compile(dspy.Predict(signature), trainset=trainset)
    report = optimizer.report[0]
    assert report["labels"] == labels and report["label_field"] == field
    assert compiled.signature.instructions.endswith(format_line(labels))
    assert ", ".join(labels) in engine.prompt(0)
    shown = {line.split(": ", 1)[1] for line in engine.prompt(0).splitlines() if line.startswith("Label: ")}
    assert shown == set(labels)


def test_signature_task_and_label_of():
    task = signature_task(MoodSig, "p")
    assert task.labels == ("happy", "sad")
    assert task.label_of(Mood.SAD) == "sad" and task.label_of("HAPPY") == "happy" and task.label_of("x") is None
    assert task.value_of("sad") is Mood.SAD
    ints = signature_task(Stars)
    assert ints.label_of(2) == "2" and ints.label_of("3") == "3"
    assert ints.label_of(True) is None  # a bool is not the int label 1
    assert ints.value_of("1") == 1
    assert signature_task(dspy.Signature("question -> answer")) is None
    with pytest.raises(KeyError, match="labels"):
        task.value_of("angry")


def test_classification_tasks_lists_every_predictor():
    found = {name: task for name, _, task in classification_tasks(SummariseThenClassify())}
    assert set(found) == {"summarise", "classify"}
    assert found["summarise"] is None
    assert found["classify"].label_field == "label"


def test_teacher_and_valset_are_accepted_and_unused():
    lm, engine = fake_lm([REPLY])
    compiled = PromptMIIOptimizer(generator_lm=lm).compile(
        dspy.Predict(Sentiment), trainset=sentiment_trainset(), valset=sentiment_trainset(4)
    )
    assert engine.calls == 1
    assert compiled.signature.instructions == INSTRUCTION
