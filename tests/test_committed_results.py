"""Every committed benchmark result still loads and reports the same figures: the report's
rows and paired tests are compared with tests/data/committed/report_figures.json (written
from the code that produced the committed reports; see tests/committed_figures.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from committed_figures import GOLDEN, figures, report_folders

from benchmarks.report import render_report

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
FOLDERS = [path.name for path in report_folders()]


def test_every_committed_result_reports_the_figures_it_reported() -> None:
    golden = json.loads(GOLDEN.read_text(encoding="utf-8"))
    now = json.loads(json.dumps(figures()))  # the same JSON round trip as the golden file
    assert sorted(now) == sorted(golden) == FOLDERS
    for folder in FOLDERS:
        assert now[folder] == golden[folder], folder


@pytest.mark.parametrize("folder", FOLDERS)
def test_every_committed_result_renders(folder: str) -> None:
    text = render_report(RESULTS / folder, plot_name=None)
    assert "## Mean over tasks, per method and n" in text


def test_every_committed_json_result_parses() -> None:
    for path in RESULTS.glob("*/*.json"):
        json.loads(path.read_text(encoding="utf-8"))
