"""The benchmark's results folder: torn lines inside a UTF-8 character, changed data under
the same task name, every result-changing input in the configuration check, one run at a
time per folder (a lock), and SIGTERM ending a run like Ctrl-C. Fake LMs; local processes only."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import dspy
import pytest
from fakes import fake_lm, message_texts, word_count
from support.chat_stub import ChatStub

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:  # `pytest` run without the repository root on sys.path
    sys.path.insert(0, str(ROOT))

from benchmarks import methods  # noqa: E402
from benchmarks.methods import MethodSpec  # noqa: E402
from benchmarks.runner import ConfigMismatch, Endpoints, RunConfig, run_benchmark  # noqa: E402
from benchmarks.store import LOCK, FolderLocked, ResultStore, read_records  # noqa: E402
from benchmarks.tasks import resolve_tasks  # noqa: E402
from dspy_promptmii.routes import Endpoint  # noqa: E402

WORDS = {"pos": "great", "neg": "awful"}


def make_task(root: Path, name: str = "toy", suffix: str = "") -> Path:
    (root / name).mkdir(parents=True, exist_ok=True)
    rows = [{"text": f"row {i} was {WORDS[lab]}{suffix}", "label": lab} for i, lab in enumerate(["pos", "neg"] * 10)]
    (root / name / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def reply(request) -> str:
    return "neg" if "awful" in message_texts(request.messages[-1]) else "pos"


def _label(body: dict, headers: dict) -> tuple[int, str]:
    """Labels by the same rule as ``reply``."""
    return 200, "neg" if "awful" in json.dumps(body["messages"][-1]) else "pos"


@pytest.fixture
def serve():
    """``serve()`` starts one more labelling server on 127.0.0.1 and gives its base URL."""
    stubs = []

    def start() -> str:
        stubs.append(ChatStub(_label).start())
        return stubs[-1].url

    yield start
    for stub in stubs:
        stub.close()


def endpoint(
    route: str = "fake/follower", context_tokens: int | None = 4096, server=None, url: str | None = None, **lm_kwargs
) -> Endpoint:
    """A fake LM, or with ``url`` a real ``dspy.LM`` routed to a local labelling server."""
    if url is None:
        lm, _ = fake_lm(reply, model=route, **lm_kwargs)
    else:
        lm = dspy.LM("hosted_vllm/follower", api_base=url, cache=False, num_retries=0, **lm_kwargs)
    return Endpoint(
        lm=lm,
        route=route,
        token_counter=word_count,
        context_tokens=context_tokens,
        constrained_style="json_schema",
        server=server,
    )


def endpoints(**follower) -> Endpoints:
    return Endpoints(follower=endpoint(**follower), generator=endpoint("fake/generator"))


def config(data_dir: Path, out: Path, **overrides) -> RunConfig:
    values = dict(
        out=out, tasks=resolve_tasks(data_dir), n_values=[4], methods=["naive", "icl"], test_rows=6,
        follower_style="none", progress=False,
    )
    values.update(overrides)
    return RunConfig(**values)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return make_task(tmp_path / "datasets")


# --- torn lines --------------------------------------------------------------------------


def test_a_last_line_torn_inside_a_utf8_character_is_skipped_with_a_warning(data_dir, tmp_path, caplog):
    out = tmp_path / "out"
    run_benchmark(config(data_dir, out), endpoints())
    assert len(read_records(out)) == 2
    line = json.dumps({"task": "toy", "n": 4, "method": "naive", "seed": 0, "error": "caf\u00e9"}, ensure_ascii=False)
    torn = line.encode("utf-8")
    torn = torn[: torn.index("\u00e9".encode()) + 1]  # cut between the two bytes of é
    with (out / "results.jsonl").open("ab") as handle:
        handle.write(torn)

    assert len(read_records(out)) == 2  # no UnicodeDecodeError
    assert "the last line" in caplog.text
    summary = run_benchmark(config(data_dir, out), endpoints())  # resume reads it too
    assert summary.cells_already_done == 2 and summary.cells_run == 0

    from benchmarks.report import render_report

    assert "naive" in render_report(out, plot_name=None)  # and so does the report


def test_a_torn_line_in_the_middle_is_skipped_and_the_rest_read(tmp_path, caplog):
    path = tmp_path / "results.jsonl"
    good = json.dumps({"task": "t", "n": 1, "method": "m", "seed": 0, "status": "ok"}).encode()
    path.write_bytes(good + b"\n" + b'{"task": "t\xc3\n' + good + b"\n")
    assert len(read_records(path)) == 2
    assert "results.jsonl:2" in caplog.text


# --- changed data under the same name ----------------------------------------------------


def test_finished_cells_made_with_other_data_are_refused(data_dir, tmp_path):
    out = tmp_path / "out"
    run_benchmark(config(data_dir, out), endpoints())
    make_task(data_dir, suffix=" indeed")  # the same task name, other rows
    with pytest.raises(ConfigMismatch, match=r"task 'toy' \(n=\[4\]\).*another --out"):
        run_benchmark(config(data_dir, out), endpoints())
    assert len(read_records(out)) == 2  # nothing was run or appended

    summary = run_benchmark(config(data_dir, tmp_path / "new"), endpoints())  # a new --out runs
    assert summary.cells_run == 2
    make_task(data_dir)  # the data back as it was: the old folder resumes
    assert run_benchmark(config(data_dir, out), endpoints()).cells_already_done == 2


# --- every result-changing input in the configuration check --------------------------------


@pytest.mark.parametrize(
    ("first", "second", "differing"),
    [
        ({"url": 1}, {"url": 2}, "follower.api_base"),  # another server: --api-base
        ({"context_tokens": 4096}, {"context_tokens": 2048}, "follower.context_tokens"),
        ({"top_p": 0.5}, {"top_p": 0.9}, "follower.lm_kwargs.top_p"),
        ({"url": 1, "extra_headers": {"X-Route": "a"}}, {"url": 1, "extra_headers": {"X-Route": "b"}}, "extra_headers"),
    ],
)
def test_a_changed_lm_setting_is_refused(data_dir, tmp_path, serve, first, second, differing):
    urls = {1: serve(), 2: serve()}
    out = tmp_path / "out"
    for settings in (first, second):
        if "url" in settings:
            settings["url"] = urls[settings["url"]]
    summary = run_benchmark(config(data_dir, out, methods=["naive"]), endpoints(**first))
    assert summary.by_status == {"ok": 1}
    with pytest.raises(ConfigMismatch, match=f"differing: [^;]*{differing}"):
        run_benchmark(config(data_dir, out, methods=["naive"]), endpoints(**second))
    # The same settings again resume.
    assert run_benchmark(config(data_dir, out, methods=["naive"]), endpoints(**first)).cells_already_done == 1


def test_a_new_api_key_is_not_a_new_setting(data_dir, tmp_path, serve):
    url, out = serve(), tmp_path / "out"
    run_benchmark(config(data_dir, out, methods=["naive"]), endpoints(url=url, api_key="first-key-123456"))
    summary = run_benchmark(config(data_dir, out, methods=["naive"]), endpoints(url=url, api_key="second-key-654321"))
    assert summary.cells_already_done == 1


def fake_server(tmp_path: Path, n_ctx: int, size: int, port: int) -> SimpleNamespace:
    path = tmp_path / "m.gguf"
    path.write_bytes(b"\0" * size)
    return SimpleNamespace(model=str(path), model_path=path, n_ctx=n_ctx, n_threads=2, port=port)


def test_a_local_server_counts_by_model_file_and_n_ctx_not_by_port(data_dir, tmp_path, serve):
    out = tmp_path / "out"

    def local(n_ctx: int, size: int) -> Endpoints:
        url = serve()  # every start of a local server has a port of its own
        server = fake_server(tmp_path, n_ctx, size, int(url.split(":")[2].split("/")[0]))
        follower = endpoint("local", context_tokens=n_ctx, server=server, url=url, api_key="local")
        return Endpoints(follower=follower, generator=endpoint("fake/generator"))

    assert run_benchmark(config(data_dir, out, methods=["naive"]), local(4096, 10)).by_status == {"ok": 1}
    # Another start of the same server: a new port, nothing else.
    assert run_benchmark(config(data_dir, out, methods=["naive"]), local(4096, 10)).cells_already_done == 1
    with pytest.raises(ConfigMismatch, match="follower.local_server.n_ctx"):
        run_benchmark(config(data_dir, out, methods=["naive"]), local(2048, 10))
    with pytest.raises(ConfigMismatch, match="follower.local_server.bytes"):
        run_benchmark(config(data_dir, out, methods=["naive"]), local(4096, 11))


def test_package_versions_that_change_results_are_settings(data_dir, tmp_path):
    out = tmp_path / "out"
    run_benchmark(config(data_dir, out, methods=["naive"]), endpoints())
    settings = json.loads((out / "manifest.json").read_text())["settings"]
    assert settings["versions"]["dspy"] and set(settings["versions"]) >= {"dspy", "litellm", "llama-cpp-python"}


# --- one run per folder ---------------------------------------------------------------------

HOLD = textwrap.dedent(
    """
    import fcntl, os, sys, time
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, b"%d\\n" % os.getpid())
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
    """
)


@pytest.fixture
def other_run(tmp_path):
    """A second process holding a folder's lock, as a running benchmark does."""
    processes = []

    def hold(folder: Path) -> subprocess.Popen:
        folder.mkdir(parents=True, exist_ok=True)
        process = subprocess.Popen(
            [sys.executable, "-c", HOLD, str(folder / LOCK), "30"], stdout=subprocess.PIPE, text=True
        )
        processes.append(process)
        assert process.stdout.readline().strip() == "locked"
        return process

    yield hold
    for process in processes:
        process.kill()
        process.wait(timeout=10)


def test_a_second_run_on_a_folder_fails_at_once(data_dir, tmp_path, other_run):
    out = tmp_path / "out"
    holder = other_run(out)
    started = time.monotonic()
    expected = rf"{out} is being written by another benchmark run \(process {holder.pid}\)"
    with pytest.raises(FolderLocked, match=expected):
        run_benchmark(config(data_dir, out), endpoints())
    assert time.monotonic() - started < 5
    assert not (out / "results.jsonl").exists() and not (out / "manifest.json").exists()


def test_the_lock_is_released_when_a_run_ends_and_reentrant_within_it(data_dir, tmp_path):
    out = tmp_path / "out"
    store = ResultStore(out)
    with store.lock():  # the command line holds it while its LMs start; the runner takes it again
        run_benchmark(config(data_dir, out, methods=["naive"]), endpoints())
    probe = subprocess.run(
        [sys.executable, "-c", HOLD, str(out / LOCK), "0"], capture_output=True, text=True, timeout=30
    )
    assert probe.returncode == 0 and probe.stdout.strip() == "locked"


def test_the_benchmark_command_refuses_a_locked_folder_before_starting_lms(
    tmp_path, data_dir, other_run, monkeypatch, capsys
):
    from benchmarks import cli
    from dspy_promptmii import routes

    def no_pool(**kwargs):
        raise AssertionError("LMs were started for a locked folder")

    monkeypatch.setattr(routes, "LMPool", no_pool)
    out = tmp_path / "out"
    holder = other_run(out)
    assert cli.main(["run", "--data-dir", str(data_dir), "--out", str(out)]) == 2
    assert f"{out} is being written by another benchmark run (process {holder.pid})" in capsys.readouterr().err


# --- SIGTERM ----------------------------------------------------------------------------------


def test_sigterm_ends_a_run_like_ctrl_c(data_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    previous = signal.getsignal(signal.SIGTERM)

    def killed(ctx):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)  # interrupted by the handler at once
        raise AssertionError("SIGTERM did not interrupt the run")

    monkeypatch.setitem(methods.METHODS, "icl", MethodSpec("icl", killed, None))
    started = time.monotonic()
    summary = run_benchmark(config(data_dir, out), endpoints())
    assert time.monotonic() - started < 8
    assert summary.status == "interrupted" and summary.cells_run == 1
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["runs"][-1]["status"] == "interrupted" and manifest["runs"][-1]["finished"]
    assert [r["method"] for r in read_records(out)] == ["naive"]  # the finished cell is kept
    assert signal.getsignal(signal.SIGTERM) == previous  # the handler is put back


KILLED_RUN = textwrap.dedent(
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
            print("pool closed", flush=True)
        def endpoint(self, route, **kwargs):
            lm, _ = fake_lm("pos", model="fake/" + route)
            return Endpoint(lm=lm, route="fake/" + route, token_counter=word_count, context_tokens=4096,
                            constrained_style="json_schema")

    def blocking(ctx):
        Path({marker!r}).write_text("compiling")
        time.sleep(60)

    routes.LMPool = Pool
    methods.METHODS["icl"] = MethodSpec("icl", blocking, None)
    sys.exit(cli.main(["run", "--data-dir", {data!r}, "--n", "4", "--test-rows", "6", "--methods", "naive,icl",
                       "--no-constrained", "--no-progress", "--out", {out!r}]))
    """
)


def test_the_benchmark_command_ends_on_sigterm_with_an_interrupted_manifest(data_dir, tmp_path):
    out, marker = tmp_path / "out", tmp_path / "marker"
    script = KILLED_RUN.format(root=str(ROOT), tests=str(TESTS), marker=str(marker), data=str(data_dir), out=str(out))
    process = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path
    )
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the run never reached its second cell"
            time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 130, stderr
    assert "interrupted" in stdout and "pool closed" in stdout  # the LMs were stopped on the way out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["runs"][-1]["status"] == "interrupted"
    assert [r["method"] for r in read_records(out)] == ["naive"]
