"""Turn what a user types (``local``, a registry model, a ``.gguf`` path, or a LiteLLM
route such as ``hosted_vllm/milli19/promptmii-llama-3.1-8b-instruct``) into ``dspy.LM``
objects, starting local llama.cpp servers as needed and stopping them at the end."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import dspy

from dspy_promptmii.local.registry import DEFAULT_MODEL, REGISTRY
from dspy_promptmii.local.server import DEFAULT_N_CTX, FOLLOWER_STYLE, LocalServer

logger = logging.getLogger(__name__)

__all__ = ["Endpoint", "LMPool", "is_local", "litellm_route"]

_OPENAI_COMPATIBLE = ("hosted_vllm/", "openai/", "litellm_proxy/")


def is_local(route: str) -> bool:
    """``local``, a registry model name, or a ``.gguf`` path."""
    return route == "local" or route in REGISTRY or route.endswith(".gguf")


def litellm_route(route: str, api_base: str | None) -> str:
    """With an ``api_base`` (an OpenAI-compatible server such as vLLM), a bare model name
    gets the ``hosted_vllm/`` prefix, which sends ``max_tokens`` as such servers expect."""
    if api_base and not route.startswith(_OPENAI_COMPATIBLE):
        return f"hosted_vllm/{route}"
    return route


@dataclass
class Endpoint:
    """An LM with what callers need to know about where it runs."""

    lm: dspy.LM
    route: str
    token_counter: Callable[[str], int] | None
    context_tokens: int | None
    constrained_style: str  # the follower decoding style this endpoint takes (see Protocol.constrained)
    server: LocalServer | None = None


class LMPool:
    """Hands out LMs for routes; one local server per local model, all stopped on exit.

    ``n_threads`` sets the CPU threads of local servers (default: all cores). llama.cpp's
    threads spin at every step, so when two local servers share a small machine (e.g.
    a generator and a follower of different sizes), one thread each is much faster.

    >>> with LMPool() as pool:                                   # doctest: +SKIP
    ...     follower = pool.endpoint("local", max_tokens=16)
    """

    def __init__(
        self,
        *,
        n_ctx: int = DEFAULT_N_CTX,
        n_threads: int | None = None,
        auto_pull: bool = True,
        api_base: str | None = None,
    ):
        self.n_ctx = n_ctx
        self.n_threads = n_threads
        self.auto_pull = auto_pull
        self.api_base = api_base
        self._servers: dict[str, LocalServer] = {}

    def endpoint(self, route: str, *, api_base: str | None = None, **lm_kwargs: Any) -> Endpoint:
        """An endpoint for ``route``; ``lm_kwargs`` go to ``dspy.LM`` (temperature, max_tokens, cache).

        A local route starts (once) a llama.cpp server for its model, pulling a registry
        model first when the pool has ``auto_pull``.

        Raises:
            ServerError: the local server cannot start (see ``LocalServer.start``).
            FileNotFoundError, ModelFileError, CorruptModelError, PullError: the local model
                cannot be used (see ``dspy_promptmii.local.resolve_model``).
            ValueError: ``dspy.LM`` refuses the route or its arguments.
        """
        if is_local(route):
            model = DEFAULT_MODEL if route == "local" else route
            server = self._servers.get(model)
            if server is None:
                server = LocalServer(model, n_ctx=self.n_ctx, n_threads=self.n_threads, auto_pull=self.auto_pull)
                server.start()
                self._servers[model] = server
            return Endpoint(
                lm=server.lm(**lm_kwargs),
                route=route,
                token_counter=server.count_tokens,
                context_tokens=server.n_ctx,
                constrained_style=FOLLOWER_STYLE,
                server=server,
            )
        base = api_base or self.api_base
        full = litellm_route(route, base)
        extra = {"api_base": base} if base else {}
        return Endpoint(
            lm=dspy.LM(full, **extra, **lm_kwargs),
            route=full,
            token_counter=None,
            context_tokens=None,
            constrained_style="json_schema",
        )

    def close(self) -> None:
        for server in self._servers.values():
            server.stop()
        self._servers.clear()

    def __enter__(self) -> LMPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
