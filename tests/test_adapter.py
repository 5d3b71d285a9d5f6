"""LabelAdapter: the follower prompt and reply parsing, through a real dspy.Predict."""

from __future__ import annotations

import asyncio
import enum
from typing import Literal

import dspy
import pytest
from dspy.utils.exceptions import AdapterParseError
from fakes import fake_lm

from dspy_promptmii import LabelAdapter, label_response_format
from dspy_promptmii.adapter import constrained_body, label_grammar
from dspy_promptmii.protocol import format_line

FORMAT = format_line(["pos", "neg"])


class Sentiment(dspy.Signature):
    """Decide the sentiment of the review."""

    text: str = dspy.InputField()
    label: Literal["pos", "neg"] = dspy.OutputField()


class Paraphrase(dspy.Signature):
    """Are the two sentences paraphrases?"""

    sentence1: str = dspy.InputField()
    sentence2: str = dspy.InputField()
    label: Literal["equivalent", "not_equivalent"] = dspy.OutputField()


class Mood(enum.Enum):
    HAPPY = "happy"
    SAD = "sad"


class MoodSig(dspy.Signature):
    """Mood of the text."""

    text: str = dspy.InputField()
    mood: Mood = dspy.OutputField()


class Spam(dspy.Signature):
    """Is it spam?"""

    text: str = dspy.InputField()
    is_spam: bool = dspy.OutputField()


class Stars(dspy.Signature):
    """Rate."""

    text: str = dspy.InputField()
    stars: Literal[1, 2, 3] = dspy.OutputField()


def run(program, reply, adapter=None, legacy=False, **inputs):
    lm, engine = fake_lm(reply, model="fake/follower", legacy=legacy)
    with dspy.context(lm=lm, adapter=adapter or LabelAdapter()):
        prediction = program(**inputs)
    return prediction, engine, lm


# --- parsing table ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("equivalent", "equivalent"),
        ("not_equivalent", "not_equivalent"),
        ("Equivalent", "equivalent"),
        ("NOT_EQUIVALENT", "not_equivalent"),
        ("not equivalent", "not_equivalent"),
        ("Not-Equivalent.", "not_equivalent"),
        ('"equivalent"', "equivalent"),
        ("'not equivalent'", "not_equivalent"),
        ("**equivalent**", "equivalent"),
        ("Label: equivalent", "equivalent"),
        ("LABEL: not_equivalent!", "not_equivalent"),
        ("equivalent\nBoth sentences say the same thing.", "equivalent"),
        ("\n  not equivalent\n\nreason", "not_equivalent"),
        ('{"label": "not_equivalent"}', "not_equivalent"),
        ('{"label": "Equivalent"}', "equivalent"),
        ("The sentences are equivalent.", None),  # prose containing a label
        ("equivalent or not_equivalent", None),
        ("equiv", None),
        ("yes", None),
        ("", None),
        ('{"answer": "maybe"}', None),
    ],
)
def test_parse_table(reply, expected):
    adapter = LabelAdapter()
    if expected is None:
        with pytest.raises(AdapterParseError) as info:
            adapter.parse(Paraphrase, reply)
        assert info.value.lm_response == reply
    else:
        assert adapter.parse(Paraphrase, reply) == {"label": expected}


def test_ambiguous_normalised_match_is_invalid():
    class Ambiguous(dspy.Signature):
        text: str = dspy.InputField()
        label: Literal["not_equal", "not-equal"] = dspy.OutputField()

    adapter = LabelAdapter()
    assert adapter.parse(Ambiguous, "not-equal") == {"label": "not-equal"}  # exact still wins
    with pytest.raises(AdapterParseError):
        adapter.parse(Ambiguous, "Not Equal")


def test_parse_returns_the_python_value_of_the_label():
    adapter = LabelAdapter()
    assert adapter.parse(MoodSig, "Sad") == {"mood": Mood.SAD}
    assert adapter.parse(Spam, "true") == {"is_spam": True}
    assert adapter.parse(Spam, "False") == {"is_spam": False}
    assert adapter.parse(Stars, "Label: 2") == {"stars": 2}


# --- the follower prompt through dspy.Predict ---------------------------------------


def test_prompt_is_one_user_message_with_instruction_format_line_demos_and_input():
    program = dspy.Predict(Sentiment)
    program.demos = [dspy.Example(text="great", label="pos"), dspy.Example(text="awful", label="neg")]
    prediction, engine, _ = run(program, ["pos"], text="not bad at all")
    assert prediction.label == "pos"
    assert engine.calls == 1
    assert engine.roles(0) == ["user"]
    assert engine.requests[0].system is None
    assert engine.prompt(0) == (
        "Decide the sentiment of the review.\n"
        + FORMAT
        + "\n\nInput: great\nLabel: pos\n\nInput: awful\nLabel: neg\n\nInput: not bad at all\nLabel:"
    )


def test_format_line_appears_once_when_the_instruction_ends_with_it():
    program = dspy.Predict(Sentiment.with_instructions("Decide the sentiment.\n" + FORMAT))
    _, engine, _ = run(program, ["neg"], text="dull")
    prompt = engine.prompt(0)
    assert prompt.count("Only return one of these options") == 1
    assert prompt == "Decide the sentiment.\n" + FORMAT + "\n\nInput: dull\nLabel:"


def test_demos_without_a_valid_label_are_skipped():
    program = dspy.Predict(Sentiment)
    program.demos = [
        dspy.Example(text="great", label="pos"),
        dspy.Example(text="no label"),
        dspy.Example(text="bad label", label="maybe"),
    ]
    _, engine, _ = run(program, ["pos"], text="x")
    prompt = engine.prompt(0)
    assert "Input: great\nLabel: pos" in prompt
    assert "no label" not in prompt and "bad label" not in prompt


def test_pair_inputs_by_field_name():
    program = dspy.Predict(Paraphrase)
    prediction, engine, _ = run(program, ["not equivalent"], sentence1="A cat sat.", sentence2="A dog ran.")
    assert prediction.label == "not_equivalent"
    assert engine.prompt(0).endswith("Sentence1: A cat sat.\nSentence2: A dog ran.\nLabel:")


def test_enum_and_bool_outputs_through_predict():
    prediction, engine, _ = run(dspy.Predict(MoodSig), ["happy"], text="yay")
    assert prediction.mood is Mood.HAPPY
    assert format_line(["happy", "sad"]) in engine.prompt(0)
    prediction, engine, _ = run(dspy.Predict(Spam), ["False"], text="hello friend")
    assert prediction.is_spam is False
    assert format_line(["True", "False"]) in engine.prompt(0)


def test_unparseable_reply_raises_with_the_raw_text_and_makes_one_call():
    reply = "I would say it is mostly positive"
    lm, engine = fake_lm([reply, "pos"], model="fake/follower")
    with dspy.context(lm=lm, adapter=LabelAdapter()):
        with pytest.raises(AdapterParseError) as info:
            dspy.Predict(Sentiment)(text="x")
    assert info.value.lm_response == reply
    assert "pos" in str(info.value) and "neg" in str(info.value)
    assert engine.calls == 1  # no hidden second (JSON) attempt


def test_plain_mode_sends_no_response_format():
    _, engine, lm = run(dspy.Predict(Sentiment), ["pos"], text="x")
    assert engine.configs[0].response_format is None
    assert "response_format" not in lm.history[-1]["kwargs"]


def test_constrained_sends_a_json_schema_enum_of_the_labels():
    prediction, engine, lm = run(
        dspy.Predict(Sentiment), ['{"label": "neg"}'], adapter=LabelAdapter(constrained=True), text="x"
    )
    assert prediction.label == "neg"
    sent = lm.history[-1]["kwargs"]["response_format"]
    assert sent["type"] == "json_schema"
    schema = sent["json_schema"]["schema"]
    assert schema["properties"]["label"]["enum"] == ["pos", "neg"]
    assert schema["required"] == ["label"]
    # ... and it reached the engine.
    received = engine.configs[0].response_format
    assert received["type"] == "json_schema"
    assert received["schema"]["properties"]["label"]["enum"] == ["pos", "neg"]
    # room for the JSON wrapper around the longest label
    assert engine.configs[0].max_tokens >= 16 + len("pos")


def test_constrained_never_lowers_a_larger_max_tokens():
    lm, engine = fake_lm(['{"label": "pos"}'], model="fake/follower", max_tokens=500)
    with dspy.context(lm=lm, adapter=LabelAdapter(constrained="json_schema")):
        dspy.Predict(Sentiment)(text="x")
    assert engine.configs[0].max_tokens == 500


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_constrained_json_object_sends_the_llama_cpp_form():
    prediction, engine, _ = run(
        dspy.Predict(Stars),
        ['{"label": "3"}'],
        adapter=LabelAdapter(constrained="json_object"),
        legacy=True,
        text="superb",
    )
    assert prediction.stars == 3
    sent = engine.bodies[0]["response_format"]
    assert sent["type"] == "json_object"
    assert sent["schema"]["properties"]["label"]["enum"] == ["1", "2", "3"]
    assert set(sent) == {"type", "schema"}


def test_label_response_format_forms():
    schema_form = label_response_format(["a", "b"])
    assert schema_form["type"] == "json_schema"
    assert schema_form["json_schema"]["strict"] is True
    assert schema_form["json_schema"]["schema"]["properties"]["label"]["enum"] == ["a", "b"]
    object_form = label_response_format((0, 1), "json_object")
    assert set(object_form) == {"type", "schema"} and object_form["type"] == "json_object"
    assert object_form["schema"]["properties"]["label"] == {"type": "string", "enum": ["0", "1"]}
    assert object_form["schema"]["additionalProperties"] is False
    with pytest.raises(ValueError, match="json_schema"):
        label_response_format(["a"], "grammar")
    with pytest.raises(ValueError, match="constrained"):
        LabelAdapter(constrained="regex")


def test_label_grammar_lists_exactly_the_labels_as_gbnf_strings():
    assert label_grammar(["pos", 'say "hi"', "ça va"]) == 'root ::= "pos" | "say \\"hi\\"" | "ça va"'
    assert constrained_body(["a", "b"], "grammar") == {"grammar": 'root ::= "a" | "b"'}
    assert constrained_body(["a"], "json_schema")["response_format"]["type"] == "json_schema"
    with pytest.raises(ValueError, match="grammar"):
        constrained_body(["a"], "regex")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_constrained_grammar_sends_a_llama_cpp_grammar_in_the_body():
    prediction, engine, _ = run(
        dspy.Predict(Stars), ["3"], adapter=LabelAdapter(constrained="grammar"), legacy=True, text="superb"
    )
    assert prediction.stars == 3
    body = engine.bodies[0]
    assert body["extra_body"] == {"grammar": 'root ::= "1" | "2" | "3"'}
    assert "response_format" not in body


def test_chain_of_thought_falls_back_to_chat_adapter():
    reply = "[[ ## reasoning ## ]]\nIt praises the film.\n\n[[ ## label ## ]]\npos\n\n[[ ## completed ## ]]"
    prediction, engine, _ = run(dspy.ChainOfThought(Sentiment), [reply], text="great film")
    assert prediction.reasoning == "It praises the film."
    assert prediction.label == "pos"
    assert engine.calls == 1
    # ChatAdapter's field-marker prompt, not the compact follower prompt.
    system = engine.requests[0].system
    system = system if isinstance(system, str) else "".join(p.text for p in system)
    assert "[[ ## reasoning ## ]]" in system
    assert "Label:" not in engine.texts(0)[-1]


def test_fallback_is_the_whole_chat_adapter_with_its_json_retry():
    # ChatAdapter (not just its format/parse) handles the CoT predictor: a garbled reply
    # is retried through JSONAdapter, as DSPy does for ChatAdapter.
    lm, engine = fake_lm(["garbled output", '{"reasoning": "r", "label": "neg"}'], model="fake/follower")
    with dspy.context(lm=lm, adapter=LabelAdapter()):
        prediction = dspy.ChainOfThought(Sentiment)(text="x")
    assert prediction.label == "neg"
    assert engine.calls == 2


def test_free_text_predictor_falls_back_too():
    reply = "[[ ## answer ## ]]\nParis\n\n[[ ## completed ## ]]"
    prediction, engine, _ = run(dspy.Predict("question -> answer"), [reply], question="Capital of France?")
    assert prediction.answer == "Paris"
    assert "[[ ## question ## ]]" in engine.texts(0)[-1]


def test_custom_fallback_is_used():
    reply = '{"answer": "Paris"}'
    adapter = LabelAdapter(fallback=dspy.JSONAdapter())
    prediction, _, _ = run(dspy.Predict("question -> answer"), [reply], adapter=adapter, question="Capital?")
    assert prediction.answer == "Paris"


def test_async_call_uses_the_same_prompt():
    lm, engine = fake_lm(["neg"], model="fake/follower")
    with dspy.context(lm=lm, adapter=LabelAdapter()):
        prediction = asyncio.run(dspy.Predict(Sentiment).acall(text="dull"))
    assert prediction.label == "neg"
    assert engine.prompt(0) == "Decide the sentiment of the review.\n" + FORMAT + "\n\nInput: dull\nLabel:"


def test_compiled_program_follows_its_induced_instruction():
    from dspy_promptmii import PromptMIIOptimizer

    generator, _ = fake_lm(["Reviews that praise are pos; others are neg."])
    trainset = [dspy.Example(text=f"t{i}", label=["pos", "neg"][i % 2]).with_inputs("text") for i in range(6)]
    compiled = PromptMIIOptimizer(generator_lm=generator).compile(dspy.Predict(Sentiment), trainset=trainset)
    prediction, engine, _ = run(compiled, ["Label: neg"], text="meh")
    assert prediction.label == "neg"
    assert engine.prompt(0) == "Reviews that praise are pos; others are neg.\n" + FORMAT + "\n\nInput: meh\nLabel:"
