"""The follower reward (training/follower.py, training/reward.py): instruction
extraction, request shape, scoring, and the failure paths (server down, timeouts, server
errors, garbage bodies and replies) -- all scored 0 with a warning, never raised. The
last test runs the real embedded follower (llama.cpp) on a sentiment task."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from typing import Any

import httpx
import pytest

from dspy_promptmii.protocol import follower_prompt  # noqa: E402
from training import reward  # noqa: E402
from training.follower import (  # noqa: E402
    Follower,
    FollowerConfig,
    HeldOutSet,
    extract_instruction,
    follower_max_tokens,
    parse_payload,
    score_instruction,
)

# Twenty short film reviews written for these tests (10 praising, 10 panning).
REVIEWS = [
    ("An absolute delight from start to finish; I would watch it again tonight.", "positive"),
    ("The acting was wooden and the plot made no sense at all.", "negative"),
    ("Warm, funny and beautifully shot.", "positive"),
    ("I walked out after forty minutes of pure boredom.", "negative"),
    ("A moving story with a terrific lead performance.", "positive"),
    ("Cheap effects, lazy writing, and a cast that clearly did not care.", "negative"),
    ("One of the best films I have seen this year.", "positive"),
    ("What a waste of two hours.", "negative"),
    ("The soundtrack is gorgeous and the ending left me smiling.", "positive"),
    ("Painfully slow and utterly forgettable.", "negative"),
    ("Clever, charming and full of heart.", "positive"),
    ("The dialogue was so bad the audience laughed at the serious scenes.", "negative"),
    ("I loved every minute of it.", "positive"),
    ("A confusing mess that never finds its footing.", "negative"),
    ("Smart writing and a wonderful ensemble cast.", "positive"),
    ("The worst sequel in a franchise full of bad sequels.", "negative"),
    ("Gripping, tense and expertly directed.", "positive"),
    ("Dull characters and a predictable, tired story.", "negative"),
    ("A joyful film that the whole family will enjoy.", "positive"),
    ("I regret paying for this ticket.", "negative"),
]
GOLD = dict(REVIEWS)
LABEL = {
    "task": "film_reviews",
    "labels": ["negative", "positive"],
    "input_fields": ["text"],
    "test_inputs": [[text] for text, _ in REVIEWS],
    "test_labels": [label for _, label in REVIEWS],
}
GOOD = (
    "Read the film review and decide whether the reviewer liked the film. Answer positive if the review "
    "praises it and negative if the review criticises it."
)
WRONG = "If the review is favourable, output negative. If the review is unfavourable, output positive."
CHATML_PROMPT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    "Write guidelines ...<|im_end|>\n<|im_start|>assistant\n"
)


def _tests(n: int = 20) -> HeldOutSet:
    return parse_payload({**LABEL, "test_inputs": LABEL["test_inputs"][:n], "test_labels": LABEL["test_labels"][:n]})


def _text_of(request: httpx.Request) -> str:
    """The input of a follower prompt (its last ``Input: ...`` line)."""
    content = json.loads(request.content)["messages"][0]["content"]
    line = [x for x in content.splitlines() if x.startswith("Input: ")][-1]
    return line[len("Input: ") :]


def _answer(content: str | None, status: int = 200) -> httpx.Response:
    return httpx.Response(status, json={"choices": [{"message": {"role": "assistant", "content": content}}]})


def _oracle(request: httpx.Request) -> httpx.Response:
    return _answer(GOLD[_text_of(request)])


def _follower(handler: Any, **config: Any) -> Follower:
    settings = {"base_url": "http://follower.test/v1", "model": "m", "max_retries": 2, "backoff": 0.001, **config}
    return Follower(FollowerConfig(**settings), transport=httpx.MockTransport(handler))


def _score(follower: Follower, instruction: str = GOOD, n: int = 20):
    async def run():
        try:
            return await score_instruction(follower, instruction, _tests(n))
        finally:
            await follower.aclose()

    return asyncio.run(run())


# --- extraction -----------------------------------------------------------------------------


def test_extract_instruction_from_a_chatml_query() -> None:
    query = CHATML_PROMPT + "Instruction:\nLabel each review by its overall opinion.<|im_end|>\n<|endoftext|>"
    assert extract_instruction(query, ["text"], prompt=CHATML_PROMPT) == "Label each review by its overall opinion."
    # Without the prompt, the last assistant header is found.
    assert extract_instruction(query, ["text"]) == "Label each review by its overall opinion."


def test_extract_instruction_other_templates_and_reasoning() -> None:
    llama = (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        '<|start_header_id|>assistant<|end_header_id|>\n\n"Classify the mood of the text."<|eot_id|>'
    )
    assert extract_instruction(llama) == "Classify the mood of the text."
    assert extract_instruction("<think>the labels look like...</think>\nSort by topic.<|im_end|>") == "Sort by topic."
    assert extract_instruction("<think>never finished thinking") == ""
    assert extract_instruction("") == "" and extract_instruction(None) == ""
    # A copied example block at the end is cut by the protocol's cleaner.
    assert extract_instruction("Use the tone.\n\nInput: great\nLabel: positive<|im_end|>") == "Use the tone."


# --- configuration and requests ---------------------------------------------------------------


def test_config_from_env_and_errors() -> None:
    env = {
        "PROMPTMII_FOLLOWER_URL": "http://a:1/v1, http://b:2/v1/",
        "PROMPTMII_FOLLOWER_MODEL": "llama",
        "PROMPTMII_FOLLOWER_CONCURRENCY": "16",
        "PROMPTMII_FOLLOWER_CONSTRAINED": "json_schema",
        "PROMPTMII_FOLLOWER_TIMEOUT": "2.5",
    }
    config = FollowerConfig.from_env(env, max_retries=5)
    assert config.urls == ["http://a:1/v1", "http://b:2/v1"]
    assert (config.model, config.concurrency, config.constrained, config.timeout, config.max_retries) == (
        "llama",
        16,
        "json_schema",
        2.5,
        5,
    )
    assert FollowerConfig.from_env({"PROMPTMII_FOLLOWER_CONSTRAINED": "off"}).constrained is False
    with pytest.raises(ValueError, match="PROMPTMII_FOLLOWER_CONCURRENCY"):
        FollowerConfig.from_env({"PROMPTMII_FOLLOWER_CONCURRENCY": "many"})
    with pytest.raises(ValueError, match="constrained"):
        FollowerConfig(constrained="regex")  # type: ignore[arg-type]


def test_request_shape_plain_and_constrained() -> None:
    plain = Follower(FollowerConfig(model="f")).body("prompt", ["no", "yes"])
    assert plain == {
        "model": "f",
        "messages": [{"role": "user", "content": "prompt"}],
        "temperature": 0.0,
        "max_tokens": 10,
    }
    llama_cpp = Follower(FollowerConfig(constrained="json_object")).body("p", ["no", "yes"])
    assert llama_cpp["response_format"]["type"] == "json_object"
    assert llama_cpp["response_format"]["schema"]["properties"]["label"]["enum"] == ["no", "yes"]
    vllm = Follower(FollowerConfig(constrained="json_schema")).body("p", ["no", "yes"])
    assert vllm["response_format"]["type"] == "json_schema"
    assert follower_max_tokens(["a" * 40]) == 24 and follower_max_tokens(["ab"], "json_schema") == 18


def test_payload_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="'test_inputs'"):
        parse_payload({"labels": ["a"], "input_fields": ["text"], "test_labels": ["a"]})
    with pytest.raises(ValueError, match="2 test inputs but 1 test labels"):
        parse_payload({**LABEL, "test_inputs": [["x"], ["y"]], "test_labels": ["a"]})
    with pytest.raises(ValueError, match="one value per input field"):
        parse_payload({**LABEL, "test_inputs": [["x", "extra"]], "test_labels": ["a"]})
    assert parse_payload(json.dumps(LABEL)).task == "film_reviews"


# --- scoring ------------------------------------------------------------------------------------


def test_perfect_follower_scores_one_and_sends_protocol_prompts() -> None:
    seen: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        return _oracle(request)

    result = _score(_follower(handler))
    assert result.reward == 1.0 and result.invalid_rate == 0.0 and result.follower_calls == 20
    first = seen[0]["messages"][0]["content"]
    texts = {s["messages"][0]["content"] for s in seen}
    assert follower_prompt(GOOD, ["negative", "positive"], {"text": REVIEWS[0][0]}, ["text"]) in texts
    assert first.startswith(GOOD + "\nOnly return one of these options: negative, positive.")
    assert all(s["temperature"] == 0.0 for s in seen)


def test_garbage_replies_are_invalid_not_errors() -> None:
    result = _score(_follower(lambda request: _answer("I really could not say, sorry!")))
    assert result.reward == 0.0 and result.invalid_rate == 1.0 and result.follower_error is None


def test_server_errors_are_retried_then_succeed() -> None:
    attempts: dict[str, int] = {}

    def handler(request: httpx.Request) -> httpx.Response:
        text = _text_of(request)
        attempts[text] = attempts.get(text, 0) + 1
        return _answer(None, 503) if attempts[text] == 1 else _oracle(request)

    result = _score(_follower(handler))
    assert result.reward == 1.0 and set(attempts.values()) == {2}


@pytest.mark.parametrize(
    "failure, pattern",
    [
        (lambda request: (_ for _ in ()).throw(httpx.ReadTimeout("slow", request=request)), "timeout"),
        (lambda request: httpx.Response(200, text="<html>not json</html>"), "malformed"),
        (lambda request: httpx.Response(500, text="boom"), "HTTP 500"),
    ],
    ids=["timeout", "garbage-body", "http-500"],
)
def test_persistent_failures_score_zero_with_a_warning(
    failure: Any, pattern: str, caplog: pytest.LogCaptureFixture
) -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return failure(request)

    with caplog.at_level(logging.WARNING, logger="training.follower"):
        result = _score(_follower(handler, max_retries=2), n=4)
    assert result.reward == 0.0 and pattern in (result.follower_error or "")
    assert len(calls) == 4 * 3  # every example tried 1 + 2 retries
    assert any("reward 0" in r.message and "film_reviews" in r.message for r in caplog.records)


def test_client_errors_are_not_retried() -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(400, text="prompt too long")

    result = _score(_follower(handler), n=3)
    assert result.reward == 0.0 and "HTTP 400" in result.follower_error and len(calls) == 3


def test_empty_instruction_scores_zero_without_calls() -> None:
    result = _score(_follower(lambda request: pytest.fail("no call expected")), instruction="   ")
    assert result.reward == 0.0 and result.empty_instruction and result.follower_calls == 0


def test_concurrency_limit_and_round_robin() -> None:
    state = {"now": 0, "peak": 0}
    hosts: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        hosts.append(request.url.host)
        state["now"] += 1
        state["peak"] = max(state["peak"], state["now"])
        await asyncio.sleep(0.01)
        state["now"] -= 1
        return _oracle(request)

    follower = _follower(handler, concurrency=3, base_url="http://a.test/v1,http://b.test/v1")
    assert _score(follower).reward == 1.0
    assert state["peak"] == 3
    assert hosts.count("a.test") == hosts.count("b.test") == 10


# --- reward_func, OpenRLHF's synchronous entry point ---------------------------------------------


@pytest.fixture()
def reset_reward(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(reward, "_follower", None)
    monkeypatch.setattr(reward, "_counter", None)
    yield
    reward._follower = None


def _query(instruction: str) -> str:
    return CHATML_PROMPT + instruction + "<|im_end|>"


def test_reward_func_single_and_batch(reset_reward: None) -> None:
    reward.configure(follower=_follower(_oracle))
    out = reward.reward_func([_query(GOOD)], [CHATML_PROMPT], [LABEL])
    assert out["rewards"] == 1.0 and out["scores"] == 1.0
    assert out["extra_logs"]["follower_invalid_rate"] == 0.0 and out["extra_logs"]["instruction_tokens"] > 10
    batch = reward.reward_func([_query(GOOD), _query("")], [CHATML_PROMPT] * 2, [LABEL, LABEL])
    assert batch["rewards"] == [1.0, 0.0] and batch["extra_logs"]["empty_instruction"] == [0.0, 1.0]


def test_reward_func_never_raises(reset_reward: None, caplog: pytest.LogCaptureFixture) -> None:
    reward.configure(follower=_follower(_oracle))
    with caplog.at_level(logging.WARNING, logger="training.reward"):
        bad_label = reward.reward_func([_query(GOOD)], [CHATML_PROMPT], [{"labels": ["a"]}])
        mismatched = reward.reward_func([_query(GOOD)], [CHATML_PROMPT, CHATML_PROMPT], [LABEL])
    assert bad_label["rewards"] == 0.0 and bad_label["extra_logs"]["follower_error"] == 1.0
    assert mismatched["rewards"] == 0.0
    assert len([r for r in caplog.records if "reward 0" in r.message]) == 2


def test_reward_func_with_the_server_down(
    reset_reward: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("PROMPTMII_FOLLOWER_URL", f"http://127.0.0.1:{port}/v1")
    monkeypatch.setenv("PROMPTMII_FOLLOWER_RETRIES", "1")
    monkeypatch.setenv("PROMPTMII_FOLLOWER_TIMEOUT", "2")
    with caplog.at_level(logging.WARNING, logger="training.follower"):
        out = reward.reward_func([_query(GOOD)], [CHATML_PROMPT], [LABEL])
    assert out["rewards"] == 0.0 and out["extra_logs"]["follower_error"] == 1.0
    assert any("connection error" in r.message for r in caplog.records)


# --- the real embedded follower -------------------------------------------------------------------


@pytest.mark.real_model
def test_good_instruction_beats_a_wrong_one_with_the_real_follower(local_server: Any, reset_reward: None) -> None:
    """40 follower calls (~0.2-0.4 s each on 2 cores) through reward_func and llama.cpp's server."""
    reward.configure(FollowerConfig(base_url=local_server.base_url, model=local_server.alias, timeout=120))
    good = reward.reward_func([_query(GOOD)], [CHATML_PROMPT], [LABEL])
    wrong = reward.reward_func([_query(WRONG)], [CHATML_PROMPT], [LABEL])
    logging.getLogger(__name__).info("real follower: good %.3f, wrong %.3f", good["rewards"], wrong["rewards"])
    assert good["extra_logs"]["follower_error"] == wrong["extra_logs"]["follower_error"] == 0.0
    assert good["rewards"] >= 0.7
    assert good["rewards"] > wrong["rewards"] + 0.2
