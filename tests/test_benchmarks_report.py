"""The benchmark report's arithmetic on a hand-made results file, and its outputs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from scipy.stats import wilcoxon

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `pytest` run without the repository root on sys.path
    sys.path.insert(0, str(ROOT))

from benchmarks import cli  # noqa: E402
from benchmarks.plot import pareto_front  # noqa: E402
from benchmarks.report import (  # noqa: E402
    MIN_WILCOXON_PAIRS,
    combine,
    folder_records,
    paired,
    ratio,
    render_report,
    summary_rows,
    wilcoxon_test,
    win_rate,
    write_report,
)
from benchmarks.store import latest, read_records  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"
TASKS = ("alpha", "beta")
NS = (5, 10, 20, 50)
# macro-F1 per (task, n), by hand: promptmii_zero beats naive in 7 of 8 cells, ties icl in one.
F1 = {
    "naive": [0.30, 0.32, 0.31, 0.35, 0.50, 0.52, 0.49, 0.55],
    "icl": [0.40, 0.45, 0.50, 0.52, 0.60, 0.62, 0.61, 0.70],
    "promptmii_zero": [0.42, 0.40, 0.44, 0.52, 0.58, 0.66, 0.64, 0.69],
    "gepa": [0.33, 0.36, 0.30, 0.40, 0.51, 0.57, 0.50, 0.56],
}
TOKENS = {"naive": 100, "icl": None, "promptmii_zero": 300, "gepa": 150}  # icl grows with n
CALLS = {"naive": (0, 0), "icl": (0, 0), "promptmii_zero": (1, 0), "gepa": (5, 140)}


def hand_records() -> list[dict]:
    records = []
    for method, values in F1.items():
        for i, (task, n) in enumerate((t, n) for t in TASKS for n in NS):
            gen, fol = CALLS[method]
            records.append(
                {
                    "task": task,
                    "n": n,
                    "method": method,
                    "seed": 0,
                    "status": "ok",
                    "macro_f1": values[i],
                    "accuracy": values[i] + 0.1,
                    "invalid_rate": 0.01 * i,
                    "prompt_tokens_per_query": TOKENS[method] if TOKENS[method] else 40 * n,
                    "compile_generator_calls": gen,
                    "compile_follower_calls": fol,
                    "compile_calls": gen + fol,
                    "compile_tokens": 1000 * gen + 100 * fol,
                    "compile_seconds": 2.0 * (gen + fol),
                    "eval_seconds": 10.0,
                    "n_used": 0 if method == "naive" else n,
                    "instruction": f"{method} instruction",
                    "demos": n if method == "icl" else 0,
                }
            )
    return records


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    records = hand_records()
    # A superseded error (retried later) and a leftover error: neither is scored.
    stale = dict(records[0], status="error", macro_f1=None, error="compile: ConnectionError: gone")
    broken = {"task": "alpha", "n": 5, "method": "miprov2", "seed": 0, "status": "error", "error": "boom"}
    lines = [json.dumps(stale)] + [json.dumps(r) for r in records] + [json.dumps(broken), '{"torn": ']
    (tmp_path / "results.jsonl").write_text("\n".join(lines) + "\n")
    manifest = {
        "created": "2026-11-21T00:00:00+00:00",
        "updated": "2026-11-21T01:00:00+00:00",
        "tasks": list(TASKS),
        "n_values": list(NS),
        "test_rows": 40,
        "seeds": [0],
        "models": {"follower": {"route": "local"}, "generator": {"route": "local"}, "generator_trained": None},
        "adapter": {"kind": "label", "constrained": "json_object", "demos": "turns"},
        "runs": [
            {
                "started": "s",
                "finished": "f",
                "status": "finished",
                "cells_run": 32,
                "wall_seconds": 600.0,
                "machine": {"cpus_usable": 2, "cpu_model": "AMD EPYC", "memory_gib": 23.0, "gpus": []},
            }
        ],
        "versions": {"dspy": "3.4.1"},
        "methods": {"gepa": "dspy.GEPA ..."},
        "notes": ["method promptmii skipped"],
    }
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    return tmp_path


def scored(folder: Path) -> list[dict]:
    return latest(read_records(folder / "results.jsonl"))


def test_means_per_method_and_n(folder: Path):
    records = scored(folder)
    assert len(records) == 32
    rows = {(r.method, r.n): r for r in summary_rows(records)}
    assert [m for m, _ in list(rows)[::4]] == ["naive", "icl", "promptmii_zero", "gepa"]  # canonical order
    for method, values in F1.items():
        for j, n in enumerate(NS):
            row = rows[(method, n)]
            assert row.tasks == 2 and row.cells == 2
            assert row.macro_f1 == pytest.approx((values[j] + values[4 + j]) / 2)
            assert row.accuracy == pytest.approx((values[j] + values[4 + j]) / 2 + 0.1)
            assert row.invalid_rate == pytest.approx((0.01 * j + 0.01 * (4 + j)) / 2)
            assert row.compile_calls == sum(CALLS[method])
            assert row.compile_generator_calls == CALLS[method][0]
    assert rows[("icl", 50)].tokens_per_query == 2000 and rows[("naive", 5)].n_used == 0


def test_ratios_against_references(folder: Path):
    records = scored(folder)
    assert ratio(records, "promptmii_zero", "icl", "prompt_tokens_per_query", 20) == pytest.approx(300 / 800)
    assert ratio(records, "gepa", "icl", "prompt_tokens_per_query", 5) == pytest.approx(150 / 200)
    assert ratio(records, "promptmii_zero", "gepa", "compile_calls", 10) == pytest.approx(1 / 145)
    assert ratio(records, "naive", "icl", "compile_calls", 10) is None  # ICL makes no compile call
    assert ratio(records, "naive", "miprov2", "compile_calls", 10) is None  # no such cells


def test_win_rates_count_ties_as_half(folder: Path):
    records = scored(folder)
    rate, pairs = win_rate(records, "promptmii_zero", "naive")
    assert (rate, pairs) == (1.0, 8)
    rate, pairs = win_rate(records, "promptmii_zero", "icl")
    # wins: alpha/5, beta/10, beta/20; tie: alpha/50; losses elsewhere -> (3 + 0.5) / 8
    assert (rate, pairs) == (pytest.approx(3.5 / 8), 8)
    assert win_rate(records, "icl", "promptmii_zero")[0] == pytest.approx(4.5 / 8)


def test_wilcoxon_matches_scipy_on_the_hand_data(folder: Path):
    records = scored(folder)
    for a, b in (("promptmii_zero", "naive"), ("icl", "gepa"), ("promptmii_zero", "icl")):
        result = wilcoxon_test(records, a, b)
        direct = wilcoxon(F1[a], F1[b])  # cells in the same (task, n) order as F1's lists
        assert [c for c, _, _ in paired(records, a, b, "macro_f1")] == [(t, n, 0) for t in TASKS for n in NS]
        assert result.pairs == 8
        assert result.statistic == pytest.approx(float(direct.statistic))
        assert result.p_value == pytest.approx(float(direct.pvalue))
        assert result.mean_difference == pytest.approx(sum(x - y for x, y in zip(F1[a], F1[b])) / 8)


def test_wilcoxon_says_when_there_are_too_few_pairs(folder: Path):
    records = [r for r in scored(folder) if r["task"] == "alpha" and r["n"] in (5, 10)]
    result = wilcoxon_test(records, "promptmii_zero", "naive")
    assert result.p_value is None and "too few pairs" in result.note and result.pairs == 2
    assert MIN_WILCOXON_PAIRS == 6
    same = [dict(r, method="twin") for r in records if r["method"] == "naive"] + records
    assert wilcoxon_test(same, "naive", "twin").note == "all paired differences are zero"


def test_report_and_plot_are_written(folder: Path):
    paths = write_report(folder)
    assert [p.name for p in paths] == ["report.md", "pareto.png"]
    assert (folder / "pareto.png").read_bytes()[:8] == PNG
    text = (folder / "report.md").read_text()
    assert "| promptmii_zero | 20 | 2 | 0.540 | 0.640 |" in text
    assert "tokens/query vs icl" in text and "compile calls vs gepa" in text
    assert "0.375x" in text  # promptmii_zero vs icl tokens at n=20
    assert "| naive vs promptmii_zero | 8 |" in text
    assert "alpha n=5 miprov2 seed=0: error: boom" in text
    assert "AMD EPYC" in text and "method promptmii skipped" in text
    assert "![prompt tokens per query vs macro-F1](pareto.png)" in text
    assert render_report(folder) == text
    assert not list(folder.glob("*.partial"))  # written beside, then renamed into place


def test_the_plot_caption_warns_when_methods_ran_on_different_tasks(folder: Path):
    caption = "Each point is a mean over the tasks that method ran on"
    assert caption not in render_report(folder)  # every method ran on every task
    path = folder / "results.jsonl"
    lines = path.read_text().splitlines()
    kept = [line for line in lines if not ('"task": "beta"' in line and '"method": "gepa"' in line)]
    assert len(kept) < len(lines)  # gepa now ran on alpha only
    path.write_text("\n".join(kept) + "\n")
    assert caption in render_report(folder)


def test_a_failed_report_write_keeps_the_previous_report(folder: Path, monkeypatch):
    write_report(folder)
    before = (folder / "report.md").read_text()

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("benchmarks.report.render_report", lambda *args: "a new report")
    monkeypatch.setattr("dspy_promptmii.files.os.fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        write_report(folder)
    assert (folder / "report.md").read_text() == before  # the write failed before the rename


def test_report_command(folder: Path, capsys):
    assert cli.main(["report", str(folder)]) == 0
    assert "report.md" in capsys.readouterr().out
    assert cli.main(["report", str(folder / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("benchmarks: error: ") and "no results.jsonl" in err


def test_pareto_front():
    points = [(100, 0.3), (300, 0.5), (200, 0.2), (800, 0.5), (900, 0.6), (100, 0.25)]
    assert pareto_front(points) == [(100, 0.3), (300, 0.5), (900, 0.6)]


# -- combined reports --------------------------------------------------------------------


def second_run(tmp_path: Path, folder: Path, **settings_change) -> Path:
    """A second run's folder: task gamma for every method, and alpha n=5 naive again (a later score)."""
    other = tmp_path / "second"
    other.mkdir()
    records = [dict(r, task="gamma", macro_f1=0.9) for r in hand_records() if r["task"] == "alpha"]
    records.append(dict(hand_records()[0], macro_f1=0.05))  # alpha n=5 naive, run again
    (other / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["tasks"] = ["gamma"]
    manifest["settings"] = {"protocol": {"v": 1}, "test_rows": 40, **settings_change}
    (other / "manifest.json").write_text(json.dumps(manifest))
    first = json.loads((folder / "manifest.json").read_text())
    first["settings"] = {"protocol": {"v": 1}, "test_rows": 40, "generator_trained": {"route": "a"}}
    (folder / "manifest.json").write_text(json.dumps(first))
    return other


def test_a_combined_report_reads_its_folders_in_order(folder: Path, tmp_path: Path):
    other = second_run(tmp_path, folder, generator_trained={"route": "b"})
    out = tmp_path / "study"
    paths = combine([folder, other], out)
    assert [p.name for p in paths] == ["sources.json", "report.md", "pareto.png"]
    assert json.loads((out / "sources.json").read_text()) == {
        "sources": ["..", "../second"],  # relative to the combined folder (here inside the first)
        "differences": ["generator_trained"],
    }
    records = latest(folder_records(out))
    assert len(records) == 32 + 16  # alpha and beta from the first folder, gamma from the second
    naive_alpha_5 = [r for r in records if (r["task"], r["n"], r["method"]) == ("alpha", 5, "naive")]
    assert [r["macro_f1"] for r in naive_alpha_5] == [0.05]  # the last folder's score of a cell
    text = (out / "report.md").read_text()
    assert text.startswith("# Benchmark report (combined)")
    assert "run settings that differ between them: generator_trained" in text
    assert f"## Source: {folder.name}" in text and "## Source: second" in text
    assert "| naive | 5 | 3 |" in text  # three tasks in one table
    assert render_report(out) == text  # a combined folder re-renders from its sources.json
    other.rename(tmp_path / "moved")
    with pytest.raises(FileNotFoundError, match="its source ../second .* has no results.jsonl: was it moved"):
        render_report(out)


def test_a_combined_report_refuses_what_is_not_comparable(folder: Path, tmp_path: Path, capsys):
    other = second_run(tmp_path, folder, test_rows=100)
    with pytest.raises(ValueError, match="differ in the run setting 'test_rows'"):
        combine([folder, other], tmp_path / "study")
    assert not (tmp_path / "study").exists()  # nothing written
    with pytest.raises(ValueError, match="is one of the folders"):
        combine([folder, other], folder)
    with pytest.raises(FileNotFoundError, match="no results.jsonl"):
        combine([folder, tmp_path / "nowhere"], tmp_path / "study")
    assert cli.main(["report", str(folder), str(other)]) == 2  # several folders need --out
    assert "give --out" in capsys.readouterr().err
    assert cli.main(["report", str(folder), str(other), "--out", str(tmp_path / "study")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("benchmarks: error: the folders differ in the run setting 'test_rows'")
