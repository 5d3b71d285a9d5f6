"""OpenRLHF agent for Prompt-MII GRPO: ``--train.agent_func_path /abs/path/training/agent.py``.

OpenRLHF 0.11.2 (``openrlhf/trainer/ray/vllm_engine.py``) loads this file by path inside
each vLLM rollout actor, checks that ``AgentExecutor`` subclasses ``AgentExecutorBase``,
builds it with no arguments, and awaits ``execute(prompt, label, sampling_params,
max_length, hf_tokenizer, llm_engine, images)`` once per sample. Here ``execute``:

1. tokenizes the chat-formatted meta-prompt and lets the policy write (one vLLM call),
2. extracts the instruction from the decoded reply (chat special tokens removed, then
   the line's protocol with the shown examples and the finish reason, as the optimizer
   cleans a reply),
3. scores it with the frozen follower on the line's m test examples -- all m calls at
   once, through an async HTTP client limited to ``PROMPTMII_FOLLOWER_CONCURRENCY``
   (default 128) requests in flight per rollout actor,
4. returns the dict OpenRLHF's single-turn executor returns, with ``reward`` = ``scores``
   = macro-F1 and extra logs (follower macro-F1, accuracy, invalid-output rate, errors,
   empty instructions, instruction length in policy tokens, response tokens).

Unlike ``--reward.remote_url`` (one blocking ``reward_func`` call per sample in a thread
pool), the follower calls of all samples in flight overlap here. Follower failures give
reward 0 with a logged warning and never raise into OpenRLHF. Configuration: the
``PROMPTMII_FOLLOWER_*`` environment variables of :mod:`training.follower`.
"""

from __future__ import annotations

import sys
from copy import deepcopy
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
from training.openrlhf_compat import agent_module

logger = protected_logger("training.agent")

AgentExecutorBase = agent_module().AgentExecutorBase

__all__ = ["AgentExecutor", "AgentExecutorBase"]


def _token_ids(hf_tokenizer: Any, text: str) -> list[int]:
    encoded = hf_tokenizer(text=text, add_special_tokens=False)
    ids = encoded["input_ids"] if not isinstance(encoded, list) else encoded
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if ids and isinstance(ids[0], list):  # a batch of one
        ids = ids[0]
    return list(ids)


class AgentExecutor(AgentExecutorBase):
    """Generate an instruction with the policy, reward it with the follower's macro-F1.

    Args:
        config: Follower settings (default: from ``PROMPTMII_FOLLOWER_*``; OpenRLHF builds
            the executor without arguments).
        follower: A ready :class:`~training.follower.Follower` (tests pass one with a mock
            transport).
    """

    def __init__(self, config: FollowerConfig | None = None, follower: Follower | None = None):
        self.follower = follower or Follower(config or FollowerConfig.from_env())
        logger.info(
            "Prompt-MII agent: follower %s model %s, concurrency %d (prompts and settings: each line's protocol)",
            self.follower.config.base_url,
            self.follower.config.model,
            self.follower.config.concurrency,
        )

    async def execute(
        self,
        prompt: str,
        label: Any,
        sampling_params: Any,
        max_length: int,
        hf_tokenizer: Any,
        llm_engine: Any,
        images: Any = None,
    ) -> dict[str, Any]:
        """One rollout and its reward, in the output format of OpenRLHF 0.11.2's
        ``SingleTurnAgentExecutor.execute``."""
        if images:
            logger.warning("Prompt-MII prompts are text-only; the sample's images are ignored")
        prompt_ids = _token_ids(hf_tokenizer, prompt)
        params = sampling_params
        if getattr(sampling_params, "max_tokens", None) is None:
            params = deepcopy(sampling_params)
            params.max_tokens = max(1, max_length - len(prompt_ids))
        room = max_length - params.max_tokens
        if len(prompt_ids) > room:
            logger.warning(
                "prompt of %d tokens exceeds max_len - max_new_tokens = %d; truncating from the left as OpenRLHF "
                "does (the data builder should have dropped it: rebuild with --max-prompt-tokens %d)",
                len(prompt_ids),
                room,
                room,
            )
            prompt_ids = prompt_ids[-room:]

        request = await llm_engine.generate(prompt_ids, deepcopy(params), multi_modal_data=None)
        output = request.outputs[0]
        action_ids = list(output.token_ids)
        observation = prompt_ids + action_ids
        log_probs = None
        if getattr(sampling_params, "logprobs", None) is not None and getattr(output, "logprobs", None) is not None:
            log_probs = [0.0] * len(prompt_ids)
            for token_id, candidates in zip(action_ids, output.logprobs, strict=False):
                chosen = candidates.get(token_id)
                log_probs.append(chosen.logprob if chosen is not None else 0.0)

        result, instruction_tokens = await self._reward(output, action_ids, label, hf_tokenizer)
        logs = result.extra_logs(instruction_tokens)
        logs["response_tokens"] = float(len(action_ids))
        return {
            "prompt": prompt,
            "label": label,
            "images": images,
            "mm_train_inputs": None,
            "observation_tokens": observation,
            "action_ranges": [(len(prompt_ids), len(observation))],
            "rollout_log_probs": log_probs,
            "truncated": output.finish_reason == "length",
            "reward": float(result.reward),
            "scores": float(result.reward),
            "extra_logs": logs,
        }

    async def _reward(
        self, output: Any, action_ids: list[int], label: Any, hf_tokenizer: Any
    ) -> tuple[ScoreResult, int]:
        """Score one response; any failure but an outage (:class:`FollowerOutage`, raised)
        is a reward of 0 with a warning."""
        try:
            tests = parse_payload(label)
            text = getattr(output, "text", None)
            if text is None:
                text = hf_tokenizer.decode(action_ids, skip_special_tokens=False)
            truncated = getattr(output, "finish_reason", None) == "length"
            instruction = extract_instruction(text, tests, truncated=truncated)
            result = await score_instruction(self.follower, instruction, tests)
            return result, len(_token_ids(hf_tokenizer, instruction)) if instruction else 0
        except FollowerOutage:
            raise
        except Exception as error:  # noqa: BLE001 - exceptions must not reach OpenRLHF
            logger.warning("reward 0: scoring failed (%s: %s)", type(error).__name__, error)
            return ScoreResult(reward=0.0, follower_error=scrub(str(error))), 0
