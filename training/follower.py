"""The Prompt-MII reward: how well a frozen follower LM labels the m test examples of a
task when given the generated instruction.

Shared by :mod:`training.reward` (OpenRLHF's ``reward_func``) and :mod:`training.agent`
(OpenRLHF's ``AgentExecutor``). Everything about prompts, cleaning, the follower's
request settings, parsing and scoring is the :class:`~dspy_promptmii.protocol.Protocol`
that ``python -m training.build_data`` wrote into each line's ``label`` (the value the
optimizer and the benchmarks use): the instruction is cleaned with the shown examples
and the truncation flag as at compile time, each test example is one request built by
:meth:`Protocol.request_body`, replies are read by :meth:`Protocol.parse` and the reward
is :meth:`Protocol.score`'s macro-F1 (an invalid reply is a miss, not a class).

Where the follower is and how hard to try is :class:`FollowerConfig`, from arguments or
from these environment variables:

========================================  =====================================================
``PROMPTMII_FOLLOWER_URL``                base URL(s), e.g. ``http://10.0.0.5:8000/v1``; several,
                                          comma-separated, are used round-robin (default
                                          ``http://127.0.0.1:8000/v1``)
``PROMPTMII_FOLLOWER_MODEL``              served model name (default ``follower``)
``PROMPTMII_FOLLOWER_API_KEY``            bearer token (default ``EMPTY``)
``PROMPTMII_FOLLOWER_CONCURRENCY``        requests in flight per process (default 128)
``PROMPTMII_FOLLOWER_TIMEOUT``            overall seconds per request, however the server
                                          trickles its answer (default 60)
``PROMPTMII_FOLLOWER_SAMPLE_TIMEOUT``     overall seconds to score one sample, all its
                                          requests and retries (default 600)
``PROMPTMII_FOLLOWER_RETRIES``            retries after a timeout / connection error / 5xx /
                                          429 / malformed body (default 3)
``PROMPTMII_FOLLOWER_MAX_FAILURE_SHARE``  stop when more than this share of the recent
                                          follower calls failed (default 0.05)
========================================  =====================================================

Failure policy: a follower call that still fails after the retries, or a sample that
runs past its deadline, scores 0 with a logged warning. But an outage must not become a
negative advantage for the policy: once at least ``min_calls`` calls have been made and
more than ``max_failure_share`` of the last ``window`` calls failed,
:class:`FollowerOutage` is raised, which stops training with that message.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import os
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from dspy_promptmii.protocol import strip_reasoning
from dspy_promptmii.secrets import protected_logger, remember, scrub
from training.grpo_label import GRPOLabel, HeldOutSet

logger = protected_logger("training.follower")

__all__ = [
    "ENV",
    "MOVED_TO_PROTOCOL",
    "FollowerConfig",
    "FollowerError",
    "FollowerOutage",
    "FailureMonitor",
    "Follower",
    "HeldOutSet",
    "ScoreResult",
    "parse_payload",
    "response_text",
    "ends_turn",
    "strip_chat_tokens",
    "extract_instruction",
    "score_instruction",
]

#: Environment variables read by :meth:`FollowerConfig.from_env`.
ENV = {
    "base_url": "PROMPTMII_FOLLOWER_URL",
    "model": "PROMPTMII_FOLLOWER_MODEL",
    "api_key": "PROMPTMII_FOLLOWER_API_KEY",
    "concurrency": "PROMPTMII_FOLLOWER_CONCURRENCY",
    "timeout": "PROMPTMII_FOLLOWER_TIMEOUT",
    "sample_timeout": "PROMPTMII_FOLLOWER_SAMPLE_TIMEOUT",
    "max_retries": "PROMPTMII_FOLLOWER_RETRIES",
    "max_failure_share": "PROMPTMII_FOLLOWER_MAX_FAILURE_SHARE",
}
#: Variables of earlier versions whose settings now live in each line's protocol.
MOVED_TO_PROTOCOL = ("PROMPTMII_FOLLOWER_MAX_TOKENS", "PROMPTMII_FOLLOWER_CONSTRAINED")


class FollowerError(RuntimeError):
    """The follower gave no usable HTTP answer (after the retries)."""


class FollowerOutage(RuntimeError):
    """Too many recent follower calls failed: training on their zero rewards would teach
    the policy the outage, not the task."""


@dataclass(frozen=True)
class FollowerConfig:
    """Where the follower is and how hard to try (see the module docstring for the
    environment variables). How it is prompted is the data's protocol, not set here.

    Args:
        base_url: OpenAI-compatible base URL ending in ``/v1``; several separated by commas
            are used round-robin.
        model: The served model name sent as ``model``.
        api_key: Sent as a bearer token.
        concurrency: Most requests in flight at once in this process (paper: the reward
            server took ~128 concurrent requests). With several rollout engines, each has
            its own limit.
        timeout: Overall seconds per request (connect to last byte), however slowly the
            server trickles its answer.
        sample_timeout: Overall seconds to score one sample (all its requests, retries
            included); then the sample scores 0 with a warning.
        max_retries: Retries after a timeout, connection error, HTTP 5xx/429 or malformed
            body; then the sample scores 0.
        backoff: First retry delay in seconds, doubled each retry (capped at 8 s).
        max_failure_share: :class:`FollowerOutage` once more than this share of the
            recent calls failed (see :class:`FailureMonitor`); 1 disables the check.

    Raises:
        ValueError: a value out of range (named).
    """

    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = "follower"
    api_key: str = "EMPTY"
    concurrency: int = 128
    timeout: float = 60.0
    sample_timeout: float = 600.0
    max_retries: int = 3
    backoff: float = 0.5
    max_failure_share: float = 0.05

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"follower concurrency must be at least 1, got {self.concurrency}")
        if self.timeout <= 0 or self.sample_timeout <= 0:
            raise ValueError(f"follower timeouts must be positive, got {self.timeout} and {self.sample_timeout}")
        if self.max_retries < 0:
            raise ValueError(f"follower max_retries must be >= 0, got {self.max_retries}")
        if not 0 < self.max_failure_share <= 1:
            raise ValueError(f"follower max_failure_share must be in (0, 1], got {self.max_failure_share}")
        if not self.urls:
            raise ValueError("follower base_url is empty")

    @property
    def urls(self) -> list[str]:
        return [u.strip().rstrip("/") for u in self.base_url.split(",") if u.strip()]

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> FollowerConfig:
        """A config from ``PROMPTMII_FOLLOWER_*`` variables; ``overrides`` (not None) win.

        Raises ``ValueError`` for a value that does not parse (naming the variable) and
        for the variables of :data:`MOVED_TO_PROTOCOL`, whose settings are now part of
        the data (``python -m training.build_data --constrained ... --reply-limit ...``).
        """
        env = os.environ if env is None else env
        moved = [var for var in MOVED_TO_PROTOCOL if (env.get(var) or "").strip()]
        if moved:
            raise ValueError(
                f"{', '.join(moved)} no longer configure the reward: the follower's constrained decoding and reply "
                "limit are part of the protocol each training line carries, so that training and evaluation "
                "cannot drift; rebuild the data with python -m training.build_data --constrained ... "
                "--reply-limit ... and unset them"
            )
        values: dict[str, Any] = {}
        casts = {
            "concurrency": int,
            "timeout": float,
            "sample_timeout": float,
            "max_retries": int,
            "max_failure_share": float,
        }
        for name, var in ENV.items():
            raw = env.get(var)
            if raw is None or raw.strip() == "":
                continue
            try:
                values[name] = casts.get(name, str)(raw.strip())
            except ValueError:
                raise ValueError(f"{var}={raw!r} is not a valid {casts[name].__name__}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


class FailureMonitor:
    """Counts follower call outcomes over a sliding window and raises
    :class:`FollowerOutage` when too many fail (thread-safe; one per :class:`Follower`).

    Args:
        max_failure_share: The share of failed calls in the window above which it raises.
        window: How many recent calls the share is taken over.
        min_calls: Calls needed before it judges (a few early failures are not an outage).
    """

    def __init__(self, max_failure_share: float = 0.05, window: int = 1000, min_calls: int = 100):
        self.max_failure_share = max_failure_share
        self.min_calls = min_calls
        self._recent: collections.deque[bool] = collections.deque(maxlen=window)
        self._lock = threading.Lock()

    def record(self, failed: bool) -> None:
        with self._lock:
            self._recent.append(failed)

    def check(self) -> None:
        """Raise :class:`FollowerOutage` when more than the allowed share of recent calls failed."""
        with self._lock:
            calls, failed = len(self._recent), sum(self._recent)
        if calls >= self.min_calls and failed / calls > self.max_failure_share:
            raise FollowerOutage(
                f"{failed} of the last {calls} follower calls failed ({failed / calls:.1%} > "
                f"{self.max_failure_share:.1%}): the follower server is down or overloaded. Stopping rather than "
                "training on zero rewards; fix the follower (see the warnings above) and resume from the checkpoint"
            )


def parse_payload(label: Any) -> HeldOutSet:
    """The :class:`HeldOutSet` of a prompt line's ``label`` (a dict, or its JSON text),
    read by :meth:`GRPOLabel.from_json <training.grpo_label.GRPOLabel.from_json>`.

    Raises ``ValueError`` naming the missing or malformed key (a line without a
    ``protocol`` was written by an older data builder: rebuild it).
    """
    return GRPOLabel.from_json(label).held_out()


# --- the instruction out of the policy's decoded text -----------------------------------

#: Where an assistant turn starts in common chat templates (Qwen/ChatML, Llama 3, Phi, Gemma, Mistral).
ASSISTANT_HEADERS = (
    "<|im_start|>assistant",
    "<|start_header_id|>assistant<|end_header_id|>",
    "<|assistant|>",
    "<start_of_turn>model",
    "[/INST]",
)
#: Tokens that end a turn: the instruction is what comes before the first of them.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<|end|>", "<|eom_id|>", "<end_of_turn>", "</s>", "<eos>")
_SPECIAL = re.compile(r"<\|[^<>|\s]{1,64}\|>|</?s>|<eos>|<bos>|<pad>|<unk>|<(?:start|end)_of_turn>")


def response_text(text: str, prompt: str | None = None) -> str:
    """The assistant's part of a decoded prompt + response (what ``reward_func`` gets as a
    query): the text after ``prompt`` when the query starts with it, else after the last
    assistant header of a known chat template, else the text itself."""
    if prompt and text.startswith(prompt):
        return text[len(prompt) :]
    cut = -1
    for header in ASSISTANT_HEADERS:
        at = text.rfind(header)
        if at >= 0:
            cut = max(cut, at + len(header))
    return text[cut:] if cut >= 0 else text


def ends_turn(response: str) -> bool:
    """Whether the assistant's turn ended with an end-of-turn token. OpenRLHF decodes the
    query with special tokens and vLLM keeps the EOS token it stopped on, so a turn
    without one was cut by the length limit (finish reason ``length``)."""
    return any(stop in response for stop in END_OF_TURN)


def strip_chat_tokens(text: str) -> str:
    """The reply without chat special tokens: cut at the first end-of-turn token, drop
    reasoning blocks (:func:`~dspy_promptmii.protocol.strip_reasoning`), then remove any
    remaining ``<|...|>``-style tokens."""
    for stop in END_OF_TURN:
        at = text.find(stop)
        if at >= 0:
            text = text[:at]
    return _SPECIAL.sub("", strip_reasoning(text)).strip()


def extract_instruction(
    text: str | None, tests: HeldOutSet, prompt: str | None = None, truncated: bool | None = None
) -> str:
    """The generated instruction in a decoded policy output, cleaned exactly as
    :class:`~dspy_promptmii.PromptMIIOptimizer` cleans a reply: by the line's protocol,
    with the shown examples, the labels and the truncation flag (``truncated``: the
    finish reason was ``length``; ``None`` reads it from the text, see :func:`ends_turn`).
    ``""`` when nothing usable is left."""
    if not text:
        return ""
    response = response_text(text, prompt)
    if truncated is None:
        truncated = not ends_turn(response)
    cleaned = tests.protocol.clean(
        strip_chat_tokens(response), tests.input_fields, labels=tests.labels, examples=tests.shown, truncated=truncated
    )
    return cleaned.text


# --- the follower client ----------------------------------------------------------------


class _Retryable(Exception):
    pass


class Follower:
    """An async client for the follower with a concurrency limit, deadlines and retries.

    One client and one semaphore per event loop, created on first use in that loop, so an
    instance can serve OpenRLHF's rollout actor (one loop) and the reward's background
    loop alike. Every call's outcome goes to :attr:`monitor` (a :class:`FailureMonitor`).
    ``transport`` lets tests plug in ``httpx.MockTransport``.
    """

    def __init__(
        self,
        config: FollowerConfig | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        monitor: FailureMonitor | None = None,
    ):
        self.config = config or FollowerConfig.from_env()
        # Its key and any credentials in its URLs are erased from every text the reward
        # logs or returns, however a server echoes them (a 401 body, a connection error).
        remember({"api_key": self.config.api_key, "base_url": self.config.base_url})
        self._transport = transport
        self._per_loop: dict[int, tuple[asyncio.AbstractEventLoop, httpx.AsyncClient, asyncio.Semaphore]] = {}
        self._urls = itertools.cycle(self.config.urls)
        self.monitor = monitor or FailureMonitor(self.config.max_failure_share)

    def _resources(self) -> tuple[httpx.AsyncClient, asyncio.Semaphore]:
        loop = asyncio.get_running_loop()
        key = id(loop)
        if key not in self._per_loop or self._per_loop[key][0] is not loop:  # new loop (or a reused id)
            limits = httpx.Limits(
                max_connections=self.config.concurrency, max_keepalive_connections=self.config.concurrency
            )
            client = httpx.AsyncClient(
                timeout=httpx.Timeout(self.config.timeout),
                limits=limits,
                headers={"Authorization": f"Bearer {self.config.api_key}"},
                transport=self._transport,
            )
            self._per_loop[key] = (loop, client, asyncio.Semaphore(self.config.concurrency))
        _, client, semaphore = self._per_loop[key]
        return client, semaphore

    async def aclose(self) -> None:
        """Close this loop's HTTP client."""
        entry = self._per_loop.pop(id(asyncio.get_running_loop()), None)
        if entry is not None:
            await entry[1].aclose()

    def body(self, instruction: str, inputs: Mapping[str, Any], tests: HeldOutSet) -> dict[str, Any]:
        """The chat-completions request for one test input: the line's protocol's
        :meth:`~dspy_promptmii.protocol.Protocol.request_body`."""
        return tests.protocol.request_body(self.config.model, instruction, tests.labels, inputs, tests.input_fields)

    async def _post_once(self, client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> str | None:
        try:
            # An overall deadline: httpx's own timeout is per read, which a server that
            # trickles a byte at a time never reaches.
            response = await asyncio.wait_for(client.post(f"{url}/chat/completions", json=body), self.config.timeout)
        except (httpx.TimeoutException, asyncio.TimeoutError) as error:
            raise _Retryable(f"timeout after {self.config.timeout:g} s ({type(error).__name__})") from None
        except httpx.TransportError as error:
            raise _Retryable(scrub(f"connection error: {type(error).__name__}: {error}")) from None
        # Error texts quote the server's body, which may echo the key: scrubbed here, so
        # that no warning, log or ScoreResult.follower_error carries it.
        if response.status_code == 429 or response.status_code >= 500:
            raise _Retryable(scrub(f"HTTP {response.status_code}: {response.text[:200]}"))
        if response.status_code >= 400:
            raise FollowerError(scrub(f"HTTP {response.status_code} from {url}: {response.text[:300]}"))
        try:
            content = response.json()["choices"][0]["message"].get("content")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise _Retryable(scrub(f"malformed reply body: {response.text[:200]!r}")) from None
        if not isinstance(content, str):
            logger.warning("the follower's reply content is %r, not text: scored as no label", content)
            return None
        return content

    async def complete(self, body: dict[str, Any]) -> str | None:
        """The follower's reply to one request (None: a reply with no text). Raises
        :class:`FollowerError` after the retries; the outcome is recorded in :attr:`monitor`."""
        client, semaphore = self._resources()
        last = "no attempt"
        failed = True
        try:
            for attempt in range(self.config.max_retries + 1):
                url = next(self._urls)
                try:
                    async with semaphore:
                        reply = await self._post_once(client, url, body)
                    failed = False
                    return reply
                except _Retryable as error:
                    last = str(error)
                    if attempt < self.config.max_retries:
                        logger.debug("follower attempt %d failed (%s); retrying", attempt + 1, last)
                        await asyncio.sleep(min(8.0, self.config.backoff * 2**attempt))
            raise FollowerError(f"{last} (after {self.config.max_retries + 1} attempts)")
        finally:
            self.monitor.record(failed)


# --- scoring ----------------------------------------------------------------------------


@dataclass
class ScoreResult:
    """What scoring one instruction gave. ``reward`` is the follower's macro-F1 over the
    test examples, or 0 when the instruction is empty or the follower failed."""

    reward: float
    macro_f1: float = 0.0
    accuracy: float = 0.0
    invalid_rate: float = 0.0
    n: int = 0
    follower_calls: int = 0
    follower_error: str | None = None
    empty_instruction: bool = False
    seconds: float = 0.0
    predictions: list[str | None] = field(default_factory=list, repr=False)

    def record(self) -> dict[str, Any]:
        """The fields a rollout or confirmation record keeps of this score (rounded to 6
        decimals; ``follower_seconds`` in seconds)."""
        return {
            "reward": round(float(self.reward), 6),
            "accuracy": round(float(self.accuracy), 6),
            "invalid_rate": round(float(self.invalid_rate), 6),
            "follower_error": self.follower_error,
            "empty_instruction": self.empty_instruction,
            "follower_seconds": round(self.seconds, 3),
        }

    def extra_logs(self, instruction_tokens: int | None = None) -> dict[str, float]:
        """Scalar logs for OpenRLHF (averaged over the batch in its metrics)."""
        logs = {
            "follower_macro_f1": float(self.macro_f1),
            "follower_accuracy": float(self.accuracy),
            "follower_invalid_rate": float(self.invalid_rate),
            "follower_error": float(self.follower_error is not None),
            "empty_instruction": float(self.empty_instruction),
            "follower_seconds": float(self.seconds),
        }
        if instruction_tokens is not None:
            logs["instruction_tokens"] = float(instruction_tokens)
        return logs


async def score_instruction(follower: Follower, instruction: str, tests: HeldOutSet) -> ScoreResult:
    """Score ``instruction`` on the test examples: one follower call per example (all at
    once, within the follower's concurrency limit), read and scored by the line's protocol.

    Follower trouble never raises here: calls that fail after the retries, or a sample
    past ``sample_timeout``, give a reward of 0 and a warning naming the task and the
    error. Raises :class:`FollowerOutage` when too many recent calls failed (see
    :class:`FailureMonitor`).
    """
    started = time.perf_counter()
    if not instruction.strip():
        return ScoreResult(reward=0.0, empty_instruction=True, n=len(tests.gold), invalid_rate=1.0)
    bodies = [follower.body(instruction, inputs, tests) for inputs in tests.test_inputs()]
    calls = [asyncio.ensure_future(follower.complete(body)) for body in bodies]
    gathered = asyncio.gather(*calls, return_exceptions=True)
    # A run stopped by Ctrl-C or SIGTERM cancels it; its outcome is then read here, so asyncio
    # logs no "exception was never retrieved" traceback after the run's own message.
    gathered.add_done_callback(lambda future: future.cancelled() or future.exception())
    try:
        replies = await asyncio.wait_for(gathered, timeout=follower.config.sample_timeout)
    except asyncio.TimeoutError:
        replies = [
            FollowerError(f"the sample ran past its {follower.config.sample_timeout:g} s deadline")
            for _ in bodies
        ]
    seconds = time.perf_counter() - started
    errors = [r for r in replies if isinstance(r, BaseException)]
    if errors:
        unexpected = [e for e in errors if not isinstance(e, FollowerError)]
        if unexpected and not isinstance(unexpected[0], Exception):  # cancellation and the like
            raise unexpected[0]
        logger.warning(
            "follower failed on %d of %d test examples of task %s (%s: %s); reward 0",
            len(errors),
            len(bodies),
            tests.task,
            type(errors[0]).__name__,
            errors[0],
        )
        follower.monitor.check()
        return ScoreResult(
            reward=0.0, n=len(bodies), follower_calls=len(bodies), follower_error=scrub(str(errors[0])), seconds=seconds
        )
    follower.monitor.check()
    predicted = [tests.protocol.parse(r, tests.labels) for r in replies]
    metrics = tests.protocol.score(list(tests.gold), predicted)
    return ScoreResult(
        reward=metrics["macro_f1"],
        macro_f1=metrics["macro_f1"],
        accuracy=metrics["accuracy"],
        invalid_rate=metrics["invalid_rate"],
        n=len(predicted),
        follower_calls=len(bodies),
        seconds=seconds,
        predictions=predicted,
    )
