"""training.validation: validation runs paired by context, compared with the baseline and naive."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from scipy.stats import wilcoxon

from training import validation
from training.runlog import digest

FOLLOWER = {"kind": "local", "model": "f", "base_sha256": "a" * 64, "adapter": None, "adapter_sha256": None}
PROTOCOL = {"template": "meta2", "constrained": "choice"}


def write_run(folder: Path, rewards: dict[str, float], naive: dict[str, float], *, split: str = "valid",
              follower: dict = FOLLOWER, adapter: str | None = None, samples: int = 1, temperature: float = 0.0,
              edit=None) -> Path:
    settings = {"config": {"split": split, "samples": samples, "temperature": temperature}, "protocol": PROTOCOL,
                "follower": follower,
                "generator": {"kind": "local", "model": "g", "adapter_sha256": adapter}}
    sha = digest(settings)
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"settings": settings, "settings_sha256": sha}))
    lines = [{"status": "ok", "settings_sha256": sha, "key": f"valid|{key}", "context_sha256": digest(key),
              "task": key.split("|")[0], "n_shot": 5, "naive": {"reward": naive[key]},
              "samples": [{"index": 0, "reward": reward}]} for key, reward in rewards.items()]
    lines.append({**lines[0], "status": "error"})  # never read
    if edit is not None:
        edit(lines[0])
    (folder / "rollouts.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return folder


KEYS = [f"task{i % 3}|{i}" for i in range(8)]
NAIVE = {k: 0.30 for k in KEYS}
BASE = dict(zip(KEYS, [0.20, 0.25, 0.30, 0.35, 0.40, 0.10, 0.50, 0.30]))
TRAINED = dict(zip(KEYS, [0.30, 0.25, 0.45, 0.40, 0.35, 0.30, 0.60, 0.42]))


def test_runs_are_paired_by_context_against_the_baseline_and_naive(tmp_path: Path) -> None:
    base = write_run(tmp_path / "r0", BASE, NAIVE)
    trained = write_run(tmp_path / "r1", {k: TRAINED[k] for k in KEYS[:7]}, NAIVE, adapter="c" * 64)
    runs = validation.load_runs([("round0", base), ("round1", trained)])
    assert [len(r.rewards) for r in runs] == [8, 7]

    c = validation.compare(runs[1], runs[0])
    shared = KEYS[:7]  # only the contexts both finished
    differences = [TRAINED[k] - BASE[k] for k in shared]
    assert c.n == 7 and c.mean_difference == pytest.approx(sum(differences) / 7)
    assert (c.wins, c.ties, c.losses) == (5, 1, 1)
    assert c.p_value == pytest.approx(wilcoxon([TRAINED[k] for k in shared], [BASE[k] for k in shared]).pvalue)
    assert c.ci_low < c.mean_difference < c.ci_high

    against_naive = validation.compare(runs[0], None)
    assert against_naive.b == "naive" and against_naive.n == 8
    assert (against_naive.wins, against_naive.ties, against_naive.losses) == (3, 2, 3)


def test_the_report_gives_every_comparison_and_task(tmp_path: Path) -> None:
    base = write_run(tmp_path / "r0", BASE, NAIVE)
    trained = write_run(tmp_path / "r1", TRAINED, NAIVE, adapter="c" * 64)
    out = tmp_path / "report" / "valid.md"
    out.parent.mkdir()
    assert validation.main([f"round0={base}", f"round1={trained}", "--out", str(out)]) == 0
    text = out.read_text()
    assert "| round1 | round0 | 8 |" in text and "| round1 | naive | 8 |" in text and "| round0 | naive | 8 |" in text
    assert "| task0 |" in text and "Warning" not in text
    figures = json.loads(out.with_suffix(".json").read_text())
    assert [r["contexts"] for r in figures["runs"]] == [8, 8]
    assert figures["by_task"]["task1"]["naive"] == pytest.approx(0.30)
    assert figures["runs"][1]["mean_reward"] == pytest.approx(sum(TRAINED.values()) / 8)  # unrounded


def test_identical_rewards_have_no_p_value_and_a_point_interval(tmp_path: Path) -> None:
    runs = validation.load_runs([("a", write_run(tmp_path / "a", BASE, NAIVE)),
                                 ("b", write_run(tmp_path / "b", BASE, NAIVE))])
    c = validation.compare(runs[1], runs[0])
    assert c.p_value is None and c.ci_low == c.ci_high == 0.0 and c.ties == 8


def test_differing_naive_rewards_are_flagged_once_per_context(tmp_path: Path) -> None:
    other_naive = {**NAIVE, KEYS[0]: 0.5}
    runs = validation.load_runs([("a", write_run(tmp_path / "a", BASE, NAIVE)),
                                 ("b", write_run(tmp_path / "b", TRAINED, other_naive)),
                                 ("c", write_run(tmp_path / "c", TRAINED, other_naive))])
    assert validation.naive_disagreements(runs) == {digest(KEYS[0]): pytest.approx(0.2)}
    assert "Warning: on 1 context(s)" in validation.render(runs)


def test_the_task_table_is_paired_and_one_context_has_no_interval(tmp_path: Path) -> None:
    base = write_run(tmp_path / "a", BASE, {**NAIVE, KEYS[1]: 0.9})
    one = write_run(tmp_path / "b", {KEYS[1]: 0.6}, {KEYS[1]: 0.9})
    runs = validation.load_runs([("a", base), ("b", one)])
    data = validation.report(runs)
    assert data["common_contexts"] == 1  # only the context both finished, in every column
    assert data["by_task"] == {"task1": {"a": 0.25, "b": 0.6, "naive": 0.9}}
    c = validation.compare(runs[1], runs[0])
    assert c.n == 1 and c.ci_low is None and c.ci_high is None
    assert "| b | a | 1 | 0.600 | 0.250 | +0.350 | n/a | 1/0/0 |" in validation.render(runs, data)


def test_figures_are_rounded_once(tmp_path: Path) -> None:
    # 0.0014779 shows as +0.001 (not 0.0015 -> +0.002), and a tiny negative mean as +0.000
    assert validation._d(0.0014779) == "+0.001" and validation._d(-0.0595258) == "-0.060"
    assert validation._d(-0.0001) == "+0.000" and validation._p(0.0004) == "<0.001"


def _bad(record, field, value):
    if field.startswith("naive."):
        record["naive"][field[6:]] = value
    elif field == "reward":
        record["samples"][0]["reward"] = value
    elif value is None:
        del record[field]
    else:
        record[field] = value


@pytest.mark.parametrize(
    "field, value, message",
    [("reward", float("nan"), "the sample's reward is nan, not a macro-F1"),
     ("reward", True, "not a macro-F1"), ("reward", "0.3", "not a macro-F1"), ("reward", 7.5, "not a macro-F1"),
     ("naive.reward", None, "the naive reward is None"), ("samples", [], "one \\(greedy\\) sample"),
     ("samples", {"0": 1}, "one \\(greedy\\) sample"), ("naive", None, "no naive reward"),
     ("context_sha256", None, "no context_sha256")],
)
def test_a_malformed_record_is_named_in_one_line(tmp_path: Path, field, value, message) -> None:
    run = write_run(tmp_path / "r", BASE, NAIVE, edit=lambda record: _bad(record, field, value))
    with pytest.raises(SystemExit, match=f"r: context 'valid\\|task0\\|0': .*{message}"):
        validation.main([str(run)])


def test_the_report_never_writes_into_a_run_folder(tmp_path: Path) -> None:
    run = write_run(tmp_path / "round0" / "valid", BASE, NAIVE)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    (tmp_path / "link.md").symlink_to(run / "rollouts.jsonl")
    for out in (run / "manifest.md", run / "summary.md", tmp_path / "link.md"):
        with pytest.raises(SystemExit, match="inside a run folder given as input"):
            validation.main([str(run), "--out", str(out)])
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    # a bare folder is named by the folder above it, whatever its spelling
    assert validation._parse_named(str(run) + "/") == ("round0", Path(str(run) + "/"))
    assert validation._parse_named(str(run / "rollouts.jsonl"))[0] == "round0"


def test_incomparable_runs_and_bad_arguments_are_refused(tmp_path: Path, capsys) -> None:
    base = write_run(tmp_path / "r0", BASE, NAIVE)
    train = write_run(tmp_path / "train", BASE, NAIVE, split="train")
    other = write_run(tmp_path / "other", BASE, NAIVE, follower={**FOLLOWER, "model": "bigger"})
    elsewhere = write_run(tmp_path / "elsewhere", {"x|1": 0.3}, {"x|1": 0.3})
    sampled = write_run(tmp_path / "sampled", BASE, NAIVE, samples=4, temperature=1.0)
    cases = [
        ([f"a={base}", f"b={train}"], "holds 'train' rollouts"),
        ([f"a={base}", f"b={sampled}"], "sampled 4 instruction\\(s\\) per context at temperature 1.0"),
        ([str(base / "manifest.json")], "is not a rollouts.jsonl"),
        ([f"a={base}", f"b={other}"], "another follower or protocol"),
        ([f"a={base}", f"a={base}"], "given twice"),
        ([f"naive={base}"], "reserved"),
        ([f"a={tmp_path / 'missing'}"], "no rollouts folder"),
        ([f"a={base}", f"b={elsewhere}"], "share no validation context"),
        ([f"a={base}", "--out", str(tmp_path / "x.json")], "a .md file"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit, match=message):
            validation.main(argv)
    for argv, message in ((["=folder"], "expected NAME=FOLDER"), ([f"a|b={base}"], "run name 'a|b'")):
        with pytest.raises(SystemExit):
            validation.main(argv)
        assert message in capsys.readouterr().err
    assert validation.load_runs([(p.name, p) for p in [base]])[0].name == "r0"
