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

from dspy_promptmii.protocol import Protocol, default_reply_limit, follower_prompt  # noqa: E402
from training import reward  # noqa: E402
from training.follower import (  # noqa: E402
    FailureMonitor,
    Follower,
    FollowerConfig,
    FollowerOutage,
    HeldOutSet,
    extract_instruction,
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
    "protocol": Protocol().to_dict(),
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


TESTS = parse_payload(LABEL)


def test_extract_instruction_from_a_chatml_query() -> None:
    query = CHATML_PROMPT + "Instruction:\nLabel each review by its overall opinion.<|im_end|>\n<|endoftext|>"
    assert extract_instruction(query, TESTS, prompt=CHATML_PROMPT) == "Label each review by its overall opinion."
    # Without the prompt, the last assistant header is found.
    assert extract_instruction(query, TESTS) == "Label each review by its overall opinion."


def test_extract_instruction_other_templates_and_reasoning() -> None:
    llama = (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        '<|start_header_id|>assistant<|end_header_id|>\n\n"Classify the mood of the text."<|eot_id|>'
    )
    assert extract_instruction(llama, TESTS) == "Classify the mood of the text."
    assert extract_instruction("<think>the labels look like...</think>\nSort by topic.<|im_end|>", TESTS) == (
        "Sort by topic."
    )
    assert extract_instruction("the labels look like...</think>\nSort by topic.<|im_end|>", TESTS) == (
        "Sort by topic."
    )
    assert extract_instruction("<think>never finished thinking", TESTS) == ""
    assert extract_instruction("", TESTS) == "" and extract_instruction(None, TESTS) == ""
    # A copied example block at the end is cut by the protocol's cleaner.
    assert extract_instruction("Use the tone.\n\nInput: great\nLabel: positive<|im_end|>", TESTS) == "Use the tone."


def test_extract_instruction_truncation_comes_from_the_end_of_turn() -> None:
    cut = "Label by opinion.\nPraise is positive and"
    # No end-of-turn token: the policy hit the length limit, the unfinished line goes.
    assert extract_instruction(CHATML_PROMPT + cut, TESTS, prompt=CHATML_PROMPT) == "Label by opinion."
    # Ended normally: every line stays, however it ends.
    assert extract_instruction(CHATML_PROMPT + cut + "<|im_end|>", TESTS, prompt=CHATML_PROMPT) == cut
    assert extract_instruction(cut, TESTS, truncated=False) == cut


def test_extract_instruction_drops_copies_of_the_shown_examples_as_compile_does() -> None:
    shown_review = "An absolute delight from start to finish; I would watch it again tonight."
    label = {**LABEL, "context_inputs": [[shown_review]], "context_labels": ["positive"]}
    reply = f"Label each review by its opinion.\n- \"{shown_review}\" is positive.\nPraise means positive."
    assert extract_instruction(reply + "<|im_end|>", parse_payload(label)) == (
        "Label each review by its opinion.\nPraise means positive."
    )


# --- configuration and requests ---------------------------------------------------------------


def test_config_from_env_and_errors() -> None:
    env = {
        "PROMPTMII_FOLLOWER_URL": "http://a:1/v1, http://b:2/v1/",
        "PROMPTMII_FOLLOWER_MODEL": "llama",
        "PROMPTMII_FOLLOWER_CONCURRENCY": "16",
        "PROMPTMII_FOLLOWER_TIMEOUT": "2.5",
        "PROMPTMII_FOLLOWER_SAMPLE_TIMEOUT": "30",
        "PROMPTMII_FOLLOWER_MAX_FAILURE_SHARE": "0.1",
    }
    config = FollowerConfig.from_env(env, max_retries=5)
    assert config.urls == ["http://a:1/v1", "http://b:2/v1"]
    assert (config.model, config.concurrency, config.timeout, config.sample_timeout, config.max_retries) == (
        "llama",
        16,
        2.5,
        30.0,
        5,
    )
    assert config.max_failure_share == 0.1
    with pytest.raises(ValueError, match="PROMPTMII_FOLLOWER_CONCURRENCY"):
        FollowerConfig.from_env({"PROMPTMII_FOLLOWER_CONCURRENCY": "many"})
    with pytest.raises(ValueError, match="max_failure_share"):
        FollowerConfig(max_failure_share=0)


@pytest.mark.parametrize("var", ["PROMPTMII_FOLLOWER_CONSTRAINED", "PROMPTMII_FOLLOWER_MAX_TOKENS"])
def test_follower_settings_of_old_versions_point_to_the_protocol(var: str) -> None:
    with pytest.raises(ValueError, match="protocol each training line carries") as caught:
        FollowerConfig.from_env({var: "json_schema"})
    assert var in str(caught.value) and "build_data" in str(caught.value)


def test_request_shape_comes_from_the_lines_protocol() -> None:
    inputs = {"text": "fine"}
    plain = Follower(FollowerConfig(model="f")).body("Decide.", inputs, TESTS)
    assert plain == {
        "model": "f",
        "messages": [{"role": "user", "content": follower_prompt("Decide.", TESTS.labels, inputs, ["text"])}],
        "temperature": 0.0,
        "max_tokens": default_reply_limit(TESTS.labels, False),
    }
    for style, kind in [("json_object", "json_object"), ("json_schema", "json_schema")]:
        tests = parse_payload({**LABEL, "protocol": Protocol(constrained=style).to_dict()})
        body = Follower(FollowerConfig()).body("p", inputs, tests)
        assert body["response_format"]["type"] == kind
        assert body["max_tokens"] == 16 + len("negative")
    grammar = parse_payload({**LABEL, "protocol": Protocol(constrained="grammar", reply_limit=3).to_dict()})
    body = Follower(FollowerConfig()).body("p", inputs, grammar)
    assert body["grammar"] == 'root ::= "negative" | "positive"' and body["max_tokens"] == 3
    assert default_reply_limit(["a" * 40], False) == 42 and default_reply_limit(["ab"], "json_schema") == 18


def test_payload_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="'test_inputs'"):
        parse_payload({"labels": ["a"], "input_fields": ["text"], "test_labels": ["a"]})
    with pytest.raises(ValueError, match="'protocol'"):
        parse_payload({k: v for k, v in LABEL.items() if k != "protocol"})
    with pytest.raises(ValueError, match="protocol is unusable"):
        parse_payload({**LABEL, "protocol": {"constrained": "regex"}})
    with pytest.raises(ValueError, match="2 test inputs but 1 test labels"):
        parse_payload({**LABEL, "test_inputs": [["x"], ["y"]], "test_labels": ["a"]})
    with pytest.raises(ValueError, match="one value per input field"):
        parse_payload({**LABEL, "test_inputs": [["x", "extra"]], "test_labels": ["a"]})
    with pytest.raises(ValueError, match="1 context inputs but 0 context labels"):
        parse_payload({**LABEL, "context_inputs": [["x"]]})
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


# --- deadlines, odd replies and outages ----------------------------------------------------------


class _TricklingServer:
    """A real HTTP server on 127.0.0.1 that sends its headers, then one body byte every
    ``every`` seconds, forever: a per-read timeout never fires on it."""

    def __init__(self, every: float = 0.1):
        import threading

        self.every = every
        self.stop = threading.Event()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        import threading

        self.sock.settimeout(0.2)
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            threading.Thread(target=self._trickle, args=(conn,), daemon=True).start()

    def _trickle(self, conn: socket.socket) -> None:
        import time

        try:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n")
            while not self.stop.is_set():
                conn.sendall(b" ")
                time.sleep(self.every)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


def test_a_trickling_follower_hits_the_overall_request_deadline(caplog: pytest.LogCaptureFixture) -> None:
    import time

    server = _TricklingServer(every=0.1)
    try:
        config = FollowerConfig(base_url=f"http://127.0.0.1:{server.port}/v1", timeout=1.0, max_retries=0)
        started = time.perf_counter()
        with caplog.at_level(logging.WARNING, logger="training.follower"):
            result = _score(Follower(config), n=2)
        elapsed = time.perf_counter() - started
    finally:
        server.close()
    assert result.reward == 0.0 and "timeout" in (result.follower_error or "")
    assert elapsed < 10, f"the request deadline did not hold: {elapsed:.1f} s"
    assert any("reward 0" in r.message for r in caplog.records)


def test_a_sample_past_its_deadline_scores_zero(caplog: pytest.LogCaptureFixture) -> None:
    async def slow(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0.3)  # each call is within its own deadline, but with retries ...
        return httpx.Response(503)

    follower = _follower(slow, timeout=5, sample_timeout=0.5, max_retries=5, backoff=0.2)
    with caplog.at_level(logging.WARNING, logger="training.follower"):
        result = _score(follower, n=3)
    assert result.reward == 0.0 and "deadline" in (result.follower_error or "")
    assert any("deadline" in r.message for r in caplog.records)


@pytest.mark.parametrize("content", [None, 1, 0.5, ["positive"]])
def test_null_or_non_text_reply_is_no_label_with_a_warning(content: Any, caplog: pytest.LogCaptureFixture) -> None:
    handler = lambda request: httpx.Response(200, json={"choices": [{"message": {"content": content}}]})  # noqa: E731
    with caplog.at_level(logging.WARNING, logger="training.follower"):
        result = _score(_follower(handler), n=2)
    assert result.reward == 0.0 and result.invalid_rate == 1.0 and result.follower_error is None
    assert any("not text" in r.message for r in caplog.records)


def test_an_outage_stops_instead_of_training_on_zeros() -> None:
    down = _follower(lambda request: httpx.Response(503), max_retries=0)
    down.monitor = FailureMonitor(max_failure_share=0.05, window=100, min_calls=20)
    with pytest.raises(FollowerOutage, match="follower calls failed"):
        _score(down, n=20)
    # A few failures in many calls are not an outage.
    flaky_calls = {"n": 0}

    def flaky(request: httpx.Request) -> httpx.Response:
        flaky_calls["n"] += 1
        return httpx.Response(503) if flaky_calls["n"] == 1 else _oracle(request)

    ok = _follower(flaky, max_retries=0)
    ok.monitor = FailureMonitor(max_failure_share=0.05, window=100, min_calls=20)
    assert _score(ok, n=20).reward == 0.0  # one failed example zeroes that sample ...
    assert _score(ok, n=20).reward == 1.0  # ... and the next is scored normally


def test_reward_func_lets_an_outage_through(reset_reward: None) -> None:
    down = _follower(lambda request: httpx.Response(503), max_retries=0)
    down.monitor = FailureMonitor(max_failure_share=0.05, window=100, min_calls=20)
    reward.configure(follower=down)
    with pytest.raises(FollowerOutage):
        reward.reward_func([_query(GOOD)], [CHATML_PROMPT], [LABEL])


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


def test_a_stopped_scoring_leaves_no_unretrieved_exception(caplog) -> None:
    """Ctrl-C or SIGTERM in the middle of scoring cancels the follower calls: the run says it
    was interrupted, and asyncio must not add an "exception was never retrieved" traceback."""
    import gc

    async def hang(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(3600)
        raise AssertionError("never answered")

    async def run() -> None:
        follower = _follower(hang)
        task = asyncio.ensure_future(score_instruction(follower, GOOD, _tests(4)))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await follower.aclose()

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        asyncio.run(run())
        gc.collect()
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]
