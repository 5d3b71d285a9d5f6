"""Issue 21, "Reliability II": one test per case the issue lists, by kind of fault.

1. No credential in any output (URL userinfo without a scheme, a key a 401 body echoes
   to the training reward, a remembered password echoed alone).
2. No silent wrong score (an LM error during evaluation makes the cell an error, listed
   in the report with its count; the exit code says whether every cell finished).
3. Every stop honoured (a request timeout the user sets; SIGTERM / SIGINT stop new
   requests at once and end the process, for ``benchmarks run`` and ``promptmii demo``).
4. No input file destroyed (``--out`` equal to ``--data`` refused; links followed as
   ``cp`` follows them).
5. No stale answer (DSPy's cache key keeps ``api_base`` and the model file).
6. Validation before anything starts; one-line errors with file:line; labels escaped.

Fake OpenAI-compatible servers on 127.0.0.1 (``support.chat_stub``) and fake LMs; no model.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Literal

import dspy
import httpx
import pytest
from fakes import fake_lm, word_count
from support.chat_stub import ChatStub

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:  # `pytest` run without the repository root on sys.path
    sys.path.insert(0, str(ROOT))

from benchmarks import cli as bench_cli  # noqa: E402
from benchmarks.report import render_report  # noqa: E402
from benchmarks.runner import Endpoints, RunConfig, run_benchmark  # noqa: E402
from benchmarks.store import read_records  # noqa: E402
from benchmarks.tasks import resolve_tasks  # noqa: E402
from dspy_promptmii import cli, demo, routes  # noqa: E402
from dspy_promptmii.protocol import Protocol  # noqa: E402
from dspy_promptmii.routes import Endpoint  # noqa: E402

PASSWORD = "hunter2-0123456789"
INSTRUCTION = "Decide whether the review is positive or negative."
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)]), "LITELLM_LOCAL_MODEL_COST_MAP": "True"}


# --- helpers ----------------------------------------------------------------------------------


class Server:
    """A ChatStub that labels reviews (``pos``/``neg``), records when each request came,
    and can be made slow, hanging, failing or to answer a fixed text."""

    def __init__(self, *, delay: float = 0.0, hang: bool = False, fail=None, text: str | None = None):
        self.delay, self.hang, self.fail, self.text = delay, hang, fail, text
        self.times: list[float] = []
        self.release = threading.Event()
        self._lock = threading.Lock()
        self.stub = ChatStub(self._reply)

    def _reply(self, body: dict, headers: dict) -> tuple[int, object]:
        with self._lock:
            self.times.append(time.time())
            number = len(self.times)
        if self.hang:
            self.release.wait(60)
        elif self.delay:
            time.sleep(self.delay)
        if self.fail is not None and self.fail(number):
            return 503, {"error": {"message": "the follower is down", "type": "server_error"}}
        if self.text is not None:
            return 200, self.text
        return 200, "neg" if "awful" in json.dumps(body["messages"][-1]) else "pos"

    @property
    def url(self) -> str:
        return self.stub.url

    def __enter__(self) -> Server:
        self.stub.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release.set()
        self.stub.close()


def write_task(folder: Path, rows: int = 40, name: str = "toy") -> Path:
    (folder / name).mkdir(parents=True, exist_ok=True)
    pairs = [("great", "pos"), ("awful", "neg")] * (rows // 2)
    lines = [json.dumps({"text": f"row {i} was {word}", "label": label}) for i, (word, label) in enumerate(pairs)]
    (folder / name / "data.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return write_task(tmp_path / "datasets")


@pytest.fixture
def no_backoff(monkeypatch):
    """DSPy waits 1, 2 and 4 s between its retries of a failed request: not in these tests."""
    from dspy.clients import execution

    monkeypatch.setattr(execution, "_delay", lambda exc, attempt: 0)


def hosted_lm(url: str, **kwargs) -> dspy.LM:
    return dspy.LM("hosted_vllm/m", api_base=url, api_key="x", cache=False, **kwargs)


def one_line(err: str, prog: str = "promptmii") -> str:
    """The only line of ``err``: ``prog: error: ...``, no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    assert "Traceback" not in err
    return lines[0]


def last_line(err: str, prog: str = "benchmarks") -> str:
    """The error line that ends ``err`` (a benchmark logs its progress before it), no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith(f"{prog}: error: "), err
    assert sum(line.startswith(f"{prog}: error: ") for line in lines) == 1 and "Traceback" not in err, err
    return lines[-1]


def run_promptmii(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


class NoPool:
    """Stands in for LMPool where none may be made."""

    def __init__(self, **kwargs):
        raise AssertionError("an LM pool was set up before the inputs were checked")


@pytest.fixture
def no_pool(monkeypatch):
    monkeypatch.setattr(routes, "LMPool", NoPool)
    monkeypatch.setattr(demo, "LMPool", NoPool)


# --- 1. no credential in any output -----------------------------------------------------------


def test_userinfo_without_a_scheme_is_scrubbed_and_a_remembered_password_too():
    from dspy_promptmii.secrets import REDACTED, remember, scrub

    text = f"[hosted_vllm/m] failed to connect to user:{PASSWORD}@10.0.0.5:8000: connection refused"
    assert PASSWORD not in scrub(text) and f"{REDACTED}@10.0.0.5:8000" in scrub(text)
    assert scrub("mail bob@example.com, at 12:30") == "mail bob@example.com, at 12:30"
    # The password of an api_base is remembered: a server that echoes it alone, or the HTTP
    # Basic header made of it, has it erased too.
    remember({"api_base": "http://alice:s3cret-Pa55w0rd%21@h:1/v1"})
    import base64

    basic = base64.b64encode(b"alice:s3cret-Pa55w0rd!").decode()
    echoed = scrub(f"bad password s3cret-Pa55w0rd! (Authorization: Basic {basic}) {basic}")
    assert "s3cret-Pa55w0rd" not in echoed and basic not in echoed


def test_promptmii_hides_a_password_in_the_api_base(capsys, tmp_path, no_backoff):
    data = write_task(tmp_path) / "toy" / "data.jsonl"
    code, out, err = run_promptmii(
        capsys, "induce", "--data", str(data), "--generator", "m", "--api-base", f"http://user:{PASSWORD}@127.0.0.1:9/v1"
    )
    assert code == 2
    line = one_line(err)
    assert "failed to connect" in line and PASSWORD not in out + err


def test_benchmark_keeps_an_api_base_password_out_of_results_log_and_console(
    data_dir, tmp_path, capsys, restore_logging, no_backoff
):
    out = tmp_path / "out"
    code = bench_cli.main(
        ["run", "--data-dir", str(data_dir), "--follower", "m", "--generator", "m",
         "--api-base", f"http://user:{PASSWORD}@127.0.0.1:9/v1", "--n", "4", "--test-rows", "2",
         "--methods", "naive", "--no-constrained", "--no-progress", "--out", str(out)]
    )
    captured = capsys.readouterr()
    assert code == 1  # its one cell has no score
    for name in ("results.jsonl", "run.log", "manifest.json"):
        text = (out / name).read_text()
        assert PASSWORD not in text, f"the password leaked into {name}"
    assert "failed to connect" in (out / "results.jsonl").read_text()
    assert PASSWORD not in captured.out + captured.err


def test_the_reward_never_logs_or_returns_a_key_that_a_401_body_echoes(caplog):
    from training.follower import Follower, FollowerConfig, parse_payload, score_instruction

    key = "sk-follower-0123456789abcdef"

    def echo(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, json={"error": f"invalid key {request.headers['Authorization']}"})

    follower = Follower(FollowerConfig(api_key=key, max_retries=0), transport=httpx.MockTransport(echo))
    tests = parse_payload(
        {"task": "t", "labels": ["neg", "pos"], "input_fields": ["text"], "test_inputs": [["a"], ["b"]],
         "test_labels": ["pos", "neg"], "protocol": Protocol().to_dict()}
    )
    import asyncio

    with caplog.at_level(logging.WARNING, logger="training.follower"):
        result = asyncio.run(score_instruction(follower, INSTRUCTION, tests))
    assert result.reward == 0.0 and "invalid key" in result.follower_error
    assert "HTTP 401" in caplog.text
    assert key not in caplog.text and key not in result.follower_error


# --- 2. a cell's score is complete or not recorded ------------------------------------------


def config(data_dir: Path, out: Path, **changes) -> RunConfig:
    settings = dict(
        out=out, tasks=resolve_tasks(data_dir), n_values=[4], methods=["naive"], test_rows=20,
        follower_style="none", progress=False,
    )
    return RunConfig(**{**settings, **changes})


def test_a_follower_down_during_a_cell_makes_it_an_error_listed_in_the_report_and_retried(data_dir, tmp_path):
    out = tmp_path / "out"
    methods = ["naive", "icl"]
    # Down for 4 of naive's 20 test rows (its cell runs first); up for icl's.
    server = Server(fail=lambda number: 5 <= number <= 8).__enter__()
    follower = Endpoint(hosted_lm(server.url, num_retries=0), "hosted_vllm/m", None, None, "json_schema")
    endpoints = Endpoints(follower=follower, generator=follower)
    summary = run_benchmark(config(data_dir, out, methods=methods), endpoints)
    assert summary.status == "incomplete" and summary.by_status == {"error": 1, "ok": 1}
    assert summary.cells_unfinished == 1
    record = {r["method"]: r for r in read_records(out)}["naive"]
    assert record["status"] == "error" and record["eval_rows_failed"] == 4 and "macro_f1" not in record
    assert "4 of 20 test rows raised" in record["error"] and "the follower is down" in record["eval_first_error"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["runs"][-1]["status"] == "incomplete" and manifest["runs"][-1]["cells_unfinished"] == 1
    report = render_report(out, plot_name=None)
    assert "toy n=4 naive seed=0: error (4 of 20 test rows failed)" in report
    assert "cells without a score: 1 error(s)" in report
    table = [line for line in report.splitlines() if line.startswith("| ")]
    assert table[0].endswith("| n used | errors |")
    naive = next(line for line in table if line.startswith("| naive | 4 |"))
    assert "| n/a |" in naive and naive.endswith("| 1 |")  # no score, one cell in error
    assert next(line for line in table if line.startswith("| icl | 4 |")).endswith("| 0 |")
    try:  # the server is up again: the next run retries the cell in error, and only it
        summary = run_benchmark(config(data_dir, out, methods=methods), endpoints)
    finally:
        server.__exit__()
    assert summary.status == "finished" and summary.by_status == {"ok": 1} and summary.cells_already_done == 1
    assert read_records(out)[-1]["method"] == "naive" and read_records(out)[-1]["macro_f1"] == 1.0
    assert "## Cells without a score" not in render_report(out, plot_name=None)


def test_a_run_whose_every_cell_errored_does_not_exit_0(data_dir, tmp_path, capsys, restore_logging, no_backoff):
    out = tmp_path / "out"
    with Server(fail=lambda number: True) as down:
        code = bench_cli.main(
            ["run", "--data-dir", str(data_dir), "--follower", "m", "--generator", "m", "--api-base", down.url,
             "--n", "4", "--test-rows", "2", "--methods", "naive,icl", "--no-constrained", "--no-progress",
             "--out", str(out)]
        )
    err = capsys.readouterr().err
    assert code == 1
    assert json.loads((out / "manifest.json").read_text())["runs"][-1]["status"] == "incomplete"
    assert "2 cell(s) have no score" in err


# --- 3. deadlines and stops -------------------------------------------------------------------


def test_every_lm_of_the_pool_has_a_timeout_and_the_stop_gate():
    from dspy_promptmii.stopping import StopGate

    assert routes.default_timeout("local") == routes.LOCAL_TIMEOUT
    assert routes.default_timeout("qwen2.5-coder-0.5b-instruct") == routes.LOCAL_TIMEOUT
    assert routes.default_timeout("openai/gpt-4o-mini") == routes.REMOTE_TIMEOUT
    with routes.LMPool(api_base="http://127.0.0.1:9/v1") as pool:
        lm = pool.endpoint("m").lm
    assert lm.kwargs["timeout"] == routes.REMOTE_TIMEOUT
    assert any(isinstance(c, StopGate) for c in lm.copy().callbacks)
    with routes.LMPool(api_base="http://127.0.0.1:9/v1", timeout=7.5) as pool:
        assert pool.endpoint("m").lm.kwargs["timeout"] == 7.5
    with pytest.raises(ValueError, match="timeout"):
        routes.LMPool(timeout=0)


def test_no_lm_request_starts_after_a_stop():
    from dspy_promptmii import stopping

    with Server() as server, routes.LMPool(api_base=server.url) as pool:
        lm = pool.endpoint("m", cache=False).lm
        lm("hello")
        stopping.request_stop()
        try:
            with pytest.raises(stopping.Stopped):
                lm.copy()("hello again")
        finally:
            stopping._stop.clear()
    assert len(server.times) == 1


def test_induce_honours_the_request_timeout(tmp_path):
    data = write_task(tmp_path) / "toy" / "data.jsonl"
    with Server(hang=True) as server:
        started = time.monotonic()
        process = subprocess.run(
            [sys.executable, "-m", "dspy_promptmii.cli", "induce", "--data", str(data), "--generator", "m",
             "--api-base", server.url, "--timeout", "1"],
            capture_output=True, text=True, timeout=120, env=ENV, cwd=ROOT,
        )
        elapsed = time.monotonic() - started
    assert process.returncode == 2, process.stderr
    one_line(process.stderr)
    assert "timed out" in process.stderr.lower() or "timeout" in process.stderr.lower()
    assert elapsed < 60  # 4 attempts of 1 s and DSPy's backoff, not LiteLLM's 6,000 s


BENCHMARK = textwrap.dedent(
    """
    import sys
    sys.path[:0] = [{root!r}, {tests!r}]
    from benchmarks import cli
    sys.exit(cli.main(None))
    """
)


def _as_a_background_job() -> None:
    """What a shell does to a command it starts in the background (``promptmii demo &`` in
    a script): SIGINT ignored. A SIGINT sent to it on purpose must still stop it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _wait_for(server: Server, count: int, process: subprocess.Popen, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while len(server.times) < count:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the run never sent its requests"
        time.sleep(0.05)


def _signal_after(server: Server, count: int, process: subprocess.Popen, sig: int) -> tuple[float, str, int]:
    """Send ``sig`` once ``count`` requests reached the server; (seconds the process took to
    end after it, its stderr, how many requests came after it)."""
    try:
        _wait_for(server, count, process)
        signalled = time.time()
        process.send_signal(sig)
        _, stderr = process.communicate(timeout=30)
        ended = time.time()
    finally:
        process.kill()
    return ended - signalled, stderr, sum(t > signalled + 0.05 for t in server.times)


def _benchmark_process(data_dir: Path, out: Path, url: str, *extra: str, background: bool = False) -> subprocess.Popen:
    argv = ["run", "--data-dir", str(data_dir), "--follower", "m", "--generator", "m", "--api-base", url,
            "--n", "4", "--test-rows", "20", "--methods", "naive", "--no-constrained", "--no-progress",
            "--out", str(out), *extra]
    script = BENCHMARK.format(root=str(ROOT), tests=str(TESTS))
    return subprocess.Popen(
        [sys.executable, "-c", script, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=ENV, cwd=ROOT, preexec_fn=_as_a_background_job if background else None,
    )


def test_sigterm_stops_new_requests_at_once_and_the_benchmark_exits(data_dir, tmp_path):
    out = tmp_path / "out"
    with Server(delay=0.3) as server:
        process = _benchmark_process(data_dir, out, server.url, "--threads", "2")
        seconds, stderr, late = _signal_after(server, 4, process, signal.SIGTERM)
    assert process.returncode == 130, stderr
    assert late == 0, f"{late} requests were sent after SIGTERM"
    assert seconds < 5
    assert json.loads((out / "manifest.json").read_text())["runs"][-1]["status"] == "interrupted"


def test_ctrl_c_ends_a_benchmark_waiting_on_a_server_that_never_answers(data_dir, tmp_path):
    out = tmp_path / "out"
    with Server(hang=True) as server:
        process = _benchmark_process(data_dir, out, server.url, "--threads", "2", "--timeout", "30", background=True)
        seconds, stderr, _ = _signal_after(server, 2, process, signal.SIGINT)
    assert process.returncode == 130, stderr
    assert seconds < 10  # not the 30 s timeout of the requests in flight
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert json.loads((out / "manifest.json").read_text())["runs"][-1]["status"] == "interrupted"


STUBBORN = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    sys.path[:0] = [{root!r}, {tests!r}]
    from fakes import fake_lm, word_count
    from benchmarks import cli, methods
    from benchmarks.methods import MethodSpec
    from dspy_promptmii import routes
    from dspy_promptmii.routes import Endpoint

    class Pool:
        def __init__(self, **kwargs):
            pass
        def __enter__(self):
            return self
        def __exit__(self, *exc_info):
            pass
        def endpoint(self, route, **kwargs):
            lm, _ = fake_lm("pos", model="fake/" + route)
            return Endpoint(lm, "fake/" + route, word_count, 4096, "json_schema")

    def stubborn(ctx):  # code that swallows Ctrl-C, as some libraries do
        Path({marker!r}).write_text("compiling")
        while True:
            try:
                time.sleep(60)
            except KeyboardInterrupt:
                Path({marker!r}).write_text("swallowed")

    routes.LMPool = Pool
    methods.METHODS["naive"] = MethodSpec("naive", stubborn, None)
    sys.exit(cli.main(None))
    """
)


def test_a_second_signal_ends_the_process_at_once(data_dir, tmp_path):
    marker = tmp_path / "marker"
    script = STUBBORN.format(root=str(ROOT), tests=str(TESTS), marker=str(marker))
    argv = ["run", "--data-dir", str(data_dir), "--n", "4", "--test-rows", "4", "--methods", "naive",
            "--no-constrained", "--no-progress", "--out", str(tmp_path / "out")]
    process = subprocess.Popen([sys.executable, "-c", script, *argv], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        while marker.read_text() != "swallowed":
            time.sleep(0.05)
        assert process.poll() is None  # the first signal was swallowed by the method
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=10)
    finally:
        process.kill()
    assert process.returncode == 130 and "again: stopping at once" in stderr


# The demo's pool, with the follower's constrained style a local llama.cpp server has
# (``json_object`` with a schema, which DSPy sends through LiteLLM), at a fake server.
DEMO = textwrap.dedent(
    """
    import dataclasses, functools, sys
    sys.path[:0] = [{root!r}, {tests!r}]
    from dspy_promptmii import cli, demo, routes

    class Pool(routes.LMPool):
        def endpoint(self, route, **kwargs):
            return dataclasses.replace(super().endpoint(route, **kwargs), constrained_style="json_object")

    demo.LMPool = functools.partial(Pool, api_base={url!r})
    sys.exit(cli.main(None))
    """
)


def test_ctrl_c_stops_the_demo_during_evaluation(tmp_path):
    with Server(delay=1.0) as server:  # the signal comes while a request is in flight
        script = DEMO.format(root=str(ROOT), tests=str(TESTS), url=server.url)
        process = subprocess.Popen(
            [sys.executable, "-c", script, "demo", "--follower", "hosted_vllm/m"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT,
            preexec_fn=_as_a_background_job,
        )
        seconds, stderr, late = _signal_after(server, 2, process, signal.SIGINT)
    assert process.returncode == 130, stderr
    assert seconds < 5 and late == 0
    assert "interrupted" in stderr and "Traceback" not in stderr


# --- 4. inputs are never written ----------------------------------------------------------------


def test_induce_refuses_an_out_that_is_its_data_file(capsys, tmp_path, no_pool):
    folder = write_task(tmp_path)
    data = folder / "toy" / "data.jsonl"
    before = data.read_bytes()
    link = tmp_path / "link.jsonl"
    link.symlink_to(data)
    for data_arg, out_arg in ((data, data), (data, link), (folder / "toy", data), (link, data)):
        code, out, err = run_promptmii(capsys, "induce", "--data", str(data_arg), "--generator", "m",
                                       "--out", str(out_arg))
        line = one_line(err)
        assert code == 2 and "--out" in line and "--data" in line and "never overwritten" in line
    assert data.read_bytes() == before and link.is_symlink()


def test_an_out_file_that_is_a_link_is_followed_as_cp_does(tmp_path):
    from dspy_promptmii.files import check_writable, write_json

    target = tmp_path / "results" / "instruction.json"
    target.parent.mkdir()
    target.write_text("old")
    link = tmp_path / "latest.json"
    link.symlink_to(target)
    check_writable(link)
    write_json({"instruction": INSTRUCTION}, link)
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert json.loads(target.read_text()) == {"instruction": INSTRUCTION}
    assert not list(target.parent.glob("*.partial")) and not list(tmp_path.glob("*.partial"))


def test_induce_writes_through_a_linked_out(capsys, tmp_path):
    data = write_task(tmp_path) / "toy" / "data.jsonl"
    target = tmp_path / "kept" / "out.json"
    target.parent.mkdir()
    link = tmp_path / "out.json"
    link.symlink_to(target)
    with Server(text=INSTRUCTION) as server:
        code, out, err = run_promptmii(capsys, "induce", "--data", str(data), "--generator", "m",
                                       "--api-base", server.url, "--out", str(link), "--no-cache")
    assert code == 0, err
    assert link.is_symlink() and json.loads(target.read_text())["instruction"].startswith(INSTRUCTION)


# --- 5. the cache key holds everything that changes a reply -----------------------------------


@pytest.fixture
def fresh_cache(monkeypatch):
    from dspy.clients.cache import Cache

    monkeypatch.setattr(dspy, "cache", Cache(enable_disk_cache=False, enable_memory_cache=True, disk_cache_dir=None))


def test_induce_at_another_server_is_not_served_the_first_servers_cached_instruction(capsys, tmp_path, fresh_cache):
    data = write_task(tmp_path) / "toy" / "data.jsonl"
    with Server(text="First server: label reviews.") as first, Server(text="Second server: label reviews.") as second:
        for server in (first, first, second):
            code, out, err = run_promptmii(capsys, "induce", "--data", str(data), "--generator", "m",
                                           "--api-base", server.url)
            assert code == 0, err
            assert out.startswith(server.text)
        assert len(first.times) == 1  # the repeat was a cache hit ...
        assert len(second.times) == 1  # ... but the other server was asked


def test_a_local_models_cache_scope_is_its_file_not_its_port(tmp_path):
    a, b = tmp_path / "a" / "model.gguf", tmp_path / "b" / "model.gguf"
    for path, content in ((a, b"GGUF one"), (b, b"GGUF two!")):
        path.parent.mkdir()
        path.write_bytes(content)
    route = "hosted_vllm/model"  # the same alias (the file's stem) for both
    scope = {str(p): routes.cache_scope(route, None, routes._model_file(SimpleNamespace(model=str(p), model_path=p)))
             for p in (a, b)}
    assert scope[str(a)] != scope[str(b)]
    again = routes.cache_scope(route, None, routes._model_file(SimpleNamespace(model=str(a), model_path=a)))
    assert again == scope[str(a)]
    registry = routes._model_file(SimpleNamespace(model="qwen2.5-coder-0.5b-instruct", model_path=None))
    assert registry == {"sha256": "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"}
    assert routes.cache_scope("hosted_vllm/m", "http://a/v1") != routes.cache_scope("hosted_vllm/m", "http://b/v1")


class FakeLocalServer:
    """Stands in for LocalServer in LMPool: a new port at every start, no process."""

    port = 40000

    def __init__(self, model, **kwargs):
        self.model, self.model_path, self.n_ctx = model, Path(model), 2048

    def start(self):
        FakeLocalServer.port += 1
        self.base_url = f"http://127.0.0.1:{FakeLocalServer.port}/v1"

    def stop(self):
        pass

    def lm(self, **kwargs):
        return dspy.LM(f"hosted_vllm/{self.model_path.stem}", api_base=self.base_url, api_key="local", **kwargs)

    def count_tokens(self, text):
        return len(text.split())


def test_a_local_endpoint_has_the_local_timeout_and_a_scope_of_its_model_file(tmp_path, monkeypatch):
    import warnings

    monkeypatch.setattr(routes, "LocalServer", FakeLocalServer)
    a, b = tmp_path / "a" / "model.gguf", tmp_path / "b" / "model.gguf"
    for path, content in ((a, b"GGUF one"), (b, b"GGUF two!")):
        path.parent.mkdir()
        path.write_bytes(content)

    def local(path: Path) -> dspy.LM:
        with routes.LMPool() as pool:
            return pool.endpoint(str(path), temperature=0.0).lm

    first, again, other = local(a), local(a), local(b)
    assert first.kwargs["api_base"] != again.kwargs["api_base"]  # another start, another port ...
    assert first.kwargs["rollout_id"] == again.kwargs["rollout_id"]  # ... the same cache scope
    assert first.kwargs["rollout_id"] != other.kwargs["rollout_id"]  # another file of the same name
    assert first.kwargs["timeout"] == routes.LOCAL_TIMEOUT and first.kwargs["temperature"] == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        first._warn_zero_temp_rollout(0.0, first.kwargs["rollout_id"])  # the scope is no rollout: no warning


def test_readme_says_what_is_cached_and_how_to_turn_it_off():
    readme = (ROOT / "README.md").read_text()
    assert "### Caching" in readme
    section = readme.split("### Caching", 1)[1].split("\n## ", 1)[0]
    for needle in ("api_base", "model file", "--no-cache", "cache=False", "DSPY_CACHEDIR"):
        assert needle in section, needle


# --- 6. validation first; one-line errors; escaped labels ---------------------------------------


def test_benchmark_reads_every_task_file_before_pulling_or_starting_a_model(
    tmp_path, monkeypatch, capsys, restore_logging
):
    folder = write_task(tmp_path / "datasets")
    with (folder / "toy" / "data.jsonl").open("a") as handle:
        handle.write('{"text": "no label here", "label": null}\n')
    monkeypatch.setattr(routes, "LMPool", NoPool)
    code = bench_cli.main(["run", "--data-dir", str(folder), "--n", "4", "--test-rows", "4", "--methods", "naive",
                           "--no-progress", "--out", str(tmp_path / "out")])
    line = last_line(capsys.readouterr().err)
    assert code == 2 and f"{folder / 'toy' / 'data.jsonl'}:41: 'label': null is not a label" in line


@pytest.mark.parametrize(
    "content, needle",
    [
        ('{"dev": ["toy"', "SPLITS.json:1:15: not valid JSON"),
        ('{"dev": "toy"}', "SPLITS.json: 'dev' must be a list of task names"),
        ('["toy"]', "SPLITS.json: expected a JSON object"),
        ('{"dev": [1]}', "'dev' must be a list of task names"),
    ],
)
def test_a_broken_splits_file_is_one_line_naming_it(tmp_path, capsys, restore_logging, no_pool, content, needle):
    folder = write_task(tmp_path / "datasets")
    (folder / "SPLITS.json").write_text(content)
    code = bench_cli.main(["run", "--data-dir", str(folder), "--no-progress", "--out", str(tmp_path / "out")])
    line = last_line(capsys.readouterr().err)
    assert code == 2 and needle in line
    from training.sources import read_splits

    with pytest.raises(ValueError, match="SPLITS.json"):
        read_splits(folder)


def test_deeply_nested_json_is_an_error_with_file_and_line(tmp_path, capsys, no_pool, restore_logging):
    data = write_task(tmp_path) / "toy" / "data.jsonl"
    with data.open("a") as handle:
        handle.write('{"text": "deep", "label": ' + "[" * 100000 + "]" * 100000 + "}\n")
    code, out, err = run_promptmii(capsys, "induce", "--data", str(data), "--generator", "m")
    assert code == 2 and f"{data}:41: JSON nested too deeply" in one_line(err)
    code = bench_cli.main(["run", "--data-dir", str(tmp_path), "--tasks", "toy", "--no-progress",
                           "--out", str(tmp_path / "out")])
    assert code == 2 and f"{data}:41: JSON nested too deeply" in last_line(capsys.readouterr().err)
    (tmp_path / "d.json").write_text("[" * 100000 + "]" * 100000)
    from dspy_promptmii.files import read_json

    with pytest.raises(ValueError, match="d.json: JSON nested too deeply"):
        read_json(tmp_path / "d.json")


def test_a_full_disk_names_the_file_and_leaves_the_manifest_not_running(
    data_dir, tmp_path, capsys, restore_logging, monkeypatch
):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.jsonl").symlink_to("/dev/full")  # every write there fails with ENOSPC

    class Pool:
        def __init__(self, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc_info):
            pass

        def endpoint(self, route, **kwargs):
            lm, _ = fake_lm("pos", model=f"fake/{route}")
            return Endpoint(lm, f"fake/{route}", word_count, 4096, "json_schema")

    monkeypatch.setattr(routes, "LMPool", Pool)
    code = bench_cli.main(["run", "--data-dir", str(data_dir), "--n", "4", "--test-rows", "4", "--methods", "naive",
                           "--no-constrained", "--no-progress", "--out", str(out)])
    line = last_line(capsys.readouterr().err)
    assert code == 2 and "[Errno 28]" in line and "results.jsonl" in line
    run = json.loads((out / "manifest.json").read_text())["runs"][-1]
    assert run["status"] == "error" and "results.jsonl" in run["error"]


def test_a_lone_surrogate_in_a_generator_reply_is_replaced_not_raised(capsys, tmp_path):
    data = write_task(tmp_path) / "toy" / "data.jsonl"
    out_file = tmp_path / "out.json"
    with Server(text="Label the review \udc80 by its tone.") as server:
        code, out, err = run_promptmii(capsys, "induce", "--data", str(data), "--generator", "m",
                                       "--api-base", server.url, "--out", str(out_file), "--no-cache")
    assert code == 0, err
    written = json.loads(out_file.read_text(encoding="utf-8"))
    assert "\ufffd" in written["instruction"] and "\ufffd" in written["report"][0]["raw_reply"]
    out.encode("utf-8")  # printable


def test_a_failed_compile_leaves_no_report_of_the_previous_one():
    from dspy_promptmii import PromptMIIOptimizer

    class Mood(dspy.Signature):
        text: str = dspy.InputField()
        label: Literal["neg", "pos"] = dspy.OutputField()

    trainset = [dspy.Example(text=f"t{i}", label=["neg", "pos"][i % 2]).with_inputs("text") for i in range(6)]
    good, _ = fake_lm(INSTRUCTION)
    optimizer = PromptMIIOptimizer(generator_lm=good, n=4)
    optimizer.compile(dspy.Predict(Mood), trainset=trainset)
    assert len(optimizer.report) == 1

    def broken(request):
        raise RuntimeError("the generator went away")

    optimizer.generator_lm, _ = fake_lm(broken)
    optimizer.generator_lm.num_retries = 0
    with pytest.raises(Exception, match="went away"):
        optimizer.compile(dspy.Predict(Mood), trainset=trainset)
    assert optimizer.report == []


def test_labels_with_control_characters_reach_the_terminal_escaped(capsys, tmp_path):
    data = tmp_path / "evil.jsonl"
    labels = ["ok\x1b[2J", "bad\u202e"]
    data.write_text("".join(json.dumps({"text": f"text {i}", "label": labels[i % 2]}) + "\n" for i in range(6)))
    with Server(text=INSTRUCTION) as server:
        code, out, err = run_promptmii(capsys, "induce", "--data", str(data), "--generator", "m",
                                       "--api-base", server.url, "--no-cache")
    assert code == 0, err
    assert "\x1b" not in out + err and "\u202e" not in out + err
    assert "ok\\x1b[2J" in out and "bad\\u202e" in out  # shown, escaped, in the format line


def test_a_printed_instruction_keeps_words_that_look_like_credential_names(capsys, tmp_path):
    data = write_task(tmp_path) / "toy" / "data.jsonl"
    text = "Key: praise means pos. Token words like 'awful' mean neg."
    with Server(text=text) as server:
        code, out, err = run_promptmii(capsys, "induce", "--data", str(data), "--generator", "m",
                                       "--api-base", server.url, "--no-cache")
    assert code == 0 and out.startswith(text), out


def test_benchmark_report_without_matplotlib_is_one_line(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "results"
    folder.mkdir()
    record = {"task": "t", "n": 4, "method": "naive", "seed": 0, "status": "ok", "macro_f1": 0.5}
    (folder / "results.jsonl").write_text(json.dumps(record) + "\n")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    code = bench_cli.main(["report", str(folder)])
    line = one_line(capsys.readouterr().err, "benchmarks")
    assert code == 2 and "matplotlib" in line and "pip install" in line
    assert not (folder / "report.md").exists()


def test_an_unexpected_error_is_one_line_and_its_traceback_only_with_v(capsys, tmp_path, monkeypatch):
    data = write_task(tmp_path) / "toy" / "data.jsonl"

    def boom(*args, **kwargs):
        raise TypeError("something unforeseen")

    monkeypatch.setattr(routes, "LMPool", boom)
    code, out, err = run_promptmii(capsys, "induce", "--data", str(data), "--generator", "m")
    assert code == 2 and one_line(err) == "promptmii: error: TypeError: something unforeseen"
    code, out, err = run_promptmii(capsys, "-v", "induce", "--data", str(data), "--generator", "m")
    assert code == 2 and "Traceback" in err and err.rstrip().endswith("TypeError: something unforeseen")


_WRITE_REPORT = (
    "import sys\n"
    "from dspy_promptmii.console import write_stdout\n"
    "sys.exit(0 if write_stdout('report line\\n' * 100000) else 1)\n"
)


def _report_process(stdout: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", _WRITE_REPORT], stdout=stdout, stderr=subprocess.PIPE,
                          text=True, timeout=60, cwd=Path(__file__).resolve().parents[1])


def test_a_report_to_a_reader_that_went_away_ends_quietly():
    # `python -m training.validation ... | head -1`: the reader closes the pipe mid-report
    reader = subprocess.Popen(["head", "-c", "5"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    done = _report_process(reader.stdin)
    reader.stdin.close()
    reader.wait(timeout=30)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr


def test_a_report_with_stdout_closed_ends_quietly():
    done = subprocess.run([sys.executable, "-c", "import os; os.close(1)\n" + _WRITE_REPORT],
                          stderr=subprocess.PIPE, text=True, timeout=60, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full on this system")
def test_a_report_to_a_full_disk_is_one_warning_and_exit_1():
    with open("/dev/full", "w") as full:
        done = _report_process(full)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert "could not write the report to stdout" in done.stderr and "No space left" in done.stderr
