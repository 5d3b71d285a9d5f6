"""LocalServer's lifecycle and LMPool's routes, with a fake server script standing in
for llama.cpp (tests/support/fake_llama_server.py): no model, no llama.cpp build."""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.request
from pathlib import Path
from typing import Literal

import dspy
import pytest

from dspy_promptmii import routes
from dspy_promptmii.adapter import LabelAdapter
from dspy_promptmii.local.lifetime import sweep
from dspy_promptmii.local.pull import CorruptModelError, ModelFileError
from dspy_promptmii.local.registry import DEFAULT_MODEL, REGISTRY, ModelSpec, get_spec
from dspy_promptmii.local.server import (
    DEFAULT_N_CTX,
    FOLLOWER_STYLE,
    LOG_PREFIX,
    PORTABLE_CMAKE_ARGS,
    LocalServer,
    ServerError,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
FAKE_SERVER = Path(__file__).resolve().parent / "support" / "fake_llama_server.py"
FAKE_COMMAND = [sys.executable, str(FAKE_SERVER)]
CRASH_MESSAGE = "fake llama: error loading model: invalid magic characters"

pull_module = importlib.import_module("dspy_promptmii.local.pull")


def alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie (a zombie has exited; only its
    parent has not collected its status yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_gone(pid: int, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def read_record(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def recorded_pids(path: Path) -> list[int]:
    return [entry["pid"] for entry in read_record(path) if "pid" in entry]


def assert_stopped(server: LocalServer, record: Path) -> None:
    """The server object holds no process, and the one server process it launched is gone."""
    assert not server.running and server.process is None
    [pid] = recorded_pids(record)
    assert not alive(pid)


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny-model.gguf"
    path.write_bytes(b"GGUF not really")
    return path


@pytest.fixture
def record(tmp_path: Path, monkeypatch) -> Path:
    """The fake server's log of its arguments and of every request body it got."""
    path = tmp_path / "record.jsonl"
    monkeypatch.setenv("FAKE_LLAMA_RECORD", str(path))
    monkeypatch.delenv("FAKE_LLAMA_MODE", raising=False)
    monkeypatch.delenv("FAKE_LLAMA_REPLY", raising=False)
    return path


@pytest.fixture
def server_logs(tmp_path: Path, monkeypatch) -> Path:
    """Temporary files (the servers' logs) go to a folder of this test's own."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


@pytest.fixture
def make_server(model_file, record, server_logs):
    """LocalServer with the fake command; every server made here is stopped at the end,
    and the test fails if one of the fake's processes is still alive then."""
    made: list[LocalServer] = []

    def make(model=None, **kwargs) -> LocalServer:
        kwargs.setdefault("startup_timeout", 20)
        server = LocalServer(model_file if model is None else model, command=FAKE_COMMAND, **kwargs)
        made.append(server)
        return server

    yield make
    for server in made:
        server.stop()
    leftover = [pid for pid in recorded_pids(record) if not wait_gone(pid, 5)]
    assert not leftover, f"fake server processes still alive: {leftover}"
    assert not list(server_logs.glob("promptmii-server-*")), "a server log was left behind"


# -- ready ------------------------------------------------------------------------------


def test_start_returns_an_lm_routed_to_the_server(make_server, record, monkeypatch):
    monkeypatch.setenv("FAKE_LLAMA_REPLY", "hello from the fake server")
    server = make_server(n_ctx=2048, n_threads=3)

    lm = server.start()

    assert server.running
    assert server.base_url == f"http://127.0.0.1:{server.port}/v1"
    assert isinstance(lm, dspy.LM)
    assert lm.model == "hosted_vllm/tiny-model"
    assert lm.kwargs["api_base"] == server.base_url
    assert lm.kwargs["temperature"] == 0.0
    # The arguments llama.cpp's server takes, as LocalServer passed them.
    argv = read_record(record)[0]["argv"]
    assert dict(zip(argv[::2], argv[1::2])) == {
        "--model": str(server.model_path),
        "--model_alias": "tiny-model",
        "--host": "127.0.0.1",
        "--port": str(server.port),
        "--n_ctx": "2048",
        "--n_threads": "3",
        "--n_threads_batch": "3",
    }
    assert read_record(record)[0]["omp_wait_policy"] is None  # OpenMP's own default unless set

    # A real call, through DSPy and LiteLLM, reaches the fake and comes back.
    assert server.lm(cache=False, max_tokens=7)("a question for the fake") == ["hello from the fake server"]
    body = next(e["body"] for e in read_record(record) if e.get("path") == "/v1/chat/completions")
    assert body["model"] == "tiny-model"
    assert body["messages"][-1]["content"] == "a question for the fake"
    assert body["max_tokens"] == 7 and "max_completion_tokens" not in body  # what llama.cpp accepts

    assert server.count_tokens("four words right here") == 4

    # start() on a running server hands out another LM, not another process.
    pid = server.process.pid
    assert server.start().model == lm.model
    assert server.process.pid == pid and len(recorded_pids(record)) == 1


@pytest.mark.parametrize("style", sorted({"json_object", FOLLOWER_STYLE}))
def test_constrained_label_request_reaches_the_server(make_server, record, style):
    """LabelAdapter's constrained decoding, in llama.cpp's JSON form and in the form
    LocalServer's route uses, arrives at the server intact (the fake answers the first
    allowed label)."""

    class Intent(dspy.Signature):
        """Classify the request."""

        text: str = dspy.InputField()
        label: Literal["PlayMusic", "GetWeather"] = dspy.OutputField()

    server = make_server()
    lm = server.start().copy(cache=False)
    with dspy.context(lm=lm, adapter=LabelAdapter(constrained=style)):
        prediction = dspy.Predict(Intent)(text="will it rain in Paris tomorrow")

    assert prediction.label == "PlayMusic"
    body = next(e["body"] for e in read_record(record) if e.get("path") == "/v1/chat/completions")
    constraint = body.get("grammar") or body.get("response_format") or body.get("label_choice")
    assert constraint, f"no constraint in the request: {sorted(body)}"
    assert "PlayMusic" in json.dumps(constraint) and "GetWeather" in json.dumps(constraint)


# -- failures at start ----------------------------------------------------------------


def test_crash_at_start_carries_the_server_output(make_server, record, monkeypatch):
    monkeypatch.setenv("FAKE_LLAMA_MODE", "crash")
    server = make_server()

    with pytest.raises(ServerError, match="exited with code 3") as caught:
        server.start()

    assert CRASH_MESSAGE in str(caught.value)
    assert_stopped(server, record)


def test_server_that_never_answers_times_out_and_is_stopped(make_server, record, monkeypatch):
    monkeypatch.setenv("FAKE_LLAMA_MODE", "hang")
    server = make_server(startup_timeout=3.0)  # long enough for the fake to start on a loaded machine

    started = time.monotonic()
    with pytest.raises(ServerError, match="did not answer within 3 s"):
        server.start()
    elapsed = time.monotonic() - started

    assert 3.0 <= elapsed < 17
    assert_stopped(server, record)


def test_ctrl_c_while_waiting_for_the_server_stops_it(make_server, record, monkeypatch):
    monkeypatch.setenv("FAKE_LLAMA_MODE", "hang")
    server = make_server(startup_timeout=30)

    def ctrl_c(signum, frame):
        if not recorded_pids(record):  # a loaded machine: the server has not even started yet
            signal.setitimer(signal.ITIMER_REAL, 0.2)
            return
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, ctrl_c)
    try:
        signal.setitimer(signal.ITIMER_REAL, 1.0)  # Ctrl-C during the wait, once the server runs
        with pytest.raises(KeyboardInterrupt):
            server.start()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)

    assert_stopped(server, record)


def test_busy_port_is_named(make_server, record):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        server = make_server(port=port)
        with pytest.raises(ServerError, match=f"port {port}"):
            server.start()
    assert server.process is None and recorded_pids(record) == []


def test_missing_model_names_the_pull_command(make_server, record, tmp_path, monkeypatch):
    monkeypatch.setenv("PROMPTMII_HOME", str(tmp_path / "home"))

    def no_pull(*args, **kwargs):
        raise AssertionError("LocalServer must not pull unless auto_pull is set")

    monkeypatch.setattr(pull_module, "pull", no_pull)
    with pytest.raises(FileNotFoundError, match=f"promptmii models pull {DEFAULT_MODEL}"):
        make_server(DEFAULT_MODEL).start()
    with pytest.raises(FileNotFoundError, match="no model file"):
        make_server(tmp_path / "absent.gguf").start()
    assert recorded_pids(record) == []


def test_llama_cpp_missing_names_the_local_extra(model_file, monkeypatch):
    # A None entry in sys.modules makes the import fail, as if the package were absent.
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    monkeypatch.setitem(sys.modules, "llama_cpp.server", None)
    server = LocalServer(model_file)  # the default command: python -m llama_cpp.server

    with pytest.raises(ServerError, match=r"dspy-promptmii\[local\]"):
        server.start()
    assert server.process is None


def test_settings_are_checked():
    with pytest.raises(ValueError, match="n_ctx"):
        LocalServer("x.gguf", n_ctx=256)
    server = LocalServer("x.gguf")
    assert server.n_ctx == DEFAULT_N_CTX
    with pytest.raises(ServerError, match="not been started"):
        _ = server.base_url
    with pytest.raises(ServerError, match="not running"):
        server.lm()


# -- stopping ---------------------------------------------------------------------------


def test_stop_terminates_the_server(make_server):
    server = make_server()
    server.start()
    process = server.process

    server.stop()

    assert process.returncode == -signal.SIGTERM
    assert not alive(process.pid)
    assert not server.running
    with pytest.raises(ServerError, match="not running"):
        server.lm()
    server.stop()  # twice is harmless


def test_server_ignoring_sigterm_is_killed_after_the_grace_period(make_server, monkeypatch):
    monkeypatch.setenv("FAKE_LLAMA_MODE", "ignore-term")
    server = make_server(stop_grace=0.5)
    server.start()
    process = server.process

    started = time.monotonic()
    server.stop()

    assert time.monotonic() - started >= 0.5
    assert process.returncode == -signal.SIGKILL
    assert not alive(process.pid)


class Boom(Exception):
    pass


@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt])
def test_context_manager_stops_on_error_and_ctrl_c(make_server, error):
    server = make_server()
    with pytest.raises(error):
        with server as lm:
            assert isinstance(lm, dspy.LM) and server.running
            process = server.process
            raise error("inside the with block")
    assert not server.running
    assert process.returncode is not None and not alive(process.pid)


@pytest.mark.parametrize("mode", ["normal", "ignore-term"])
def test_server_dies_with_its_parent(model_file, record, server_logs, monkeypatch, mode):
    """A Python process that starts a server and dies without stopping it (os._exit:
    no atexit, no finally) takes the server with it, also a server that would not stop
    on SIGTERM (llama.cpp's server, on SIGTERM, first finishes the request in flight,
    which can take minutes on a busy 2-core machine)."""
    monkeypatch.setenv("FAKE_LLAMA_MODE", mode)
    monkeypatch.setenv("TMPDIR", str(server_logs))  # its log folder goes here, not in the real /tmp
    script = textwrap.dedent(
        f"""
        import os, sys
        from dspy_promptmii.local.server import LocalServer
        server = LocalServer({str(model_file)!r}, command={FAKE_COMMAND!r}, startup_timeout=20)
        server.start()
        print(server.process.pid, flush=True)
        os._exit(0)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    pid = int(result.stdout.split()[-1])
    assert pid in recorded_pids(record)
    try:
        assert wait_gone(pid, 10), f"the server {pid} outlived the process that started it"
    finally:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
    # Its log folder stays behind until a sweep (the next start does one): see below.
    [left] = server_logs.glob(f"{LOG_PREFIX}*")
    assert sweep(server_logs, LOG_PREFIX) == [left]


# -- LMPool ---------------------------------------------------------------------------


@pytest.fixture
def cached_models(tmp_path, monkeypatch):
    """PROMPTMII_HOME with the default and the smollm2 model 'cached': sparse files of
    the right size, recorded as verified as a pull records them (resolve_model then
    trusts the record, since size and mtime are unchanged)."""
    monkeypatch.setenv("PROMPTMII_HOME", str(tmp_path / "home"))
    folder = tmp_path / "home" / "models"
    folder.mkdir(parents=True)
    for name in (DEFAULT_MODEL, "smollm2-135m-instruct"):
        spec = get_spec(name)
        path = folder / spec.filename
        with path.open("wb") as handle:
            handle.truncate(spec.size)
        pull_module._write_marker(path, spec.sha256, path.stat())

    def no_pull(*args, **kwargs):
        raise AssertionError("nothing may be pulled here")

    monkeypatch.setattr(pull_module, "pull", no_pull)
    return folder


def test_pool_starts_one_local_server_per_model_and_stops_them(make_server, cached_models, record, monkeypatch):
    def fake_local_server(model, **kwargs):
        return make_server(model, **kwargs)

    monkeypatch.setattr(routes, "LocalServer", fake_local_server)

    with routes.LMPool(n_ctx=1024, n_threads=1) as pool:
        follower = pool.endpoint("local", max_tokens=5, cache=False)
        generator = pool.endpoint(DEFAULT_MODEL, max_tokens=900, cache=False)
        small = pool.endpoint("smollm2-135m-instruct", cache=False)

        assert follower.server is generator.server is not small.server
        assert len(recorded_pids(record)) == 2
        assert follower.lm.model == generator.lm.model == f"hosted_vllm/{DEFAULT_MODEL}"
        assert small.lm.model == "hosted_vllm/smollm2-135m-instruct"
        assert follower.lm.kwargs["api_base"] == follower.server.base_url
        assert (follower.lm.kwargs["max_tokens"], generator.lm.kwargs["max_tokens"]) == (5, 900)
        assert follower.route == "local" and generator.route == DEFAULT_MODEL
        assert follower.context_tokens == 1024 and follower.server.n_ctx == 1024
        argvs = [dict(zip(e["argv"][::2], e["argv"][1::2])) for e in read_record(record) if "argv" in e]
        assert argvs and all(a["--n_threads"] == a["--n_threads_batch"] == "1" for a in argvs)
        assert follower.constrained_style == FOLLOWER_STYLE
        assert follower.token_counter("three small words") == 3
        assert follower.lm("hi") == ["fake reply"]
        assert follower.server.model_path == cached_models / get_spec(DEFAULT_MODEL).filename
        servers = [follower.server, small.server]
        processes = [server.process for server in servers]

    assert not any(server.running for server in servers)
    assert all(process.returncode is not None and not alive(process.pid) for process in processes)


def test_pool_stops_its_servers_on_an_exception(make_server, model_file, monkeypatch):
    monkeypatch.setattr(routes, "LocalServer", lambda model, **kwargs: make_server(model, **kwargs))
    with pytest.raises(Boom):
        with routes.LMPool() as pool:
            endpoint = pool.endpoint(str(model_file))  # a .gguf path is a local route
            assert endpoint.lm.model == "hosted_vllm/tiny-model"
            process = endpoint.server.process
            raise Boom()
    assert not alive(process.pid)


def test_pool_remote_routes(monkeypatch):
    def no_local_server(*args, **kwargs):
        raise AssertionError("a remote route must not start a local server")

    monkeypatch.setattr(routes, "LocalServer", no_local_server)
    base = "http://gpu-box:8000/v1"
    with routes.LMPool() as pool:
        vllm = pool.endpoint("milli19/promptmii-llama-3.1-8b-instruct", api_base=base, max_tokens=1024)
        assert vllm.route == vllm.lm.model == "hosted_vllm/milli19/promptmii-llama-3.1-8b-instruct"
        assert vllm.lm.kwargs["api_base"] == base and vllm.lm.kwargs["max_tokens"] == 1024
        assert vllm.server is None and vllm.token_counter is None and vllm.context_tokens is None
        assert vllm.constrained_style == "json_schema"

        explicit = pool.endpoint("openai/gpt-4o-mini", api_base=base)
        assert explicit.lm.model == "openai/gpt-4o-mini" and explicit.lm.kwargs["api_base"] == base

        hosted = pool.endpoint("openai/gpt-4o-mini")
        assert hosted.lm.model == "openai/gpt-4o-mini" and "api_base" not in hosted.lm.kwargs

    with routes.LMPool(api_base=base) as pool:
        assert pool.endpoint("my-model").lm.model == "hosted_vllm/my-model"
        assert pool.endpoint("my-model").lm.kwargs["api_base"] == base
        other = "http://other:9000/v1"
        assert pool.endpoint("my-model", api_base=other).lm.kwargs["api_base"] == other


def test_a_stopped_server_with_an_automatic_port_restarts_on_a_free_port(make_server):
    server = make_server()
    server.start()
    first = server.port
    server.stop()
    assert server.port is None
    # Someone else takes the old port meanwhile: the restart must not insist on it.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        # SO_REUSEADDR: the old server's closed connections may still sit in TIME_WAIT.
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", first))
        squatter.listen(1)
        server.start()
        assert server.running and server.port != first
    server.stop()


def test_a_command_that_cannot_be_launched_is_named_and_leaves_no_log(model_file, server_logs):
    server = LocalServer(model_file, command=[str(server_logs / "no-such-binary")], startup_timeout=5)
    with pytest.raises(ServerError, match="could not launch the server command"):
        server.start()
    assert not server.running
    assert not list(server_logs.glob("promptmii-server-*"))


# -- the model is checked before launch; a model llama.cpp cannot load is named ----------


@pytest.fixture
def registered_model(tmp_path, monkeypatch) -> ModelSpec:
    """A small registry model (``fake-gguf``), cached in PROMPTMII_HOME and intact."""
    data = b"GGUF" + hashlib.shake_256(b"fake gguf").digest(4096)
    spec = ModelSpec(
        name="fake-gguf", filename="fake.gguf", size=len(data), sha256=hashlib.sha256(data).hexdigest(),
        parts=(), description="a fake", license="none",
    )
    monkeypatch.setitem(REGISTRY, spec.name, spec)
    monkeypatch.setenv("PROMPTMII_HOME", str(tmp_path / "home"))
    path = tmp_path / "home" / "models" / spec.filename
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    assert pull_module.cache_state(spec) == "cached"  # hashed once and recorded
    return spec


def damage(path: Path, keep_mtime: bool) -> None:
    """Flip the last byte. ``keep_mtime``: the damage the record cannot see (a write in
    the same timestamp tick as the record, or a tool that restores mtimes)."""
    before = path.stat()
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    mtime = before.st_mtime_ns if keep_mtime else before.st_mtime_ns + 1_000_000
    os.utime(path, ns=(before.st_atime_ns, mtime))


def test_a_corrupt_registry_model_is_refused_before_launch(make_server, registered_model, record):
    path = pull_module.cached_path(registered_model)
    damage(path, keep_mtime=False)

    with pytest.raises(CorruptModelError, match=re.escape(f"promptmii models pull {registered_model.name}")):
        make_server(registered_model.name).start()
    assert recorded_pids(record) == []  # never launched


def test_a_gguf_path_that_is_not_gguf_is_refused_before_launch(make_server, tmp_path, record):
    text = tmp_path / "readme.gguf"
    text.write_text("this is not a GGUF file\n" * 100)

    with pytest.raises(ModelFileError, match=re.escape(str(text))):
        make_server(text).start()
    assert recorded_pids(record) == []


def test_model_load_failure_of_a_path_comes_with_advice_first(make_server, model_file, record, monkeypatch):
    """llama.cpp exits while loading a .gguf given by path: the first line names the
    file and what to check, then the exit code and the server's output."""
    monkeypatch.setenv("FAKE_LLAMA_MODE", "crash")
    server = make_server(model_file)

    with pytest.raises(ServerError) as caught:
        server.start()

    first, *rest = str(caught.value).splitlines()
    assert first.startswith(f"llama.cpp could not load the model file {model_file}: check the path")
    assert "exited with code 3" in rest[0] and CRASH_MESSAGE in rest
    assert_stopped(server, record)


def test_model_load_failure_of_a_registry_model_says_whether_to_pull_again(
    make_server, registered_model, record, monkeypatch
):
    """A registry model llama.cpp cannot load is hashed in full, whatever its record says:
    damaged, the advice is to pull it again (and the record is dropped, so it is refused
    from then on); intact, the advice is about llama-cpp-python."""
    monkeypatch.setenv("FAKE_LLAMA_MODE", "crash")
    path = pull_module.cached_path(registered_model)

    with pytest.raises(ServerError) as caught:
        make_server(registered_model.name).start()
    first = str(caught.value).splitlines()[0]
    assert first.startswith(f"llama.cpp could not load {path}, although it matches its sha256")

    damage(path, keep_mtime=True)
    assert pull_module.cache_state(registered_model) == "cached"  # the record cannot tell
    with pytest.raises(ServerError) as caught:
        make_server(registered_model.name).start()
    first = str(caught.value).splitlines()[0]
    assert first.startswith(f"llama.cpp could not load {path}: the file is corrupt")
    assert first.endswith(f"run `promptmii models pull {registered_model.name}`, which replaces it.")
    assert pull_module.cache_state(registered_model) == "corrupt"


def test_a_context_that_does_not_fit_is_named_with_its_size(make_server, record, monkeypatch):
    """llama.cpp loads the model but cannot allocate the KV cache of a huge n_ctx (what
    n_ctx=100000000 did on 2026-12-06): the first line names n_ctx and the flag to lower,
    not the model file."""
    monkeypatch.setenv("FAKE_LLAMA_MODE", "no-context")
    server = make_server(n_ctx=100_000_000)

    with pytest.raises(ServerError) as caught:
        server.start()

    first, *rest = str(caught.value).splitlines()
    assert first.startswith("llama.cpp loaded the model but could not make a context of n_ctx=100000000 tokens")
    assert "--n-ctx" in first and "could not load" not in str(caught.value)
    assert "exited with code 1" in rest[0] and "ValueError: Failed to create llama_context" in rest
    assert_stopped(server, record)


def test_a_context_that_fails_for_another_reason_or_at_the_smallest_size_gets_no_advice_to_shrink(
    make_server, record, monkeypatch
):
    monkeypatch.setenv("FAKE_LLAMA_MODE", "no-context-other")
    with pytest.raises(ServerError) as caught:
        make_server(n_ctx=8192).start()
    first = str(caught.value).splitlines()[0]
    assert first == (
        "llama.cpp loaded the model but could not make a context of n_ctx=8192 tokens (its output below says why)."
    )
    assert "V cache quantization requires flash_attn" in str(caught.value)

    monkeypatch.setenv("FAKE_LLAMA_MODE", "no-context")
    with pytest.raises(ServerError) as caught:
        make_server(n_ctx=512).start()
    first = str(caught.value).splitlines()[0]
    assert first.endswith("(its KV cache did not fit in memory, at the smallest n_ctx): free memory.")


def test_another_crash_gets_no_model_advice(make_server, record, monkeypatch):
    monkeypatch.setenv("FAKE_LLAMA_MODE", "crash-other")
    server = make_server()

    with pytest.raises(ServerError) as caught:
        server.start()

    message = str(caught.value)
    assert message.startswith("the server exited with code 4 while starting")
    assert "could not load" not in message and "address already in use" in message
    assert_stopped(server, record)


# -- lifetime: a server started from a worker thread -------------------------------------


def test_a_server_started_from_a_worker_thread_outlives_the_thread(make_server, record):
    """Linux's parent-death signal belongs to the thread that forks: a server forked by
    a worker thread would be killed when that thread ends. It must live on until stop()."""
    server = make_server()
    errors: list[BaseException] = []

    def start() -> None:
        try:
            server.start()
        except BaseException as error:
            errors.append(error)

    worker = threading.Thread(target=start)
    worker.start()
    worker.join(60)
    assert not worker.is_alive() and not errors, errors

    time.sleep(0.5)  # the signal would come as the thread ends
    [pid] = recorded_pids(record)
    assert alive(pid) and server.running
    with urllib.request.urlopen(f"{server.base_url}/models", timeout=10) as response:
        assert response.status == 200
    assert server.lm(cache=False)("hi") == ["fake reply"]

    server.stop()
    assert not alive(pid)


# -- server logs --------------------------------------------------------------------------


def test_the_log_is_in_a_folder_of_this_process_and_stop_removes_it(make_server, server_logs):
    server = make_server()
    server.start()

    log = server.log_path
    assert log.name == "server.log" and log.parent.parent == server_logs
    assert log.parent.name.startswith(f"promptmii-server-{os.getpid()}-")
    assert "fake llama: serving" in log.read_text()

    server.stop()
    assert server.log_path is None and not log.parent.exists()


HOLD_A_SERVER = """
import os, sys, time
from dspy_promptmii.local.server import LocalServer
server = LocalServer(sys.argv[1], command=sys.argv[2:], startup_timeout=20)
server.start()
print(server.log_path, server.process.pid, flush=True)
if os.environ["THEN"] == "die":
    os._exit(0)  # no stop(), no atexit: as if killed
time.sleep(60)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_log_folders_of_dead_processes_are_removed_at_the_next_start(make_server, model_file, server_logs):
    """A process that died without stopping its server leaves its log folder; the next
    start (in any process) removes it, and keeps that of a process still running."""

    def spawn(then: str) -> tuple[subprocess.Popen, Path, int]:
        process = subprocess.Popen(
            [sys.executable, "-c", HOLD_A_SERVER, str(model_file), *FAKE_COMMAND],
            env={**os.environ, "TMPDIR": str(server_logs), "THEN": then,
                 "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])},
            stdout=subprocess.PIPE, text=True,
        )
        log, pid = process.stdout.readline().split()
        return process, Path(log), int(pid)

    live, live_log, live_server = spawn("live")
    dead, dead_log, dead_server = spawn("die")
    try:
        dead.wait(timeout=30)
        assert wait_gone(dead_server, 10)  # the server died with its parent...
        assert dead_log.parent.is_dir()  # ...and left its log folder behind
        assert dead_log.parent.name.startswith(f"promptmii-server-{dead.pid}-")

        server = make_server()
        server.start()

        assert not dead_log.parent.exists()
        assert live_log.is_file() and alive(live_server)  # a live process's log is kept
        server.stop()
    finally:
        live.kill()
        live.wait(timeout=30)
        for pid in (dead_server, live_server):
            if not wait_gone(pid, 10):
                os.kill(pid, signal.SIGKILL)
    assert wait_gone(live_server, 10)
    make_server().start()  # and once its process is gone, its folder goes too
    assert not live_log.parent.exists()


@pytest.mark.parametrize("policy, expected", [("passive", "PASSIVE"), ("active", "ACTIVE"), (None, None)])
def test_thread_settings_reach_the_server(make_server, record, monkeypatch, policy, expected):
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # the user's own setting does not leak past the option
    server = make_server(n_threads=1, n_threads_batch=2, wait_policy=policy)
    server.start()
    [entry] = [e for e in read_record(record) if "argv" in e]
    argv = dict(zip(entry["argv"][::2], entry["argv"][1::2]))
    assert (argv["--n_threads"], argv["--n_threads_batch"]) == ("1", "2")
    assert entry["omp_wait_policy"] == expected


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"wait_policy": "spin"}, "wait_policy must be one of"),
        ({"n_threads": 0}, "n_threads must be a positive integer"),
        ({"n_threads_batch": 1.5}, "n_threads_batch must be a positive integer"),
        ({"n_threads": True}, "n_threads must be a positive integer"),
    ],
)
def test_bad_thread_settings_are_refused_by_name(model_file, kwargs, message):
    with pytest.raises(ValueError, match=message):
        LocalServer(model_file, **kwargs)


# -- routes a user types ---------------------------------------------------------------


@pytest.mark.parametrize(
    "route, api_base",
    [
        ("local", None),
        (DEFAULT_MODEL, None),
        ("promptmii-qwen2.5-0.5b", None),  # a trained generator
        ("/models/any.gguf", None),
        ("./Model.Q4_K_M.GGUF", None),  # a GGUF path in any case
        ("openai/gpt-4o-mini", None),
        ("gpt-4o-mini", None),  # LiteLLM knows the provider of this bare name
        ("hosted_vllm/my-model", None),
        ("my-served-model", "http://localhost:8000/v1"),  # an OpenAI-compatible server names it
    ],
)
def test_routes_a_user_can_type_are_accepted(route, api_base):
    routes.check_route(route, api_base)


@pytest.mark.parametrize(
    "route, hint",
    [
        ("promptmii-qwen2.5-05b", "did you mean 'promptmii-qwen2.5-0.5b'"),
        ("qwen2.5-coder-0.5b-instruct-q4", f"did you mean '{DEFAULT_MODEL}'"),
        ("lokal", "did you mean 'local'"),
        ("LOCAL", "did you mean 'local'"),  # spelling, whatever the case
        ("nonsense-model", "nor can LiteLLM route it"),
    ],
)
def test_a_misspelled_or_unroutable_model_is_refused_before_any_server_starts(route, hint, monkeypatch, capsys):
    def no_server(*args, **kwargs):
        raise AssertionError("no server may start for a refused route")

    monkeypatch.setattr(routes, "LocalServer", no_server)
    with pytest.raises(ValueError, match="unknown model") as refused:
        routes.check_route(route)
    message = str(refused.value)
    assert hint in message and route in message and DEFAULT_MODEL in message and "promptmii-qwen2.5-0.5b" in message
    with routes.LMPool() as pool, pytest.raises(ValueError, match=re.escape(hint)):
        pool.endpoint(route)
    assert capsys.readouterr().out == ""  # no LiteLLM provider banner on stdout
    for empty in ("", "  "):
        with pytest.raises(ValueError, match="non-empty"):
            routes.check_route(empty)
    for spaced in (" openai/gpt-4o-mini", "openai/gpt-4o-mini ", f"{DEFAULT_MODEL}\t"):
        with pytest.raises(ValueError, match="white space around it"):
            routes.check_route(spaced)
    for wrong in (None, 1, Path("m.gguf")):
        with pytest.raises(TypeError, match="must be a string"):
            routes.check_route(wrong)


# -- a server that stops on its own -------------------------------------------------------


def wait_for_failure(server: LocalServer, seconds: float = 10.0) -> ServerError | None:
    deadline = time.monotonic() + seconds
    while server.failure is None and time.monotonic() < deadline:
        time.sleep(0.05)
    return server.failure


@pytest.mark.parametrize(
    ("sent", "says"),
    [
        (signal.SIGSEGV, ["killed by signal SIGSEGV", "llama.cpp crashed", "CMAKE_ARGS=", PORTABLE_CMAKE_ARGS]),
        (signal.SIGKILL, ["killed by signal SIGKILL", "out of memory"]),
    ],
)
def test_a_server_that_dies_after_it_was_ready_is_named_with_its_cause(make_server, sent, says, caplog):
    server = make_server()
    server.start()
    with caplog.at_level(logging.ERROR, logger="dspy_promptmii.local.server"):
        os.kill(server.process.pid, sent)
        failure = wait_for_failure(server)
    assert isinstance(failure, ServerError) and not server.running
    text = str(failure)
    assert "stopped on its own" in text and server.base_url in text and "fake llama: serving" in text
    for part in says:
        assert part in text
    if sent != signal.SIGSEGV:
        assert "CMAKE_ARGS" not in text  # the rebuild advice is for crashes only
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR] == [text]  # logged at once


def test_a_stopped_or_restarted_server_has_no_failure(make_server):
    server = make_server()
    server.start()
    server.stop()
    time.sleep(0.3)  # the watcher has seen its process end
    assert server.failure is None
    server.start()
    os.kill(server.process.pid, signal.SIGINT)  # a Ctrl-C of the terminal reaches the server too
    server.process.wait()
    time.sleep(0.3)
    assert server.failure is None and not server.running
    server.start()
    os.kill(server.process.pid, signal.SIGKILL)
    assert wait_for_failure(server) is not None
    server.stop()
    server.start()  # a new start clears what the last process died of
    assert server.failure is None and server.running
