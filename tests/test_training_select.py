"""``python -m training.select``: per context the best of the k samples and the naive
instruction by reward; a sample is the target only when it beats naive by the margin; the
naive-target option and its cap; off-policy folders merged by context; pairs carrying the
meta-prompt as compile sends it; the report's counts. Rollout folders are written here
by hand, so every reward is the test's choice."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from dspy_promptmii.protocol import NAIVE_INSTRUCTION, Protocol
from training import select
from training.runlog import digest
from training.select import SelectionConfig, decide

PROTOCOL = Protocol(template="meta2", constrained="json_object").to_dict()
FOLLOWER = {"kind": "local", "model": "f", "base_sha256": "a" * 64, "adapter": None, "adapter_sha256": None}


def context(key: str, naive: float, rewards: list[float], *, task: str = "t", instructions: list[str] | None = None,
            errors: list[str | None] | None = None) -> dict[str, Any]:
    instructions = instructions or [f"instruction {i} of {key}" for i in range(len(rewards))]
    errors = errors or [None] * len(rewards)
    return {
        "key": key,
        "context_sha256": digest(key),
        "task": task,
        "n_shot": 5,
        "meta_prompt": f"meta-prompt of {key}",
        "protocol": PROTOCOL,
        "naive": {"instruction": NAIVE_INSTRUCTION, "reward": naive, "follower_error": None},
        "samples": [
            {"index": i, "seed": 100 + i, "temperature": 1.0, "instruction": text, "reward": reward,
             "follower_error": error}
            for i, (reward, text, error) in enumerate(zip(rewards, instructions, errors))
        ],
    }


def write_folder(folder: Path, contexts: list[dict[str, Any]], *, split: str = "train", follower: dict = FOLLOWER,
                 generator: str = "g") -> Path:
    settings = {"config": {"split": split}, "protocol": PROTOCOL, "follower": follower,
                "generator": {"kind": "local", "model": generator, "base_sha256": "b" * 64, "adapter": None,
                              "adapter_sha256": None}}
    sha = digest(settings)
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"settings": settings, "settings_sha256": sha}))
    lines = [{**c, "status": "ok", "settings_sha256": sha} for c in contexts]
    lines.append({**contexts[0], "status": "ok", "settings_sha256": "other settings"})  # never read
    (folder / "rollouts.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return folder


# --- the rule -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "naive, rewards, kind, target_index",
    [
        (0.40, [0.30, 0.50, 0.46], "sample", 1),   # beats naive by 0.10 >= 0.05
        (0.40, [0.44, 0.42], "drop", None),        # best leads by 0.04: within the margin
        (0.40, [0.45], "sample", 0),               # exactly the margin
        (0.60, [0.20, 0.30], "naive", None),       # naive leads by 0.30
        (0.60, [0.57], "drop", None),              # naive leads by 0.03: within the margin
        (0.50, [0.50, 0.50], "drop", None),        # a tie is no signal
    ],
)
def test_a_sample_is_the_target_only_when_it_beats_naive_by_the_margin(naive, rewards, kind, target_index) -> None:
    decision = decide(context("c", naive, rewards), SelectionConfig())
    assert decision.kind == kind
    if kind == "sample":
        assert decision.target == f"instruction {target_index} of c"
    if kind == "naive":
        assert decision.target == NAIVE_INSTRUCTION


def test_the_margin_is_an_option() -> None:
    assert decide(context("c", 0.40, [0.44]), SelectionConfig(margin=0.0)).kind == "sample"
    assert decide(context("c", 0.40, [0.44]), SelectionConfig(margin=0.1)).kind == "drop"
    assert decide(context("c", 0.40, [0.40]), SelectionConfig(margin=0.0)).kind == "drop"  # strictly better only
    with pytest.raises(ValueError, match="margin"):
        SelectionConfig(margin=-0.1)
    with pytest.raises(ValueError, match="naive_target"):
        SelectionConfig(naive_target="sometimes")


SHOWN_TEXT = "The battery died after two days and the charger never worked at all."


@pytest.mark.parametrize(
    ("quote", "quotes"),
    [
        ("battery died after two days and the charger", True),       # 43 characters of a shown input
        ("BATTERY   died after two\ndays and the CHARGER", True),   # case and white space ignored
        ("after two days and the charger", True),                    # exactly 30
        ("fter two days and the charger", False),                    # 29: a common phrase, not a quote
        ("I love it, works great", True),                            # a short input repeated whole
    ],
)
def test_a_sample_quoting_a_shown_input_is_never_the_target(quote, quotes) -> None:
    quoting = f'negative: texts like "{quote}" are negative.'
    c = context("c", 0.2, [0.9, 0.6], instructions=[quoting, "Complaints about broken products are negative."])
    c["label"] = {"context_inputs": [[SHOWN_TEXT], ["I love it, works great"], ["Good."]]}
    decision = decide(c, SelectionConfig())
    assert decision.kind == "sample" and decision.best["index"] == (1 if quotes else 0)
    assert decide(c, SelectionConfig(quote_chars=0)).best["index"] == 0  # the check is off
    assert (select.quoted_input(quoting, [SHOWN_TEXT, "I love it, works great"]) is not None) is quotes
    with pytest.raises(ValueError, match="quote_chars"):
        SelectionConfig(quote_chars=-1)


def test_the_quote_check_reads_wide_scripts_by_their_own_measure() -> None:
    shown = ["这个手机真的很好用，电池也耐用", "好"]
    # 10 wide characters in a row are a quote (30 Latin ones would be a sentence and a half).
    assert select.quoted_input('正面：像"这个手机真的很好用，电池"这样的评论', shown) == "这个手机真的很好用，"
    assert select.quoted_input('正面：像"手机真的很好用"这样的评论', shown) is None  # 7
    assert select.quoted_input("正面：称赞产品的评论；负面：抱怨的评论。", shown) is None
    assert select.quoted_input("Good. Label the sentiment.", ["Good."]) is None  # too short to be a quote


def test_where_naive_wins_the_option_keeps_or_drops_it() -> None:
    lost = context("c", 0.60, [0.10, 0.20])
    assert decide(lost, SelectionConfig(naive_target="keep")).kind == "naive"
    drop = decide(lost, SelectionConfig(naive_target="drop"))
    assert drop.kind == "drop" and "naive won" in drop.reason


def test_ties_go_to_the_shorter_then_earlier_instruction_and_broken_samples_never_win() -> None:
    tie = context("c", 0.1, [0.9, 0.9, 0.9], instructions=["a longer instruction", "short", "short"])
    assert decide(tie, SelectionConfig()).best["index"] == 1
    broken = context("c", 0.1, [1.0, 0.0, 0.7], instructions=["errored", "", "fine"], errors=["HTTP 500", None, None])
    assert decide(broken, SelectionConfig()).target == "fine"
    # No usable sample: they scored 0, so naive wins by its reward.
    empty = context("c", 0.5, [0.0], instructions=[""])
    assert decide(empty, SelectionConfig()).kind == "naive"


def test_naive_targets_are_capped_keeping_the_clearest() -> None:
    contexts = [context(f"s{i}", 0.2, [0.9]) for i in range(6)]
    contexts += [context("n-small", 0.5, [0.4]), context("n-big", 0.9, [0.1]), context("n-mid", 0.7, [0.4])]
    decisions = {d.context["key"]: d for d in select.select(contexts, SelectionConfig(max_naive_share=0.25))}
    # 6 sample targets: a quarter of the kept pairs allows 2 naive targets (2 / 8).
    assert [k for k, d in decisions.items() if d.kind == "naive"] == ["n-big", "n-mid"]
    assert decisions["n-small"].kind == "drop" and "max-naive-share" in decisions["n-small"].reason
    unlimited = select.select(contexts, SelectionConfig(max_naive_share=1.0))
    assert sum(d.kind == "naive" for d in unlimited) == 3
    none = select.select(contexts, SelectionConfig(max_naive_share=0.0))
    assert sum(d.kind == "naive" for d in none) == 0


# --- the command ----------------------------------------------------------------------------------


def test_pairs_and_report(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "r1", [
        context("a", 0.40, [0.30, 0.80], task="alpha"),
        context("b", 0.90, [0.10, 0.20], task="alpha"),
        context("c", 0.50, [0.52, 0.49], task="beta"),
        context("d", 0.20, [0.60, 0.70], task="beta"),
    ])
    out = tmp_path / "select"
    assert select.main(["--rollouts", str(folder), "--out", str(out)]) == 0
    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert [(p["key"], p["source"]) for p in pairs] == [("a", "sample"), ("d", "sample")]  # b: naive over the cap
    assert pairs[0]["prompt"] == "meta-prompt of a" and pairs[0]["target"] == "instruction 1 of a"
    assert pairs[0]["advantage"] == pytest.approx(0.4) and pairs[0]["sample"]["seed"] == 101
    report = json.loads((out / "selection.json").read_text())
    assert report["contexts"] == 4 and report["kept"] == 2 and report["kept_fraction"] == 0.5
    assert report["any_sample_beat_naive"] == 0.75 and report["sample_beat_naive_by_margin"] == 0.5
    assert report["mean_advantage"] == pytest.approx((0.4 - 0.7 + 0.02 + 0.5) / 4, abs=1e-4)
    assert report["by_task"]["alpha"]["sample_targets"] == 1 and report["by_task"]["beta"]["dropped"] == 1
    assert report["dropped_by_reason"] == {"naive target over --max-naive-share": 1, "within the margin": 1}
    text = (out / "selection.txt").read_text()
    assert "Kept 2 (0.500)" in text and "alpha" in text and "beta" in text
    # With no cap, the naive text becomes the target where naive won.
    assert select.main(["--rollouts", str(folder), "--out", str(out), "--max-naive-share", "1"]) == 0
    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    naive = [p for p in pairs if p["source"] == "naive"]
    assert [(p["key"], p["target"]) for p in naive] == [("b", NAIVE_INSTRUCTION)]


def test_off_policy_samples_of_the_same_context_join(tmp_path: Path) -> None:
    on = write_folder(tmp_path / "on", [context("a", 0.40, [0.42]), context("b", 0.4, [0.9])], generator="0.5b")
    off = write_folder(tmp_path / "off", [context("a", 0.40, [0.70])], generator="1.5b")
    loaded = select.load_rollouts([on, off])
    merged = {c["key"]: c for c in loaded.contexts}
    assert len(merged["a"]["samples"]) == 2 and len(merged["b"]["samples"]) == 1
    decision = decide(merged["a"], SelectionConfig())
    assert decision.kind == "sample" and decision.best["generator"]["model"] == "1.5b"


def test_incomparable_or_held_out_rollouts_are_refused(tmp_path: Path) -> None:
    train = write_folder(tmp_path / "train", [context("a", 0.4, [0.5])])
    other = write_folder(tmp_path / "other", [context("a", 0.4, [0.5])], follower={**FOLLOWER, "model": "g"})
    valid = write_folder(tmp_path / "valid", [context("a", 0.4, [0.5])], split="valid")
    with pytest.raises(SystemExit, match="another follower or protocol"):
        select.main(["--rollouts", str(train), str(other), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="never SFT data"):
        select.main(["--rollouts", str(valid), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="no rollouts.jsonl"):
        select.main(["--rollouts", str(tmp_path), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match=f"no rollouts folder or file at {tmp_path / 'typo'}"):  # not "in <parent>"
        select.main(["--rollouts", str(tmp_path / "typo"), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="max_naive_share"):
        select.main(["--rollouts", str(train), "--out", str(tmp_path / "o"), "--max-naive-share", "2"])


@pytest.mark.parametrize(
    "text, problem",
    [('{"settings":', r"manifest\.json:1:13: not valid JSON"), ("[1]", "not a training.rollouts manifest"),
     ('{"settings": [1]}', "not a training.rollouts manifest"), ('{"settings": {"config": null}}', "and their config")],
)
def test_a_broken_manifest_is_named_in_a_one_line_error(tmp_path: Path, text: str, problem: str) -> None:
    folder = write_folder(tmp_path / "train", [context("a", 0.4, [0.5])])
    (folder / "manifest.json").write_text(text)
    with pytest.raises(SystemExit, match=problem):
        select.main(["--rollouts", str(folder), "--out", str(tmp_path / "o")])
