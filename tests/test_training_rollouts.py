"""``python -m training.rollouts`` with a fake generator (tests/fakes.py) and a fake follower
(httpx MockTransport) on a tiny datasets folder made here: contexts drawn exactly as
``training.build_data`` draws them, k seeded samples per context scored by the reward code,
the naive baseline, append-only records that survive a kill (a torn line is cut off, the
finished contexts are skipped), the refusal of changed settings/data/generator, and every
option checked before any server starts."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.rollout_fakes import GOOD, TRAIN_TASKS, Fakes, follower_reply, make_datasets

from dspy_promptmii.generation import budget_limit
from dspy_promptmii.local.registry import DEFAULT_MODEL, REGISTRY
from dspy_promptmii.local.server import FOLLOWER_STYLE
from dspy_promptmii.protocol import NAIVE_INSTRUCTION
from training import build_data, rollouts
from training.rollouts import RolloutConfig, sample_seed
from training.runlog import JsonlLog
from training.sources import load_local_tasks, resolve_task_paths
from training.tokens import ApproxCounter


@pytest.fixture()
def datasets(tmp_path: Path) -> Path:
    return make_datasets(tmp_path / "datasets")


@pytest.fixture()
def fakes(monkeypatch) -> Fakes:
    made = Fakes()
    monkeypatch.setattr(rollouts, "open_endpoints", made.open_endpoints)
    return made


def _main(datasets: Path, out: Path, *extra: str) -> int:
    return rollouts.main(["--datasets", str(datasets), "--out", str(out), "--no-progress", "--samples", "3",
                          "--valid-tasks", "weather_west", *extra])


def _records(out: Path) -> list[dict[str, Any]]:
    return JsonlLog(out / "rollouts.jsonl").read()


# --- what a run writes ---------------------------------------------------------------------------------


def test_contexts_are_drawn_as_build_data_draws_them_and_scored_by_the_reward(datasets, tmp_path, fakes) -> None:
    out = tmp_path / "run"
    assert _main(datasets, out) == 0
    records = _records(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(records) == manifest["settings"]["plan"]["contexts"]
    # The same lines build_data writes for the same tasks, seed and settings.
    tasks = load_local_tasks(resolve_task_paths(
        TRAIN_TASKS, datasets.resolve()))
    dev = [t for t, _ in load_local_tasks(resolve_task_paths(["dev_weather"], datasets))]
    config = RolloutConfig(samples=3, valid_tasks=("weather_west",), constrained=FOLLOWER_STYLE)
    built = build_data.build(tasks, config.build_config(), ApproxCounter(), eval_tasks=dev,
                             valid_tasks=["weather_west"], progress=False)
    expected = {f"train|{r['label']['task']}|{r['label']['n_shot']}|{r['label']['repeat']}": r for r in built.train}
    assert {r["key"] for r in records} == set(expected)
    for record in records:
        line = expected[record["key"]]
        assert record["meta_prompt"] == line["prompt"][0]["content"] and record["label"] == line["label"]
        assert record["status"] == "ok" and record["split"] == "train" and len(record["samples"]) == 3
        assert record["naive"]["instruction"] == NAIVE_INSTRUCTION
        assert record["generator"] == {"kind": "local", "model": DEFAULT_MODEL,
                                       "base_sha256": REGISTRY[DEFAULT_MODEL].sha256, "adapter": None,
                                       "adapter_sha256": None}
        assert record["protocol"]["constrained"] == FOLLOWER_STYLE  # auto: the embedded follower's style
        assert [s["seed"] for s in record["samples"]] == [sample_seed(0, record["key"], i) for i in range(3)]
    assert "ids_task" in {r["task"] for r in records}  # opaque id labels are drawn too
    assert "dev_weather" not in {r["task"] for r in records}
    assert {r["task"] for r in records}.isdisjoint(built.summary["tasks"]["valid"])
    # Every sample was generated at temperature 1.0 with its own seed and compile's limit.
    configs = fakes.engine.configs
    assert {c.temperature for c in configs} == {1.0} and {c.max_tokens for c in configs} == {budget_limit(160)}
    assert len({c.seed for c in configs}) == len(configs)
    # The reward: the good instruction is right on the weather tasks, the guess is not.
    weather = [s for r in records if r["task"].startswith("weather") for s in r["samples"]]
    good = [s["reward"] for s in weather if s["instruction"] == GOOD]
    guess = [s["reward"] for s in weather if s["instruction"] != GOOD]
    assert good and min(good) == 1.0 and max(guess) < 0.5
    summary = json.loads((out / "summary.json").read_text())
    assert summary["contexts"] == len(records) and summary["any_beat_naive"] > 0


def test_a_rerun_asks_for_the_same_samples(datasets, tmp_path, fakes) -> None:
    assert _main(datasets, tmp_path / "a", "--limit", "2") == 0
    first = [(c.seed, c.temperature) for c in fakes.engine.configs]
    prompts = [fakes.engine.prompt(i) for i in range(len(fakes.engine.requests))]
    fakes.engine.requests.clear()
    assert _main(datasets, tmp_path / "b", "--limit", "2") == 0
    assert [(c.seed, c.temperature) for c in fakes.engine.configs] == first
    assert [fakes.engine.prompt(i) for i in range(len(fakes.engine.requests))] == prompts


def test_a_killed_run_resumes_without_redoing_or_tearing(datasets, tmp_path, fakes) -> None:
    out = tmp_path / "run"
    # Killed in the middle of the third context (the generator raises what Ctrl-C / SIGTERM raise).
    fakes.replies = lambda n: KeyboardInterrupt() if n == 7 else GOOD
    assert _main(datasets, out) == 130
    assert len(_records(out)) == 2  # the context in flight is lost, the two finished ones are kept
    # A kill in the middle of a write leaves a torn last line.
    with (out / "rollouts.jsonl").open("ab") as handle:
        handle.write(b'{"version": 1, "status": "ok", "key": "train|weather_north|5|0", "samp')
    fakes.replies = lambda n: GOOD
    fakes.calls = 0
    assert _main(datasets, out) == 0
    lines = (out / "rollouts.jsonl").read_bytes().split(b"\n")
    assert lines[-1] == b"" and all(json.loads(line) for line in lines[:-1])  # no torn line kept
    records = _records(out)
    planned = json.loads((out / "manifest.json").read_text())["settings"]["plan"]["contexts"]
    assert len(records) == planned and len({r["key"] for r in records}) == planned
    assert fakes.calls == (planned - 2) * 3  # the finished contexts were not sampled again
    # A third run has nothing left to do.
    fakes.calls = 0
    assert _main(datasets, out) == 0 and fakes.calls == 0


def test_follower_failures_are_recorded_as_errors_and_run_again(datasets, tmp_path, fakes) -> None:
    out = tmp_path / "run"
    fakes.handler = lambda request: httpx.Response(500, text="down")
    assert _main(datasets, out, "--limit", "1") == 0
    [record] = _records(out)
    assert record["status"] == "error" and record["naive"]["follower_error"]
    fakes.handler = follower_reply
    assert _main(datasets, out, "--limit", "1") == 0
    records = _records(out)
    assert [r["status"] for r in records] == ["error", "ok"] and records[0]["key"] == records[1]["key"]


@pytest.mark.parametrize(
    "change, differing",
    [
        (["--samples", "4"], "config.samples"),
        (["--temperature", "0.7"], "config.temperature"),
        (["--seed", "1"], "config.seed"),
        (["--constrained", "grammar"], "protocol.constrained"),
        (["--lora", "{adapter}"], "generator.adapter"),
    ],
)
def test_a_restart_with_other_settings_or_generator_is_refused(datasets, tmp_path, fakes, change, differing):
    out = tmp_path / "run"
    assert _main(datasets, out, "--limit", "1") == 0
    adapter = tmp_path / "adapter.gguf"
    adapter.write_bytes(b"GGUF adapter")
    with pytest.raises(SystemExit, match=rf"differing: .*{differing}.*pass another --out"):
        _main(datasets, out, *[c.format(adapter=adapter) for c in change])
    assert len(fakes.opened) == 1  # refused before any server


def test_a_restart_on_changed_data_is_refused(datasets, tmp_path, fakes) -> None:
    out = tmp_path / "run"
    assert _main(datasets, out, "--limit", "1") == 0
    data = datasets / "weather_east" / "data.jsonl"
    data.write_text(data.read_text().replace("Report 59", "Report fifty-nine"))
    with pytest.raises(SystemExit, match=r"data\.tasks\.weather_east"):
        _main(datasets, out)
    # Limits and task filters are not settings: they choose what runs now.
    data.write_text(data.read_text().replace("Report fifty-nine", "Report 59"))
    assert _main(datasets, out, "--limit", "1", "--tasks", "ids_task") == 0
    assert _records(out)[-1]["task"] == "ids_task"


def test_the_validation_split_is_greedy_on_held_out_tasks(datasets, tmp_path, fakes) -> None:
    out = tmp_path / "valid"
    assert _main(datasets, out, "--split", "valid", "--samples", "1") == 0
    records = _records(out)
    train = json.loads((out / "manifest.json").read_text())["settings"]
    assert records and {r["split"] for r in records} == {"valid"}
    assert all(len(r["samples"]) == 1 and r["samples"][0]["temperature"] == 0.0 for r in records)
    assert {c.temperature for c in fakes.engine.configs} == {0.0}
    assert {r["n_shot"] for r in records} <= {5, 20} and train["config"]["split"] == "valid"
    train_out = tmp_path / "train"
    assert _main(datasets, train_out) == 0
    assert {r["task"] for r in records}.isdisjoint({r["task"] for r in _records(train_out)})


def test_the_follower_style_is_a_protocol_option(datasets, tmp_path, fakes) -> None:
    seen = []

    def follower(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        return httpx.Response(200, json={"choices": [{"message": {"content": "sunny"}}]})

    fakes.handler = follower
    assert _main(datasets, tmp_path / "run", "--limit", "1", "--constrained", "grammar") == 0
    assert seen and all("grammar" in body and "response_format" not in body for body in seen)
    assert _records(tmp_path / "run")[0]["protocol"]["constrained"] == "grammar"


# --- options are checked before any server -------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, problem",
    [
        (["--temperature", "-1"], "temperature must be a finite number >= 0"),
        (["--temperature", "nan"], "temperature must be a finite number >= 0"),
        (["--temperature", "0", "--samples", "6"], "would be the same reply"),
        (["--lora", "{tmp}/missing.gguf"], "no model file at"),
        (["--lora", "{notgguf}"], "is not a GGUF model file"),
        (["--generator", "{tmp}/missing.gguf"], "no model file at"),
        (["--generator", "lcoal"], "unknown model 'lcoal': did you mean 'local'?"),
        (["--generator", "promptmii-qwen2.5-05b"], "did you mean 'promptmii-qwen2.5-0.5b'?"),
        (["--follower", "Local"], "did you mean 'local'?"),
        (["--generator-url", "http://x/v1"], "--generator-url needs --generator NAME"),
        (["--generator", "m", "--generator-url", "http://x/v1", "--lora", "{notgguf}"], "embedded server only"),
        (["--generator-base-sha256", "abc"], "declare an endpoint's weights"),
        (["--out", "{notgguf}"], "it is a file"),
        (["--tasks", "dev_weather"], "dev_weather is a dev task"),
        (["--tasks", "nowhere"], "nowhere is not a train task"),
        (["--split", "valid", "--samples", "1", "--valid-tasks", "--valid-fraction", "0"], "needs held-out tasks"),
        (["--valid-tasks", "nope"], "not being built"),
        (["--datasets", "{tmp}"], "no SPLITS.json"),
    ],
)
def test_options_are_checked_before_any_server(datasets, tmp_path, fakes, extra, problem) -> None:
    not_gguf = tmp_path / "file.bin"
    not_gguf.write_bytes(b"PK zip")
    argv = [a.format(tmp=tmp_path, notgguf=not_gguf) for a in extra]
    with pytest.raises(SystemExit) as stop:
        _main(datasets, tmp_path / "run", *argv)
    assert problem in str(stop.value)
    assert not fakes.opened


def test_samples_must_be_at_least_one() -> None:
    with pytest.raises(ValueError, match="samples"):
        RolloutConfig(samples=0)
    with pytest.raises(SystemExit):
        rollouts.parser().parse_args(["--out", "x", "--samples", "0"])


def test_plan_is_the_paper_mix_without_50_shot_by_default(datasets) -> None:
    tasks = load_local_tasks(resolve_task_paths(
        TRAIN_TASKS, datasets))
    contexts, _ = rollouts.plan_contexts(tasks, RolloutConfig(valid_fraction=0, repeats=2), ApproxCounter())
    counts = Counter(c.label["n_shot"] for c in contexts)
    assert counts == {5: 10, 10: 4, 20: 2}  # 5 tasks x 2 repeats; 30% and 20% of 5 tasks, x 2
    assert len({c.key for c in contexts}) == len(contexts)


def test_a_follower_outage_stops_the_run_with_its_reason(datasets, tmp_path, fakes, monkeypatch) -> None:
    import contextlib

    from training.follower import FailureMonitor, Follower, FollowerConfig

    @contextlib.contextmanager
    def down(generator, follower, **kwargs):
        client = Follower(FollowerConfig(base_url="http://follower.test/v1", max_retries=0),
                          transport=httpx.MockTransport(lambda request: httpx.Response(503, text="overloaded")),
                          monitor=FailureMonitor(0.05, window=20, min_calls=10))
        yield rollouts.Endpoints(fakes.lm, client, "json_object")

    monkeypatch.setattr(rollouts, "open_endpoints", down)
    with pytest.raises(SystemExit, match="follower server is down or overloaded.*finished contexts are saved"):
        _main(datasets, tmp_path / "run")
    assert all(r["status"] == "error" for r in _records(tmp_path / "run"))


def test_held_out_tasks_and_validation_contexts_stay_the_same_across_rounds(datasets) -> None:
    tasks = load_local_tasks(resolve_task_paths(TRAIN_TASKS, datasets))

    def plan(**kwargs):
        contexts, summary = rollouts.plan_contexts(tasks, RolloutConfig(valid_fraction=0.2, **kwargs),
                                                   ApproxCounter())
        return contexts, summary["tasks"]["valid"]

    round1, held1 = plan(seed=1)
    round2, held2 = plan(seed=2)
    assert held1 == held2 and len(held1) == 1  # the split seed decides, not the round's seed
    assert {c.label["task"] for c in round1 + round2}.isdisjoint(held1)
    assert {c.sha256 for c in round1} != {c.sha256 for c in round2}  # new contexts each round
    valid1, _ = plan(seed=1, split="valid", samples=1, temperature=0.0)
    valid2, _ = plan(seed=2, split="valid", samples=1, temperature=0.0)
    assert {c.sha256 for c in valid1} == {c.sha256 for c in valid2} and {c.label["task"] for c in valid1} == set(held1)
    _, other = plan(seed=1, split_seed=5)
    assert other != held1 or len(TRAIN_TASKS) == 1  # (5 tasks: another seed holds out another one)


def test_a_larger_validation_set_keeps_the_smaller_ones_contexts(datasets) -> None:
    # --repeats draws more validation contexts per held-out task; repeat 0 stays the same
    # context, so a validation reward on the larger set extends the one already measured.
    tasks = load_local_tasks(resolve_task_paths(TRAIN_TASKS, datasets))

    def plan(repeats):
        config = RolloutConfig(valid_fraction=0.2, split="valid", samples=1, temperature=0.0, repeats=repeats)
        return rollouts.plan_contexts(tasks, config, ApproxCounter())[0]

    small, large = plan(1), plan(3)
    assert len(large) == 3 * len(small) and len({c.sha256 for c in large}) == len(large)
    assert {c.sha256 for c in small} <= {c.sha256 for c in large}
    assert {c.label["repeat"] for c in large} == {0, 1, 2}
