"""The Prompt-MII reward: how well a frozen follower LM labels the m test examples of a
task when given the generated instruction.

Shared by :mod:`training.reward` (OpenRLHF's ``reward_func``) and :mod:`training.agent`
(OpenRLHF's ``AgentExecutor``). Everything about prompts, parsing and scoring is the
package's one protocol (:mod:`dspy_promptmii.protocol`): the follower gets
:func:`~dspy_promptmii.protocol.follower_prompt` as one user message at temperature 0,
its reply goes through :func:`~dspy_promptmii.protocol.parse_label` (an unrecognised reply
is invalid, its own class), and the reward is :func:`~dspy_promptmii.protocol.macro_f1`.

The follower is any OpenAI-compatible chat-completions server (vLLM in training,
llama.cpp's server in the CPU tests), configured by :class:`FollowerConfig` -- from
arguments or from these environment variables:

==================================  ===========================================================
``PROMPTMII_FOLLOWER_URL``          base URL(s), e.g. ``http://10.0.0.5:8000/v1``; several,
                                    comma-separated, are used round-robin (default
                                    ``http://127.0.0.1:8000/v1``)
``PROMPTMII_FOLLOWER_MODEL``        served model name (default ``follower``)
``PROMPTMII_FOLLOWER_API_KEY``      bearer token (default ``EMPTY``)
``PROMPTMII_FOLLOWER_CONCURRENCY``  requests in flight per process (default 128)
``PROMPTMII_FOLLOWER_TIMEOUT``      seconds per request (default 60)
``PROMPTMII_FOLLOWER_RETRIES``      retries after a timeout / connection error / 5xx / 429 /
                                    malformed body (default 3)
``PROMPTMII_FOLLOWER_MAX_TOKENS``   reply limit (default: 10, more for long label names)
``PROMPTMII_FOLLOWER_CONSTRAINED``  ``json_schema`` (vLLM), ``json_object`` or ``grammar``
                                    (llama.cpp): constrain replies to the label set
                                    (default off)
==================================  ===========================================================

A follower that still fails after the retries makes the sample's reward 0 with a logged
warning; nothing is raised into OpenRLHF.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import httpx

from dspy_promptmii.protocol import (
    CONSTRAINED_STYLES,
    clean_instruction,
    constrained_body,
    follower_prompt,
    parse_label,
    score,
)

logger = logging.getLogger("training.follower")

__all__ = [
    "ENV",
    "FollowerConfig",
    "FollowerError",
    "Follower",
    "HeldOutSet",
    "ScoreResult",
    "parse_payload",
    "follower_max_tokens",
    "response_text",
    "strip_chat_tokens",
    "extract_instruction",
    "score_instruction",
]

Constrained = Literal[False, "json_schema", "json_object", "grammar"]

#: Environment variables read by :meth:`FollowerConfig.from_env`.
ENV = {
    "base_url": "PROMPTMII_FOLLOWER_URL",
    "model": "PROMPTMII_FOLLOWER_MODEL",
    "api_key": "PROMPTMII_FOLLOWER_API_KEY",
    "concurrency": "PROMPTMII_FOLLOWER_CONCURRENCY",
    "timeout": "PROMPTMII_FOLLOWER_TIMEOUT",
    "max_retries": "PROMPTMII_FOLLOWER_RETRIES",
    "max_tokens": "PROMPTMII_FOLLOWER_MAX_TOKENS",
    "constrained": "PROMPTMII_FOLLOWER_CONSTRAINED",
}


class FollowerError(RuntimeError):
    """The follower gave no usable HTTP answer (after the retries)."""


@dataclass(frozen=True)
class FollowerConfig:
    """Where the follower is and how it is called (see the module docstring for the
    environment variables).

    Args:
        base_url: OpenAI-compatible base URL ending in ``/v1``; several separated by commas
            are used round-robin.
        model: The served model name sent as ``model``.
        api_key: Sent as a bearer token.
        concurrency: Most requests in flight at once in this process (paper: the reward
            server took ~128 concurrent requests). With several rollout engines, each has
            its own limit.
        timeout: Seconds per request.
        max_retries: Retries after a timeout, connection error, HTTP 5xx/429 or malformed
            body; then the sample scores 0.
        backoff: First retry delay in seconds, doubled each retry (capped at 8 s).
        max_tokens: Reply limit; None picks :func:`follower_max_tokens`.
        constrained: ``False``, ``"json_schema"`` (vLLM, OpenAI: replies restricted to
            ``{"label": <one of the labels>}``), or for llama.cpp's server ``"json_object"``
            (the same JSON) or ``"grammar"`` (the bare labels).
        temperature: Follower temperature (0, as in the paper).
    """

    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = "follower"
    api_key: str = "EMPTY"
    concurrency: int = 128
    timeout: float = 60.0
    max_retries: int = 3
    backoff: float = 0.5
    max_tokens: int | None = None
    constrained: Constrained = False
    temperature: float = 0.0

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"follower concurrency must be at least 1, got {self.concurrency}")
        if self.timeout <= 0:
            raise ValueError(f"follower timeout must be positive, got {self.timeout}")
        if self.max_retries < 0:
            raise ValueError(f"follower max_retries must be >= 0, got {self.max_retries}")
        if self.constrained is not False and self.constrained not in CONSTRAINED_STYLES:
            raise ValueError(f"constrained must be False or one of {CONSTRAINED_STYLES}, got {self.constrained!r}")
        if not self.urls:
            raise ValueError("follower base_url is empty")

    @property
    def urls(self) -> list[str]:
        return [u.strip().rstrip("/") for u in self.base_url.split(",") if u.strip()]

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> FollowerConfig:
        """A config from ``PROMPTMII_FOLLOWER_*`` variables; ``overrides`` (not None) win."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        casts = {"concurrency": int, "timeout": float, "max_retries": int, "max_tokens": int}
        for name, var in ENV.items():
            raw = env.get(var)
            if raw is None or raw.strip() == "":
                continue
            if name == "constrained":
                values[name] = False if raw.strip().lower() in ("0", "false", "no", "off") else raw.strip()
                continue
            try:
                values[name] = casts.get(name, str)(raw.strip())
            except ValueError:
                raise ValueError(f"{var}={raw!r} is not a valid {casts[name].__name__}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


@dataclass(frozen=True)
class HeldOutSet:
    """The m held-out examples a prompt line's ``label`` carries (see training.build_data)."""

    task: str
    labels: tuple[str, ...]
    input_fields: tuple[str, ...]
    inputs: tuple[tuple[str, ...], ...]
    gold: tuple[str, ...]


def parse_payload(label: Any) -> HeldOutSet:
    """The :class:`HeldOutSet` of a prompt line's ``label`` (a dict, or its JSON text).

    Raises ``ValueError`` naming the missing or malformed key.
    """
    if isinstance(label, (str, bytes)):
        try:
            label = json.loads(label)
        except ValueError:
            raise ValueError(f"label is a string but not JSON: {str(label)[:80]!r}") from None
    if not isinstance(label, Mapping):
        raise ValueError(f"label must be a dict (the data builder's label), got {type(label).__name__}")
    for key in ("labels", "input_fields", "test_inputs", "test_labels"):
        if not label.get(key):
            raise ValueError(f"label has no {key!r}; was the file written by python -m training.build_data?")
    fields = tuple(str(f) for f in label["input_fields"])
    inputs = tuple(tuple(str(v) for v in row) for row in label["test_inputs"])
    gold = tuple(str(g) for g in label["test_labels"])
    if len(inputs) != len(gold):
        raise ValueError(f"label has {len(inputs)} test inputs but {len(gold)} test labels")
    bad = [i for i, row in enumerate(inputs) if len(row) != len(fields)]
    if bad:
        raise ValueError(f"test input(s) {bad[:5]} do not have one value per input field {list(fields)}")
    return HeldOutSet(
        task=str(label.get("task", "?")),
        labels=tuple(str(x) for x in label["labels"]),
        input_fields=fields,
        inputs=inputs,
        gold=gold,
    )


def follower_max_tokens(labels: Sequence[str], constrained: Constrained = False) -> int:
    """A short reply limit that still fits the longest label: 10 tokens, or more for long
    label names (a token is at least ~2 characters of a label); with constrained decoding,
    room for the JSON wrapper as :class:`~dspy_promptmii.LabelAdapter` allows."""
    longest = max((len(str(label)) for label in labels), default=1)
    if constrained:
        return 16 + longest
    return max(10, math.ceil(longest / 2) + 4)


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
_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)


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


def strip_chat_tokens(text: str) -> str:
    """The reply without chat special tokens: cut at the first end-of-turn token, drop
    reasoning (``<think>...</think>``; an unclosed ``<think>`` leaves nothing), then remove
    any remaining ``<|...|>``-style tokens."""
    for stop in END_OF_TURN:
        at = text.find(stop)
        if at >= 0:
            text = text[:at]
    if "</think>" in text:
        text = text[text.rfind("</think>") + len("</think>") :]
    text = _THINK.sub("", text)
    if "<think>" in text:
        text = text[: text.find("<think>")]
    return _SPECIAL.sub("", text).strip()


def extract_instruction(text: str | None, input_fields: Sequence[str] = ("text",), prompt: str | None = None) -> str:
    """The generated instruction in a decoded policy output: the assistant part, without
    chat special tokens, cleaned by :func:`dspy_promptmii.protocol.clean_instruction`
    (the optimizer's own cleaning). ``""`` when nothing usable is left."""
    if not text:
        return ""
    return clean_instruction(strip_chat_tokens(response_text(text, prompt)), input_fields)


# --- the follower client ----------------------------------------------------------------


class _Retryable(Exception):
    pass


class Follower:
    """An async client for the follower with a concurrency limit, timeouts and retries.

    One client and one semaphore per event loop, created on first use in that loop, so an
    instance can serve OpenRLHF's rollout actor (one loop) and the reward's background
    loop alike. ``transport`` lets tests plug in ``httpx.MockTransport``.
    """

    def __init__(self, config: FollowerConfig | None = None, transport: httpx.AsyncBaseTransport | None = None):
        self.config = config or FollowerConfig.from_env()
        self._transport = transport
        self._per_loop: dict[int, tuple[asyncio.AbstractEventLoop, httpx.AsyncClient, asyncio.Semaphore]] = {}
        self._urls = itertools.cycle(self.config.urls)

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

    def body(self, prompt: str, labels: Sequence[str]) -> dict[str, Any]:
        """The chat-completions request for one follower prompt."""
        cfg = self.config
        body: dict[str, Any] = {
            "model": cfg.model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": cfg.temperature,
            "max_tokens": cfg.max_tokens or follower_max_tokens(labels, cfg.constrained),
        }
        if cfg.constrained:
            body.update(constrained_body(list(labels), cfg.constrained))
        return body

    async def _post_once(self, client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> str:
        try:
            response = await client.post(f"{url}/chat/completions", json=body)
        except httpx.TimeoutException as error:
            raise _Retryable(f"timeout after {self.config.timeout:g} s ({type(error).__name__})") from None
        except httpx.TransportError as error:
            raise _Retryable(f"connection error: {type(error).__name__}: {error}") from None
        if response.status_code == 429 or response.status_code >= 500:
            raise _Retryable(f"HTTP {response.status_code}: {response.text[:200]}")
        if response.status_code >= 400:
            raise FollowerError(f"HTTP {response.status_code} from {url}: {response.text[:300]}")
        try:
            content = response.json()["choices"][0]["message"].get("content")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise _Retryable(f"malformed reply body: {response.text[:200]!r}") from None
        return content or ""

    async def complete(self, prompt: str, labels: Sequence[str]) -> str:
        """The follower's reply to one prompt. Raises :class:`FollowerError` after the retries."""
        client, semaphore = self._resources()
        body = self.body(prompt, labels)
        last = "no attempt"
        for attempt in range(self.config.max_retries + 1):
            url = next(self._urls)
            try:
                async with semaphore:
                    return await self._post_once(client, url, body)
            except _Retryable as error:
                last = str(error)
                if attempt < self.config.max_retries:
                    logger.debug("follower attempt %d failed (%s); retrying", attempt + 1, last)
                    await asyncio.sleep(min(8.0, self.config.backoff * 2**attempt))
        raise FollowerError(f"{last} (after {self.config.max_retries + 1} attempts)")


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
    once, within the follower's concurrency limit), the protocol's parser, macro-F1.

    Never raises for follower trouble: a follower that fails after the retries gives a
    reward of 0 and a warning naming the task and the error.
    """
    started = time.perf_counter()
    if not instruction.strip():
        return ScoreResult(reward=0.0, empty_instruction=True, n=len(tests.gold), invalid_rate=1.0)
    prompts = [
        follower_prompt(instruction, tests.labels, dict(zip(tests.input_fields, row, strict=True)), tests.input_fields)
        for row in tests.inputs
    ]
    replies = await asyncio.gather(*(follower.complete(p, tests.labels) for p in prompts), return_exceptions=True)
    seconds = time.perf_counter() - started
    errors = [r for r in replies if isinstance(r, BaseException)]
    if errors:
        unexpected = [e for e in errors if not isinstance(e, FollowerError)]
        if unexpected and not isinstance(unexpected[0], Exception):  # cancellation and the like
            raise unexpected[0]
        logger.warning(
            "follower failed on %d of %d test examples of task %s (%s: %s); reward 0",
            len(errors),
            len(prompts),
            tests.task,
            type(errors[0]).__name__,
            errors[0],
        )
        return ScoreResult(
            reward=0.0, n=len(prompts), follower_calls=len(prompts), follower_error=str(errors[0]), seconds=seconds
        )
    predicted = [parse_label(r, tests.labels) for r in replies]
    metrics = score(list(tests.gold), predicted)
    return ScoreResult(
        reward=metrics["macro_f1"],
        macro_f1=metrics["macro_f1"],
        accuracy=metrics["accuracy"],
        invalid_rate=metrics["invalid_rate"],
        n=len(predicted),
        follower_calls=len(prompts),
        seconds=seconds,
        predictions=predicted,
    )


def with_overrides(config: FollowerConfig, **overrides: Any) -> FollowerConfig:
    """``config`` with the given (not None) fields replaced."""
    return replace(config, **{k: v for k, v in overrides.items() if v is not None})
