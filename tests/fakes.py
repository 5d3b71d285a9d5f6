"""Shared test fakes: a recording fake LM (no network, no model) and small helpers.

Usage::

    lm, engine = fake_lm(["reply one", "reply two"], model="fake/generator")
    lm("hello")                      # -> ["reply one"]
    engine.requests[0]               # the dspy.lm15 Request that was sent
    engine.texts(0)                  # ["hello"]: the text of each message of request 0
    engine.configs[0].temperature    # the settings of request 0

``replies`` may be a list of strings (consumed in order; the last one repeats when
the list runs out, and an empty list raises), a single string (always returned), or
a callable ``request -> str``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import dspy  # noqa: E402
from dspy.lm15 import Message, Response, Usage  # noqa: E402

__all__ = ["AsyncFakeEngine", "FakeEngine", "LegacyFakeEngine", "fake_lm", "message_texts", "word_count"]

Replies = Sequence[str] | str | Callable[[Any], str]


def message_texts(message: Any) -> str:
    """All the text parts of one dspy.lm15 message, joined."""
    return "".join(getattr(part, "text", "") or "" for part in message.parts)


def word_count(text: str) -> int:
    """A deterministic stand-in token counter: white-space separated words."""
    return len(text.split())


class FakeEngine:
    """A dspy.LM engine that records every request and answers from a script.

    Usage reported per call: input tokens = words in all messages (at least 1),
    output tokens = words in the reply (at least 1), unless ``usage`` is given as a
    fixed ``(input_tokens, output_tokens)`` pair.
    """

    def __init__(self, replies: Replies, usage: tuple[int, int] | None = None, finish_reason: str = "stop"):
        self.replies = replies
        self.usage = usage
        self.finish_reason = finish_reason
        self.requests: list[Any] = []
        self._next = 0

    # what dspy.LM calls
    def complete(self, request: Any) -> Response:
        self.requests.append(request)
        text = self._reply(request)
        if self.usage is not None:
            input_tokens, output_tokens = self.usage
        else:
            input_tokens = max(1, sum(word_count(message_texts(m)) for m in request.messages))
            output_tokens = max(1, word_count(text))
        return Response(
            id=f"fake-{len(self.requests)}",
            model=request.model,
            message=Message.assistant(text),
            finish_reason=self.finish_reason,
            usage=Usage(
                input_tokens=input_tokens, output_tokens=output_tokens, total_tokens=input_tokens + output_tokens
            ),
        )

    def _reply(self, request: Any) -> str:
        if callable(self.replies):
            return self.replies(request)
        if isinstance(self.replies, str):
            return self.replies
        if not self.replies:
            raise AssertionError("FakeEngine got a request but has no scripted replies")
        text = self.replies[min(self._next, len(self.replies) - 1)]
        self._next += 1
        return text

    # helpers for assertions
    @property
    def calls(self) -> int:
        return len(self.requests)

    @property
    def configs(self) -> list[Any]:
        return [request.config for request in self.requests]

    def texts(self, index: int = -1) -> list[str]:
        """The text of each message of one request."""
        return [message_texts(m) for m in self.requests[index].messages]

    def roles(self, index: int = -1) -> list[str]:
        return [str(getattr(m.role, "value", m.role)) for m in self.requests[index].messages]

    def prompt(self, index: int = -1) -> str:
        """The text of the only message of one request (asserts there is exactly one)."""
        texts = self.texts(index)
        assert len(texts) == 1, f"expected one message, got {len(texts)}: {texts!r}"
        return texts[0]


class AsyncFakeEngine:
    """The async counterpart of a :class:`FakeEngine`: same script, same request log."""

    def __init__(self, sync: FakeEngine):
        self.sync = sync

    async def complete(self, request: Any) -> Response:
        return self.sync.complete(request)


class LegacyFakeEngine(FakeEngine):
    """A :class:`FakeEngine` that takes DSPy's legacy (OpenAI-chat body) route.

    DSPy turns a call into a canonical ``Request`` for ``complete``, and refuses
    settings that have no canonical slot (e.g. ``response_format`` of type
    ``json_object`` with a ``schema`` key, which a real ``dspy.LM`` then sends
    through LiteLLM unchanged). This engine receives the body as sent, records it in
    ``bodies``, and answers from the same script. DSPy 3.4 warns (DeprecationWarning)
    that this route goes away in 3.5.
    """

    def __init__(self, replies: Replies, usage: tuple[int, int] | None = None, finish_reason: str = "stop"):
        super().__init__(replies, usage=usage, finish_reason=finish_reason)
        self.bodies: list[dict[str, Any]] = []

    def complete_legacy(self, lm: Any, request: dict[str, Any], **context: Any) -> Any:
        from dspy.clients.call_result import CallResult
        from dspy.lm15 import Request

        self.bodies.append(request)
        canonical = Request(model=request["model"], messages=tuple(
            Message.user(m["content"]) for m in request["messages"] if m["role"] == "user"
        ))
        return CallResult.native(self.complete(canonical))


def fake_lm(
    replies: Replies,
    model: str = "fake/generator",
    usage: tuple[int, int] | None = None,
    legacy: bool = False,
    finish_reason: str = "stop",
    **lm_kwargs: Any,
) -> tuple[dspy.LM, FakeEngine]:
    """A ``dspy.LM`` backed by a :class:`FakeEngine` (no cache, no network; sync and
    async calls share the engine's script and request log) and the engine.
    ``legacy=True`` gives a :class:`LegacyFakeEngine` (see there); ``finish_reason`` is
    what every response reports (``"length"``: cut at the token limit)."""
    engine = (LegacyFakeEngine if legacy else FakeEngine)(replies, usage=usage, finish_reason=finish_reason)
    lm = dspy.LM(model, engine=engine, async_engine=AsyncFakeEngine(engine), cache=False, **lm_kwargs)
    return lm, engine
