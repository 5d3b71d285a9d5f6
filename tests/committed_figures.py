"""The figures the benchmark report gives for every committed result folder (a run's, or a
combined one over several runs' folders): each (method, n) row's means and every paired
Wilcoxon test between its methods. Used by
tests/test_committed_results.py; ``python tests/committed_figures.py`` rewrites the
golden file (only when a figure is meant to change, and say why in the commit)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "data" / "committed" / "report_figures.json"


def _rounded(value: Any) -> Any:
    return round(value, 9) if isinstance(value, float) else value


def report_folders() -> list[Path]:
    """The committed folders a report is made of: runs' (results.jsonl) and combined ones (sources.json)."""
    results = ROOT / "benchmarks" / "results"
    return sorted({path.parent for pattern in ("*/results.jsonl", "*/sources.json") for path in results.glob(pattern)})


def figures() -> dict[str, Any]:
    """Per committed folder with a results.jsonl: the report's rows and paired tests."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.report import folder_records, latest, method_order, summary_rows, wilcoxon_test

    out: dict[str, Any] = {}
    for path in report_folders():
        all_records = folder_records(path)
        records = latest(all_records)
        rows = [{k: _rounded(v) for k, v in dataclasses.asdict(row).items()} for row in summary_rows(records)]
        tests = []
        for a, b in itertools.combinations(method_order(records), 2):
            result = dataclasses.asdict(wilcoxon_test(records, a, b))
            tests.append({k: _rounded(v) for k, v in result.items()})
        out[path.name] = {"records": len(all_records), "rows": rows, "wilcoxon": tests}
    return out


if __name__ == "__main__":
    GOLDEN.write_text(json.dumps(figures(), indent=1, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {GOLDEN}")
