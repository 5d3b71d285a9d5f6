"""What a compile will cost, said before it runs: ``PromptMIIOptimizer.estimate`` (no LM
call) against the compiles the dev12 study recorded, against compiles made here with fake
LMs, GEPA's and MIPROv2's budget rules against their runs, prices, ``induce --dry-run``
and the report's estimate-vs-measured table."""

from __future__ import annotations

import json
from pathlib import Path

import dspy
import pytest
from fakes import fake_lm, word_count
from test_benchmarks import config, data_dir, endpoint, lms  # noqa: F401 - fixtures and helpers
from test_cli import fake_pool  # noqa: F401 - a fixture

from benchmarks.methods import Budgets, CompileContext, estimate_promptmii
from benchmarks.report import estimate_rows, render_report
from benchmarks.runner import run_benchmark
from benchmarks.store import read_records
from benchmarks.tasks import _fingerprint, make_split
from dspy_promptmii import cli
from dspy_promptmii.adapter import LabelAdapter
from dspy_promptmii.data import TaskData, classifier_signature, load_task
from dspy_promptmii.estimate import (
    CompileEstimate,
    RoleCost,
    gepa_estimate,
    gepa_metric_budget,
    miprov2_estimate,
    token_price,
)
from dspy_promptmii.optimizer import CHAT_FRAMING, PromptMIIOptimizer
from dspy_promptmii.protocol import Protocol
from dspy_promptmii.routes import Endpoint

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "benchmarks" / "results" / "dev12-2026-11-29" / "results.jsonl"
FIXTURES = Path(__file__).resolve().parent / "data" / "estimate"
#: The study's protocol and models (its manifest): the embedded 0.5B model, json_object, demos as turns.
STUDY_PROTOCOL = Protocol(template="auto", demo_style="turns", constrained="json_object")
GENERATORS = {None: "hosted_vllm/qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct":
              "hosted_vllm/qwen2.5-coder-1.5b-instruct"}


def _records() -> list[dict]:
    """The study's records, each with the options it ran with (read by the store)."""
    return read_records(STUDY)


def _study_estimate(examples: list[dspy.Example], labels: list[str], pair: bool, options: dict) -> CompileEstimate:
    """The estimate of a dev12 cell, made as the runner makes it, with its recorded
    options, with LiteLLM's counter (the study counted with the embedded model's
    tokenizer, which is not here)."""
    generator = dspy.LM(GENERATORS[options.get("generator")])
    follower = dspy.LM(GENERATORS[None])
    ctx = CompileContext(
        student=dspy.Predict(classifier_signature(labels, pair)),
        examples=examples,
        seed=0,
        threads=1,
        budgets=Budgets(),
        follower=Endpoint(lm=follower, route="local", token_counter=None, context_tokens=None,
                          constrained_style="json_object"),
        generator=Endpoint(lm=generator, route="local", token_counter=None, context_tokens=None,
                           constrained_style="json_object"),
        generator_lm=generator,
        follower_lm=follower,
        protocol=STUDY_PROTOCOL,
        options=options,
    )
    with dspy.context(adapter=LabelAdapter(protocol=STUDY_PROTOCOL)):
        return estimate_promptmii(ctx)


def _check_against_record(estimate: CompileEstimate, record: dict, within: float | None) -> None:
    g, f = estimate.generator, estimate.follower
    assert g.calls == record["compile_generator_calls"]
    # Every candidate is scored unless its reply was empty after cleaning (then it is not).
    assert record["compile_follower_calls"] <= f.calls
    assert abs(g.prompt_tokens / record["compile_generator_prompt_tokens"] - 1) <= 0.10
    assert record["compile_generator_completion_tokens"] <= g.completion_tokens
    assert record["compile_follower_completion_tokens"] <= f.completion_tokens
    assert record["compile_tokens"] <= estimate.total()["tokens"] * 1.10
    if within is not None:
        assert abs(record["compile_tokens"] / estimate.total()["tokens"] - 1) <= within
    assert estimate.total()["price"] == "unknown"  # a local model: LiteLLM's map has no price


FIXTURE_TASKS = sorted(p.stem for p in FIXTURES.glob("*.json"))


@pytest.mark.parametrize("name", FIXTURE_TASKS)
def test_the_estimate_is_within_10_percent_of_the_recorded_compile(name: str) -> None:
    """The study's default configuration (one call, the 160-token budget) on the committed
    examples of five dev tasks: calls exact, total tokens within 10% of what the compile
    spent; every other recorded Prompt-MII configuration within its bounds."""
    fixture = json.loads((FIXTURES / f"{name}.json").read_text())
    assert fixture["split_id"].endswith(_fingerprint(fixture["examples"]))  # the very rows of the record
    task = TaskData(name=name, rows=fixture["examples"])
    examples = task.examples()
    records = [r for r in _records() if r["task"] == name and r["method"].startswith("promptmii_zero")]
    assert len(records) >= 3
    checked = 0
    for record in records:
        assert record["split_id"] == fixture["split_id"]
        estimate = _study_estimate(examples, fixture["labels"], fixture["pair"], record["options"])
        default = record["method"] == "promptmii_zero:max_instruction_tokens=160"
        _check_against_record(estimate, record, 0.10 if default else None)
        checked += default
    assert checked == 1


@pytest.mark.shared_data
def test_the_estimate_against_every_recorded_prompt_mii_compile(shared_datasets: Path) -> None:
    """All 12 dev tasks of the study (their data from ../shared/datasets). LiteLLM's counter
    falls back to tiktoken's cl100k_base for these models: close to Qwen's tokenizer on
    Latin-script text, but it counts Chinese and Yoruba news far higher (an over-estimate)."""
    over_counted = {"chnsenticorp_hotel_sentiment_zh", "masakhanews_topic_yor"}
    for record in (r for r in _records() if r["method"].startswith("promptmii_zero")):
        task = load_task(shared_datasets / record["task"])
        split = make_split(task, 100, 0)
        assert split.split_id(20) == record["split_id"]
        estimate = _study_estimate(split.examples(20), task.labels, task.pair, record["options"])
        if record["task"] in over_counted:
            assert estimate.generator.prompt_tokens > 1.5 * record["compile_generator_prompt_tokens"]
            continue
        default = record["method"] == "promptmii_zero:max_instruction_tokens=160"
        _check_against_record(estimate, record, 0.10 if default else None)


# --- with fake LMs: the estimate counts what compile sends ---------------------------------

LABELS = ["neg", "pos"]
TRAIN = [
    dspy.Example(text=f"review {i} was {'great' if i % 2 else 'awful'}", label=LABELS[i % 2]).with_inputs("text")
    for i in range(12)
]
REPLY = "Decide whether the review praises or pans.\nPraise is pos; complaints are neg."


class Review(dspy.Signature):
    text: str = dspy.InputField()
    label: str = dspy.OutputField()


def _student() -> dspy.Predict:
    return dspy.Predict(classifier_signature(LABELS, False))


def test_estimate_makes_no_call_and_counts_the_meta_prompt_compile_sends() -> None:
    lm, engine = fake_lm([REPLY], model="fake/generator")
    optimizer = PromptMIIOptimizer(generator_lm=lm, n=6, token_counter=word_count, max_instruction_tokens=100)
    estimate = optimizer.estimate(_student(), TRAIN)
    assert engine.requests == []  # no LM call
    (entry,) = estimate.predictors
    optimizer.compile(_student(), trainset=TRAIN)
    sent = engine.prompt(0)
    assert entry.meta_prompt_tokens == word_count(sent) + CHAT_FRAMING
    assert entry.generator.calls == 1 and entry.follower.calls == 0 and entry.n_used == 6
    assert entry.generator.completion_tokens == 164  # the budget's reply limit: 100 + 64
    assert engine.configs[0].max_tokens == 164
    assert estimate.total()["price"] == "unknown" and estimate.total()["price_usd"] is None
    assert "unknown" in estimate.format() and "$0" not in estimate.format()


def test_estimate_of_several_candidates_counts_the_follower_scoring_them() -> None:
    generator, _ = fake_lm([REPLY], model="fake/generator")
    follower, follower_engine = fake_lm(lambda r: "pos", model="fake/follower")
    optimizer = PromptMIIOptimizer(generator_lm=generator, follower_lm=follower, n=6, candidates=3, val_size=4)
    with dspy.context(adapter=LabelAdapter()):
        estimate = optimizer.estimate(_student(), TRAIN, follower_token_counter=word_count)
        assert follower_engine.requests == []
        optimizer.compile(_student(), trainset=TRAIN)
    (entry,) = estimate.predictors
    report = optimizer.report[0]
    assert entry.validation_rows == 4
    assert entry.generator.calls == report["generator_calls"] == 3
    assert entry.follower.calls == report["follower_calls"] == len(follower_engine.requests) == (3 + 1) * 4
    # What the follower was sent (words, as the fake counts) is within the bound counted.
    sent = sum(sum(word_count(text) for text in follower_engine.texts(i)) for i in range(len(follower_engine.requests)))
    assert sent <= entry.follower.prompt_tokens
    assert entry.follower.completion_tokens == entry.follower.calls * Protocol().max_tokens(LABELS)


def test_the_meta_prompt_budget_drops_examples_as_compile_does() -> None:
    lm, engine = fake_lm([REPLY], model="fake/generator")
    optimizer = PromptMIIOptimizer(generator_lm=lm, n=12, token_counter=word_count, max_prompt_tokens=150)
    (entry,) = optimizer.estimate(_student(), TRAIN).predictors
    optimizer.compile(_student(), trainset=TRAIN)
    assert entry.n_used == optimizer.report[0]["n_used"] < 12


def test_a_price_comes_from_litellms_cost_map_and_is_never_made_up() -> None:
    import litellm

    lm, _ = fake_lm([REPLY], model="openai/gpt-4o-mini")
    estimate = PromptMIIOptimizer(generator_lm=lm, n=6).estimate(_student(), TRAIN)
    total = estimate.total()
    prompt_cost, completion_cost = litellm.cost_per_token(
        model="openai/gpt-4o-mini", prompt_tokens=total["prompt_tokens"], completion_tokens=total["completion_tokens"]
    )
    assert total["price_usd"] == pytest.approx(prompt_cost + completion_cost) and total["price_usd"] > 0
    assert total["price"].startswith("$")
    assert token_price("hosted_vllm/my-model", 100, 10) is None
    assert token_price("openai/gpt-4o-mini", None, 10) is None
    # One role with calls and no price makes the whole price unknown.
    known = RoleCost(model="openai/gpt-4o-mini", calls=1, prompt_tokens=10, completion_tokens=5).priced()
    unknown = RoleCost(model="hosted_vllm/x", calls=1, prompt_tokens=10, completion_tokens=5).priced()
    assert known.price_usd > 0 and unknown.price_usd is None
    assert known.add(unknown).price_usd is None


def test_bad_input_fails_as_compile_does() -> None:
    lm, engine = fake_lm([REPLY])
    optimizer = PromptMIIOptimizer(generator_lm=lm, n=4)
    with pytest.raises(ValueError, match="no classification predictor"):
        optimizer.estimate(dspy.Predict(Review), [dspy.Example(text="x", label="y").with_inputs("text")])
    with pytest.raises(TypeError, match="trainset must be a list"):
        optimizer.estimate(_student(), iter(TRAIN))
    with pytest.raises(TypeError, match="student must be a dspy.Module"):
        optimizer.estimate("not a program", TRAIN)
    with pytest.raises(ValueError, match="outside the label set"):
        optimizer.estimate(_student(), [dspy.Example(text="x", label="maybe").with_inputs("text")])
    with pytest.raises(ValueError, match="no generator LM"):
        PromptMIIOptimizer(n=4).estimate(_student(), TRAIN)
    assert engine.requests == []


# --- GEPA's and MIPROv2's budget rules ------------------------------------------------------


@pytest.mark.parametrize("valset", [1, 6, 20, 100])
def test_gepa_light_is_four_valsets_plus_380(valset: int) -> None:
    assert gepa_metric_budget(valset_size=valset, auto="light") == 4 * valset + 380
    assert gepa_metric_budget(valset_size=valset, trainset_size=10, max_full_evals=2) == 2 * (10 + valset)
    with pytest.raises(ValueError, match="exactly one of"):
        gepa_metric_budget(valset_size=valset, auto="light", max_metric_calls=10)


def test_gepa_rule_against_the_studys_gepa_compiles() -> None:
    """The four GEPA cells of the dev12 study (max_metric_calls=150, 20 examples as valset)."""
    estimate = gepa_estimate(valset_size=20, trainset_size=20, max_metric_calls=150)
    gepa = [r for r in _records() if r["method"] == "gepa"]
    assert len(gepa) == 4
    for record in gepa:
        assert abs(record["compile_follower_calls"] / estimate.follower.calls - 1) <= 0.10
        assert record["compile_generator_calls"] <= estimate.generator.calls == 22


def test_miprov2_rule_follows_dspys_settings() -> None:
    import math

    from dspy.teleprompt.mipro_optimizer_v2 import AUTO_RUN_SETTINGS

    estimate = miprov2_estimate(trainset_size=7, valset_size=13, auto="light")
    n = AUTO_RUN_SETTINGS["light"]["n"]
    trials = int(max(2 * 1 * math.log2(n), 1.5 * n))
    assert estimate.generator.calls == 10 + n + 2
    assert estimate.follower.calls == (trials + 1) * 13 + (n - 1) * 7
    big = miprov2_estimate(trainset_size=100, valset_size=300, auto="light")  # valset capped at 100, minibatched
    assert big.follower.calls == trials * 35 + (1 + trials // 5 + 1) * 100 + (n - 1) * 100
    with pytest.raises(ValueError, match="needs num_candidates and num_trials"):
        miprov2_estimate(trainset_size=7, valset_size=13, auto=None)


def test_the_runner_records_an_estimate_beside_each_measured_compile(data_dir, lms, tmp_path) -> None:  # noqa: F811
    """GEPA and MIPROv2 run for real at tiny budgets with fake LMs; Prompt-MII with several candidates."""
    out = tmp_path / "out"
    methods = ["naive", "promptmii_zero", "promptmii_zero:candidates=2", "gepa", "miprov2"]
    run_benchmark(config(data_dir, out, methods=methods), lms["endpoints"])
    records = [r for r in read_records(out) if r["status"] == "ok"]
    assert records
    for record in records:
        estimate = record["estimate"]
        assert set(estimate) >= {"calls", "generator_calls", "follower_calls", "tokens", "price", "counted_by"}
        assert estimate["price"] == "unknown" or record["method"] == "naive"
        if record["method"] == "naive":
            assert estimate["calls"] == 0 and record["compile_calls"] == 0
        elif record["method"].startswith("promptmii_zero"):
            assert estimate["generator_calls"] == record["compile_generator_calls"]
            assert estimate["follower_calls"] == record["compile_follower_calls"]
            assert record["compile_tokens"] <= estimate["tokens"]
        elif record["method"] == "gepa":  # budget 12 metric calls on 6 examples
            assert estimate["follower_calls"] == 12 and record["compile_follower_calls"] >= 12 - 3
            assert record["compile_generator_calls"] <= estimate["generator_calls"] == 1
        else:  # MIPROv2: 2 candidates, 2 trials, valset 4 (of 6), no minibatch
            # (2 trials + the default program) x 4 valset rows, and bootstrapping one set of demos
            # (the second of the 2 sets; the first is zero-shot) from at most the 2 trainset rows.
            assert estimate["follower_calls"] == (2 + 1) * 4 + 1 * 2
            assert (2 + 1) * 4 <= record["compile_follower_calls"] <= estimate["follower_calls"]
            assert estimate["generator_calls"] == 10 + 2 + 2
            assert record["compile_generator_calls"] <= estimate["generator_calls"]
    rows = estimate_rows(records)
    assert {r.method for r in rows} == set(methods)
    report = render_report(out, plot_name=None)
    assert "## Compile cost: estimated before compile vs measured" in report


# --- the command line ---------------------------------------------------------------------


@pytest.fixture
def task_file(tmp_path: Path) -> Path:
    path = tmp_path / "reviews.jsonl"
    path.write_text("".join(json.dumps({"text": ex.text, "label": ex.label}) + "\n" for ex in TRAIN))
    return path


def test_induce_dry_run_prints_the_estimate_and_calls_nothing(capsys, tmp_path, task_file, monkeypatch) -> None:
    from dspy_promptmii import routes

    def no_pool(*args, **kwargs):
        raise AssertionError("a dry run starts no LM pool")

    monkeypatch.setattr(routes.LMPool, "__init__", no_pool)
    out = tmp_path / "estimate.json"
    argv = ["induce", "--data", str(task_file), "--generator", "openai/gpt-4o-mini", "--n", "6", "--dry-run"]
    assert cli.main([*argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "dry run" in printed and "generator calls" in printed and "$" in printed
    data = json.loads(out.read_text())
    assert data["estimate"]["total"]["generator_calls"] == 1 and data["estimate"]["total"]["price_usd"] > 0

    assert cli.main(["induce", "--data", str(task_file), "--generator", "local", "--n", "6", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "unknown" in printed and "hosted_vllm/qwen2.5-coder-0.5b-instruct" in printed

    # a .gguf path is checked even in a dry run: a misspelled path is named, not estimated
    missing = tmp_path / "nowhere" / "model.gguf"
    assert cli.main(["induce", "--data", str(task_file), "--generator", str(missing), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("promptmii: error: ") and f"no model file at {missing}" in err


def test_the_demo_prints_the_estimate_beside_the_measured_compile(capsys, tmp_path, fake_pool) -> None:  # noqa: F811
    fake_pool()
    out_file = tmp_path / "demo.json"
    assert cli.main(["demo", "--test-rows", "10", "--n", "7", "--no-constrained", "--out", str(out_file)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out_file.read_text())
    estimate, measured = result["estimate"]["total"], result["measured"]
    assert estimate["generator_calls"] == measured["generator_calls"] == 1
    assert estimate["follower_calls"] == measured["follower_calls"] == 0
    # The fake generator reports words as tokens, and the demo counts with the same words
    # (plus the chat framing allowance): the meta-prompt is what was sent.
    assert estimate["prompt_tokens"] == measured["prompt_tokens"] + CHAT_FRAMING
    assert measured["completion_tokens"] <= estimate["completion_tokens"] == 224
    assert "compile, estimated before it: 1 generator + 0 follower calls" in printed
    assert "compile, measured:" in printed and "price unknown" in printed
