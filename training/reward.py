"""OpenRLHF custom reward for Prompt-MII: ``--reward.remote_url /abs/path/training/reward.py``.

OpenRLHF 0.11.2 (``openrlhf/utils/agent.py``, ``SingleTurnAgentExecutor``) loads this file
by path and calls ``reward_func([query], [prompt], [label])`` once per sample, in a worker
thread (``asyncio.to_thread``), where ``query`` is the decoded prompt + response (chat
special tokens included), ``prompt`` the chat-formatted prompt and ``label`` the line's
``label`` dict written by ``python -m training.build_data``. It reads ``rewards`` (the
training reward), ``scores`` (dynamic filtering and eval) and ``extra_logs`` from the
returned dict, and wraps each in a one-element tensor itself, so for one query the
values are plain floats.

The follower is configured by ``PROMPTMII_FOLLOWER_*`` environment variables (see
:mod:`training.follower`); pass them to the Ray workers through the job's runtime
environment (``train_grpo.sh`` does). ``PROMPTMII_TOKENIZER`` (a tokenizer folder or a
``.gguf`` file) makes the ``instruction_tokens`` log exact; without it the count is the
over-estimate of :class:`training.tokens.ApproxCounter`.

All follower calls of every thread go through one background event loop, so the
concurrency limit (default 128) holds for the whole process. The instruction is cleaned
and the follower called, parsed and scored by the protocol in each line's ``label``
(:mod:`training.follower`). Failures of single samples are not raised into OpenRLHF:
they give a reward of 0 and a logged warning. An outage is: once too many recent
follower calls failed, :class:`~training.follower.FollowerOutage` propagates with its
message, so that training stops instead of learning from zeros.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # loaded by file path (OpenRLHF): make `training` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dspy_promptmii.secrets import protected_logger, scrub
from training.follower import (
    Follower,
    FollowerConfig,
    FollowerOutage,
    ScoreResult,
    extract_instruction,
    parse_payload,
    score_instruction,
)
from training.tokens import TokenCounter, load_counter

logger = protected_logger("training.reward")

__all__ = ["reward_func", "score_queries", "configure"]

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_follower: Follower | None = None
_counter: TokenCounter | None = None


def configure(config: FollowerConfig | None = None, follower: Follower | None = None) -> None:
    """Set the follower used by :func:`reward_func` (default: from the environment on first use)."""
    global _follower
    with _lock:
        _follower = follower or Follower(config or FollowerConfig.from_env())


def _background_loop() -> asyncio.AbstractEventLoop:
    global _loop
    with _lock:
        if _loop is None or _loop.is_closed():
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="promptmii-reward-loop", daemon=True)
            thread.start()
            _loop = loop
        return _loop


def _get_follower() -> Follower:
    global _follower
    with _lock:
        if _follower is None:
            _follower = Follower(FollowerConfig.from_env())
            logger.info(
                "reward follower: %s model %s, concurrency %d",
                _follower.config.base_url,
                _follower.config.model,
                _follower.config.concurrency,
            )
        return _follower


def _get_counter() -> TokenCounter:
    global _counter
    with _lock:
        if _counter is None:
            spec = os.environ.get("PROMPTMII_TOKENIZER") or None
            try:
                _counter = load_counter(spec)
            except Exception as error:  # noqa: BLE001 - a log must not stop training
                logger.warning("PROMPTMII_TOKENIZER=%r could not be loaded (%s); using the approximation", spec, error)
                _counter = load_counter(None)
        return _counter


async def _score_one(follower: Follower, query: str, prompt: str | None, label: Any) -> tuple[ScoreResult, int]:
    try:
        tests = parse_payload(label)
    except ValueError as error:
        logger.warning("reward 0: the sample's label is unusable (%s)", error)
        return ScoreResult(reward=0.0, follower_error=scrub(str(error))), 0
    instruction = extract_instruction(query, tests, prompt=prompt)
    if not instruction:
        logger.info("reward 0: no instruction left in the response of task %s", tests.task)
    result = await score_instruction(follower, instruction, tests)
    return result, _get_counter().count(instruction) if instruction else 0


def score_queries(
    queries: Sequence[str], prompts: Sequence[str] | None, labels: Sequence[Any], follower: Follower | None = None
) -> list[tuple[ScoreResult, int]]:
    """(score, instruction tokens) per query, computed on the shared background loop."""
    follower = follower or _get_follower()
    prompts = list(prompts) if prompts is not None else [None] * len(queries)

    async def run() -> list[tuple[ScoreResult, int]]:
        return list(
            await asyncio.gather(
                *(_score_one(follower, q, p, lab) for q, p, lab in zip(queries, prompts, labels, strict=True))
            )
        )

    return asyncio.run_coroutine_threadsafe(run(), _background_loop()).result()


def reward_func(queries: Sequence[str], prompts: Sequence[str], labels: Sequence[Any], **kwargs: Any) -> dict[str, Any]:
    """OpenRLHF's custom reward: the follower's macro-F1 for the instruction in each query.

    Returns ``{"rewards", "scores", "extra_logs"}``: floats when there is one query (how
    OpenRLHF 0.11.2 calls it), lists of floats otherwise. Raises only
    :class:`~training.follower.FollowerOutage`; any other failure is a reward of 0.
    """
    n = len(queries)
    try:
        if len(labels) != n or (prompts is not None and len(prompts) != n):
            raise ValueError(f"{n} queries but {len(labels)} labels and {len(prompts or [])} prompts")
        results = score_queries(queries, prompts, labels)
        rewards = [r.reward for r, _ in results]
        logs = [r.extra_logs(tokens) for r, tokens in results]
    except FollowerOutage:
        logger.error("stopping: too many follower calls failed", exc_info=True)
        raise
    except Exception as error:  # noqa: BLE001 - exceptions must not reach OpenRLHF
        logger.warning("reward 0 for %d sample(s): %s: %s", n, type(error).__name__, error)
        rewards = [0.0] * n
        logs = [ScoreResult(reward=0.0, follower_error=scrub(str(error))).extra_logs(0) for _ in range(n)]
    if n == 1:
        return {"rewards": rewards[0], "scores": rewards[0], "extra_logs": logs[0]}
    keys = sorted({k for log in logs for k in log})
    return {
        "rewards": rewards,
        "scores": list(rewards),
        "extra_logs": {k: [log.get(k, 0.0) for log in logs] for k in keys},
    }
