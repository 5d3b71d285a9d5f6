"""The ``promptmii`` command line: ``induce`` with a fake generator, ``models``,
``serve`` with the fake server, ``demo`` with fake LMs, help, and bad input."""

from __future__ import annotations

import importlib
import json
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
from fakes import fake_lm, word_count

import dspy_promptmii.local
from dspy_promptmii import cli, demo, routes
from dspy_promptmii.local import adapters as adapters_module
from dspy_promptmii.local.pull import CorruptModelError
from dspy_promptmii.local.registry import ADAPTERS, DEFAULT_GENERATOR, DEFAULT_MODEL, REGISTRY, get_spec
from dspy_promptmii.local.server import LocalServer, ServerError
from dspy_promptmii.protocol import format_line
from dspy_promptmii.routes import Endpoint

FAKE_SERVER = Path(__file__).resolve().parent / "support" / "fake_llama_server.py"
pull_module = importlib.import_module("dspy_promptmii.local.pull")

REPLY = "Decide what the user wants done.\n\nRequests to hear songs are PlayMusic; forecasts are GetWeather."
LABELS = ["BookRestaurant", "GetWeather", "PlayMusic"]
TEXTS = {
    "PlayMusic": ["play some jazz", "put on the new album by adele", "i want to hear rock music", "play my playlist"],
    "GetWeather": ["will it rain tomorrow", "how hot is it in rome", "forecast for the weekend", "is it snowing"],
    "BookRestaurant": ["book a table for two", "reserve dinner at eight", "a table at a thai place", "book brunch"],
}


@pytest.fixture
def task_file(tmp_path: Path) -> Path:
    path = tmp_path / "intents.jsonl"
    rows = [{"text": text, "label": label} for label, texts in TEXTS.items() for text in texts]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


class FakePool:
    """Stands in for routes.LMPool: hands out fake endpoints (a generator for requests
    of more than 128 tokens, a follower otherwise) and records how it was built and used."""

    instances: list[FakePool] = []
    prepared: list[str] = []  # local generators checked before the pool (see fake_pool)

    def __init__(self, *, reply=REPLY, follower_reply="PlayMusic", context_tokens=None, **kwargs):
        self.kwargs = kwargs
        self.generator, self.engine = fake_lm(reply, model="fake/generator")
        self.follower, self.follower_engine = fake_lm(follower_reply, model="fake/follower")
        self.context_tokens = context_tokens
        self.requests: list[tuple[str, dict]] = []
        self.closed = False
        FakePool.instances.append(self)

    def endpoint(self, route, **kwargs):
        self.requests.append((route, kwargs))
        settings = {k: v for k, v in kwargs.items() if k not in ("api_base", "cache")}
        lm = self.follower if (kwargs.get("max_tokens") or 0) <= 128 else self.generator
        return Endpoint(
            lm=lm.copy(**settings),
            route=f"fake/{route}",
            token_counter=word_count,
            context_tokens=self.context_tokens,
            constrained_style="json_schema",
        )

    def close(self):
        self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


@pytest.fixture
def fake_pool(monkeypatch):
    """Replace routes.LMPool (and demo's copy of the name, bound when dspy_promptmii.demo
    was first imported); ``fake_pool(**settings)`` sets what the next pool gets."""
    FakePool.instances = []
    settings: dict = {}

    def make_pool(**kwargs):
        return FakePool(**settings, **kwargs)

    monkeypatch.setattr(routes, "LMPool", make_pool)
    monkeypatch.setattr(demo, "LMPool", make_pool)
    FakePool.prepared = []

    class CheckedServer:
        """Stands in for the demo's pre-launch check of a local generator (no llama.cpp, no pull)."""

        def __init__(self, model, **kwargs):
            self.model = model

        def prepare(self):
            FakePool.prepared.append(self.model)
            return []

    monkeypatch.setattr(demo, "LocalServer", CheckedServer)

    def configure(**changes):
        settings.update(changes)
        return FakePool

    return configure


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("promptmii: error: "), err
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"


# -- induce ---------------------------------------------------------------------------


def test_induce_prints_the_instruction_and_writes_the_report(capsys, tmp_path, task_file, fake_pool):
    fake_pool()
    out_file = tmp_path / "out" / "instruction.json"

    code, out, err = run(
        capsys, "induce", "--data", str(task_file), "--generator", "my-generator", "--api-base", "http://gpu:8000/v1",
        "--n", "6", "--template", "meta1", "--seed", "3", "--max-tokens", "300", "--out", str(out_file),
    )

    assert code == 0, err
    instruction = REPLY + "\n" + format_line(LABELS)
    assert out == instruction + "\n"
    [pool] = FakePool.instances
    assert pool.kwargs["api_base"] == "http://gpu:8000/v1"
    assert pool.closed
    [(route, settings)] = pool.requests
    assert route == "my-generator"
    assert settings["max_tokens"] == 300 and settings["temperature"] == 0.0

    # Exactly one generator call, with examples of every label.
    assert pool.engine.calls == 1
    prompt = pool.engine.prompt(0)
    assert all(label in prompt for label in LABELS)

    saved = json.loads(out_file.read_text())
    assert saved["instruction"] == instruction
    assert saved["generator"] == "fake/my-generator"
    assert saved["data"] == str(task_file)
    [report] = saved["report"]
    assert report["generator_calls"] == 1
    assert report["template"] == "meta1"
    assert report["n_requested"] == 6 and report["n_used"] == 6
    assert report["labels"] == LABELS
    assert report["instruction"] == instruction
    assert str(out_file) in err
    assert not list(out_file.parent.glob("*.partial"))


@pytest.mark.parametrize(("extra", "limit"), [([], 224), (["--max-instruction-tokens", "0"], 1024)])
def test_induce_limits_the_generator_to_the_instruction_budget(capsys, task_file, fake_pool, extra, limit):
    fake_pool()
    code, _, err = run(capsys, "induce", "--data", str(task_file), "--generator", "my-generator", *extra)
    assert code == 0, err
    [pool] = FakePool.instances
    [(_, settings)] = pool.requests
    assert settings["max_tokens"] == limit
    assert pool.engine.configs[0].max_tokens == limit


def test_induce_fits_the_meta_prompt_into_a_local_context(capsys, tmp_path, task_file, fake_pool):
    """With a local endpoint (a context size), the meta-prompt budget is the context
    left after the reply: fewer examples are shown."""
    fake_pool(context_tokens=200 + 64 + 150)  # 150 words for the meta-prompt
    out_file = tmp_path / "instruction.json"

    code, out, err = run(
        capsys, "induce", "--data", str(task_file), "--generator", "local", "--max-tokens", "200",
        "--out", str(out_file),
    )

    assert code == 0, err
    [report] = json.loads(out_file.read_text())["report"]
    assert 1 <= report["n_used"] < report["n_available"] == 12
    assert report["meta_prompt_tokens"] <= 150
    assert word_count(FakePool.instances[0].engine.prompt(0)) == report["meta_prompt_tokens"]


def test_induce_missing_file(capsys, tmp_path, fake_pool):
    missing = tmp_path / "nope.jsonl"
    out_file = tmp_path / "out.json"
    code, out, err = run(capsys, "induce", "--data", str(missing), "--generator", "x", "--out", str(out_file))
    assert_one_line_error(code, err, str(missing))
    assert out == "" and not out_file.exists()
    assert FakePool.instances == []  # no LM was even set up


def test_induce_bad_jsonl_line(capsys, tmp_path, task_file, fake_pool):
    lines = task_file.read_text().splitlines()
    lines.insert(2, '{"text": "broken", "label": ')
    task_file.write_text("\n".join(lines) + "\n")
    code, out, err = run(capsys, "induce", "--data", str(task_file), "--generator", "x")
    assert_one_line_error(code, err, f"{task_file}:3", "not valid JSON")
    assert FakePool.instances == []


def test_induce_unknown_generator_name(capsys, task_file):
    """A generator that is neither local nor a route LiteLLM knows: a one-line error,
    not a traceback (no network: LiteLLM refuses it before any request)."""
    code, out, err = run(capsys, "induce", "--data", str(task_file), "--generator", "no-such-model-anywhere")
    assert_one_line_error(code, err, "no-such-model-anywhere")


def test_induce_missing_gguf_generator(capsys, tmp_path, task_file, monkeypatch):
    # llama.cpp "installed" (an empty stand-in module): the model file is what is missing.
    for name in ("llama_cpp", "llama_cpp.server"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    missing = tmp_path / "missing-model.gguf"
    code, out, err = run(capsys, "induce", "--data", str(task_file), "--generator", str(missing))
    assert_one_line_error(code, err, str(missing))


def test_induce_needs_its_arguments(capsys, task_file):
    with pytest.raises(SystemExit) as exited:
        cli.main(["induce", "--data", str(task_file)])
    assert exited.value.code == 2
    assert "--generator" in capsys.readouterr().err


# -- models ---------------------------------------------------------------------------


def test_models_list_shows_the_registry_and_the_cache(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("PROMPTMII_HOME", str(tmp_path))
    spec = get_spec("smollm2-135m-instruct")
    cached = tmp_path / "models" / spec.filename
    cached.parent.mkdir()
    with cached.open("wb") as handle:
        handle.truncate(spec.size)  # sparse: right size, instantly
    pull_module._write_marker(cached, spec.sha256, cached.stat())  # recorded as verified, as a pull records it

    code, out, err = run(capsys, "models", "list")

    assert code == 0, err
    assert f"cache: {tmp_path / 'models'}" in out
    lines = {name: next(line for line in out.splitlines() if name in line) for name in REGISTRY}
    assert f"cached  {cached}" in lines["smollm2-135m-instruct"]
    assert "not cached" in lines[DEFAULT_MODEL]
    assert "98.4 MB" in lines["smollm2-135m-instruct"]
    trained = next(line for line in out.splitlines() if line.strip().startswith(DEFAULT_GENERATOR))
    assert "adapter intact" in trained and "8.8 MB" in trained

    monkeypatch.setattr(adapters_module, "adapters_dir", lambda: tmp_path / "no-adapters")
    code, out, err = run(capsys, "models", "list")
    trained = next(line for line in out.splitlines() if line.strip().startswith(DEFAULT_GENERATOR))
    assert code == 0 and "adapter unusable" in trained and "reinstall" in trained

    # a file that cannot be read (PermissionError, any OSError) is shown, and the rest listed
    def unreadable(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(cached))

    monkeypatch.setattr(dspy_promptmii.local, "cache_state", unreadable)
    monkeypatch.setattr(adapters_module, "resolve_adapter", unreadable)
    code, out, err = run(capsys, "models", "list")
    assert code == 0, err
    assert all(f"unreadable {tmp_path / 'models'}" in out and name in out for name in REGISTRY)
    trained = next(line for line in out.splitlines() if line.strip().startswith(DEFAULT_GENERATOR))
    assert "adapter unusable" in trained and "Permission denied" in trained


@pytest.mark.parametrize("command", [["demo"], ["serve"], ["induce", "--generator", "local", "--data", "x.jsonl"]])
def test_a_context_size_too_small_names_its_flag(capsys, command):
    with pytest.raises(SystemExit) as exited:  # argparse's usage error
        cli.main([*command, "--n-ctx", "100"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "argument --n-ctx: expected an integer >= 512, got 100" in err


def test_models_pull(capsys, tmp_path, monkeypatch):
    pulled = []

    def fake_pull(name, **kwargs):
        pulled.append(name)
        return tmp_path / "model.gguf"

    monkeypatch.setattr(dspy_promptmii.local, "pull", fake_pull)
    assert run(capsys, "models", "pull")[:2] == (0, f"{tmp_path / 'model.gguf'}\n")
    assert run(capsys, "models", "pull", "smollm2-135m-instruct")[0] == 0
    assert pulled == [DEFAULT_MODEL, "smollm2-135m-instruct"]


def test_models_pull_unknown_name(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("PROMPTMII_HOME", str(tmp_path))
    code, out, err = run(capsys, "models", "pull", "no-such-model")
    assert_one_line_error(code, err, "no-such-model", *REGISTRY)
    assert err.startswith("promptmii: error: unknown model 'no-such-model'")  # the message, not the KeyError repr
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


def test_models_pull_of_a_route_or_a_trained_generator_names_the_base_model(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("PROMPTMII_HOME", str(tmp_path))
    code, out, err = run(capsys, "models", "pull", "local")
    assert_one_line_error(code, err, "'local' is the route of the embedded model", repr(DEFAULT_MODEL))
    trained = next(iter(ADAPTERS))
    code, out, err = run(capsys, "models", "pull", trained)
    assert_one_line_error(code, err, f"{trained!r} is a trained generator", repr(ADAPTERS[trained].base))
    assert "did you mean" not in err


# -- serve ------------------------------------------------------------------------------


@pytest.fixture
def serve_fake(tmp_path, monkeypatch):
    """``promptmii serve`` on the fake llama.cpp server, stopped by a Ctrl-C at its first wait;
    gives the model file and the list of LocalServers the command made."""
    model = tmp_path / "tiny-model.gguf"
    model.write_bytes(b"GGUF")
    servers: list[LocalServer] = []

    def fake_local_server(*args, **kwargs):
        servers.append(LocalServer(*args, command=[sys.executable, str(FAKE_SERVER)], startup_timeout=20, **kwargs))
        return servers[-1]

    def ctrl_c(seconds):
        assert servers[-1].running  # serving while it waits
        raise KeyboardInterrupt

    monkeypatch.setattr(dspy_promptmii.local, "LocalServer", fake_local_server)
    monkeypatch.setattr(cli, "time", types.SimpleNamespace(sleep=ctrl_c))
    return model, servers


def test_serve_runs_until_ctrl_c(capsys, serve_fake):
    model, servers = serve_fake

    code, out, err = run(capsys, "serve", "--model", str(model), "--n-ctx", "1024", "--threads", "1")

    assert code == 0, err
    [server] = servers
    assert (server.n_ctx, server.n_threads, server.auto_pull) == (1024, 1, True)
    port = re.search(r"at http://127\.0\.0\.1:(\d+)/v1", out).group(1)
    assert f'dspy.LM("hosted_vllm/tiny-model", api_base="http://127.0.0.1:{port}/v1"' in out
    assert not server.running and server.process is None
    assert server.port is None  # an automatically chosen port is chosen again on restart


def test_serve_takes_local_and_refuses_an_unknown_name_with_a_hint(capsys, serve_fake, monkeypatch):
    model, servers = serve_fake
    code, out, err = run(capsys, "serve", "--model", "lcoal")
    assert_one_line_error(code, err, "unknown model 'lcoal'", "did you mean 'local'", "local models only")
    assert servers == []
    def stop_before_launch(self):
        raise ServerError("stopped here by the test")

    monkeypatch.setattr(LocalServer, "prepare", stop_before_launch)
    code, out, err = run(capsys, "serve", "--model", "local")
    assert_one_line_error(code, err, "stopped here by the test")
    assert [server.model for server in servers] == [DEFAULT_MODEL]  # 'local' is the default model


def test_serve_takes_a_lora_adapter_and_names_the_route_after_both(capsys, tmp_path, serve_fake):
    model, servers = serve_fake
    adapter = tmp_path / "round1d.gguf"
    adapter.write_bytes(b"GGUF")

    code, out, err = run(capsys, "serve", "--model", str(model), "--lora", str(adapter))

    assert code == 0, err
    [server] = servers
    assert server.lora_path == adapter
    assert 'dspy.LM("hosted_vllm/tiny-model+round1d", api_base=' in out  # never the base model's name
    assert f"serving {model} + LoRA {adapter} at http://127.0.0.1:" in out  # what is served: both files

    not_gguf = tmp_path / "adapter.safetensors"
    not_gguf.write_bytes(b"\x00" * 16)
    code, out, err = run(capsys, "serve", "--model", str(model), "--lora", str(not_gguf))
    assert_one_line_error(code, err)
    assert "adapter.safetensors" in err


# -- demo -------------------------------------------------------------------------------


def test_demo_with_fake_lms(capsys, tmp_path, fake_pool):
    """The demo's plumbing end to end on fake LMs: every method evaluated, a table
    printed, the results written; one generator call."""

    fake_pool()
    out_file = tmp_path / "demo.json"

    code, out, err = run(capsys, "demo", "--test-rows", "10", "--n", "7", "--no-constrained", "--out", str(out_file))

    assert code == 0, err
    result = json.loads(out_file.read_text())
    # the table names the generator that wrote the instruction: by default the trained one
    assert [row["method"] for row in result["results"]] == [
        "naive", "icl (n=7)", f"prompt-mii (n=7, {DEFAULT_GENERATOR})"
    ]
    assert result["generator_name"] == DEFAULT_GENERATOR
    assert result["results"][-1]["compile_calls"] == 1
    [pool] = FakePool.instances
    assert pool.closed
    assert pool.engine.calls == 1 and pool.follower_engine.calls == 3 * 10
    assert all(row["invalid_rate"] == 0.0 for row in result["results"])
    assert result["instruction"].startswith(REPLY.split("\n")[0])
    for row in result["results"]:
        assert row["method"] in out
    assert "macro-F1" in out and result["instruction"].splitlines()[0] in out
    # The follower LM sets no limit or temperature: LabelAdapter's protocol does, per label set.
    # the generator's limit enforces the default instruction budget: 160 + 64 tokens
    assert [kwargs.get("max_tokens") for _, kwargs in pool.requests] == [None, 224]
    assert [route for route, _ in pool.requests] == ["local", DEFAULT_GENERATOR]
    assert FakePool.prepared == [DEFAULT_GENERATOR]  # checked before any evaluation
    assert "temperature" not in pool.requests[0][1]
    limits = {config.max_tokens for config in pool.follower_engine.configs}
    temperatures = {config.temperature for config in pool.follower_engine.configs}
    assert limits == {2 + len("SearchScreeningEvent")} and temperatures == {0.0}  # unconstrained: the bare label


def test_demo_gives_chat_adapter_replies_room_for_its_field_markers(capsys, tmp_path, fake_pool):
    fake_pool(follower_reply="[[ ## label ## ]]\nPlayMusic\n\n[[ ## completed ## ]]")
    out_file = tmp_path / "demo.json"

    code, out, err = run(capsys, "demo", "--test-rows", "4", "--n", "7", "--adapter", "chat", "--out", str(out_file))

    assert code == 0, err
    [pool] = FakePool.instances
    assert [kwargs["max_tokens"] for _, kwargs in pool.requests] == [128, 224]
    result = json.loads(out_file.read_text())
    assert result["adapter"] == "chat" and all(row["invalid_rate"] == 0.0 for row in result["results"])


def test_demo_names_an_untrained_generator_and_checks_the_trained_one_before_any_server(
    capsys, tmp_path, fake_pool, monkeypatch
):
    fake_pool()
    code, out, err = run(capsys, "demo", "--test-rows", "2", "--n", "7", "--generator", "local")
    assert code == 0, err
    assert f"prompt-mii (n=7, {DEFAULT_MODEL}, untrained)" in out
    assert [route for route, _ in FakePool.instances[0].requests] == ["local", "local"]
    assert FakePool.prepared == []  # the follower's own server: nothing more to check

    # a remote follower: its route is the generator too, so no llama.cpp is needed
    result = demo.run_demo(follower="openai/gpt-4o-mini", n=7, test_rows=2, progress=False)
    assert [route for route, _ in FakePool.instances[-1].requests] == ["openai/gpt-4o-mini"] * 2
    assert result["generator_name"] == "openai/gpt-4o-mini" and FakePool.prepared == []
    with pytest.raises(ValueError, match="generator must be"):
        demo.run_demo(generator=" ", n=7, test_rows=2, progress=False)
    # a misspelled trained generator or follower is refused before any pool or server
    made = len(FakePool.instances)
    code, out, err = run(capsys, "demo", "--test-rows", "2", "--n", "7", "--generator", "promptmii-qwen2.5-05b")
    assert_one_line_error(code, err)
    assert "did you mean 'promptmii-qwen2.5-0.5b'" in err and out == ""  # refused before the banner
    with pytest.raises(ValueError, match="did you mean 'local'"):
        demo.run_demo(follower="lokal", n=7, test_rows=2, progress=False)
    for wrong in ({"follower": None}, {"generator": 1}):
        with pytest.raises(TypeError, match="must be a string"):
            demo.run_demo(n=7, test_rows=2, progress=False, **wrong)
    assert len(FakePool.instances) == made and FakePool.prepared == []

    # a damaged install: the trained generator's adapter fails its sha256 before a server starts
    monkeypatch.setattr(demo, "LocalServer", LocalServer)
    bad = tmp_path / "adapters"
    bad.mkdir()
    spec = ADAPTERS[DEFAULT_GENERATOR]
    (bad / spec.filename).write_bytes(b"GGUF" + b"\0" * (spec.size - 4))
    monkeypatch.setattr(adapters_module, "adapters_dir", lambda: bad)
    FakePool.instances.clear()
    with pytest.raises(CorruptModelError, match="reinstall"):
        demo.run_demo(n=7, test_rows=2, progress=False)
    assert FakePool.instances == []


def test_run_demo_takes_the_follower_style_as_benchmarks_do(fake_pool):
    fake_pool()
    result = demo.run_demo(n=7, test_rows=2, follower_style="json_schema", progress=False)
    assert result["constrained"] == "json_schema"
    none = demo.run_demo(n=7, test_rows=2, follower_style="none", progress=False)
    assert none["constrained"] is False
    # the deprecated spelling: True was the endpoint's style (not Protocol(True), json_schema)
    with pytest.warns(DeprecationWarning, match="follower_style"):
        old = demo.run_demo(n=7, test_rows=2, constrained=True, progress=False)
    assert old["constrained"] == demo.run_demo(n=7, test_rows=2, progress=False)["constrained"]
    made = len(FakePool.instances)
    with pytest.raises(ValueError, match="follower_style must be one of"):
        demo.run_demo(n=7, test_rows=2, follower_style="json", progress=False)
    assert len(FakePool.instances) == made  # refused before any LM pool was made


# -- help -------------------------------------------------------------------------------

SUBCOMMANDS = [["demo"], ["induce"], ["models"], ["models", "pull"], ["models", "list"], ["serve"]]


def test_help(capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: promptmii")
    for command in ("demo", "induce", "models", "serve"):
        assert command in out


@pytest.mark.parametrize("command", SUBCOMMANDS, ids=" ".join)
def test_subcommand_help(capsys, command):
    with pytest.raises(SystemExit) as exited:
        cli.main([*command, "--help"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: promptmii {' '.join(command)}")


def test_conflicting_decoding_flags_are_a_usage_error(capsys):
    from benchmarks import cli as benchmarks_cli

    for main, argv in ((cli.main, ["demo"]), (benchmarks_cli.main, ["run"])):
        with pytest.raises(SystemExit) as exited:
            main([*argv, "--constrained", "choice", "--no-constrained"])
        assert exited.value.code == 2
        assert "not allowed with argument --constrained" in capsys.readouterr().err


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main([])
    assert exited.value.code == 2
    assert "usage: promptmii" in capsys.readouterr().err


def _entry_point() -> str:
    beside = Path(sys.executable).with_name("promptmii")
    found = str(beside) if beside.exists() else shutil.which("promptmii")
    assert found, "the promptmii console script is not installed (pip install -e .)"
    return found


def test_installed_entry_point(tmp_path):
    command = _entry_point()
    result = subprocess.run([command, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: promptmii") and "induce" in result.stdout

    missing = tmp_path / "missing.jsonl"
    result = subprocess.run(
        [command, "induce", "--data", str(missing), "--generator", "local"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert result.stderr == f"promptmii: error: no task file at {missing}\n"


@pytest.mark.parametrize(
    "argv",
    [
        ["demo", "--n", "0"],
        ["demo", "--test-rows", "-3"],
        ["induce", "--data", "x.jsonl", "--generator", "g", "--max-tokens", "ten"],
        ["serve", "--threads", "0"],
    ],
    ids=" ".join,
)
def test_counts_and_sizes_must_be_positive_integers(capsys, fake_pool, argv):
    fake_pool()
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {argv[-2]}: expected" in err and argv[-1] in err
    assert FakePool.instances == []  # refused before any LM is set up
