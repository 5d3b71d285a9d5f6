"""``python -m training.confirm`` and ``training.select --confirm``: the chosen target and the
naive instruction scored again on fresh rows (never the context's shown or held-out rows,
never a row sharing a text with a dev task), resumable; selection keeps only the targets the
fresh rows confirm. Fake generator and follower (tests/support/rollout_fakes.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.rollout_fakes import GOOD, Fakes, follower_reply, make_datasets

from training import confirm, rollouts, select
from training.confirm import instruction_sha256
from training.grpo_label import GRPOLabel
from training.runlog import JsonlLog, digest
from training.select import Decision, SelectionConfig, apply_confirmation

DEV_TEXT = "Dev report 1: rainy"  # a text of the dev task, copied into a train task below


@pytest.fixture()
def datasets(tmp_path: Path) -> Path:
    root = make_datasets(tmp_path / "datasets")
    with (root / "weather_north" / "data.jsonl").open("a", encoding="utf-8") as handle:
        for _ in range(5):  # rows sharing a text with the dev task: never scored
            handle.write(json.dumps({"text": DEV_TEXT, "label": "rainy"}) + "\n")
    return root


@pytest.fixture()
def fakes(monkeypatch) -> Fakes:
    made = Fakes(replies=lambda n: GOOD if n % 2 == 0 else "Guess any label.")
    monkeypatch.setattr(rollouts, "open_endpoints", made.open_endpoints)
    monkeypatch.setattr(confirm, "open_endpoints", made.open_endpoints)
    return made


def _rollouts(datasets: Path, out: Path) -> Path:
    code = rollouts.main(["--datasets", str(datasets), "--out", str(out), "--no-progress", "--samples", "2",
                          "--valid-tasks", "weather_west"])
    assert code == 0
    return out


def _confirm(datasets: Path, runs: Path, out: Path, *extra: str) -> int:
    return confirm.main(["--rollouts", str(runs), "--out", str(out), "--datasets", str(datasets),
                         "--no-progress", *extra])


def test_targets_are_scored_again_on_fresh_rows_and_a_rerun_resumes(datasets, tmp_path, fakes) -> None:
    runs = _rollouts(datasets, tmp_path / "rollouts")
    contexts = {r["context_sha256"]: r for r in JsonlLog(runs / "rollouts.jsonl").read()}
    asked: list[str] = []

    def counting(request: httpx.Request) -> httpx.Response:
        asked.append(json.loads(request.content)["messages"][-1]["content"])
        return follower_reply(request)

    fakes.handler = counting
    out = tmp_path / "confirm"
    assert _confirm(datasets, runs, out) == 0
    records = JsonlLog(out / "confirm.jsonl").read()
    kept = [c for c in contexts.values() if select.decide(c, SelectionConfig()).kind != "drop"]
    assert records and {r["context_sha256"] for r in records} == {c["context_sha256"] for c in kept}
    north = [line for line in (datasets / "weather_north" / "data.jsonl").read_text().splitlines()]
    dev_rows = {i for i, line in enumerate(north) if DEV_TEXT in line}
    for record in records:
        label = GRPOLabel.from_json(contexts[record["context_sha256"]]["label"])
        rows = set(record["rows"])
        assert len(rows) == 20 and rows.isdisjoint(label.context_ids) and rows.isdisjoint(label.test_ids)
        if record["task"] == "weather_north":
            assert rows.isdisjoint(dev_rows)
        # The fake follower is right only with the good instruction: it wins on fresh rows too.
        assert record["kind"] == "sample" and record["instruction_sha256"] == instruction_sha256(GOOD)
        assert record["target"]["reward"] == 1.0 and record["fresh_advantage"] > 0
    assert len(asked) == 2 * 20 * len(records)  # naive and the target, 20 rows each
    assert DEV_TEXT not in "".join(asked)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sample"]["confirmed"] == len(records)
    # A rerun has nothing left to score; the same draw of rows each time.
    asked.clear()
    assert _confirm(datasets, runs, out) == 0 and asked == []
    assert _confirm(datasets, runs, tmp_path / "again") == 0
    assert [r["rows"] for r in JsonlLog(tmp_path / "again" / "confirm.jsonl").read()] == [r["rows"] for r in records]
    # Other settings in the same folder are refused, naming what differs.
    with pytest.raises(SystemExit, match="m"):
        _confirm(datasets, runs, out, "--m", "10")
    # select --confirm keeps the confirmed targets and says so.
    pairs_dir = tmp_path / "select"
    assert select.main(["--rollouts", str(runs), "--out", str(pairs_dir), "--confirm", str(out)]) == 0
    pairs = JsonlLog(pairs_dir / "pairs.jsonl").read()
    assert len(pairs) == len(records) and all(p["fresh_advantage"] > 0 for p in pairs)
    assert "Confirmation on fresh rows" in (pairs_dir / "selection.txt").read_text()


def test_another_follower_or_changed_data_is_refused(datasets, tmp_path, fakes) -> None:
    runs = _rollouts(datasets, tmp_path / "rollouts")
    other = tmp_path / "other.gguf"
    other.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(SystemExit, match="not the follower that scored the rollouts"):
        _confirm(datasets, runs, tmp_path / "c", "--follower", str(other))
    with (datasets / "weather_north" / "data.jsonl").open("a") as handle:
        handle.write(json.dumps({"text": "one more", "label": "sunny"}) + "\n")
    with pytest.raises(SystemExit, match="changed since the rollouts were drawn"):
        _confirm(datasets, runs, tmp_path / "c")


def _decision(kind: str, fresh: float | None, *, instruction: str = "a rule", record_kind: str | None = None,
              sha: str | None = None) -> tuple[Decision, dict[str, Any]]:
    context = {"key": "k", "context_sha256": digest("k"), "naive": {"reward": 0.3}}
    decision = Decision(context, kind, "why", {"instruction": instruction, "reward": 0.6, "index": 0}, 0.3)
    records = {}
    if fresh is not None:
        records[digest("k")] = {"kind": record_kind or kind, "fresh_advantage": fresh,
                                "instruction_sha256": sha or instruction_sha256(instruction)}
    return decision, records


@pytest.mark.parametrize(
    ("kind", "fresh", "extra", "kept", "reason"),
    [
        ("sample", 0.1, {}, True, None),
        ("sample", 0.0, {}, False, "not confirmed on fresh rows"),  # a tie is no evidence
        ("sample", -0.2, {}, False, "not confirmed on fresh rows"),
        ("naive", -0.1, {}, True, None),
        ("naive", 0.05, {}, False, "not confirmed on fresh rows"),
        ("sample", None, {}, False, "no confirmation on fresh rows"),
        ("sample", 0.1, {"sha": "0" * 64}, False, "its confirmation scored another target"),
        ("sample", 0.1, {"record_kind": "naive"}, False, "its confirmation scored another target"),
    ],
)
def test_only_targets_the_fresh_rows_confirm_are_kept(kind, fresh, extra, kept, reason) -> None:
    decision, records = _decision(kind, fresh, **extra)
    apply_confirmation([decision], records)
    assert (decision.kind != "drop") is kept
    if kept:
        assert decision.kind == kind and decision.confirmation["fresh_advantage"] == fresh
    else:
        assert decision.reason == reason
        # The record of a scored target stays with the decision (for the report), confirmed or not.
        assert (decision.confirmation is not None) is (reason == "not confirmed on fresh rows")


def test_fresh_rows_refuse_a_task_with_too_few_left() -> None:
    from dspy_promptmii.data import TaskData

    task = TaskData(name="small", rows=[{"text": str(i), "label": "a"} for i in range(30)])
    label = GRPOLabel.from_json({
        "task": "small", "source": "x", "split": "train", "labels": ["a"], "input_fields": ["text"], "n_shot": 5,
        "repeat": 0, "template": "meta2", "context_seed": 1, "context_ids": list(range(5)),
        "test_ids": list(range(5, 25)), "context_inputs": [[str(i)] for i in range(5)], "context_labels": ["a"] * 5,
        "test_inputs": [[str(i)] for i in range(5, 25)], "test_labels": ["a"] * 20,
        "protocol": {"template": "meta2"},
    })
    with pytest.raises(ValueError, match="5 fresh rows left"):
        confirm.fresh_rows(task, label, 20, set())


def test_a_naive_target_without_a_usable_sample_is_not_a_crash() -> None:
    # Every sample quoted a shown input (or failed): select's naive target has no best sample,
    # while a confirm folder made with another --quote-chars scored one.
    context = {"key": "k", "context_sha256": digest("k"), "naive": {"reward": 0.4}}
    decision = Decision(context, "naive", "naive beat every sample by the margin", None, -0.4)
    record = {"kind": "naive", "fresh_advantage": -0.2, "instruction_sha256": instruction_sha256("a rule")}
    apply_confirmation([decision], {digest("k"): record})
    assert decision.kind == "drop" and decision.reason == "its confirmation scored another target"


def test_select_refuses_a_confirmation_of_another_selection_and_confirm_checks_its_counts(
    datasets, tmp_path, fakes
) -> None:
    runs = _rollouts(datasets, tmp_path / "rollouts")
    out = tmp_path / "confirm"
    assert _confirm(datasets, runs, out, "--margin", "0.1") == 0
    with pytest.raises(SystemExit, match="--margin 0.1, this selection uses --margin 0.05"):
        select.main(["--rollouts", str(runs), "--out", str(tmp_path / "s"), "--confirm", str(out)])
    for bad in (["--m", "5"], ["--m", "x"], ["--follower-timeout", "0"]):
        with pytest.raises(SystemExit):
            _confirm(datasets, runs, tmp_path / "bad", *bad)
    assert not (tmp_path / "bad").exists()


def test_a_naive_target_is_scored_against_the_best_sample_even_one_that_quotes() -> None:
    shown = "Report 1 from the north: the sky looks rainy and grey all day"
    context = {
        "key": "k", "context_sha256": digest("k"), "naive": {"reward": 0.9},
        "label": {"context_inputs": [[shown]]},
        "samples": [{"index": 0, "instruction": f'Like "{shown}": rainy.', "reward": 0.3},
                    {"index": 1, "instruction": "Name the weather.", "reward": 0.1}],
    }
    decision = select.decide(context, SelectionConfig())
    assert decision.kind == "naive" and decision.best["index"] == 0  # naive beat every sample, quoting one too
    context["samples"][0]["reward"] = 1.0  # only the quoting sample beats naive: nothing to teach
    decision = select.decide(context, SelectionConfig())
    assert decision.kind == "drop" and "quoting" in decision.reason
