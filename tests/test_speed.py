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
from benchmarks.speed import SpeedConfig, binary_queries, format_speed, run_speed  # noqa: E402
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
    assert set(styles) == {"none", "grammar", "json_object", "json_schema"}
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
    text = format_speed(result)
    assert "json_schema  refused" in text and "Prefix cache" in text and "Compile" in text


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
        ["speed", "--queries", "2", "--styles", "none,grammar,json_object", "--generator-max-tokens", "8",
         "--n", "4", "--out", str(out)]
    )
    assert code == 0
    report = json.loads(out.read_text())
    assert {row["style"] for row in report["styles"]} == {"none", "grammar", "json_object"}
    assert all(row["raw"]["valid_rate"] == 1.0 for row in report["styles"])
    assert report["compile"][0]["prompt_tokens"] > 50
    assert report["machine"]["cpu_count"] and report["follower"]["local_server"]["model"]
