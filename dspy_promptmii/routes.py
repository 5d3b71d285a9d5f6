"""Turn what a user types (``local``, a registry model, a ``.gguf`` path, or a LiteLLM
route such as ``hosted_vllm/milli19/promptmii-llama-3.1-8b-instruct``) into ``dspy.LM``
objects, starting local llama.cpp servers as needed and stopping them at the end.

Every LM handed out here:

* has a per-request ``timeout`` (:func:`default_timeout`: :data:`LOCAL_TIMEOUT` for a
  local server, which answers one request at a time on a CPU, :data:`REMOTE_TIMEOUT`
  otherwise; ``LMPool(timeout=...)`` sets another), so that no call waits for ever;
* carries a :class:`~dspy_promptmii.stopping.StopGate`: after Ctrl-C or SIGTERM it sends
  nothing more;
* keys DSPy's response cache by everything that changes a reply: DSPy's own key holds
  the route, the messages and the settings but leaves out ``api_base``, so two servers
  behind one model name would share entries. A :class:`ServerLM` adds a scope made of
  the route, the ``api_base`` (for a local server: the model file, not its port) to the
  key, through DSPy's ``rollout_id`` (part of the key, never sent);
* has its credentials remembered by :mod:`dspy_promptmii.secrets` (the password of an
  ``api_base`` such as ``http://user:password@host/v1`` included), so that no error
  text or log line shows them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dspy

from dspy_promptmii.console import quiet_litellm
from dspy_promptmii.local.registry import ADAPTERS, DEFAULT_MODEL, REGISTRY, unknown_local_model
from dspy_promptmii.local.server import DEFAULT_N_CTX, FOLLOWER_STYLE, LocalServer
from dspy_promptmii.secrets import protected_logger, remember
from dspy_promptmii.stopping import StopGate

logger = protected_logger(__name__)

__all__ = [
    "Endpoint",
    "LMPool",
    "ServerLM",
    "is_local",
    "local_model",
    "check_route",
    "unknown_local_model",
    "litellm_route",
    "default_timeout",
    "cache_scope",
    "LOCAL_TIMEOUT",
    "REMOTE_TIMEOUT",
]

#: Seconds a request to a local llama.cpp server may wait for its next byte: it serves
#: one request at a time on the CPU, and a long meta-prompt (7,000 tokens) takes about
#: two minutes on 2 cores before the first token.
LOCAL_TIMEOUT = 600.0
#: Seconds a request to any other server may wait for its next byte (a GPU server
#: writes a 1,024-token instruction in well under a minute).
REMOTE_TIMEOUT = 120.0

_OPENAI_COMPATIBLE = ("hosted_vllm/", "openai/", "litellm_proxy/")


def is_local(route: str) -> bool:
    """``local``, a registry model name, a trained generator's name, or a ``.gguf`` path."""
    return route == "local" or route in REGISTRY or route in ADAPTERS or route.lower().endswith(".gguf")


def local_model(route: str) -> str:
    """The model a local route serves: :data:`DEFAULT_MODEL` for ``local``, else the route
    itself (a registry model, a trained generator's name or a ``.gguf`` path)."""
    return DEFAULT_MODEL if route == "local" else route


def check_route(route: str, api_base: str | None = None) -> None:
    """Refuse a route that no LM can be made from, before anything starts.

    A local route, or any route with an ``api_base`` (an OpenAI-compatible server), is
    accepted here (a local model's file is checked when its server is prepared). Any other
    route must be one LiteLLM can route (``litellm.get_llm_provider``: a provider prefix such
    as ``openai/`` or a model name LiteLLM knows): the first call would fail otherwise.

    Raises:
        TypeError: the route is not a string.
        ValueError: the route is empty or has white space around it, or is neither local nor
            routable; the message lists the local names and the closest of them to a misspelled one.
    """
    if not isinstance(route, str):
        raise TypeError(f"a model route must be a string, got {type(route).__name__} {route!r}")
    if not route.strip():
        raise ValueError(f"a model route must be a non-empty string, got {route!r}")
    if route != route.strip():
        raise ValueError(f"model route {route!r} has white space around it")
    if is_local(route) or api_base:
        return
    import litellm

    try:
        with quiet_litellm():  # no provider banner on stdout
            litellm.get_llm_provider(route)
    except Exception:  # LiteLLM raises its BadRequestError (or ValueError) for an unknown provider
        raise ValueError(
            unknown_local_model(route)
            + "; nor can LiteLLM route it: give a provider prefix (e.g. openai/gpt-4o-mini, hosted_vllm/NAME) "
            "or an api_base of an OpenAI-compatible server"
        ) from None


def litellm_route(route: str, api_base: str | None) -> str:
    """With an ``api_base`` (an OpenAI-compatible server such as vLLM), a bare model name
    gets the ``hosted_vllm/`` prefix, which sends ``max_tokens`` as such servers expect."""
    if api_base and not route.startswith(_OPENAI_COMPATIBLE):
        return f"hosted_vllm/{route}"
    return route


def default_timeout(route: str) -> float:
    """The per-request timeout of a route when none is given: :data:`LOCAL_TIMEOUT` for
    a local one, :data:`REMOTE_TIMEOUT` otherwise."""
    return LOCAL_TIMEOUT if is_local(route) else REMOTE_TIMEOUT


def _model_file(server: LocalServer) -> dict[str, Any]:
    """What identifies the files a local server serves: a registry model's sha256 (with a
    trained generator's adapter sha256), else the file's resolved path, size and
    modification time (and the adapter's, when one is given)."""
    trained = ADAPTERS.get(server.model)
    if trained is not None:
        return {"sha256": REGISTRY[trained.base].sha256, "adapter_sha256": trained.sha256}
    spec = REGISTRY.get(server.model)
    identity = (
        {"sha256": spec.sha256}
        if spec is not None
        else _file_identity(Path(server.model_path or server.model).expanduser())
    )
    lora = getattr(server, "lora", None)
    if lora is not None:
        identity["adapter"] = _file_identity(Path(lora))
    return identity


def _file_identity(path: Path) -> dict[str, Any]:
    try:
        stat = path.stat()
    except OSError:
        return {"path": os.path.realpath(path)}
    return {"path": os.path.realpath(path), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def cache_scope(route: str, api_base: str | None, model_file: dict[str, Any] | None = None) -> int:
    """An integer naming where replies come from: the LiteLLM route, the ``api_base``
    (None for a local server) and the model file (a local server's). Equal scopes mean
    the same server and model; it is the ``rollout_id`` of a :class:`ServerLM`."""
    text = json.dumps({"route": route, "api_base": api_base, "model_file": model_file}, sort_keys=True)
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:15], 16)


class ServerLM(dspy.LM):
    """A ``dspy.LM`` whose ``rollout_id`` is a :func:`cache_scope`: DSPy puts it in the
    response cache's key and strips it from the request, so a cached reply of one server
    or model file is never served for another. DSPy warns that a rollout id does nothing
    at temperature 0; this one is not a sampling rollout, so the warning is left out."""

    def _warn_zero_temp_rollout(self, temperature: float | None, rollout_id: Any) -> None:
        return None


def _scoped(lm: dspy.LM, *, scope: int, timeout: float) -> ServerLM:
    """``lm`` as a :class:`ServerLM` (a copy: same route, engine and settings) with the
    cache scope, the per-request timeout and the stop gate; its credentials remembered."""
    scoped = lm.copy(rollout_id=scope, timeout=timeout)
    scoped.__class__ = ServerLM  # adds no state: only the rollout warning differs
    scoped.callbacks = [StopGate(), *scoped.callbacks]
    remember(scoped.kwargs)  # the key and any credentials in api_base, for every later error text
    return scoped


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
    ``timeout`` is every request's limit in seconds (default: :func:`default_timeout`
    of each route). See the module docstring for what every LM carries.

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
        timeout: float | None = None,
    ):
        if timeout is not None and not (isinstance(timeout, (int, float)) and 0 < timeout < float("inf")):
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        self.timeout = timeout
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
            ValueError: the route is neither local nor one LiteLLM can route (:func:`check_route`).
            ServerError: the local server cannot start (see ``LocalServer.start``).
            FileNotFoundError, ModelFileError, CorruptModelError, PullError: the local model
                cannot be used (see ``dspy_promptmii.local.resolve_model``).
            ValueError: ``dspy.LM`` refuses the route or its arguments.
        """
        check_route(route, api_base or self.api_base)
        timeout = self.timeout or default_timeout(route)
        if is_local(route):
            model = local_model(route)
            server = self._servers.get(model)
            if server is None:
                server = LocalServer(model, n_ctx=self.n_ctx, n_threads=self.n_threads, auto_pull=self.auto_pull)
                server.start()
                self._servers[model] = server
            base = server.lm(**lm_kwargs)
            lm = _scoped(base, scope=cache_scope(base.model, None, _model_file(server)), timeout=timeout)
            return Endpoint(
                lm=lm,
                route=route,
                token_counter=server.count_tokens,
                context_tokens=server.n_ctx,
                constrained_style=FOLLOWER_STYLE,
                server=server,
            )
        base = api_base or self.api_base
        full = litellm_route(route, base)
        extra = {"api_base": base} if base else {}
        lm = _scoped(dspy.LM(full, **extra, **lm_kwargs), scope=cache_scope(full, base), timeout=timeout)
        return Endpoint(
            lm=lm,
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
