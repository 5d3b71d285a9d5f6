"""``promptmii export``: the follower prompt of a saved program, as a template that, filled
with an input, is byte for byte the request LabelAdapter sends (recorded by a real HTTP
endpoint on 127.0.0.1)."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path
from typing import Any, Literal

import dspy
import pytest
from support.chat_stub import ChatStub

from dspy_promptmii import cli
from dspy_promptmii.adapter import LabelAdapter
from dspy_promptmii.export import (
    SINGLE_SLOT,
    export_prompts,
    labels_from_instruction,
    load_program,
    program_from_state,
    render_export,
)
from dspy_promptmii.protocol import Protocol, format_line, with_format_line

LABELS = ["negative", "positive"]
PAIR_LABELS = ["yes, surely", "no"]  # a comma: the format line quotes every label


class Review(dspy.Signature):
    """Say what the reviewer thinks."""

    text: str = dspy.InputField(desc="a film review")
    sentiment: Literal["negative", "positive"] = dspy.OutputField(desc="the reviewer's verdict")


class Entails(dspy.Signature):
    premise: str = dspy.InputField(desc="the first sentence")
    hypothesis_text: str = dspy.InputField()
    verdict: Literal["yes, surely", "no"] = dspy.OutputField()


def _reply(body: dict[str, Any], headers: dict[str, str]) -> tuple[int, str]:
    text = json.dumps(body["messages"])
    label = "no" if "premise" in text.lower() else "positive"
    return 200, json.dumps({"label": label}) if "response_format" in body else label


@pytest.fixture()
def server():
    with ChatStub(_reply) as stub:
        yield stub


def _lm(server: ChatStub) -> dspy.LM:
    return dspy.LM("hosted_vllm/follower", api_base=server.url, api_key="local", cache=False, num_retries=0)


def _compiled(signature: type[dspy.Signature], labels: list[str], demos: list[dspy.Example]) -> dspy.Predict:
    program = dspy.Predict(signature)
    program.signature = program.signature.with_instructions(
        with_format_line("Read it closely.\nQuote {input} never; answer with the label.", labels)
    )
    program.demos = demos
    return program


CASES = {
    "single": (
        Review,
        LABELS,
        [dspy.Example(text="a waste of two hours", sentiment="negative").with_inputs("text")],
        {"text": 'loved it {input} "quoted" \\n and more'},
    ),
    "pair": (
        Entails,
        PAIR_LABELS,
        [dspy.Example(premise="a cat sleeps", hypothesis_text="a dog runs", verdict="no").with_inputs(
            "premise", "hypothesis_text")],
        {"premise": "a man {hypothesis_text} walks", "hypothesis_text": "someone walks {premise}"},
    ),
}
STYLES = [False, "json_schema", "json_object", "grammar", "choice"]


@pytest.mark.parametrize("from_file_alone", [True, False], ids=["file-alone", "with-program"])
@pytest.mark.parametrize("demo_style", ["inline", "turns", "no-demos"])
@pytest.mark.parametrize("style", STYLES, ids=[str(s) for s in STYLES])
@pytest.mark.parametrize("case", sorted(CASES))
def test_filled_export_is_byte_for_byte_what_label_adapter_sends(
    server, tmp_path: Path, case: str, style, demo_style: str, from_file_alone: bool
) -> None:
    signature, labels, demos, inputs = CASES[case]
    program = _compiled(signature, labels, [] if demo_style == "no-demos" else demos)
    path = tmp_path / "program.json"
    program.save(str(path))
    protocol = Protocol(constrained=style, demo_style="inline" if demo_style == "no-demos" else demo_style)

    loaded = load_program(path, None if from_file_alone else dspy.Predict(signature))
    (prompt,) = export_prompts(loaded, protocol)

    with dspy.context(lm=_lm(server), adapter=LabelAdapter(protocol=protocol)):
        _run(path, signature, inputs)
    sent = server.bodies[-1]
    filled = prompt.fill(inputs)
    assert json.dumps(filled, ensure_ascii=False) == json.dumps(sent["messages"], ensure_ascii=False)
    assert filled == sent["messages"]
    assert {k: v for k, v in sent.items() if k not in ("model", "messages")} == prompt.settings
    assert prompt.labels == labels and prompt.input_fields == list(inputs)


def _run(path: Path, signature: type[dspy.Signature], inputs: dict[str, str]) -> None:
    program = dspy.Predict(signature)
    program.load(str(path))
    program(**inputs)


def test_a_single_input_has_the_input_slot_and_the_text_format_shows_it(tmp_path: Path) -> None:
    program = _compiled(Review, LABELS, [])
    (prompt,) = export_prompts(program)
    assert prompt.slots == {"text": SINGLE_SLOT}
    assert prompt.messages == [
        {
            "role": "user",
            "content": "Read it closely.\nQuote {input} never; answer with the label.\n"
            + format_line(LABELS)
            + "\n\nFields:\n- Input: a film review\n- Label: the reviewer's verdict\n\nInput: {input}\nLabel:",
        }
    ]
    text = render_export([prompt], "text")
    assert text.splitlines()[0].startswith("=== predictor self: 1 message(s); slots: {input} = text;")
    assert "--- user ---\n" + prompt.messages[0]["content"] in text
    assert prompt.fill({"text": "great"})[0]["content"].endswith("Input: great\nLabel:")
    assert "Quote {input} never" in prompt.fill({"text": "great"})[0]["content"]


def test_the_command_prints_each_format(tmp_path: Path, capsys) -> None:
    program = _compiled(Review, LABELS, [])
    path = tmp_path / "review.json"
    program.save(str(path))
    expected = export_prompts(program, Protocol(constrained="json_schema"))[0]

    assert cli.main(["export", str(path), "--format", "messages", "--constrained", "json_schema"]) == 0
    assert json.loads(capsys.readouterr().out) == {"self": expected.messages}

    assert cli.main(["export", str(path), "--format", "json", "--constrained", "json_schema"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["format"] == "promptmii-export/1"
    assert data["protocol"]["constrained"] == "json_schema"
    (entry,) = data["predictors"]
    assert entry["messages"] == expected.messages and entry["settings"] == expected.settings
    assert entry["settings"]["response_format"]["json_schema"]["schema"]["properties"]["label"]["enum"] == LABELS

    assert cli.main(["export", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("=== predictor self:") and "Input: {input}\nLabel:" in out


def test_a_module_of_several_predictors_keeps_their_names(tmp_path: Path) -> None:
    class Two(dspy.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first = dspy.Predict(Review)
            self.second = dspy.ChainOfThought(Review)
            self.third = dspy.Predict("question -> answer")

        def forward(self, text: str) -> Any:
            return self.first(text=text)

    program = Two()
    program.first.signature = program.first.signature.with_instructions(with_format_line("One.", LABELS))
    program.second.predict.signature = program.second.predict.signature.with_instructions(
        with_format_line("Two.", LABELS)
    )
    path = tmp_path / "two.json"
    program.save(str(path))

    rebuilt = load_program(path)
    assert [name for name, _ in rebuilt.named_predictors()] == ["first"]  # the CoT goes to ChatAdapter
    (prompt,) = export_prompts(rebuilt)
    assert prompt.predictor == "first" and prompt.messages == export_prompts(program)[0].messages

    with_code = load_program(path, Two())
    assert [p.predictor for p in export_prompts(with_code)] == ["first"]


def test_program_given_as_module_attribute(tmp_path: Path, monkeypatch, capsys) -> None:
    (tmp_path / "myprog.py").write_text(
        textwrap.dedent(
            """
            from typing import Literal
            import dspy

            class Pair(dspy.Signature):
                premise: str = dspy.InputField()
                hypothesisText: str = dspy.InputField()
                label: Literal["a", "b"] = dspy.OutputField()

            program = dspy.Predict(Pair)
            """
        )
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("myprog", None)
    import myprog

    saved = myprog.program.deepcopy()
    saved.signature = saved.signature.with_instructions(with_format_line("Pick.", ["a", "b"]))
    saved.save(str(tmp_path / "p.json"))

    assert cli.main(["export", "p.json", "--program", "myprog:program", "--format", "messages"]) == 0
    messages = json.loads(capsys.readouterr().out)["self"]
    assert messages[0]["content"].endswith("Premise: {premise}\nHypothesisText: {hypothesisText}\nLabel:")
    # Signature classes are taken too.
    assert cli.main(["export", "p.json", "--program", "myprog:Pair", "--format", "messages"]) == 0
    assert json.loads(capsys.readouterr().out)["self"] == messages


@pytest.mark.parametrize(
    "labels",
    [["a", "b"], ["yes, surely", "no"], ['say "hi"', "x, y"], ["1", "0"], ["a. Do not", "b"], ["Ünï", "日本"]],
)
def test_labels_are_read_back_from_the_format_line(labels: list[str]) -> None:
    assert labels_from_instruction(with_format_line("Some text.\nMore.", labels)) == labels
    assert labels_from_instruction(format_line(labels)) == labels


@pytest.mark.parametrize(
    "instruction",
    ["", "Classify it.", format_line(["a", "b"]) + "\nThen more text.", 'Only return one of these options: . Do not'],
)
def test_an_instruction_without_the_format_line_gives_no_labels(instruction: str) -> None:
    assert labels_from_instruction(instruction) is None


def test_bad_input_is_one_clear_line(tmp_path: Path, capsys) -> None:
    # A program with no classifier.
    plain = dspy.Predict("question -> answer")
    plain.save(str(tmp_path / "qa.json"))
    assert cli.main(["export", str(tmp_path / "qa.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("promptmii: error: ") and "no classification predictor to export" in err
    assert len(err.strip().splitlines()) == 1

    assert cli.main(["export", str(tmp_path / "qa.json"), "--program", "os:sep"]) == 2
    assert "expected a dspy.Module, a Signature or a factory" in capsys.readouterr().err

    with pytest.raises(ValueError, match="no classification predictor to export"):
        export_prompts(plain)

    assert cli.main(["export", str(tmp_path / "missing.json")]) == 2
    assert "no program file at" in capsys.readouterr().err

    (tmp_path / "bad.json").write_text("{not json")
    assert cli.main(["export", str(tmp_path / "bad.json")]) == 2
    assert "bad.json:1:2: not valid JSON" in capsys.readouterr().err

    (tmp_path / "list.json").write_text("[1, 2]")
    assert cli.main(["export", str(tmp_path / "list.json")]) == 2
    assert "is not a saved DSPy program" in capsys.readouterr().err

    assert cli.main(["export", str(tmp_path / "qa.json"), "--program", "no_such_module_here:x"]) == 2
    assert "cannot import 'no_such_module_here'" in capsys.readouterr().err

    assert cli.main(["export", str(tmp_path / "qa.json"), "--program", "nocolon"]) == 2
    assert "is not MODULE:ATTR" in capsys.readouterr().err

    with pytest.raises(ValueError, match="holds no predictor"):
        program_from_state({"metadata": {}}, "x.json")
