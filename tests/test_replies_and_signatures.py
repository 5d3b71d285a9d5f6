"""What real LMs and real DSPy programs bring: reasoning blocks and fenced JSON in replies,
generators with settings of their own (reasoning models), signatures with field
descriptions, awkward field names and labels, inputs that are not text, and test sets
built without ``with_inputs``. Each kind of fault with its instances."""

from __future__ import annotations

import enum
import logging
from pathlib import Path
from typing import Literal

import dspy
import pytest
from dspy.utils.exceptions import AdapterParseError
from fakes import fake_lm

from dspy_promptmii import LabelAdapter, PromptMIIOptimizer
from dspy_promptmii.evaluation import IncompleteEvaluation, evaluate
from dspy_promptmii.protocol import (
    LABEL_MARKER,
    Protocol,
    clean_reply,
    format_line,
    label_list,
    load_template,
    parse_label,
    strip_reasoning,
)
from dspy_promptmii.task import signature_task

BODY = "Classify the sentiment of the review."
SENT = ["positive", "negative"]

# --- reasoning blocks -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "reply",
    [
        f"<think>The labels are positive and negative.\nLet me write it.</think>\n{BODY}",
        f"<think>\nfirst thought\n</think>\n\n<think>second</think>{BODY}",
        f"<thinking>plan</thinking>\n{BODY}",
        f"<reasoning>plan</reasoning>{BODY}",
        f"The opening tag was in the chat template, so only this closes it.</think>\n{BODY}",
        f"<THINK>loud</THINK>\n{BODY}",
        f"<think>plan</think>\nInstruction:\n```\n{BODY}\n```",
    ],
)
def test_reasoning_blocks_are_removed_from_generator_replies(reply: str) -> None:
    cleaned = clean_reply(reply)
    assert cleaned.text == BODY and cleaned.reasoning_removed


def test_a_reply_cut_off_while_thinking_leaves_nothing() -> None:
    assert strip_reasoning("<think>the model never stopped thinking and") == ""
    assert clean_reply(f"{BODY}\n<think>second thoughts that never").text == BODY


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("<think>It praises the acting.</think>\npositive", "positive"),
        ("<think>hmm</think>negative", "negative"),
        ("reasoning that started in the prompt</think>\n\nnegative", "negative"),
        ('```json\n{"label": "positive"}\n```', "positive"),
        ('```\n{"label": "negative"}\n```', "negative"),
        ('<think>json please</think>\n```json\n{"label": "negative"}\n```', "negative"),
        ('Here is my answer: {"label": "positive"}', "positive"),
        ('{"sentiment": "negative"}', "negative"),
        ('"positive"', "positive"),
        ("```\npositive\n```", "positive"),
        ("<think>never finished", None),
        ('{"label": "neutral"}', None),
    ],
)
def test_follower_replies_with_reasoning_or_fences_parse(reply: str, expected: str | None) -> None:
    assert parse_label(reply, SENT) == expected


def test_cleaning_keeps_every_sentence_of_the_instruction() -> None:
    text = (
        "Label each review by the reviewer's verdict.\n"
        "Instructions for edge cases follow\n"  # names a header word, but is a sentence of the text
        "- A review that praises and then pans counts by its ending.\n"
        "- Sarcasm is negative"
    )
    assert clean_reply(text).text == text  # not truncated: the last line stays
    assert clean_reply(text, truncated=True).text == text.rsplit("\n", 1)[0]


def test_copies_of_shown_inputs_are_dropped_anywhere_and_measured() -> None:
    shown = [({"text": "will it rain in Oslo tomorrow morning"}, "GetWeather"), ({"text": "play jazz"}, "PlayMusic")]
    reply = (
        "Pick the intent of the request.\n"
        '1. "will it rain in Oslo tomorrow morning" -> GetWeather\n'
        "Requests about music are PlayMusic; play jazz is one.\n"  # a short input is ordinary words
        "Weather questions are GetWeather."
    )
    cleaned = clean_reply(reply, examples=shown, labels=["GetWeather", "PlayMusic"])
    assert cleaned.text == (
        "Pick the intent of the request.\nRequests about music are PlayMusic; play jazz is one.\n"
        "Weather questions are GetWeather."
    )
    assert cleaned.copied_lines == 1
    assert 0.2 < cleaned.copied_fraction < 0.4


# --- the generator's own settings ---------------------------------------------------------

REPLY = "Decide whether the review is positive or negative."


class Review(dspy.Signature):
    text: str = dspy.InputField()
    label: Literal["pos", "neg"] = dspy.OutputField()


TRAIN = [dspy.Example(text=f"review {i}", label="pos" if i % 2 else "neg").with_inputs("text") for i in range(8)]


def test_an_lm_configured_temperature_and_limit_are_kept() -> None:
    lm, engine = fake_lm([REPLY], temperature=1.0, max_tokens=32000)
    optimizer = PromptMIIOptimizer(generator_lm=lm)
    optimizer.compile(dspy.Predict(Review), trainset=TRAIN)
    assert (engine.configs[0].temperature, engine.configs[0].max_tokens) == (1.0, 32000)
    assert optimizer.report[0]["generation_settings"] == {}


def test_a_reasoning_model_gets_no_temperature_from_us() -> None:
    lm, engine = fake_lm([REPLY], model="openai/gpt-5")  # takes no temperature but its default
    PromptMIIOptimizer(generator_lm=lm).compile(dspy.Predict(Review), trainset=TRAIN)
    assert engine.configs[0].temperature is None


def test_a_model_that_refuses_temperature_0_is_called_again_without_it(caplog: pytest.LogCaptureFixture) -> None:
    calls = []

    def picky(request):
        calls.append(request.config.temperature)
        if request.config.temperature is not None:
            raise ValueError("Unsupported value: 'temperature' does not support 0 with this model")
        return REPLY

    lm, _ = fake_lm(picky, model="openai/some-new-model", num_retries=0)
    with caplog.at_level(logging.WARNING, logger="dspy_promptmii.optimizer"):
        compiled = PromptMIIOptimizer(generator_lm=lm).compile(dspy.Predict(Review), trainset=TRAIN)
    assert calls == [0.0, None]
    assert compiled.signature.instructions.startswith(REPLY)
    assert "refused temperature=0.0" in caplog.text


def test_other_generator_errors_are_not_retried() -> None:
    def down(request):
        raise ConnectionError("server went away")

    lm, _ = fake_lm(down, num_retries=0)
    with pytest.raises(Exception, match="server went away"):
        PromptMIIOptimizer(generator_lm=lm).compile(dspy.Predict(Review), trainset=TRAIN)


# --- signatures: descriptions, names, labels --------------------------------------------------


class Intent(dspy.Signature):
    """Route requests a voice assistant hears."""

    text: str = dspy.InputField(desc="what the user said, transcribed")
    intent: Literal["GetWeather", "PlayMusic"] = dspy.OutputField(desc="what the user wants done")


def test_field_descriptions_and_task_description_reach_the_follower_and_the_generator() -> None:
    task = signature_task(Intent)
    assert task.descriptions == {"text": "what the user said, transcribed", LABEL_MARKER: "what the user wants done"}
    assert task.task_description == "Route requests a voice assistant hears."

    follower, follower_engine = fake_lm("PlayMusic")
    with dspy.context(lm=follower, adapter=LabelAdapter()):
        dspy.Predict(Intent)(text="put on some jazz")
    prompt = follower_engine.prompt(0)
    assert "Fields:\n- Input: what the user said, transcribed\n- Label: what the user wants done" in prompt
    assert prompt.endswith("Input: put on some jazz\nLabel:")

    generator, generator_engine = fake_lm([REPLY])
    train = [
        dspy.Example(text=t, intent=i).with_inputs("text")
        for t, i in [("rain today?", "GetWeather"), ("play jazz", "PlayMusic")]
    ]
    PromptMIIOptimizer(generator_lm=generator, template="meta2").compile(dspy.Predict(Intent), trainset=train)
    meta = generator_engine.prompt(0)
    assert "Route requests a voice assistant hears." in meta
    assert "- Label: what the user wants done" in meta


def test_descriptions_can_be_switched_off_and_default_ones_are_not_shown() -> None:
    follower, engine = fake_lm("PlayMusic")
    adapter = LabelAdapter(protocol=Protocol(field_descriptions=False))
    with dspy.context(lm=follower, adapter=adapter):
        dspy.Predict(Intent)(text="play jazz")
    assert "Fields:" not in engine.prompt(0)
    assert signature_task(Review).descriptions == {} and signature_task(Review).task_description is None


class Checker(dspy.Signature):
    """Is the given label right for the text?"""

    text: str = dspy.InputField()
    label: str = dspy.InputField()
    is_correct: bool = dspy.OutputField()


class Commas(dspy.Signature):
    text: str = dspy.InputField()
    kind: Literal["good, mostly", "bad", "mixed"] = dspy.OutputField()


class Spaced(dspy.Signature):
    input: str = dspy.InputField()
    text_pair: str = dspy.InputField()
    answer: Literal["Not Sure", "Yes", "No"] = dspy.OutputField()


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Colors(dspy.Signature):
    text: str = dspy.InputField()
    color: Color = dspy.OutputField()


@pytest.mark.parametrize(
    ("signature", "inputs", "reply", "expected", "must_have"),
    [
        # An input field called "label" is not the answer marker: it reads "Label (input):".
        (Checker, {"text": "great film", "label": "negative"}, "False", False,
         "Text: great film\nLabel (input): negative\nLabel:"),
        # A label with a comma: the option list quotes every label.
        (Commas, {"text": "fine"}, "good, mostly", "good, mostly", 'options: "good, mostly", "bad", "mixed".'),
        (Spaced, {"input": "a", "text_pair": "b"}, "not sure", "Not Sure", "Input: a\nText pair: b\nLabel:"),
        (Colors, {"text": "sky"}, "blue", Color.BLUE, "options: red, blue."),
    ],
    ids=["input-named-label", "label-with-comma", "spaced-labels", "enum"],
)
def test_follower_prompts_stay_unambiguous(signature, inputs, reply, expected, must_have) -> None:
    lm, engine = fake_lm(reply)
    with dspy.context(lm=lm, adapter=LabelAdapter()):
        prediction = dspy.Predict(signature)(**inputs)
    prompt = engine.prompt(0)
    assert must_have in prompt
    assert prompt.count("\nLabel:") == 1 and prompt.endswith("\nLabel:")
    assert getattr(prediction, list(signature.output_fields)[-1]) == expected


def test_label_list_quotes_only_when_a_label_has_a_comma() -> None:
    assert label_list(["a", "b"]) == "a, b"
    assert label_list(["a, b", "c"]) == '"a, b", "c"'
    assert format_line(["x, y", "z"]).startswith('Only return one of these options: "x, y", "z".')


class Pictures(dspy.Signature):
    image: dspy.Image = dspy.InputField()
    label: Literal["cat", "dog"] = dspy.OutputField()


class Listing(dspy.Signature):
    items: list[str] = dspy.InputField()
    label: Literal["short", "long"] = dspy.OutputField()


class Multiline(dspy.Signature):
    text: str = dspy.InputField()
    label: Literal["one\nline", "two"] = dspy.OutputField()


class Twins(dspy.Signature):
    text: str = dspy.InputField()
    label: Literal[1, "1", 2] = dspy.OutputField()


@pytest.mark.parametrize(
    ("signature", "reason"),
    [
        (Pictures, "input field 'image' has type"),
        (Listing, "input field 'items' has type"),
        (Multiline, "spans several lines"),
        (Twins, "not distinct as strings"),
    ],
)
def test_what_label_adapter_cannot_render_goes_to_the_fallback_with_a_log_line(signature, reason, caplog) -> None:
    task = signature_task(signature)
    assert reason in task.rendering_problem()

    class Marker(dspy.ChatAdapter):
        called = 0

        def format(self, *args, **kwargs):
            Marker.called += 1
            return super().format(*args, **kwargs)

    adapter = LabelAdapter(fallback=Marker())
    with caplog.at_level(logging.INFO, logger="dspy_promptmii.adapter"):
        adapter.format(signature, [], {name: "x" for name in signature.input_fields})
        adapter.format(signature, [], {name: "x" for name in signature.input_fields})
    assert Marker.called == 2
    assert sum(reason in r.getMessage() for r in caplog.records) == 1  # said once

    lm, engine = fake_lm(["Fine."])
    train = [dspy.Example(**{n: "x" for n in signature.input_fields}, label="two").with_inputs(*signature.input_fields)]
    with pytest.raises(ValueError, match="cannot be written as a Prompt-MII task"):
        PromptMIIOptimizer(generator_lm=lm).compile(dspy.Predict(signature), trainset=train)
    assert engine.calls == 0


def test_a_missing_input_is_named() -> None:
    lm, _ = fake_lm("pos")
    with pytest.raises(ValueError, match=r"without a value for input field\(s\) \['text'\]"):
        LabelAdapter().format(Review, [], {})


def test_on_invalid_none_returns_the_raw_reply_instead_of_raising() -> None:
    lm, _ = fake_lm("I would rather not say")
    with dspy.context(lm=lm, adapter=LabelAdapter(on_invalid="none")):
        prediction = dspy.Predict(Review)(text="meh")
    assert prediction.label is None and prediction.invalid_reply == "I would rather not say"
    with dspy.context(lm=lm, adapter=LabelAdapter()), pytest.raises(AdapterParseError):
        dspy.Predict(Review)(text="meh")


# --- evaluation: user errors are not model failures --------------------------------------------


def test_examples_without_declared_inputs_are_refused_before_any_call() -> None:
    lm, engine = fake_lm("pos")
    bare = [dspy.Example(text="good", label="pos"), dspy.Example(text="bad", label="neg")]
    with pytest.raises(ValueError, match=r"examples\[0\] has no declared inputs: build it with .with_inputs\('text'\)"):
        evaluate(dspy.Predict(Review), bare, lm=lm, adapter=LabelAdapter(), progress=False)
    assert engine.calls == 0


@pytest.mark.parametrize(
    ("example", "message"),
    [
        (dspy.Example(text="good", label="meh").with_inputs("text"), "label 'meh'"),
        (dspy.Example(text="good").with_inputs("text"), "label None"),
        (dspy.Example(comment="good", label="pos").with_inputs("comment"), "lacks the input field"),
        ({"text": "good", "label": "pos"}, "expected a dspy.Example"),
    ],
)
def test_bad_test_examples_are_named(example, message) -> None:
    lm, engine = fake_lm("pos")
    good = dspy.Example(text="fine", label="pos").with_inputs("text")
    with pytest.raises(ValueError, match=r"examples\[1\]") as caught:
        evaluate(dspy.Predict(Review), [good, example], lm=lm, adapter=LabelAdapter(), progress=False)
    assert message in str(caught.value)
    assert engine.calls == 0


def test_a_bug_in_the_program_is_an_error_not_an_invalid_reply(caplog) -> None:
    class Buggy(dspy.Module):
        def __init__(self):
            super().__init__()
            self.predict = dspy.Predict(Review)

        def forward(self, text):
            if "bad" in text:
                raise KeyError("a bug in user code")
            return self.predict(text=text)

    lm, _ = fake_lm("pos")
    test = [dspy.Example(text=t, label=y).with_inputs("text") for t, y in [("good", "pos"), ("bad", "neg")]]
    with pytest.raises(IncompleteEvaluation) as raised:  # no score with a failed row (issue 21)
        evaluate(Buggy(), test, lm=lm, adapter=LabelAdapter(), progress=False)
    result = raised.value.evaluation
    assert result.errors == 1 and result.invalid_rate == 0.0 and result.lm_errors == 0
    assert "a bug in user code" in result.first_error
    with pytest.raises(RuntimeError, match="every one of the 1 examples raised"):
        evaluate(Buggy(), test[1:], lm=lm, adapter=LabelAdapter(), progress=False)


# --- templates from files, for the released checkpoints ----------------------------------------


def test_a_template_file_is_read_and_checked(tmp_path: Path) -> None:
    good = tmp_path / "paper_meta1.txt"
    good.write_text("Labels: {label_names}\n\n{examples}\n\nWrite the instruction.", encoding="utf-8")
    text, source = load_template(str(good))
    assert text.startswith("Labels: {label_names}") and source == f"file:{good}"
    lm, engine = fake_lm([REPLY, REPLY])
    optimizer = PromptMIIOptimizer(generator_lm=lm, template=good)
    good.write_text("Labels now: {label_names}\n\n{examples}\n\nWrite it.", encoding="utf-8")  # read when used
    optimizer.compile(dspy.Predict(Review), trainset=TRAIN)
    assert engine.prompt(0).startswith("Labels now: ")
    assert optimizer.template.startswith("Labels now: ")
    assert Protocol.from_dict(optimizer.protocol.to_dict()) == optimizer.protocol

    lacking = tmp_path / "lacking.txt"
    lacking.write_text("Write an instruction for {label_names}.", encoding="utf-8")
    missing = tmp_path / "missing.txt"
    message = r"lacking.txt: the template is missing the placeholder\(s\) \{examples\}"
    lm, engine = fake_lm([REPLY])
    optimizer = PromptMIIOptimizer(generator_lm=lm, template=str(lacking))  # nothing read here
    with pytest.raises(ValueError, match=message):
        optimizer.compile(dspy.Predict(Review), trainset=TRAIN)
    with pytest.raises(ValueError, match=message):
        optimizer.estimate(dspy.Predict(Review), TRAIN)
    assert engine.calls == 0  # raised before any LM call
    optimizer = PromptMIIOptimizer(generator_lm=lm, template=good)
    good.unlink()  # a file gone after construction: refused at compile, before any LM call
    with pytest.raises(ValueError, match="is not an existing file"):
        optimizer.compile(dspy.Predict(Review), trainset=TRAIN)
    assert engine.calls == 0
    for name in (missing, "meta3"):  # no such file, or a misspelled built-in: refused at once
        with pytest.raises(ValueError, match=r"is not a built-in name \(meta1, meta2, .*is not an existing file"):
            PromptMIIOptimizer(generator_lm=lm, template=name)
        with pytest.raises(ValueError, match="is not an existing file"):  # the same error as Protocol's
            Protocol(template=str(name))
    with pytest.raises(ValueError, match="either template= or protocol="):
        PromptMIIOptimizer(template="meta1", protocol=Protocol())


def test_protocol_round_trips_through_json_and_refuses_unknown_settings(tmp_path: Path) -> None:
    protocol = Protocol(template="meta1", demo_style="turns", constrained="grammar", reply_limit=7)
    assert Protocol.from_json(protocol.to_json()) == protocol
    path = tmp_path / "protocol.json"
    path.write_text(protocol.to_json(), encoding="utf-8")
    assert Protocol.from_json(path) == protocol
    with pytest.raises(ValueError, match="unknown protocol setting"):
        Protocol.from_dict({"constraint": "grammar"})
    with pytest.raises(ValueError, match="reply_limit"):
        Protocol(reply_limit=0)
    assert Protocol(constrained=True).constrained == "json_schema"


def test_a_bug_that_names_a_setting_is_not_taken_for_a_refusal() -> None:
    class Buggy(dspy.BaseLM):
        calls = 0

        def __init__(self) -> None:
            super().__init__(model="fake/buggy")

        def __call__(self, *args, **kwargs):
            Buggy.calls += 1
            raise TypeError("bad temperature arithmetic")

    with pytest.raises(TypeError, match="bad temperature arithmetic"):
        PromptMIIOptimizer(generator_lm=Buggy()).compile(dspy.Predict(Review), trainset=TRAIN)
    assert Buggy.calls == 1  # not called again without temperature
