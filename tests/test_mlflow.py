"""MLflow: a compile under ``mlflow.dspy.autolog(log_compiles=True)`` is a run with the
optimizer's parameters, its report, the instruction, calls and tokens; ``benchmarks run
--mlflow`` logs every finished cell; bad URIs are one line before any LM call. Every run is
read back with MLflow's own client. Needs the ``mlflow`` extra."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import dspy
import pytest
from fakes import fake_lm
from support.chat_stub import ChatStub
from test_benchmarks import config, data_dir, lms  # noqa: F401 - fixtures and helpers

mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

from benchmarks import cli as bench_cli  # noqa: E402
from benchmarks.runner import run_benchmark  # noqa: E402
from benchmarks.store import read_records  # noqa: E402
from benchmarks.tracking import EXPERIMENT_PREFIX, MlflowSink  # noqa: E402
from dspy_promptmii import PromptMIIOptimizer, routes  # noqa: E402
from dspy_promptmii.data import classifier_signature  # noqa: E402
from dspy_promptmii.tracking import check_tracking_uri, tracking_uri  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LABELS = ["neg", "pos"]
TRAIN = [
    dspy.Example(text=f"review {i} was {'great' if i % 2 else 'awful'}", label=LABELS[i % 2]).with_inputs("text")
    for i in range(10)
]
REPLY = "Decide whether the review praises or pans.\nPraise is pos; complaints are neg."


@pytest.fixture
def autolog(tmp_path: Path):
    """MLflow tracking to a SQLite file in tmp_path, DSPy autolog with log_compiles; undone after."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    track_usage = dspy.settings.track_usage
    mlflow.set_tracking_uri(uri)
    # Artifacts go under tmp_path too (MLflow's default is ./mlruns in the current folder).
    mlflow.create_experiment("compiles", artifact_location=(tmp_path / "artifacts").as_uri())
    mlflow.set_experiment("compiles")
    mlflow.dspy.autolog(log_compiles=True)
    try:
        yield MlflowClient(tracking_uri=uri)
    finally:
        mlflow.dspy.autolog(disable=True)
        dspy.settings.configure(track_usage=track_usage)
        mlflow.set_tracking_uri(None)


def test_a_compile_under_autolog_is_a_run_with_the_report_instruction_calls_and_tokens(autolog) -> None:
    lm, engine = fake_lm([REPLY], model="fake/generator")
    optimizer = PromptMIIOptimizer(generator_lm=lm, n=6, max_instruction_tokens=100)
    program = optimizer.compile(dspy.Predict(classifier_signature(LABELS, False)), trainset=TRAIN)

    experiment = autolog.get_experiment_by_name("compiles")
    (run,) = autolog.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
    assert params["promptmii.n"] == "6" and params["promptmii.max_instruction_tokens"] == "100"
    assert params["promptmii.generator_lm"] == "fake/generator" and params["promptmii.candidates"] == "1"
    assert metrics["promptmii.generator_calls"] == 1 and metrics["promptmii.follower_calls"] == 0
    report = optimizer.report[0]
    assert metrics["promptmii.prompt_tokens"] == report["prompt_tokens"] > 0
    assert metrics["promptmii.completion_tokens"] == report["completion_tokens"] > 0
    instruction = program.signature.instructions
    assert tags["promptmii.instruction.self"] == instruction

    paths = {a.path for a in autolog.list_artifacts(run.info.run_id, "promptmii")}
    assert paths == {"promptmii/report.json", "promptmii/instructions"}
    folder = Path(autolog.download_artifacts(run.info.run_id, "promptmii"))
    logged = json.loads((folder / "report.json").read_text())
    assert logged["predictors"][0]["instruction"] == instruction
    assert logged["predictors"][0]["meta_prompt_tokens"] == report["meta_prompt_tokens"]
    assert (folder / "instructions" / "self.txt").read_text() == instruction
    # MLflow's own autolog logs the program too.
    assert "best_model.json" in {a.path for a in autolog.list_artifacts(run.info.run_id)}


def test_autolog_called_before_the_optimizer_exists_is_named_in_a_warning(tmp_path: Path) -> None:
    """MLflow patches the Teleprompter subclasses that exist when autolog is called: in a
    fresh process, importing PromptMIIOptimizer afterwards leaves its compile unrecorded,
    and the compile says so."""
    script = f"""
import mlflow, dspy
mlflow.set_tracking_uri("sqlite:///{tmp_path / 'late.db'}")
mlflow.dspy.autolog(log_compiles=True)            # too early: PromptMIIOptimizer is not defined yet
from fakes import fake_lm
from dspy_promptmii import PromptMIIOptimizer
from dspy_promptmii.data import classifier_signature
lm, _ = fake_lm([{REPLY!r}], model="fake/generator")
train = [dspy.Example(text=f"r {{i}}", label=["neg", "pos"][i % 2]).with_inputs("text") for i in range(6)]
PromptMIIOptimizer(generator_lm=lm, n=4).compile(dspy.Predict(classifier_signature(["neg", "pos"], False)),
                                                 trainset=train)
client = mlflow.tracking.MlflowClient()
print("RUNS", sum(len(client.search_runs([e.experiment_id])) for e in client.search_experiments()))
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "RUNS 0" in done.stdout
    assert "import PromptMIIOptimizer (from dspy_promptmii import PromptMIIOptimizer) before" in done.stderr


def test_without_autolog_nothing_is_logged(tmp_path: Path) -> None:
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'none.db'}")
    try:
        lm, _ = fake_lm([REPLY], model="fake/generator")
        PromptMIIOptimizer(generator_lm=lm, n=4).compile(dspy.Predict(classifier_signature(LABELS, False)),
                                                          trainset=TRAIN)
        client = MlflowClient()
        assert sum(len(client.search_runs([e.experiment_id])) for e in client.search_experiments()) == 0
    finally:
        mlflow.set_tracking_uri(None)


# --- the benchmark ------------------------------------------------------------------------


def _runs(uri: str, folder: Path) -> list[Any]:
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(f"{EXPERIMENT_PREFIX}{folder.resolve().name}")
    return client.search_runs([experiment.experiment_id])


def test_the_benchmark_logs_each_finished_cell_once(data_dir, lms, tmp_path) -> None:  # noqa: F811
    out = tmp_path / "out"
    uri = f"sqlite:///{tmp_path / 'bench.db'}"
    # Cells run without MLflow first: the next run logs them too.
    run_benchmark(config(data_dir, out, methods=["naive"]), lms["endpoints"])
    sink = MlflowSink(uri, out)
    run_benchmark(config(data_dir, out, methods=["naive", "icl", "promptmii_zero"]), lms["endpoints"], sink=sink)
    records = {(r["task"], r["method"]): r for r in read_records(out) if r["status"] == "ok"}
    runs = _runs(uri, out)
    assert len(runs) == len(records) == 6
    for run in runs:
        params, metrics = run.data.params, run.data.metrics
        record = records[(params["task"], params["method"])]
        assert run.info.run_name == f"{record['task']} n=6 {record['method']}"
        assert params["n"] == "6" and params["follower"] == record["follower"]
        assert metrics["macro_f1"] == pytest.approx(record["macro_f1"])
        assert metrics["tokens_per_query"] == pytest.approx(record["prompt_tokens_per_query"])
        assert metrics["compile_calls"] == record["compile_calls"]
        assert metrics["compile_seconds"] == pytest.approx(record["compile_seconds"])
        assert metrics["eval_seconds"] == pytest.approx(record["eval_seconds"])
        assert metrics["estimated_compile_calls"] == record["estimate"]["calls"]
        assert run.data.tags["promptmii.cell"] == f"{record['task']}/6/{record['method']}/0"
        assert run.info.status == "FINISHED"
    # A resumed run with nothing left to do logs nothing twice, even through a new sink.
    run_benchmark(config(data_dir, out, methods=["naive", "icl", "promptmii_zero"]), lms["endpoints"],
                  sink=MlflowSink(uri, out))
    assert len(_runs(uri, out)) == 6


class NoPool:
    def __init__(self, **kwargs):
        raise AssertionError("an LM pool was set up before --mlflow was checked")


@pytest.mark.parametrize(
    ("uri", "needle"),
    [
        ("foo://bar", "MLflow cannot use tracking URI 'foo://bar'"),
        ("sqlite:////no/such/folder/x.db", "the folder /no/such/folder does not exist"),
        ("runs", "'runs' is not an MLflow tracking URI"),
        ("http://127.0.0.1:9", "MLflow cannot use tracking URI 'http://127.0.0.1:9'"),
    ],
)
def test_an_unusable_mlflow_uri_is_one_line_before_any_lm(
    data_dir, tmp_path, capsys, monkeypatch, restore_logging, uri, needle  # noqa: F811
) -> None:
    monkeypatch.setattr(routes, "LMPool", NoPool)
    code = bench_cli.main(  # the option checks' one line, as every option of `run`
        ["run", "--data-dir", str(data_dir), "--out", str(tmp_path / "out"), "--mlflow", uri, "--no-progress"]
    )
    line = capsys.readouterr().err.splitlines()[-1]
    assert code == 2 and line.startswith("benchmarks: error: --mlflow: ") and needle in line
    assert not Path("/no/such/folder").exists()


def test_mlflow_missing_is_named_with_what_to_install(data_dir, tmp_path, capsys, monkeypatch, restore_logging):  # noqa: F811
    monkeypatch.setattr(routes, "LMPool", NoPool)
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow raises ImportError
    assert bench_cli.main(["run", "--data-dir", str(data_dir), "--out", str(tmp_path / "out"), "--mlflow"]) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith(
        "benchmarks: error: --mlflow: MLflow is not installed: pip install 'dspy-promptmii[mlflow]'"
    )


def test_tracking_uris() -> None:
    assert tracking_uri(None, "/tmp/results") == "sqlite:////tmp/results/mlflow.db"
    assert tracking_uri("runs.db").startswith("sqlite:///") and tracking_uri("runs.db").endswith("/runs.db")
    assert tracking_uri("http://host:5000") == "http://host:5000"
    with pytest.raises(ValueError, match="is not an MLflow tracking URI"):
        tracking_uri("mlruns")
    with pytest.raises(ValueError, match="does not exist"):
        check_tracking_uri("sqlite:////no/such/folder/x.db")


def test_the_command_line_logs_to_a_sqlite_store_in_the_results_folder_by_default(
    data_dir, tmp_path, capsys, restore_logging  # noqa: F811
) -> None:
    def reply(body: dict[str, Any], headers: dict[str, str]) -> tuple[int, str]:
        text = body["messages"][-1]["content"]
        if "Label:" in text or len(body["messages"]) > 1:
            return 200, "neg" if "awful" in text else "pos"
        return 200, "Decide whether the text praises (pos), complains (neg) or is lukewarm (meh)."

    out = tmp_path / "out"
    with ChatStub(reply) as stub:
        code = bench_cli.main(
            ["run", "--data-dir", str(data_dir), "--tasks", "toy", "--follower", "m", "--generator", "m",
             "--api-base", stub.url, "--n", "6", "--test-rows", "6", "--methods", "naive,promptmii_zero",
             "--no-constrained", "--no-progress", "--out", str(out), "--mlflow"]
        )
    printed = capsys.readouterr().out
    assert code == 0
    uri = f"sqlite:///{(out / 'mlflow.db').resolve()}"
    assert f"mlflow ui --backend-store-uri {uri}" in printed
    runs = _runs(uri, out)
    assert sorted(run.data.params["method"] for run in runs) == ["naive", "promptmii_zero"]
    assert all(run.data.metrics["macro_f1"] >= 0 for run in runs)
