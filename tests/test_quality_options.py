"""PromptMIIOptimizer's quality options: exemplars from the instruction library, an
instruction budget, candidate selection by the follower, demos beside the instruction;
and the library builder (training.build_library) on a small fixture with a fake
generator and a fake follower."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import dspy
import httpx
import pytest
from fakes import fake_lm, message_texts
from support.reviews import GOOD, Review, reviews

from dspy_promptmii import LabelAdapter, PromptMIIOptimizer
from dspy_promptmii.data import TaskData
from dspy_promptmii.library import load_library, select_exemplars
from dspy_promptmii.protocol import NAIVE_INSTRUCTION, Protocol, format_line, unknown_labels
from training.build_library import LibraryConfig, build_library, redistributable
from training.follower import Follower, FollowerConfig

LIBRARY = [
    {
        "task": "movie_sentiment",
        "labels": ["negative", "positive"],
        "inputs": ["a gorgeous, moving film", "two hours I will never get back"],
        "instruction": "Decide whether the reviewer liked the film.",
        "reward": 0.9,
        "naive_reward": 0.6,
    },
    {
        "task": "question_type",
        "labels": ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"],
        "inputs": ["Who wrote Hamlet?", "How far is the moon?"],
        "instruction": "Name what kind of answer the question asks for.",
        "reward": 0.7,
        "naive_reward": 0.3,
    },
    {
        "task": "voice_intents",
        "labels": ["GetWeather", "PlayMusic", "BookRestaurant"],
        "inputs": ["will it snow in Denver", "play some Miles Davis"],
        "instruction": "Pick what the user wants the assistant to do.",
        "reward": 0.8,
        "naive_reward": 0.5,
    },
]






# --- exemplars ---------------------------------------------------------------------------


def test_exemplars_are_the_most_similar_library_entries() -> None:
    chosen = select_exemplars(LIBRARY, ["pos", "neg"], ["loved the film", "hated the acting"], 2)
    assert len(chosen) == 2 and chosen[0]["task"] == "movie_sentiment"  # the review task is the closest
    assert chosen[0]["similarity"] > chosen[1]["similarity"]
    assert select_exemplars(LIBRARY, ["pos"], ["x"], 0) == []
    assert len(select_exemplars(LIBRARY, ["pos"], ["x"], 10)) == len(LIBRARY)
    intents = select_exemplars(LIBRARY, ["GetWeather", "PlayMusic"], ["will it rain in Oslo"], 1)
    assert intents[0]["task"] == "voice_intents"


def test_exemplars_go_into_the_one_meta_prompt_and_the_report() -> None:
    lm, engine = fake_lm([GOOD])
    optimizer = PromptMIIOptimizer(generator_lm=lm, exemplars=2, library=LIBRARY, n=6)
    compiled = optimizer.compile(dspy.Predict(Review), trainset=reviews(10))
    assert engine.calls == 1
    prompt = engine.prompt(0)
    report = optimizer.report[0]
    shown_inputs = [line[len("Input: "):] for line in prompt.splitlines() if line.startswith("Input: ")]
    expected = select_exemplars(LIBRARY, ["pos", "neg"], shown_inputs, 2)
    assert report["exemplars"] == [e["task"] for e in expected] and len(expected) == 2
    for task in report["exemplars"]:
        entry = next(e for e in LIBRARY if e["task"] == task)
        assert entry["instruction"] in prompt
    assert prompt.index("Instructions written for other") < prompt.index("Some texts that were already annotated")
    assert compiled.signature.instructions == GOOD + "\n" + format_line(["pos", "neg"])


def test_exemplars_need_a_template_with_the_placeholder_and_a_readable_library(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exemplars"):
        PromptMIIOptimizer(exemplars=1, library=LIBRARY, template="Labels {label_names}\n{examples}")
    broken = tmp_path / "library.json"
    broken.write_text('{"entries": [{"task": "x"}]}', encoding="utf-8")
    # The constructor reads no file; compile (and estimate) read it before any LM call.
    lm, engine = fake_lm([GOOD])
    optimizer = PromptMIIOptimizer(generator_lm=lm, exemplars=1, library=broken)
    for step in (optimizer.compile, optimizer.estimate):
        with pytest.raises(ValueError, match="entry 0 has no labels, instruction"):
            step(dspy.Predict(Review), trainset=reviews(4))
    assert engine.calls == 0
    with pytest.raises(TypeError, match="exemplars"):
        PromptMIIOptimizer(exemplars="2")


def test_the_packaged_library_loads_and_holds_no_dev_task() -> None:
    entries = load_library()
    assert entries, "the packaged instruction library is empty"
    dev = {"snips", "tweeteval_emotion", "cola", "mrpc", "snli", "code_comment_category_java", "masakhanews_topic_yor",
           "indonlu_smsa_sentiment_id", "legalbench_overruling", "tweeteval_irony", "hwu64",
           "chnsenticorp_hotel_sentiment_zh"}
    assert not dev & {e["task"] for e in entries}
    for entry in entries:
        assert entry["reward"] > entry["naive_reward"]
        assert entry["instruction"].strip()


# --- the instruction budget ----------------------------------------------------------------


def test_a_budget_asks_for_words_and_limits_the_generation() -> None:
    lm, engine = fake_lm([GOOD])
    optimizer = PromptMIIOptimizer(generator_lm=lm, max_instruction_tokens=100, token_counter=lambda t: len(t.split()))
    optimizer.compile(dspy.Predict(Review), trainset=reviews(10))
    assert "Keep it under 75 words." in engine.prompt(0)
    assert engine.configs[0].max_tokens == 100 + 64
    assert optimizer.report[0]["instruction_tokens"] == len(GOOD.split())


def test_an_lm_limit_wins_over_the_budgets_limit() -> None:
    lm, engine = fake_lm([GOOD], max_tokens=4000)
    PromptMIIOptimizer(generator_lm=lm, max_instruction_tokens=100).compile(dspy.Predict(Review), trainset=reviews(8))
    assert engine.configs[0].max_tokens == 4000


def test_unknown_labels_in_an_instruction_are_reported() -> None:
    assert unknown_labels("Answer GetWeather or PlayMusic, or FindFlight.", ["GetWeather", "PlayMusic"]) == [
        "FindFlight"
    ]
    assert unknown_labels("Use not_equivalent or Not-Equivalent.", ["not_equivalent"]) == []
    lm, _ = fake_lm(["Answer pos or neg, never very_positive."])
    optimizer = PromptMIIOptimizer(generator_lm=lm)
    optimizer.compile(dspy.Predict(Review), trainset=reviews(8))
    assert optimizer.report[0]["unknown_labels"] == ["very_positive"]


# --- candidates ------------------------------------------------------------------------


def _follower_that_obeys() -> tuple[dspy.LM, Any]:
    """A follower that labels correctly only when its instruction says the magic words."""

    def reply(request: Any) -> str:
        text = message_texts(request.messages[-1])
        if "Praise means pos" in text:
            return "pos" if "loved" in text.rsplit("Input:", 1)[-1] else "neg"
        return "neg"

    return fake_lm(reply, model="fake/follower")


def test_candidates_are_scored_by_the_follower_and_the_best_is_kept() -> None:
    generator, generator_engine = fake_lm(["Label the review.", GOOD, "Answer with a label.", "Be careful."])
    follower, follower_engine = _follower_that_obeys()
    optimizer = PromptMIIOptimizer(generator_lm=generator, follower_lm=follower, candidates=4, n=6, val_size=8)
    with dspy.context(adapter=LabelAdapter()):
        compiled = optimizer.compile(dspy.Predict(Review), trainset=reviews(20))
    report = optimizer.report[0]
    assert generator_engine.calls == 4 and report["generator_calls"] == 4
    assert compiled.signature.instructions.startswith(GOOD)
    assert report["chosen"] == 1
    assert len(report["candidates"]) == 5  # four generated and the naive reference
    assert report["candidates"][-1]["kind"] == "naive"
    scores = [c["score"]["macro_f1"] for c in report["candidates"]]
    assert scores[1] == 1.0 and max(scores) == 1.0
    assert report["follower_calls"] == follower_engine.calls == 5 * 8
    assert report["validation"] == "8 trainset rows the generator did not see"
    # Candidates vary their template and sampling: two greedy, then sampled with seeds.
    configs = generator_engine.configs
    assert [c.temperature for c in configs] == [0.0, 0.0, 0.0, 0.7]
    templates = [c["template"] for c in report["candidates"][:4]]
    assert templates == ["meta2", "meta1", "label_defs", "meta2"]
    assert len({generator_engine.prompt(i) for i in range(3)}) == 3  # the fourth repeats the first, sampled


def test_the_naive_instruction_wins_when_every_candidate_is_worse() -> None:
    generator, _ = fake_lm(["Always answer neg.", "Answer neg."])

    def reply(request: Any) -> str:
        text = message_texts(request.messages[-1])
        if NAIVE_INSTRUCTION in text:  # the naive instruction makes this follower right
            return "pos" if "loved" in text.rsplit("Input:", 1)[-1] else "neg"
        return "neg"

    follower, _ = fake_lm(reply)
    optimizer = PromptMIIOptimizer(generator_lm=generator, follower_lm=follower, candidates=2, n=4)
    with dspy.context(adapter=LabelAdapter()):
        compiled = optimizer.compile(dspy.Predict(Review), trainset=reviews(12))
    assert optimizer.report[0]["candidates"][optimizer.report[0]["chosen"]]["kind"] == "naive"
    assert compiled.signature.instructions == NAIVE_INSTRUCTION + "\n" + format_line(["pos", "neg"])


def test_a_valset_is_used_for_selection_when_given() -> None:
    generator, _ = fake_lm(["Label it.", GOOD])
    follower, engine = _follower_that_obeys()
    optimizer = PromptMIIOptimizer(generator_lm=generator, follower_lm=follower, candidates=2, n=4, include_naive=False)
    with dspy.context(adapter=LabelAdapter()):
        optimizer.compile(dspy.Predict(Review), trainset=reviews(4), valset=reviews(30)[20:26])
    assert optimizer.report[0]["validation"] == "valset (6 rows)"
    assert engine.calls == 2 * 6


def test_empty_candidates_are_reported_and_a_lone_usable_one_is_not_scored() -> None:
    generator, _ = fake_lm(["<think>still thinking", GOOD, "```\n```"])
    follower, engine = _follower_that_obeys()
    optimizer = PromptMIIOptimizer(generator_lm=generator, follower_lm=follower, candidates=3, n=4, include_naive=False)
    with dspy.context(adapter=LabelAdapter()):
        compiled = optimizer.compile(dspy.Predict(Review), trainset=reviews(20))
    report = optimizer.report[0]
    assert compiled.signature.instructions.startswith(GOOD)
    assert [(c["index"], c["kind"]) for c in report["candidates"]] == [(0, "empty"), (1, "generated"), (2, "empty")]
    assert report["chosen"] == 1 and report["generator_calls"] == 3
    assert engine.calls == 0 and report["follower_calls"] == 0 and report["validation"] is None


def test_a_naive_check_keeps_the_generated_instruction_only_where_it_does_better() -> None:
    """candidates=1 with include_naive=True: one generator call, then the follower scores
    that instruction and the naive one on the validation rows and keeps the better."""

    def reply(request: Any) -> str:
        text = message_texts(request.messages[-1])
        if NAIVE_INSTRUCTION in text:  # the naive instruction makes this follower right
            return "pos" if "loved" in text.rsplit("Input:", 1)[-1] else "neg"
        return "neg"

    generator, generator_engine = fake_lm(["Answer neg."])
    follower, follower_engine = fake_lm(reply)
    optimizer = PromptMIIOptimizer(generator_lm=generator, follower_lm=follower, n=4, val_size=6, include_naive=True)
    estimate = optimizer.estimate(dspy.Predict(Review), reviews(12))
    with dspy.context(adapter=LabelAdapter()):
        compiled = optimizer.compile(dspy.Predict(Review), trainset=reviews(12))
    report = optimizer.report[0]
    assert generator_engine.calls == 1 and report["generator_calls"] == 1
    assert [c["kind"] for c in report["candidates"]] == ["generated", "naive"]
    assert report["candidates"][report["chosen"]]["kind"] == "naive"
    assert compiled.signature.instructions == NAIVE_INSTRUCTION + "\n" + format_line(["pos", "neg"])
    assert report["follower_calls"] == follower_engine.calls == 2 * 6
    assert estimate.total()["follower_calls"] == 2 * 6

    # The good instruction is kept: the follower labels every row right with it, half with the naive one.
    generator, _ = fake_lm([GOOD])
    follower, _ = _follower_that_obeys()
    optimizer = PromptMIIOptimizer(generator_lm=generator, follower_lm=follower, n=4, val_size=6, include_naive=True)
    with dspy.context(adapter=LabelAdapter()):
        compiled = optimizer.compile(dspy.Predict(Review), trainset=reviews(12))
    assert compiled.signature.instructions.startswith(GOOD)


def test_one_candidate_by_default_is_one_generator_call_and_no_follower_call() -> None:
    """include_naive=None (default) scores the naive instruction only with candidates > 1."""
    generator, _ = fake_lm(["Answer neg."])
    follower, follower_engine = fake_lm(lambda request: "neg")
    optimizer = PromptMIIOptimizer(generator_lm=generator, follower_lm=follower, n=4)
    compiled = optimizer.compile(dspy.Predict(Review), trainset=reviews(12))
    assert compiled.signature.instructions.startswith("Answer neg.")
    assert follower_engine.calls == 0 and optimizer.report[0]["follower_calls"] == 0
    assert optimizer.estimate(dspy.Predict(Review), reviews(12)).total()["follower_calls"] == 0
    with pytest.raises(TypeError, match="include_naive must be True or False, or None"):
        PromptMIIOptimizer(include_naive="yes")


def test_candidates_need_a_follower() -> None:
    generator, _ = fake_lm([GOOD])
    with dspy.context(lm=None), pytest.raises(ValueError, match="needs a follower LM"):
        PromptMIIOptimizer(generator_lm=generator, candidates=2).compile(dspy.Predict(Review), trainset=reviews(8))
    with dspy.context(lm=None), pytest.raises(ValueError, match="include_naive=True needs a follower LM"):
        optimizer = PromptMIIOptimizer(generator_lm=generator, include_naive=True)
        optimizer.compile(dspy.Predict(Review), trainset=reviews(8))


# --- demos ------------------------------------------------------------------------------


def test_demos_are_kept_beside_the_instruction() -> None:
    lm, _ = fake_lm([GOOD])
    student = dspy.Predict(Review)
    compiled = PromptMIIOptimizer(generator_lm=lm, n=6, demos=2).compile(student, trainset=reviews(10))
    assert len(compiled.demos) == 2 and {d.label for d in compiled.demos} == {"pos", "neg"}
    assert student.demos == []


# --- the library builder --------------------------------------------------------------------


def _task(name: str, n: int = 40) -> TaskData:
    rows = [
        {"text": f"{name} item {i} {'bright' if i % 2 else 'dark'}", "label": "b" if i % 2 else "d"} for i in range(n)
    ]
    return TaskData(name=name, rows=rows)


def test_build_library_keeps_the_best_candidate_that_beats_naive() -> None:
    replies = iter(["Say d.", "bright means b and dark means d.", "Guess.", "Answer b."] * 2)
    generator, generator_engine = fake_lm(lambda request: next(replies))

    def follower_reply(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        content = body["messages"][-1]["content"]
        item = content.rsplit("Input:", 1)[-1]
        if "bright means b" in content:
            label = "b" if "bright" in item else "d"
        else:
            label = "d"
        return httpx.Response(200, json={"choices": [{"message": {"content": label}}]})

    follower = Follower(
        FollowerConfig(base_url="http://f.test/v1", max_retries=0), transport=httpx.MockTransport(follower_reply)
    )
    config = LibraryConfig(
        n=6, m=10, candidates=4, templates=("meta2", "meta1"), seed=3, max_instruction_tokens=60, protocol=Protocol()
    )
    library = build_library(
        [(_task("shades"), "local"), (_task("tones"), "local")],
        config,
        generator,
        follower,
        eval_tasks=[_task("dev_task")],
        licences={"shades": "CC BY 4.0", "tones": "not stated"},
        generator_name="fake/generator",
        follower_name="fake/follower",
    )
    assert generator_engine.calls == 8
    assert [e["task"] for e in library["entries"]] == ["shades", "tones"]
    entry = library["entries"][0]
    assert entry["instruction"] == "bright means b and dark means d." and entry["reward"] == 1.0
    assert entry["naive_reward"] < entry["reward"]
    assert entry["inputs"] and library["entries"][1]["inputs"] == []  # only licensed inputs are shipped
    assert all(len(t["candidates"]) == 4 for t in library["tasks"])
    candidates = library["tasks"][0]["candidates"]
    assert [(c["template"], c["temperature"]) for c in candidates] == [
        ("meta2", 0.0), ("meta2", 0.8), ("meta1", 0.0), ("meta1", 0.8)
    ]
    assert "Keep it under 45 words." in generator_engine.prompt(0)
    assert json.loads(json.dumps(library)) == library
    # The library is usable as the optimizer's.
    assert select_exemplars(library["entries"], ["b", "d"], ["bright"], 1)[0]["task"] in {"shades", "tones"}


def test_build_library_refuses_evaluation_tasks_and_skips_tasks_it_cannot_use() -> None:
    generator, _ = fake_lm(["x"])
    follower = Follower(FollowerConfig(base_url="http://f.test/v1"), transport=httpx.MockTransport(lambda r: None))
    with pytest.raises(ValueError, match="evaluation tasks"):
        build_library(
            [(_task("dev_task"), "local")], LibraryConfig(), generator, follower, eval_tasks=[_task("dev_task")]
        )
    tiny = TaskData(name="tiny", rows=[{"text": "a", "label": "x"}, {"text": "b", "label": "y"}])
    library = build_library([(tiny, "local")], LibraryConfig(n=5, m=5), generator, follower)
    assert library["entries"] == [] and "tiny" in library["skipped"]


def _datasets(tmp_path: Path) -> Path:
    root = tmp_path / "datasets"
    for name in ("shades", "dev_task"):
        (root / name).mkdir(parents=True)
        (root / name / "data.jsonl").write_text(
            "\n".join(json.dumps(row) for row in _task(name).rows) + "\n", encoding="utf-8"
        )
    (root / "SPLITS.json").write_text(json.dumps({"train": ["shades"], "dev": ["dev_task"]}), encoding="utf-8")
    return root


@pytest.mark.parametrize(
    "extra, problem",
    [
        (["--candidates", "0"], "candidates must be at least 1"),
        (["--templates", "meta2,bogus"], "['bogus'] are not built-in templates"),
        (["--max-instruction-tokens", "-1"], "--max-instruction-tokens must be 0"),
        (["--out", "{tmp}"], "is a folder"),
        (["--tasks", "nowhere"], "no task folder (with data.jsonl) or .jsonl file for nowhere"),
        (["--tasks", "{datasets}/dev_task"], "development task(s) ['dev_task']"),
    ],
)
def test_build_library_checks_its_options_before_any_server(tmp_path, monkeypatch, extra, problem) -> None:
    from dspy_promptmii import routes
    from training import build_library as builder

    def no_pool(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("an LM pool was made before the options were checked")

    monkeypatch.setattr(routes, "LMPool", no_pool)
    datasets = _datasets(tmp_path)
    argv = [a.format(tmp=tmp_path, datasets=datasets) for a in ["--datasets", str(datasets), *extra]]
    with pytest.raises(SystemExit) as stop:
        builder.main(argv)
    assert problem in str(stop.value)


def test_redistributable_licences() -> None:
    assert redistributable("CC BY 4.0 (README)") and redistributable("CC0 1.0") and redistributable("Apache-2.0 (x)")
    assert not redistributable("not stated") and not redistributable("GPL-3.0") and not redistributable(None)


# --- review regressions ------------------------------------------------------------------


def test_validation_rows_leave_out_duplicates_of_shown_rows_and_shown_valset_rows() -> None:
    from dspy_promptmii.sampling import select_examples
    from dspy_promptmii.selection import validation_rows
    from dspy_promptmii.task import signature_task

    task = signature_task(Review, "p")
    labelled = task.labelled_examples(reviews(6) * 3)
    shown = select_examples(labelled, 6, 0)
    rows, _ = validation_rows(labelled, shown, 20, 0)
    assert rows and not [row for row in rows if row in shown]
    valset = task.labelled_examples(reviews(10))
    rows, where = validation_rows(labelled, shown, 20, 0, valset)
    assert not [row for row in rows if row in shown] and "did not see" in where


def test_validation_on_shown_rows_takes_at_most_val_size_of_them() -> None:
    from dspy_promptmii.sampling import select_examples
    from dspy_promptmii.selection import validation_rows
    from dspy_promptmii.task import signature_task

    task = signature_task(Review, "p")
    labelled = task.labelled_examples(reviews(12))
    shown = select_examples(labelled, 12, 0)  # the generator saw every row
    rows, where = validation_rows(labelled, shown, 6, 0)
    assert rows == select_examples(shown, 6, 1)  # seeded (seed + 1, as for unseen rows), stratified
    assert len(rows) == 6 and {label for _, label in rows} == {label for _, label in shown}
    assert where == "6 of the 12 shown rows (no unseen row and no valset)"
    rows, where = validation_rows(labelled, shown, 20, 0)
    assert rows == list(shown) and where.startswith("12 of the 12")


def test_a_library_list_is_checked_like_a_file() -> None:
    lm, _ = fake_lm([GOOD])
    with pytest.raises(ValueError, match="entry 0 has no labels"):
        PromptMIIOptimizer(generator_lm=lm, exemplars=1, library=[{"task": "t", "instruction": "Do it."}])
    entry = {"task": "t", "labels": ["a", "b"], "instruction": "Do it."}
    for key, value, problem in [
        ("inputs", 5, "inputs 5, not a list"),
        ("inputs", "abcdef", "inputs 'abcdef', not a list"),
        ("reward", "high", "reward 'high', not a number"),
        ("naive_reward", True, "naive_reward True, not a number"),
    ]:
        with pytest.raises(ValueError, match=f"library: entry 1 has {problem}"):
            PromptMIIOptimizer(generator_lm=lm, exemplars=1, library=[entry, {**entry, key: value}])
    with pytest.raises(ValueError, match="exemplars=2 needs an instruction library with entries"):
        PromptMIIOptimizer(generator_lm=lm, exemplars=2, library=[])


def test_quotes_around_two_words_are_not_a_wrapping_pair() -> None:
    from dspy_promptmii.protocol import clean_reply

    reply = '"pos" means the reviewer liked it.\nAnything else is "neg"'
    assert clean_reply(reply, labels=["pos", "neg"]).text == reply
    assert clean_reply('"Label praise as pos."').text == "Label praise as pos."


def test_candidates_are_scored_by_the_follower_with_the_demos_the_program_keeps() -> None:
    generator, _ = fake_lm(["Label it.", GOOD])
    follower, follower_engine = _follower_that_obeys()
    own, own_engine = fake_lm("neg", model="fake/own")
    student = dspy.Predict(Review)
    student.lm = own
    student.demos = [dspy.Example(text="DEMO loved it", label="pos")]
    optimizer = PromptMIIOptimizer(generator_lm=generator, follower_lm=follower, candidates=2, n=4)
    with dspy.context(adapter=LabelAdapter()):
        compiled = optimizer.compile(student, trainset=reviews(20))
    assert optimizer.report[0]["chosen"] == 1 and optimizer.report[0]["follower_calls"] == follower_engine.calls
    assert all("DEMO loved it" in "".join(message_texts(m) for m in r.messages) for r in follower_engine.requests)
    assert len(compiled.demos) == 1 and student.lm is own


def test_a_bad_valset_row_is_named_as_a_valset_row() -> None:
    generator, _ = fake_lm([GOOD])
    follower, _ = _follower_that_obeys()
    optimizer = PromptMIIOptimizer(generator_lm=generator, follower_lm=follower, candidates=2, n=4)
    bad = [dspy.Example(label="pos").with_inputs("text")]
    with pytest.raises(ValueError, match=r"^valset\[0\]"):
        optimizer.compile(dspy.Predict(Review), trainset=reviews(8), valset=bad)


def test_a_candidate_the_follower_cannot_take_is_scored_as_failed() -> None:
    def reply(request: Any) -> str:
        text = message_texts(request.messages[-1])
        if "RUNAWAY" in text:
            raise RuntimeError("context length exceeded")
        return "pos" if "Praise means pos" in text and "loved" in text.rsplit("Input:", 1)[-1] else "neg"

    generator, _ = fake_lm([GOOD, "RUNAWAY " * 50])
    follower, _ = fake_lm(reply, model="fake/follower", num_retries=0)
    optimizer = PromptMIIOptimizer(generator_lm=generator, follower_lm=follower, candidates=2, n=4)
    with dspy.context(adapter=LabelAdapter()):
        optimizer.compile(dspy.Predict(Review), trainset=reviews(12))
    report = optimizer.report[0]
    failed = report["candidates"][1]
    assert report["chosen"] == 0 and failed["score"] is None and "context length exceeded" in failed["failed"]
    assert report["candidates"][0]["score"]["macro_f1"] >= 0 and "failed" not in report["candidates"][0]


def test_sampled_candidates_of_a_model_without_temperature_are_reported_as_not_sampled() -> None:
    generator, _ = fake_lm(["A.", "B.", "C.", GOOD], model="openai/o3-mini", temperature=1.0, max_tokens=16000)
    follower, _ = _follower_that_obeys()
    optimizer = PromptMIIOptimizer(generator_lm=generator, follower_lm=follower, candidates=4, n=4, template="meta2")
    with dspy.context(adapter=LabelAdapter()):
        optimizer.compile(dspy.Predict(Review), trainset=reviews(20))
    assert optimizer.report[0]["candidates"][3]["temperature"] is None


def test_an_instruction_past_its_budget_and_margin_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    word_counter = lambda text: len(text.split())  # noqa: E731 - one token a word
    long_reply = " ".join(["Praise means pos."] * 40)  # 120 "tokens"
    short_reply = " ".join(["Praise means pos."] * 5)  # 15
    for reply, budget, warned in ((long_reply, 20, True), (short_reply, 20, False), (long_reply, 160, False)):
        lm, _ = fake_lm([reply], max_tokens=4000)  # the LM's own limit: the budget is only asked for in words
        caplog.clear()
        with caplog.at_level("WARNING", logger="dspy_promptmii.optimizer"):
            PromptMIIOptimizer(generator_lm=lm, max_instruction_tokens=budget, token_counter=word_counter).compile(
                dspy.Predict(Review), trainset=reviews(10)
            )
        assert ("over max_instruction_tokens" in caplog.text) is warned, (budget, caplog.text)
