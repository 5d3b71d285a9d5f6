"""``python -m benchmarks speed``: its measurements against a stub server (what is
measured, what is reported), the command line, and a smoke run on the real embedded
model (no timing assertions: speed targets live in benchmarks/results)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import dspy
import pytest
from support.chat_stub import ChatStub

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import cli  # noqa: E402
from benchmarks.speed import (  # noqa: E402
    WARM_UP_TEXT,
    ServerSetting,
    SpeedConfig,
    binary_queries,
    format_speed,
    measure_load,
    run_speed,
)
from dspy_promptmii.demo import demo_task  # noqa: E402
from dspy_promptmii.routes import Endpoint  # noqa: E402


def _reply(body: dict, headers: dict) -> tuple[int, object]:
    if body.get("response_format", {}).get("type") == "json_schema":
        return 500, {"error": {"message": "json_schema is not supported"}}
    if "response_format" in body:
        return 200, json.dumps({"label": "GetWeather"})
    return 200, "GetWeather"


def _endpoint(stub: ChatStub) -> Endpoint:
    lm = dspy.LM("hosted_vllm/follower", api_base=stub.url, api_key="x", cache=False, num_retries=0)
    return Endpoint(lm=lm, route="hosted_vllm/follower", token_counter=None, context_tokens=None,
                    constrained_style="json_object")


def test_the_queries_are_fixed_binary_snips_rows() -> None:
    first = binary_queries(demo_task(), 6, seed=0)
    assert first == binary_queries(demo_task(), 6, seed=0)
    assert len(first) == 6 and {row["label"] for row in first} <= {"GetWeather", "PlayMusic"}


def test_run_speed_measures_every_style_the_stack_the_cache_and_compile() -> None:
    with ChatStub(_reply) as stub:
        endpoint = _endpoint(stub)
        result = run_speed(endpoint, [("stub", endpoint)], SpeedConfig(queries=3, generator_max_tokens=8))
    styles = {row["style"]: row for row in result["styles"]}
    assert set(styles) == {"none", "grammar", "json_object", "json_schema", "choice"}
    assert "refused" in styles["json_schema"]
    for name in ("none", "grammar", "json_object"):
        row = styles[name]
        assert row["raw"]["n"] == row["stack"]["n"] == 3 and row["raw"]["valid_rate"] == 1.0
        assert isinstance(row["stack_overhead"], float)
    sent = [b for b in stub.bodies if "grammar" in b]
    assert sent and sent[0]["grammar"] == 'root ::= "GetWeather" | "PlayMusic"'
    cache = result["prefix_cache"]
    assert cache["long"]["prompt_tokens"] and cache["short"]["rest"]["n"] == 2 and cache["ratio"] > 0
    [compile_row] = result["compile"]
    assert compile_row["generator"] == "stub" and compile_row["max_tokens"] == 8
    processing = {row["style"]: row for row in result["prompt_processing"]}
    assert "refused" in processing["json_schema"]
    for name in ("none", "grammar", "json_object", "choice"):
        row = processing[name]
        assert row["prompt_processing"]["n"] == row["follower"]["n"] == 3 and row["ratio"] > 0
    one_token = [b for b in stub.bodies if b.get("max_tokens") == 1 and "Input:" in b["messages"][-1]["content"]]
    assert one_token and all("response_format" not in b and "label_choice" not in b for b in one_token)
    scoring = {(row["style"], row["threads"]): row for row in result["scoring"]}
    assert set(scoring) == {("json_object", 1), ("json_object", 4), ("choice", 1), ("choice", 4)}
    assert all(row["rows"] == 20 and row["errors"] == 0 and row["rows_per_second"] > 0 for row in scoring.values())
    assert "load" not in result  # a remote follower: no server of ours to start with other settings
    text = format_speed(result)
    assert "json_schema  refused" in text and "Prefix cache" in text and "Compile" in text
    assert "Answer over prompt processing" in text and "Scoring 20 rows" in text


class StubServer:
    """What measure_load needs of a LocalServer, over a ChatStub."""

    def __init__(self, stub: ChatStub, setting: ServerSetting, started: list) -> None:
        self.base_url, self.alias = stub.url, "follower"
        started.append(setting)
        self.stopped = False

    def stop(self) -> None:
        self.stopped = True


def test_load_series_starts_one_server_per_setting_and_busies_a_core() -> None:
    started: list[ServerSetting] = []
    servers: list[StubServer] = []
    busy_seen = []

    def reply_checking_busy(body: dict, headers: dict) -> tuple[int, object]:
        if WARM_UP_TEXT not in json.dumps(body["messages"]):  # the timed queries, not the cache resets
            busy_seen.append(_busy_loops_running())
        return 200, "GetWeather"

    with ChatStub(reply_checking_busy) as stub:
        def start(setting: ServerSetting) -> StubServer:
            servers.append(StubServer(stub, setting, started))
            return servers[-1]

        settings = (ServerSetting(2, 2, None), ServerSetting(1, 1, "passive"))
        rows = measure_load("model.gguf", binary_queries(demo_task(), 3), "choice", settings, start_server=start)
    assert started == list(settings) and all(server.stopped for server in servers)
    assert [row["name"] for row in rows] == ["threads 2/2, wait default", "threads 1/1, wait passive"]
    assert all(row["idle"]["n"] == row["loaded"]["n"] == row["loaded_2"]["n"] == 3 for row in rows)
    assert all(row["ratio"] == row["ratio_1"] > 0 and row["ratio_2"] > 0 for row in rows)
    # Per setting and query: idle, with one busy loop running, with two (alternating).
    assert busy_seen == [0, 1, 2] * 3 * 2
    assert "1 busy" in format_speed({"queries": 3, "labels": [], "styles": [], "load": rows, "load_style": "choice"})
    assert not _busy_loops_running()


def _busy_loops_running() -> int:
    running = 0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            running += b"while True: pass" in cmdline and state not in ("Z", "T")  # not exited, not paused
    return running


def test_speed_command_line_checks_its_styles() -> None:
    with pytest.raises(SystemExit, match="unknown style 'fast'"):
        cli._styles("none,fast")
    assert cli._styles("none,grammar") == (False, "grammar")


@pytest.mark.real_model
def test_speed_smoke_on_the_embedded_model(local_server, tmp_path) -> None:
    """A few queries per style and a short compile call on the real model: the command
    runs end to end and reports every part (no timing assertions)."""
    out = tmp_path / "speed.json"
    code = cli.main(
        ["speed", "--queries", "2", "--styles", "none,json_object,choice", "--generator-max-tokens", "8",
         "--n", "4", "--no-load", "--out", str(out)]
    )
    assert code == 0
    report = json.loads(out.read_text())
    assert {row["style"] for row in report["styles"]} == {"none", "json_object", "choice"}
    assert all(row["raw"]["valid_rate"] == 1.0 for row in report["styles"])
    assert {row["style"] for row in report["prompt_processing"]} == {"none", "json_object", "choice"}
    assert all(row["errors"] == 0 for row in report["scoring"])
    assert report["compile"][0]["prompt_tokens"] > 50
    assert report["machine"]["cpu_count"] and report["follower"]["local_server"]["model"]


@pytest.mark.real_model
def test_load_series_on_the_embedded_model(local_server) -> None:
    """One setting, two queries: a server of its own starts with the setting, answers idle
    and beside a busy core, and stops (no timing assertions)."""
    [row] = measure_load(
        str(local_server.model_path), binary_queries(demo_task(), 2), "choice", (ServerSetting(1, 2, "passive"),)
    )
    assert row["idle"]["n"] == row["loaded"]["n"] == 2 and row["ratio"] > 0
    assert not _busy_loops_running()
