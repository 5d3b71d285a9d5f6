"""The OpenRLHF agent (training/agent.py) with a fake vLLM engine and tokenizer: loaded
the way OpenRLHF 0.11.2 loads it, same output shape as OpenRLHF's own single-turn
executor, reward from the follower, failures scored 0. Needs
``pip install --no-deps openrlhf==0.11.2`` (skipped with the reason otherwise); the last
test uses the real embedded follower."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]

from training.follower import Follower, FollowerConfig  # noqa: E402
from training.openrlhf_compat import OpenRLHFUnavailable, agent_module  # noqa: E402

try:
    OPENRLHF_AGENT = agent_module()
except OpenRLHFUnavailable as error:  # pragma: no cover - depends on the environment
    pytest.skip(f"openrlhf.utils.agent cannot be imported ({error})", allow_module_level=True)

from test_training_reward import CHATML_PROMPT, GOLD, LABEL, _oracle  # noqa: E402

AGENT_FILE = ROOT / "training" / "agent.py"
INSTRUCTION = "Decide whether the reviewer liked the film: positive for praise, negative for criticism."


class _Row(list):
    def tolist(self) -> list[int]:
        return list(self)


class FakeTokenizer:
    """Characters as token ids; enough of a HF tokenizer for the executors."""

    def __call__(self, text: str, add_special_tokens: bool = False, return_tensors: str | None = None) -> dict:
        ids = [ord(c) for c in text]
        return {"input_ids": [_Row(ids)] if return_tensors == "pt" else ids}

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(chr(i) for i in ids)


class FakeEngine:
    """Stands in for OpenRLHF's vLLM engine: answers every prompt with a fixed reply."""

    def __init__(self, reply: str, finish_reason: str = "stop"):
        self.reply, self.finish_reason = reply, finish_reason
        self.calls: list[tuple[list[int], Any]] = []

    async def generate(self, prompt_ids: list[int], sampling_params: Any, multi_modal_data: Any = None) -> Any:
        self.calls.append((prompt_ids, sampling_params))
        ids = [ord(c) for c in self.reply]
        logprobs = [{i: SimpleNamespace(logprob=-0.5)} for i in ids]
        output = SimpleNamespace(token_ids=ids, text=self.reply, finish_reason=self.finish_reason, logprobs=logprobs)
        return SimpleNamespace(outputs=[output])


def _params(**overrides: Any) -> SimpleNamespace:
    return SimpleNamespace(**{"max_tokens": None, "logprobs": None, "temperature": 1.0, **overrides})


def _load_like_openrlhf() -> Any:
    """What openrlhf/trainer/ray/vllm_engine.py's _load_agent_executor does."""
    spec = importlib.util.spec_from_file_location("agent_module", str(AGENT_FILE))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert hasattr(module, "AgentExecutor")
    assert issubclass(module.AgentExecutor, OPENRLHF_AGENT.AgentExecutorBase)
    return module


def _run(executor: Any, engine: FakeEngine, label: Any = LABEL, **kw: Any) -> dict[str, Any]:
    prompt = kw.pop("prompt", CHATML_PROMPT)
    return asyncio.run(
        executor.execute(
            prompt, label, kw.pop("params", _params()), kw.pop("max_length", 5120), FakeTokenizer(), engine
        )
    )


def test_loads_like_openrlhf_and_builds_without_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROMPTMII_FOLLOWER_URL", "http://follower.test:9/v1")
    monkeypatch.setenv("PROMPTMII_FOLLOWER_CONCURRENCY", "7")
    executor = _load_like_openrlhf().AgentExecutor()
    assert executor.follower.config.urls == ["http://follower.test:9/v1"]
    assert executor.follower.config.concurrency == 7


def test_execute_rewards_the_instruction_with_the_follower() -> None:
    module = _load_like_openrlhf()
    follower = Follower(FollowerConfig(base_url="http://f.test/v1"), transport=httpx.MockTransport(_oracle))
    engine = FakeEngine("Guidelines:\n" + INSTRUCTION + "<|im_end|>")
    out = _run(module.AgentExecutor(follower=follower), engine, params=_params(logprobs=1))
    assert out["reward"] == out["scores"] == 1.0
    logs = out["extra_logs"]
    assert logs["follower_invalid_rate"] == 0.0 and logs["follower_error"] == 0.0
    assert logs["instruction_tokens"] == len(INSTRUCTION)  # the fake tokenizer: one token a character
    assert logs["response_tokens"] == len(engine.reply)
    prompt_len = len(CHATML_PROMPT)
    assert out["action_ranges"] == [(prompt_len, prompt_len + len(engine.reply))]
    assert len(out["rollout_log_probs"]) == len(out["observation_tokens"])
    assert engine.calls[0][1].max_tokens == 5120 - prompt_len  # dynamic budget, as OpenRLHF computes it
    assert out["truncated"] is False


def test_output_has_the_shape_of_openrlhfs_single_turn_executor() -> None:
    follower = Follower(FollowerConfig(base_url="http://f.test/v1"), transport=httpx.MockTransport(_oracle))
    ours = _run(_load_like_openrlhf().AgentExecutor(follower=follower), FakeEngine(INSTRUCTION))
    theirs = _run(OPENRLHF_AGENT.SingleTurnAgentExecutor(), FakeEngine(INSTRUCTION))
    assert set(ours) == set(theirs)
    for key in ("observation_tokens", "action_ranges", "truncated", "prompt", "label"):
        assert ours[key] == theirs[key], key
    assert theirs["reward"] is None and isinstance(ours["reward"], float)


def test_follower_down_or_bad_label_scores_zero(caplog: pytest.LogCaptureFixture) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    down = Follower(
        FollowerConfig(base_url="http://f.test/v1", max_retries=1, backoff=0.001), transport=httpx.MockTransport(refuse)
    )
    executor = _load_like_openrlhf().AgentExecutor(follower=down)
    with caplog.at_level(logging.WARNING):
        out = _run(executor, FakeEngine(INSTRUCTION, finish_reason="length"))
        bad = _run(executor, FakeEngine(INSTRUCTION), label={"labels": ["x"]})
    assert out["reward"] == 0.0 and out["extra_logs"]["follower_error"] == 1.0 and out["truncated"] is True
    assert bad["reward"] == 0.0
    assert any("reward 0" in r.message for r in caplog.records)


def test_long_prompt_is_truncated_like_openrlhf_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    follower = Follower(FollowerConfig(base_url="http://f.test/v1"), transport=httpx.MockTransport(_oracle))
    engine = FakeEngine(INSTRUCTION)
    with caplog.at_level(logging.WARNING, logger="training.agent"):
        out = _run(
            _load_like_openrlhf().AgentExecutor(follower=follower),
            engine,
            params=_params(max_tokens=100),
            max_length=150,
        )
    assert len(engine.calls[0][0]) == 50 and out["reward"] == 1.0
    assert any("--max-prompt-tokens" in r.message for r in caplog.records)


@pytest.mark.real_model
def test_agent_with_the_real_follower(local_server: Any) -> None:
    """Six follower calls through llama.cpp's server."""
    six = {**LABEL, "test_inputs": LABEL["test_inputs"][:6], "test_labels": LABEL["test_labels"][:6]}
    follower = Follower(FollowerConfig(base_url=local_server.base_url, model=local_server.alias, timeout=120))
    executor = _load_like_openrlhf().AgentExecutor(follower=follower)
    out = _run(executor, FakeEngine("Here are the guidelines:\n" + INSTRUCTION + "<|im_end|>"), label=six)
    assert out["extra_logs"]["follower_error"] == 0.0
    assert out["extra_logs"]["follower_invalid_rate"] <= 0.5
    assert out["reward"] >= 0.5
    assert {GOLD[row[0]] for row in six["test_inputs"]} == {"positive", "negative"}


class _OracleFollower(BaseHTTPRequestHandler):
    """A minimal OpenAI-compatible chat endpoint that answers each review's gold label."""

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        content = body["messages"][0]["content"]
        text = [x for x in content.splitlines() if x.startswith("Input: ")][-1][len("Input: ") :]
        reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": GOLD[text]}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args: Any) -> None:
        pass


def test_reward_file_through_openrlhfs_single_turn_executor(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--reward.remote_url training/reward.py``: OpenRLHF's own executor loads the file,
    decodes prompt + reply and calls reward_func in a thread; the follower is a local HTTP stub."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _OracleFollower)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("PROMPTMII_FOLLOWER_URL", f"http://127.0.0.1:{server.server_address[1]}/v1")
        executor = OPENRLHF_AGENT.SingleTurnAgentExecutor(remote_rm_url=str(ROOT / "training" / "reward.py"))
        out = _run(executor, FakeEngine("Instruction: " + INSTRUCTION + "<|im_end|>"))
    finally:
        server.shutdown()
        server.server_close()
    assert out["reward"] == out["scores"] == 1.0
    assert out["extra_logs"]["follower_invalid_rate"] == 0.0 and out["extra_logs"]["follower_error"] == 0.0
