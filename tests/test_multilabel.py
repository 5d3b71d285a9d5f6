"""Multi-label programs (``list[Literal[...]]``, ``list[Enum]``): task files with list
labels, the meta-prompt and format line, LabelAdapter's JSON-array answers (constrained
where the style allows, checked on a real HTTP endpoint), scoring by scikit-learn's
multilabel metrics, the benchmark and the export, on the GoEmotions fixture
(tests/data/multilabel, Apache-2.0) with fake LMs."""

from __future__ import annotations

import enum
import json
from pathlib import Path
from typing import Any, Literal

import dspy
import pytest
from fakes import fake_lm, message_texts
from sklearn.metrics import accuracy_score, f1_score
from support.chat_stub import ChatStub

from benchmarks.methods import Budgets
from benchmarks.report import render_report
from benchmarks.runner import Endpoints, RunConfig, run_benchmark
from benchmarks.store import read_records
from benchmarks.tasks import make_split
from dspy_promptmii.adapter import LabelAdapter
from dspy_promptmii.data import TaskData, load_jsonl, load_task
from dspy_promptmii.evaluation import evaluate
from dspy_promptmii.export import export_prompts, labels_from_instruction, load_program
from dspy_promptmii.optimizer import PromptMIIOptimizer
from dspy_promptmii.protocol import (
    MultiLabels,
    Protocol,
    format_line,
    label_grammar,
    multilabel_score,
    naive_instruction,
    parse_labels,
)
from dspy_promptmii.routes import Endpoint
from dspy_promptmii.task import signature_task

FIXTURE = Path(__file__).resolve().parent / "data" / "multilabel" / "goemotions_ekman.jsonl"
EKMAN = ["anger", "disgust", "fear", "joy", "sadness", "surprise"]
LABELS = MultiLabels(EKMAN)


class Emotion(enum.Enum):
    JOY = "joy"
    FEAR = "fear"


class Tagged(dspy.Signature):
    """Tag a comment with the emotions it shows."""

    text: str = dspy.InputField(desc="a Reddit comment")
    emotions: list[Literal["anger", "disgust", "fear", "joy", "sadness", "surprise"]] = dspy.OutputField()


# --- task files and introspection ---------------------------------------------------------


def test_a_task_file_with_list_labels_is_a_multi_label_task() -> None:
    task = load_task(FIXTURE)
    assert task.multilabel and task.labels == EKMAN
    assert sum(len(row["label"]) > 1 for row in task.rows) == 11
    assert sum(row["label"] == [] for row in task.rows) == 20
    spec = signature_task(task.signature())
    assert spec.multilabel and isinstance(spec.labels, MultiLabels) and list(spec.labels) == EKMAN
    example = task.examples()[13]
    assert example.label == ["joy", "surprise"]
    assert spec.label_of(example.label) == '["joy", "surprise"]'
    assert spec.label_of({"surprise", "joy"}) == '["joy", "surprise"]'
    assert spec.label_of([]) == "[]" and spec.label_of(["love"]) is None and spec.label_of("joy") is None
    assert spec.value_of('["fear", "joy"]') == ["fear", "joy"]
    # The split stratifies by label set and is stable.
    split = make_split(task, 30, seed=0)
    assert split.split_id(20) == make_split(task, 30, seed=0).split_id(20)
    assert all(isinstance(ex.label, list) for ex in split.examples(20))


def test_list_of_enum_and_bool_lists() -> None:
    class ByEnum(dspy.Signature):
        text: str = dspy.InputField()
        tags: list[Emotion] = dspy.OutputField()

    class Flags(dspy.Signature):
        text: str = dspy.InputField()
        flags: list[bool] = dspy.OutputField()

    spec = signature_task(ByEnum)
    assert spec.multilabel and list(spec.labels) == ["joy", "fear"]
    assert spec.label_of([Emotion.FEAR, "joy"]) == '["joy", "fear"]'
    assert spec.value_of('["fear"]') == [Emotion.FEAR]
    assert signature_task(Flags) is None


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"text": "a", "label": ["x"]}', '{"text": "b", "label": "y"}'],
         ":2: 'label' must be a list of labels in a multi-label file (line 1 has a list), got \"y\""),
        (['{"text": "a", "label": ["x", null]}'], ":1: 'label': null is not a label"),
        (['{"text": "a", "label": ["x", ["y"]]}'], ":1: 'label': a list ([\"y\"]) is not a label"),
        (['{"text": "a", "label": [1]}', '{"text": "b", "label": ["1"]}'], "both become the label '1'"),
        # A single-label file keeps its error for a list label.
        (['{"text": "a", "label": "x"}', '{"text": "b", "label": ["y"]}'],
         ":2: 'label': a list ([\"y\"]) is not a label; a label is a string, an integer or a boolean"),
    ],
)
def test_a_malformed_multi_label_file_is_named_by_line(tmp_path: Path, lines: list[str], message: str) -> None:
    path = tmp_path / "task.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError) as error:
        load_jsonl(path)
    assert str(error.value).startswith(f"{path}:") and message in str(error.value)


def test_labels_repeated_in_a_row_count_once_and_are_sorted(tmp_path: Path) -> None:
    path = tmp_path / "task.jsonl"
    path.write_text('{"text": "a", "label": ["y", "x", "y"]}\n{"text": "b", "label": []}\n')
    assert [row["label"] for row in load_jsonl(path)] == [["x", "y"], []]
    with pytest.raises(ValueError, match="not a list of label strings"):
        TaskData(name="t", rows=[{"text": "a", "label": ["x"]}, {"text": "b", "label": "y"}])


# --- the protocol ------------------------------------------------------------------------


def test_the_format_line_meta_prompt_and_naive_instruction_say_several_or_none() -> None:
    line = format_line(LABELS)
    assert line == (
        "Return a JSON array of the options that apply, from: anger, disgust, fear, joy, sadness, surprise. "
        'Several may apply, or none ([]). Do not output "Label:" or any extra text.'
    )
    assert format_line(EKMAN).startswith("Only return one of these options:")  # a plain list is single-label
    examples = [({"text": "so glad and surprised"}, '["joy", "surprise"]'), ({"text": "ok"}, "[]")]
    for template in ("meta1", "meta2", "label_defs"):
        prompt = Protocol(template=template).meta_prompt(LABELS, examples, ["text"])
        assert "several" in prompt.lower() and "none" in prompt.lower()
        assert 'Input: so glad and surprised\nLabel: ["joy", "surprise"]' in prompt and "Label: []" in prompt
        assert "exactly one" not in prompt
    custom = Protocol(template="Labels: {label_names}\n{examples}\nWrite it.").meta_prompt(LABELS, examples, ["text"])
    assert custom.startswith("Labels: anger, disgust, fear, joy, sadness, surprise (a text may take several")
    assert naive_instruction(LABELS) == "Read the input and list every label that applies to it."


@pytest.mark.parametrize(
    ("reply", "parsed"),
    [
        ('["joy", "surprise"]', '["joy", "surprise"]'),
        ('["surprise", "joy", "joy"]', '["joy", "surprise"]'),
        ('{"labels": ["Fear"]}', '["fear"]'),
        ("[]", "[]"),
        ("Label: joy, sadness", '["joy", "sadness"]'),
        ('<think>happy</think>\n```json\n["joy"]\n```', '["joy"]'),
        ('The emotions are ["anger"].', '["anger"]'),
        ('["joy", "love"]', None),
        ("", None),
        ("none of them", None),
        ('[["joy"]]', None),
    ],
)
def test_replies_are_parsed_into_the_protocols_json_array(reply: str, parsed: str | None) -> None:
    assert parse_labels(reply, LABELS) == parsed
    assert Protocol.parse(reply, LABELS) == parsed


def test_scores_are_scikit_learns_multilabel_metrics() -> None:
    gold = ['["joy"]', "[]", '["anger", "fear"]', '["joy", "surprise"]']
    predicted = ['["joy"]', None, '["anger"]', '["surprise"]']
    scores = multilabel_score(gold, predicted, LABELS)
    y_true = [[0, 0, 0, 1, 0, 0], [0] * 6, [1, 0, 1, 0, 0, 0], [0, 0, 0, 1, 0, 1]]
    y_pred = [[0, 0, 0, 1, 0, 0], [0] * 6, [1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1]]
    used = [0, 2, 3, 5]  # disgust and sadness: in no gold set and no prediction
    assert scores["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, labels=used, average="macro"))
    assert scores["micro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="micro"))
    assert scores["example_f1"] == pytest.approx(f1_score(y_true, y_pred, average="samples", zero_division=1))
    assert scores["exact_match"] == scores["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred)) == 0.5
    assert scores["invalid_rate"] == 0.25 and scores["n"] == 4
    assert Protocol.score(gold, predicted, LABELS) == scores
    one = multilabel_score(['["a"]', "[]"], ['["a"]', "[]"], MultiLabels(["a"]))  # a one-label set
    assert one["example_f1"] == one["exact_match"] == 1.0
    with pytest.raises(ValueError, match="not in the label set"):
        multilabel_score(['["love"]'], ["[]"], LABELS)


def test_constrained_styles_ask_for_an_array_of_the_labels() -> None:
    schema = Protocol(constrained="json_schema").settings(LABELS)["response_format"]["json_schema"]["schema"]
    assert schema["properties"] == {"labels": {"type": "array", "items": {"type": "string", "enum": EKMAN}}}
    assert schema["required"] == ["labels"]
    # The choice style picks one label: a set takes json_object, which the embedded server also answers.
    assert Protocol(constrained="choice").settings(LABELS)["response_format"]["type"] == "json_object"
    grammar = label_grammar(LABELS)
    assert grammar.startswith('root ::= "[" ( item ( ", " item )* )? "]"') and '"\\"joy\\""' in grammar
    assert Protocol(constrained="json_object").max_tokens(LABELS) == 16 + sum(len(label) + 4 for label in EKMAN)


# --- LabelAdapter on a real HTTP endpoint ----------------------------------------------------


def _reply(body: dict[str, Any], headers: dict[str, str]) -> tuple[int, str]:
    text = body["messages"][-1]["content"].rsplit("Input: ", 1)[-1]
    chosen = [label for label in ("joy", "surprise", "fear") if label in text]
    if "response_format" in body:
        return 200, json.dumps({"labels": chosen})
    return 200, json.dumps(chosen)


@pytest.mark.parametrize("style", [False, "json_schema", "json_object", "grammar", "choice"])
def test_label_adapter_sends_the_protocols_request_and_returns_a_list(style, tmp_path: Path) -> None:
    protocol = Protocol(constrained=style)
    program = dspy.Predict(Tagged)
    program.signature = program.signature.with_instructions(
        protocol.instruction("Tag the comment with every emotion it shows.", LABELS)
    )
    with ChatStub(_reply) as stub:
        lm = dspy.LM("hosted_vllm/follower", api_base=stub.url, api_key="local", cache=False, num_retries=0)
        with dspy.context(lm=lm, adapter=LabelAdapter(protocol=protocol)):
            prediction = program(text="such joy and surprise here")
        body = stub.bodies[-1]
    assert prediction.emotions == ["joy", "surprise"]
    instruction = program.signature.instructions
    expected = protocol.request_body(
        "follower", instruction, LABELS, {"text": "such joy and surprise here"}, ["text"],
        descriptions={"text": "a Reddit comment"},
    )
    assert {k: v for k, v in body.items() if k != "model"} == {k: v for k, v in expected.items() if k != "model"}
    assert body["messages"][0]["content"].endswith(
        "Fields:\n- Input: a Reddit comment\n\nInput: such joy and surprise here\nLabel:"
    )

    # The export, filled with the same input, is that request.
    path = tmp_path / "tagged.json"
    program.save(str(path))
    (prompt,) = export_prompts(load_program(path), protocol)
    assert prompt.multilabel and prompt.fill({"text": "such joy and surprise here"}) == body["messages"]
    assert prompt.settings == {k: v for k, v in body.items() if k not in ("model", "messages")}
    assert isinstance(labels_from_instruction(instruction), MultiLabels)


# --- compile, evaluate, the benchmark ---------------------------------------------------------

GUIDELINES = "Tag joy for happy comments, surprise for astonished ones, and nothing for neutral remarks."


def _chosen(text: str) -> str:
    """The fake follower's answer for an input: cue words, deterministic."""
    text = text.lower()
    cues = (("joy", ("love", "thank", "glad", "lol")), ("surprise", ("wow", "?")))
    return json.dumps([label for label, words in cues if any(word in text for word in words)])


def _follower(request: Any) -> str:
    last = message_texts(request.messages[-1])
    return _chosen(last.rsplit("Input: ", 1)[-1])


def test_compile_and_evaluate_a_multi_label_program() -> None:
    task = load_task(FIXTURE)
    split = make_split(task, 40, seed=0)
    generator, generator_engine = fake_lm([GUIDELINES], model="fake/generator")
    follower, _ = fake_lm(_follower, model="fake/follower")
    optimizer = PromptMIIOptimizer(generator_lm=generator, n=12)
    estimate = optimizer.estimate(dspy.Predict(task.signature()), split.examples(30))
    compiled = optimizer.compile(dspy.Predict(task.signature()), trainset=split.examples(30))
    meta_prompt = generator_engine.prompt(0)
    assert "A text may take several labels, or none." in meta_prompt and 'Label: ["' in meta_prompt
    instruction = compiled.signature.instructions
    assert instruction == f"{GUIDELINES}\n{format_line(LABELS)}"
    assert optimizer.report[0]["labels"] == EKMAN and estimate.total()["generator_calls"] == 1

    result = evaluate(compiled, split.test, lm=follower, adapter=LabelAdapter(), progress=False)
    gold = [task.label_key({"label": ex.label}) for ex in split.test]
    predicted = [_chosen(ex.text) for ex in split.test]
    expected = multilabel_score(gold, predicted, LABELS)
    assert result.macro_f1 == pytest.approx(expected["macro_f1"])
    assert result.example_f1 == pytest.approx(expected["example_f1"])
    assert result.micro_f1 == pytest.approx(expected["micro_f1"])
    assert result.accuracy == pytest.approx(expected["exact_match"])
    assert result.invalid_rate == 0 and result.n == 40


def test_the_benchmark_runs_naive_icl_and_prompt_mii_on_a_multi_label_task(tmp_path: Path) -> None:
    data = tmp_path / "datasets" / "goemotions_ekman"
    data.mkdir(parents=True)
    (data / "data.jsonl").write_text(FIXTURE.read_text(encoding="utf-8"), encoding="utf-8")
    follower, _ = fake_lm(_follower, model="fake/follower")
    generator, _ = fake_lm([GUIDELINES], model="fake/generator")

    def endpoint(lm: dspy.LM) -> Endpoint:
        return Endpoint(lm=lm, route=lm.model, token_counter=None, context_tokens=None, constrained_style="json_schema")

    out = tmp_path / "out"
    config = RunConfig(out=out, tasks=[data], n_values=[10], methods=["naive", "icl", "promptmii_zero"], test_rows=30,
                       follower_style="json_schema", progress=False, budgets=Budgets())
    summary = run_benchmark(config, Endpoints(follower=endpoint(follower), generator=endpoint(generator)))
    assert summary.status == "finished"
    records = {r["method"]: r for r in read_records(out)}
    for record in records.values():
        assert record["status"] == "ok" and record["multilabel"] is True
        assert 0 <= record["example_f1"] <= 1 and 0 <= record["micro_f1"] <= 1
    assert records["naive"]["instruction"].startswith(naive_instruction(LABELS))
    assert records["icl"]["demos"] == 10
    report = render_report(out, plot_name=None)
    assert "## Multi-label tasks" in report and "example-F1" in report
