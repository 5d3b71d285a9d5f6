"""The benchmark runner with fake LMs: shared splits, resume, per-role accounting, and
every method (GEPA and MIPROv2 at tiny budgets included) end to end, offline."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest
from fakes import fake_lm, message_texts, word_count

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `pytest` run without the repository root on sys.path
    sys.path.insert(0, str(ROOT))

from benchmarks import cli, methods  # noqa: E402
from benchmarks.methods import (  # noqa: E402
    PROMPTMII_DEFAULTS,
    Budgets,
    MethodSpec,
    method_options,
    parse_method,
    train_val_split,
)
from benchmarks.runner import ConfigMismatch, Endpoints, RunConfig, make_protocol, run_benchmark  # noqa: E402
from benchmarks.store import ResultStore, cell_key, read_records  # noqa: E402
from benchmarks.tasks import make_split, resolve_tasks  # noqa: E402
from dspy_promptmii.data import load_task  # noqa: E402
from dspy_promptmii.generation import BUDGET_MARGIN, DEFAULT_MAX_INSTRUCTION_TOKENS  # noqa: E402
from dspy_promptmii.routes import Endpoint  # noqa: E402

ALL = ["naive", "icl", "promptmii_zero", "gepa", "miprov2"]
TINY = Budgets(gepa_metric_calls=12, miprov2_auto=None, miprov2_candidates=2, miprov2_trials=2, generator_max_tokens=64)
WORDS = {"pos": "great", "neg": "awful", "meh": "okay"}


# --- fakes ----------------------------------------------------------------------------


def make_tasks(root: Path) -> Path:
    """Two small tasks (single-text, 3 labels; text pair, 2 labels) and a SPLITS.json."""
    (root / "toy").mkdir(parents=True)
    rows = [{"text": f"row {i} was {WORDS[lab]}", "label": lab} for i, lab in enumerate(["pos", "neg", "meh"] * 16)]
    (root / "toy" / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "pairs").mkdir()
    rows = [
        {"text": f"claim {i} is {WORDS[lab]}", "text_pair": f"evidence {i}", "label": lab}
        for i, lab in enumerate(["pos", "neg"] * 20)
    ]
    (root / "pairs" / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "unused").mkdir()
    (root / "unused" / "data.jsonl").write_text(json.dumps({"text": "x", "label": "a"}) + "\n")
    (root / "SPLITS.json").write_text(json.dumps({"dev": ["toy", "pairs"], "train": ["unused"]}))
    return root


def follower_reply(request) -> str:
    """Right on 'great' and 'awful', wrong ('pos') on 'okay': GEPA has failures to reflect on."""
    last = message_texts(request.messages[-1])
    return "neg" if "awful" in last else "pos"


def generator_reply(request) -> str:
    """Answers DSPy's ChatAdapter and JSONAdapter prompts (GEPA, MIPROv2) with their output
    fields, and anything else (Prompt-MII's meta-prompt) with a plain instruction."""
    last = message_texts(request.messages[-1])
    chat = [f for f in re.findall(r"`\[\[ ## (\w+) ## \]\]`", last) if f != "completed"]
    if chat:
        return "\n\n".join(f"[[ ## {f} ## ]]\nSay pos for praise and neg for complaints." for f in chat) + (
            "\n\n[[ ## completed ## ]]"
        )
    fields = re.search(r"JSON object in the following order of fields: (.*)", last)
    if fields:
        return json.dumps(
            {f: "Say pos for praise and neg for complaints." for f in re.findall(r"`(\w+)`", fields.group(1))}
        )
    return "Instruction: decide whether the text praises (pos), complains (neg) or is lukewarm (meh)."


def endpoint(lm, route: str, context_tokens: int | None = 4096) -> Endpoint:
    return Endpoint(
        lm=lm,
        route=route,
        token_counter=word_count if context_tokens else None,
        context_tokens=context_tokens,
        constrained_style="json_schema",
    )


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return make_tasks(tmp_path / "datasets")


@pytest.fixture
def lms():
    follower, follower_engine = fake_lm(follower_reply, model="fake/follower")
    generator, generator_engine = fake_lm(generator_reply, model="fake/generator")
    return {
        "endpoints": Endpoints(
            follower=endpoint(follower, "fake/follower"), generator=endpoint(generator, "fake/generator")
        ),
        "follower": follower_engine,
        "generator": generator_engine,
    }


def config(data_dir: Path, out: Path, **overrides) -> RunConfig:
    values = dict(
        out=out,
        tasks=resolve_tasks(data_dir),
        n_values=[6],
        methods=list(ALL),
        test_rows=9,
        seed=0,
        follower_style="none",
        budgets=TINY,
        progress=False,
    )
    values.update(overrides)
    return RunConfig(**values)


def ok(out: Path) -> dict:
    return {cell_key(r): r for r in read_records(out) if r["status"] == "ok"}


# --- tasks and splits -----------------------------------------------------------------


def test_tasks_default_to_the_dev_list_and_missing_folders_are_named(
    data_dir: Path, tmp_path: Path, capsys, restore_logging
):
    assert [p.name for p in resolve_tasks(data_dir)] == ["toy", "pairs"]
    assert [p.name for p in resolve_tasks(data_dir, ["pairs"])] == ["pairs"]
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        resolve_tasks(missing)
    with pytest.raises(FileNotFoundError, match="nope"):
        resolve_tasks(data_dir, ["nope"])
    # before any LM is started: one line and exit 2, as every error of the command line
    assert cli.main(["run", "--data-dir", str(missing), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("benchmarks: error: ") and str(missing) in err


@pytest.mark.parametrize(
    "flags, hint",
    [
        (["--generator-trained", "promptmii-qwen2.5-05b"], "did you mean 'promptmii-qwen2.5-0.5b'"),
        (["--follower", "lokal"], "did you mean 'local'"),
        (["--methods", "naive,promptmii_zero:generator=nonsense-model"], "'nonsense-model'"),
    ],
)
def test_a_misspelled_model_is_refused_before_any_server_starts(data_dir, tmp_path, monkeypatch, capsys, flags, hint):
    from dspy_promptmii import routes

    def no_pool(**kwargs):
        raise AssertionError("an LM pool was set up for a route that cannot work")

    monkeypatch.setattr(routes, "LMPool", no_pool)
    out = tmp_path / "out"
    argv = ["run", "--data-dir", str(data_dir), "--out", str(out), "--test-rows", "9", "--n", "6", *flags]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("benchmarks: error: unknown model") and hint in err
    assert not out.exists()  # refused before --out is touched: no run.lock or run.log left behind


def test_speed_refuses_a_misspelled_generator_before_any_server_starts(tmp_path, monkeypatch, capsys):
    from dspy_promptmii import routes

    def no_pool(**kwargs):
        raise AssertionError("an LM pool was set up for a route that cannot work")

    monkeypatch.setattr(routes, "LMPool", no_pool)
    argv = ["speed", "--follower", "local", "--generator", "lcoal", "--out", str(tmp_path / "speed.json")]
    assert cli.main(argv) == 2
    assert "did you mean 'local'" in capsys.readouterr().err


def test_split_draws_test_rows_first_and_examples_as_a_stratified_prefix(data_dir: Path):
    task = load_task(data_dir / "toy")
    split = make_split(task, test_rows=9, seed=3)
    test_texts = {r["text"] for r in split.test_rows}
    assert len(test_texts) == 9 and not test_texts & {r["text"] for r in split.ordered_rows}
    five, ten = split.examples(5), split.examples(10)
    assert [e.text for e in ten[:5]] == [e.text for e in five]
    assert {e.label for e in split.examples(3)} == {"pos", "neg", "meh"}
    # The test rows do not depend on how many examples are asked for, and are seeded.
    assert make_split(task, 9, 3).test_rows == split.test_rows
    assert make_split(task, 9, 4).test_rows != split.test_rows
    assert split.split_id(5) != split.split_id(10)
    train, val = train_val_split(ten)
    assert (len(train), len(val)) == (4, 6) and not {e.text for e in train} & {e.text for e in val}


def test_every_method_sees_the_same_examples_and_test_rows_and_never_a_test_row_to_compile(data_dir, lms, tmp_path):
    out = tmp_path / "out"
    summary = run_benchmark(config(data_dir, out), lms["endpoints"])
    assert summary.status == "finished" and summary.by_status == {"ok": 10}
    records = ok(out)
    assert {(t, m) for t, _, m, _ in records} == {(t, m) for t in ("toy", "pairs") for m in ALL}
    for task_name in ("toy", "pairs"):
        assert len({r["split_id"] for r in records.values() if r["task"] == task_name}) == 1
        assert {r["test_rows"] for r in records.values()} == {9}

    for task_name in ("toy", "pairs"):
        split = make_split(load_task(data_dir / task_name), 9, 0)
        test_texts = [r["text"] for r in split.test_rows]
        example_texts = {r["text"] for r in split.ordered_rows[:6]}
        asked = [message_texts(req.messages[-1]) for req in lms["follower"].requests]
        # Each test row is labelled exactly once per method (compile never asks about it) ...
        for text in test_texts:
            assert sum(text in a for a in asked) == len(ALL), text
        # ... every other follower query during compile is one of the n examples ...
        other = task_name == "toy" and [a for a in asked if "row " in a and not any(t in a for t in test_texts)]
        for query in other or []:
            assert any(t in query for t in example_texts), query
        # ... and no generator prompt (Prompt-MII, GEPA reflection, MIPROv2 proposals) holds a test row.
        for request in lms["generator"].requests:
            prompt = "\n".join(message_texts(m) for m in request.messages)
            assert not any(re.search(rf"\b{re.escape(t)}\b", prompt) for t in test_texts)


def test_search_methods_really_search_at_a_tiny_budget(data_dir, lms, tmp_path):
    out = tmp_path / "out"
    run_benchmark(
        config(data_dir, out, methods=["gepa", "miprov2"], tasks=resolve_tasks(data_dir, ["toy"])), lms["endpoints"]
    )
    records = ok(out)
    gepa, mipro = records[("toy", 6, "gepa", 0)], records[("toy", 6, "miprov2", 0)]
    assert gepa["compile_generator_calls"] >= 1 and gepa["compile_follower_calls"] >= 4  # reflected, evaluated
    assert gepa["details"] == {"train": 6, "val": 6, "max_metric_calls": 12}  # every example in both roles
    assert mipro["compile_generator_calls"] >= 2 and mipro["compile_follower_calls"] >= 4
    assert "num_candidates=2" in mipro["details"]["budget"]
    # GEPA's reflection LM reads textual feedback: the gold label and what was predicted.
    prompts = ["\n".join(message_texts(m) for m in r.messages) for r in lms["generator"].requests]
    assert any("the correct label is" in p or "Correct: the label is" in p for p in prompts)


def test_method_options_are_parsed_and_refused_by_name():
    spec, options = parse_method("promptmii_zero:exemplars=2+max_instruction_tokens=160+candidates=4+demos=1")
    assert spec.name == "promptmii_zero"
    assert options == {"exemplars": 2, "max_instruction_tokens": 160, "candidates": 4, "demos": 1}
    assert parse_method("gepa:generator=qwen2.5-coder-1.5b-instruct")[1] == {"generator": "qwen2.5-coder-1.5b-instruct"}
    with pytest.raises(ValueError, match="unknown method 'gepaa'"):
        parse_method("gepaa")
    with pytest.raises(ValueError, match="method 'gepa' takes no option 'exemplars'"):
        parse_method("gepa:exemplars=2")
    with pytest.raises(ValueError, match="option candidates takes an integer"):
        parse_method("promptmii_zero:candidates=four")
    for bad in ("candidates=0", "max_prompt_tokens=0", "val_size=-1", "exemplars=-2"):  # the optimizer's rules
        with pytest.raises(ValueError, match=f"option {bad.split('=')[0]} must be an integer >= "):
            parse_method(f"promptmii_zero:{bad}")
    with pytest.raises(ValueError, match="is not name=value"):
        parse_method("promptmii_zero:exemplars")


def test_a_method_with_options_runs_under_its_full_name(data_dir, lms, tmp_path):
    out = tmp_path / "out"
    method = "promptmii_zero:exemplars=1+max_instruction_tokens=40+demos=2"
    library = [{"task": "other", "labels": ["x", "y"], "inputs": ["q"], "instruction": "Sort them.", "reward": 1}]
    import dspy_promptmii.optimizer as optimizer_module

    original = optimizer_module.load_library
    optimizer_module.load_library = lambda path=None: library
    try:
        run_benchmark(config(data_dir, out, methods=[method], tasks=resolve_tasks(data_dir, ["toy"])), lms["endpoints"])
    finally:
        optimizer_module.load_library = original
    [record] = ok(out).values()
    assert record["method"] == method and record["demos"] == 2
    assert record["details"]["exemplars"] == ["other"]
    assert record["options"] == {**PROMPTMII_DEFAULTS, "exemplars": 1, "max_instruction_tokens": 40, "demos": 2}
    with pytest.raises(ValueError, match="takes no option"):
        run_benchmark(config(data_dir, tmp_path / "o2", methods=["icl:demos=2"]), lms["endpoints"])


def test_a_remote_generator_gets_the_meta_prompt_budget_its_method_names(data_dir, tmp_path):
    """A remote generator's context is unknown to the run (no token counter, no context size):
    ``max_prompt_tokens`` in the method name fits its meta-prompt (counted by LiteLLM's counter),
    as a local server's room does."""
    follower, _ = fake_lm(follower_reply, model="fake/follower")
    generator, engine = fake_lm(generator_reply, model="fake/generator")
    endpoints = Endpoints(follower=endpoint(follower, "fake/follower"), generator=endpoint(generator, "fake/generator"))
    tasks = resolve_tasks(data_dir, ["toy"])

    def prompt_words() -> int:
        return sum(word_count(message_texts(message)) for message in engine.requests[-1].messages)

    run_benchmark(config(data_dir, tmp_path / "wide", methods=["promptmii_zero"], tasks=tasks), endpoints)
    wide_words = prompt_words()
    method = f"promptmii_zero:max_prompt_tokens={wide_words * 6 // 7}"  # less than it took: some examples must go
    run_benchmark(config(data_dir, tmp_path / "fit", methods=[method], tasks=tasks), endpoints)
    [wide] = ok(tmp_path / "wide").values()
    [fit] = ok(tmp_path / "fit").values()
    assert fit["options"]["max_prompt_tokens"] == wide_words * 6 // 7 and "max_prompt_tokens" not in wide["options"]
    assert fit["n_used"] < wide["n_used"] and prompt_words() < wide_words  # examples left out to fit


# --- accounting ------------------------------------------------------------------------


@pytest.mark.parametrize("method", ALL)
def test_compile_calls_and_tokens_are_counted_per_role(data_dir, tmp_path, method):
    follower, follower_engine = fake_lm(follower_reply, model="fake/follower", usage=(10, 1))
    generator, generator_engine = fake_lm(generator_reply, model="fake/generator", usage=(100, 20))
    endpoints = Endpoints(follower=endpoint(follower, "fake/follower"), generator=endpoint(generator, "fake/generator"))
    out = tmp_path / "out"
    started = time.perf_counter()
    run_benchmark(config(data_dir, out, methods=[method], tasks=resolve_tasks(data_dir, ["toy"])), endpoints)
    wall = time.perf_counter() - started
    (record,) = ok(out).values()

    assert record["compile_generator_calls"] == generator_engine.calls
    assert record["compile_follower_calls"] + record["eval_calls"] == follower_engine.calls
    assert record["eval_calls"] == 9 and record["prompt_tokens_per_query"] == 10
    assert record["compile_calls"] == record["compile_generator_calls"] + record["compile_follower_calls"]
    assert record["compile_generator_prompt_tokens"] == 100 * record["compile_generator_calls"]
    assert record["compile_generator_completion_tokens"] == 20 * record["compile_generator_calls"]
    assert record["compile_follower_prompt_tokens"] == 10 * record["compile_follower_calls"]
    assert record["compile_tokens"] == 120 * record["compile_generator_calls"] + 11 * record["compile_follower_calls"]
    expected_generator_calls = {"naive": 0, "icl": 0, "promptmii_zero": 1}
    if method in expected_generator_calls:
        assert record["compile_generator_calls"] == expected_generator_calls[method]
        assert record["compile_follower_calls"] == 0
    else:
        assert record["compile_generator_calls"] >= 1 and record["compile_follower_calls"] >= 4
    # Times are this cell's own: at most the run's wall time, and the evaluation's calls take some.
    assert 0 <= record["compile_seconds"] + record["eval_seconds"] <= wall and record["eval_seconds"] > 0
    assert record["instruction"]
    # Each role got only its own kind of request: the follower labels inputs, the
    # generator writes (GEPA's reflections, MIPROv2's proposals go through DSPy adapters).
    for request in follower_engine.requests:
        text = "\n".join(message_texts(m) for m in request.messages)
        assert "[[ ## " not in text and "JSON object" not in text and "Input: row" in text
    # Prompt-MII's meta-prompt shows the examples; GEPA's reflections and MIPROv2's proposals
    # get DSPy's own prompts, never the follower's inputs.
    shows = {"promptmii_zero": True}.get(method.split(":")[0], False)
    for request in generator_engine.requests:
        assert ("Input: row" in message_texts(request.messages[-1])) is shows, method


def test_n_used_icl_fits_the_context_and_promptmii_reports_its_n(data_dir, lms, tmp_path):
    follower, _ = fake_lm(follower_reply, model="fake/follower")
    generator, _ = fake_lm(generator_reply, model="fake/generator")
    # About 30 words of prompt plus 4 per demo: a 60-word context fits a few demos, not all 20.
    endpoints = Endpoints(
        follower=endpoint(follower, "fake/follower", 60 + 64 + 8 * 20), generator=endpoint(generator, "g")
    )
    out = tmp_path / "out"
    run_benchmark(
        config(data_dir, out, n_values=[20], methods=["icl", "promptmii_zero"], tasks=resolve_tasks(data_dir, ["toy"])),
        endpoints,
    )
    records = ok(out)
    icl, pmii = records[("toy", 20, "icl", 0)], records[("toy", 20, "promptmii_zero", 0)]
    assert 0 < icl["n_used"] < 20 and icl["demos"] == icl["n_used"]
    assert pmii["n_used"] == 20 and pmii["details"]["template"] == "meta2"
    # A route that gives no token counter: no fit, all n shown.
    out2 = tmp_path / "out2"
    endpoints = Endpoints(follower=endpoint(follower, "fake/follower", None), generator=endpoint(generator, "g", None))
    run_benchmark(
        config(data_dir, out2, n_values=[20], methods=["icl"], tasks=resolve_tasks(data_dir, ["toy"])), endpoints
    )
    assert ok(out2)[("toy", 20, "icl", 0)]["n_used"] == 20


def test_promptmii_needs_a_trained_generator_and_uses_it(data_dir, lms, tmp_path):
    out = tmp_path / "out"
    summary = run_benchmark(config(data_dir, out, methods=["promptmii"]), lms["endpoints"])
    assert summary.cells_total == 0 and "skipped" in summary.notes[0]
    assert "skipped" in json.loads((out / "manifest.json").read_text())["notes"][0]

    trained, trained_engine = fake_lm("Label praise pos, complaints neg, lukewarm meh.", model="fake/trained")
    endpoints = Endpoints(**{**lms["endpoints"].__dict__, "trained": endpoint(trained, "fake/trained")})
    run_benchmark(config(data_dir, tmp_path / "out2", methods=["promptmii"]), endpoints)
    records = ok(tmp_path / "out2")
    assert trained_engine.calls == 2 and lms["generator"].calls == 0
    assert {r["generator"] for r in records.values()} == {"fake/trained"}
    assert all(r["instruction"].startswith("Label praise pos") for r in records.values())


# --- resume -----------------------------------------------------------------------------


def test_an_interrupted_run_resumes_and_skips_finished_cells(data_dir, lms, tmp_path, monkeypatch):
    out = tmp_path / "out"
    cfg = config(data_dir, out, methods=["naive", "icl", "promptmii_zero"], n_values=[3, 6])
    real = dict(methods.METHODS)
    calls: list[tuple[str, int]] = []

    def spy(name, crash_at=None):
        def compile(ctx):
            calls.append((name, len(ctx.examples)))
            if crash_at is not None and len(calls) == crash_at:
                raise KeyboardInterrupt  # Ctrl-C in the middle of a cell
            return real[name].compile(ctx)

        return MethodSpec(name, compile, real[name].generator)

    for name in ("naive", "icl"):
        monkeypatch.setitem(methods.METHODS, name, spy(name))
    monkeypatch.setitem(methods.METHODS, "promptmii_zero", spy("promptmii_zero", crash_at=6))
    summary = run_benchmark(cfg, lms["endpoints"])
    assert summary.status == "interrupted" and summary.cells_run == 5
    finished = ok(out)
    assert len(finished) == 5
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["runs"][-1]["status"] == "interrupted"
    # A crash in the middle of writing a record leaves a torn line: it is ignored.
    with (out / "results.jsonl").open("a") as handle:
        handle.write('{"task": "toy", "n": 6, "method": "na')

    calls.clear()
    monkeypatch.setitem(methods.METHODS, "promptmii_zero", spy("promptmii_zero"))
    summary = run_benchmark(cfg, lms["endpoints"])
    assert summary.status == "finished" and summary.cells_already_done == 5 and summary.cells_run == 7
    assert len(calls) == 7  # only the unfinished cells compiled again
    records = read_records(out)
    assert len(records) == 12 and len(ok(out)) == 12  # each cell once, the torn line skipped
    assert {k: v["finished_at"] for k, v in finished.items()} == {k: ok(out)[k]["finished_at"] for k in finished}
    assert [r["status"] for r in json.loads((out / "manifest.json").read_text())["runs"]] == ["interrupted", "finished"]

    summary = run_benchmark(cfg, lms["endpoints"])  # nothing left to do
    assert summary.cells_run == 0 and len(read_records(out)) == 12


def test_a_bare_method_name_means_the_optimizers_defaults_and_every_record_stores_its_options(
    data_dir, lms, tmp_path
):
    out = tmp_path / "out"
    run_benchmark(config(data_dir, out, methods=["naive", "promptmii_zero"], tasks=resolve_tasks(data_dir, ["toy"])),
                  lms["endpoints"])
    records = ok(out)
    assert records[("toy", 6, "naive", 0)]["options"] == {}
    pmii = records[("toy", 6, "promptmii_zero", 0)]
    assert pmii["options"] == method_options("promptmii_zero") == PROMPTMII_DEFAULTS
    assert PROMPTMII_DEFAULTS["max_instruction_tokens"] == DEFAULT_MAX_INSTRUCTION_TOKENS
    assert method_options("promptmii_zero:max_instruction_tokens=none")["max_instruction_tokens"] is None
    # The optimizer's default budget: asked for in words, and the reply capped at it.
    assert "Keep it under 120 words" in lms["generator"].prompt(0)
    assert lms["generator"].configs[0].max_tokens == DEFAULT_MAX_INSTRUCTION_TOKENS + BUDGET_MARGIN


def test_an_old_record_means_what_its_name_meant_and_a_resumed_old_run_keeps_that_meaning(data_dir, lms, tmp_path):
    out = tmp_path / "out"
    tasks = resolve_tasks(data_dir, ["toy"])
    run_benchmark(config(data_dir, out, methods=["promptmii_zero"], n_values=[3], tasks=tasks), lms["endpoints"])
    # Make it a folder written before records stored their options (the bare name then
    # meant no instruction budget); its config_id and cell keys are the same as before.
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    for line in lines:
        del line["options"]
    (out / "results.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    [old] = read_records(out)
    assert old["options"] == {**PROMPTMII_DEFAULTS, "max_instruction_tokens": None}
    calls = lms["generator"].calls

    summary = run_benchmark(config(data_dir, out, methods=["promptmii_zero"], n_values=[3, 6], tasks=tasks),
                            lms["endpoints"])
    assert summary.cells_already_done == 1 and summary.cells_run == 1  # the finished cell is not redone
    assert lms["generator"].calls == calls + 1
    assert any("no longer means" in note for note in summary.notes)
    new = ok(out)[("toy", 6, "promptmii_zero", 0)]
    assert new["options"] == old["options"]  # one name, one meaning in this folder
    assert "words" not in lms["generator"].prompt(calls) and lms["generator"].configs[calls].max_tokens == 64
    assert ok(out)[("toy", 3, "promptmii_zero", 0)]["finished_at"] == old["finished_at"]


def test_a_record_of_the_old_include_naive_default_keeps_its_meaning(data_dir, lms, tmp_path):
    """Until 2026-12-06 records stored include_naive=True for a bare name (then: naive
    scored with candidates > 1 only); that is None now, not a naive check, so a resumed
    old run goes on without follower calls and without a note."""
    out = tmp_path / "out"
    tasks = resolve_tasks(data_dir, ["toy"])
    run_benchmark(config(data_dir, out, methods=["promptmii_zero"], n_values=[3], tasks=tasks), lms["endpoints"])
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    for line in lines:
        assert line["options"]["include_naive"] is None
        line["options"]["include_naive"] = True  # as the old default was stored
    (out / "results.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    [old] = read_records(out)
    assert old["options"] == method_options("promptmii_zero")

    summary = run_benchmark(config(data_dir, out, methods=["promptmii_zero"], n_values=[3, 6], tasks=tasks),
                            lms["endpoints"])
    assert summary.cells_run == 1 and not any("no longer means" in note for note in summary.notes)
    new = ok(out)[("toy", 6, "promptmii_zero", 0)]
    assert new["options"]["include_naive"] is None and new["compile_follower_calls"] == 0
    # A name that sets it keeps what it set.
    assert method_options("promptmii_zero:include_naive=true")["include_naive"] is True
    assert method_options("promptmii_zero:include_naive=none")["include_naive"] is None
    with pytest.raises(ValueError, match="option include_naive takes true, false or none, got 'maybe'"):
        method_options("promptmii_zero:include_naive=maybe")


def test_committed_records_keep_the_meaning_their_names_had():
    folder = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "dev12-2026-11-29"
    options = {r["method"]: r["options"] for r in read_records(folder)}
    assert options["promptmii_zero"]["max_instruction_tokens"] is None
    assert options["promptmii_zero:max_instruction_tokens=160"] == method_options("promptmii_zero")
    assert options["naive"] == {}


def test_a_run_killed_without_recording_its_end_is_marked_died_by_the_next_run(data_dir, lms, tmp_path):
    out = tmp_path / "out"
    cfg = config(data_dir, out, methods=["naive"], n_values=[3])
    run_benchmark(cfg, lms["endpoints"])
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["runs"][-1].update(status="running", finished=None)  # as kill -9 leaves it
    manifest_path.write_text(json.dumps(manifest))
    run_benchmark(cfg, lms["endpoints"])
    runs = json.loads(manifest_path.read_text())["runs"]
    assert [r["status"] for r in runs] == ["died", "finished"]
    assert "killed" in runs[0]["note"]


def test_machinery_errors_are_recorded_and_retried_method_failures_are_not(data_dir, lms, tmp_path, monkeypatch):
    out = tmp_path / "out"
    cfg = config(data_dir, out, methods=["naive", "promptmii_zero"], tasks=resolve_tasks(data_dir, ["toy"]))

    def broken(ctx):
        raise ConnectionError("server went away")

    monkeypatch.setitem(methods.METHODS, "naive", MethodSpec("naive", broken, None))
    empty, _ = fake_lm("```\n```", model="fake/generator")  # an instruction that cleans to nothing
    endpoints = Endpoints(follower=lms["endpoints"].follower, generator=endpoint(empty, "fake/generator"))
    summary = run_benchmark(cfg, endpoints)
    assert summary.by_status == {"error": 1, "failed": 1}
    statuses = {r["method"]: r for r in read_records(out)}
    assert "ConnectionError" in statuses["naive"]["error"]
    assert "GenerationError" in statuses["promptmii_zero"]["error"]

    monkeypatch.setitem(methods.METHODS, "naive", MethodSpec("naive", methods.compile_naive, None))
    summary = run_benchmark(cfg, endpoints)
    assert summary.cells_run == 1 and summary.by_status == {"ok": 1}  # the error is retried, the failure kept
    assert ResultStore(out).finished() == {("toy", 6, "naive", 0), ("toy", 6, "promptmii_zero", 0)}


def test_other_settings_in_the_same_folder_are_refused(data_dir, lms, tmp_path):
    out = tmp_path / "out"
    run_benchmark(config(data_dir, out, methods=["naive"]), lms["endpoints"])
    with pytest.raises(ConfigMismatch, match="test_rows"):
        run_benchmark(config(data_dir, out, methods=["naive"], test_rows=5), lms["endpoints"])
    # More tasks, n or methods under the same settings are fine.
    run_benchmark(config(data_dir, out, methods=["naive", "icl"], n_values=[3, 6]), lms["endpoints"])
    assert len(ok(out)) == 8


def test_manifest_records_versions_models_adapter_and_preset(data_dir, lms, tmp_path):
    out = tmp_path / "out"
    cfg = config(data_dir, out, methods=["naive"], preset={"name": "quick", "description": "d", "values": {}})
    started = time.perf_counter()
    run_benchmark(cfg, lms["endpoints"])
    wall = time.perf_counter() - started
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["versions"]["dspy"] and "dspy-promptmii" in manifest["versions"]
    assert manifest["models"]["follower"]["route"] == "fake/follower"
    assert manifest["adapter"] == {**manifest["adapter"], "kind": "label", "demos": "turns", "constrained": False}
    assert manifest["preset"]["name"] == "quick" and manifest["seeds"] == [0]
    assert manifest["runs"][0]["machine"]["cpu_count"] >= 1
    assert 0 <= manifest["runs"][0]["wall_seconds"] <= round(wall, 1) + 0.1  # the run's own time, to 0.1 s


def test_chat_adapter_runs_every_method_through_dspy_chat_prompts(data_dir, lms, tmp_path):
    def chat_follower(request) -> str:
        return "[[ ## label ## ]]\n" + follower_reply(request) + "\n\n[[ ## completed ## ]]"

    follower, engine = fake_lm(chat_follower, model="fake/follower")
    endpoints = Endpoints(follower=endpoint(follower, "fake/follower"), generator=lms["endpoints"].generator)
    out = tmp_path / "out"
    run_benchmark(
        config(data_dir, out, methods=["naive", "icl"], adapter="chat", tasks=resolve_tasks(data_dir, ["toy"])),
        endpoints,
    )
    records = ok(out)
    assert {r["invalid_rate"] for r in records.values()} == {0.0}
    assert all("[[ ## text ## ]]" in message_texts(r.messages[-1]) for r in engine.requests)
    assert json.loads((out / "manifest.json").read_text())["adapter"]["kind"] == "chat"


def test_a_local_server_that_died_stops_the_run_with_its_cause(data_dir, lms, tmp_path, restore_logging):
    from dspy_promptmii.local.server import LocalServer, ServerError

    server = LocalServer(tmp_path / "never-started.gguf")  # the runner reads its failure

    def dying_follower(request) -> str:
        server.failure = ServerError("the llama.cpp server of m stopped on its own (killed by signal SIGSEGV)")
        return follower_reply(request)

    follower, _ = fake_lm(dying_follower, model="fake/follower")
    follower_endpoint = endpoint(follower, "fake/follower")
    follower_endpoint.server = server
    endpoints = Endpoints(follower=follower_endpoint, generator=lms["endpoints"].generator)
    out = tmp_path / "out"
    with pytest.raises(ServerError, match="stopped on its own"):  # the CLI's one-line error
        run_benchmark(
            config(data_dir, out, methods=["naive", "icl"], tasks=resolve_tasks(data_dir, ["toy"])), endpoints
        )
    assert [r["status"] for r in read_records(out)] == ["ok"]  # its cell is kept; no cell of connection errors
    run = json.loads((out / "manifest.json").read_text())["runs"][-1]
    assert run["status"] == "error" and run["cells_run"] == 1
    assert run["error"].startswith("ServerError: the llama.cpp server of m stopped on its own")


def test_quick_preset_fills_only_what_was_not_typed():
    args = cli.build_parser().parse_args(["run", "--quick", "--n", "5"])
    values = cli._resolved(args)
    assert values["n"] == "5" and values["test_rows"] == cli.QUICK["test_rows"]
    assert {"gepa", "miprov2"} & set(values["methods"].split(","))
    assert values["gepa_metric_calls"] < cli.DEFAULTS["gepa_metric_calls"]
    plain = cli._resolved(cli.build_parser().parse_args(["run"]))
    assert plain == cli.DEFAULTS


@pytest.mark.parametrize(
    ("flags", "style"),
    [([], "endpoint"), (["--constrained", "none"], "none"), (["--no-constrained"], "none"),
     (["--constrained", "grammar"], "grammar"), (["--constrained", "auto"], "endpoint")],
)
def test_the_constrained_flags_name_the_follower_style(flags, style):
    assert cli._follower_style(cli.build_parser().parse_args(["run", *flags])) == style


def test_run_config_follower_style_and_its_deprecated_spelling():
    endpoint_ = Endpoint(lm=None, route="r", token_counter=None, context_tokens=None, constrained_style="grammar")
    base = dict(out=Path("o"), tasks=[], n_values=[1], methods=["naive"])
    assert make_protocol(RunConfig(**base), endpoint_).constrained == "grammar"
    assert make_protocol(RunConfig(**base, follower_style="none"), endpoint_).constrained is False
    assert make_protocol(RunConfig(**base, follower_style="json_object"), endpoint_).constrained == "json_object"
    for old, new in ((True, "endpoint"), (False, "none"), ("choice", "choice")):
        with pytest.warns(DeprecationWarning, match="follower_style"):
            config = RunConfig(**base, constrained=old)
        assert config.follower_style == new and config.constrained is None
    with pytest.raises(ValueError, match="follower_style must be one of"):
        RunConfig(**base, follower_style="json")


def test_follower_reply_limit_defaults_by_adapter():
    parse = cli.build_parser().parse_args
    assert cli._follower_max_tokens(parse(["run"])) is None  # LabelAdapter: the protocol's limit per label set
    assert cli._follower_max_tokens(parse(["run", "--adapter", "chat"])) == 128  # room for its field markers
    assert cli._follower_max_tokens(parse(["run", "--adapter", "chat", "--follower-max-tokens", "40"])) == 40


@pytest.mark.parametrize("flag", ["--test-rows", "--gepa-metric-calls", "--follower-max-tokens", "--threads"])
def test_count_flags_refuse_zero_before_anything_runs(capsys, flag):
    with pytest.raises(SystemExit) as exited:
        cli.main(["run", flag, "0"])
    assert exited.value.code == 2
    assert f"argument {flag}: expected an integer >= 1, got 0" in capsys.readouterr().err


def test_descriptions_reach_the_signature_and_the_configuration(data_dir, lms, tmp_path):
    notes = {"toy": {"task": "Sort toy rows.", "text": "a toy row", "label": "the toy's class"}}
    out = tmp_path / "out"
    run_benchmark(
        config(data_dir, out, methods=["naive", "promptmii_zero"], tasks=resolve_tasks(data_dir, ["toy"]),
               descriptions=notes),
        lms["endpoints"],
    )
    asked = [message_texts(req.messages[-1]) for req in lms["follower"].requests]
    assert any("- Input: a toy row\n- Label: the toy's class" in a for a in asked)
    prompts = ["\n".join(message_texts(m) for m in r.messages) for r in lms["generator"].requests]
    assert any("Sort toy rows." in p for p in prompts)
    manifest = ResultStore(out).read_manifest()
    assert manifest["settings"]["descriptions"] == notes


def test_a_descriptions_file_is_checked(tmp_path):
    bad = tmp_path / "d.json"
    bad.write_text('{"tasks": {"toy": {"labels": "x"}}}', encoding="utf-8")
    with pytest.raises(SystemExit, match="has keys"):
        cli._read_descriptions(str(bad))
    assert cli._read_descriptions(str(ROOT / "benchmarks" / "task_descriptions.json"))["snips"]["label"]
