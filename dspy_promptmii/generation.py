"""One call to the instruction generator: its settings, the call, and what came back.

Settings follow the LM: a temperature or reply limit the LM (``dspy.LM(...,
temperature=..., max_tokens=...)``) or the caller sets is kept; where neither sets
one, the paper's temperature 0 is used (unless the model takes no temperature, like
OpenAI's reasoning models) and a default reply limit. A setting that was filled in here
and that the model refuses (its error names the setting) is dropped and the call made
again. Whether the reply was cut off comes from its finish reason (``length``), never
from token counts. A reply's text is always valid Unicode: a lone surrogate (a server
may send one as a JSON escape, ``"\\udc80"``) becomes U+FFFD, so that printing or
writing the instruction cannot fail.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import dspy

from dspy_promptmii.dspy_private import finish_reason_of, is_openai_reasoning_model
from dspy_promptmii.secrets import protected_logger

logger = protected_logger(__name__)

__all__ = [
    "Reply",
    "BUDGET_MARGIN",
    "budget_limit",
    "generator_settings",
    "budget_words",
    "DEFAULT_MAX_INSTRUCTION_TOKENS",
    "DEFAULT_GENERATOR_MAX_TOKENS",
    "generate",
    "finish_reason",
    "refuses_temperature_0",
    "valid_text",
]

#: Tokens a reply may run past an instruction budget (headers, the answer line) before the
#: generation limit cuts it; cleaning then drops the unfinished last line.
BUDGET_MARGIN = 64
#: The generator's reply limit without an instruction budget, when neither the LM nor the
#: caller sets one (the paper lets the generator write up to about 1-2k tokens).
DEFAULT_GENERATOR_MAX_TOKENS = 1024
#: The default instruction budget (tokens), chosen on the dev tasks of the shared datasets;
#: the measurements behind it are in README's Benchmarks section and
#: benchmarks/results/dev12-2026-11-29.
DEFAULT_MAX_INSTRUCTION_TOKENS = 160


def budget_words(max_instruction_tokens: int | None) -> int | None:
    """The length rule the meta-prompt states for an instruction budget: three quarters
    of the tokens, in words (about 1.3 tokens a word in English); None without a budget."""
    return int(0.75 * max_instruction_tokens) if max_instruction_tokens else None


def budget_limit(max_instruction_tokens: int | None, ceiling: int = DEFAULT_GENERATOR_MAX_TOKENS) -> int:
    """The generator's reply limit for an instruction budget: the budget plus
    :data:`BUDGET_MARGIN` tokens, at most ``ceiling``; ``ceiling`` without a budget."""
    if not max_instruction_tokens:
        return ceiling
    return min(ceiling, max_instruction_tokens + BUDGET_MARGIN)


@dataclass
class Reply:
    """A generator reply: its text, the usage the LM reported (empty on a cache hit), its
    finish reason (None when DSPy kept no history), and the settings sent with it."""

    text: str
    usage: dict[str, Any]
    finish_reason: str | None
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


def refuses_temperature_0(model: str) -> bool:
    """Models that take no temperature but their default (OpenAI's reasoning models, by
    DSPy's own rule)."""
    return is_openai_reasoning_model(model)


def generator_settings(
    lm: dspy.BaseLM,
    *,
    temperature: float | None = None,
    max_tokens: int | None = None,
    default_max_tokens: int = 1024,
    extra: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], set[str]]:
    """The settings to send on top of the LM's own, and the names of those filled in
    here rather than asked for (which may be dropped if the model refuses them)."""
    configured = getattr(lm, "kwargs", {}) or {}
    settings = dict(extra or {})
    filled: set[str] = set()
    if temperature is not None:
        settings["temperature"] = temperature
    elif configured.get("temperature") is None and "temperature" not in settings:
        if not refuses_temperature_0(lm.model):
            settings["temperature"] = 0.0
            filled.add("temperature")
    if max_tokens is not None:
        settings["max_tokens"] = max_tokens
    elif not (configured.get("max_tokens") or configured.get("max_completion_tokens")) and not (
        "max_tokens" in settings or "max_completion_tokens" in settings
    ):
        settings["max_tokens"] = default_max_tokens
    return settings, filled


def finish_reason(response: Any) -> str | None:
    """The finish reason of a recorded LM response (DSPy's lm15 ``Response`` or an
    OpenAI/LiteLLM ``ModelResponse``), or None when it carries none."""
    reason = getattr(response, "finish_reason", None)
    if reason is None:
        choices = getattr(response, "choices", None)
        if choices is None and isinstance(response, dict):
            choices = response.get("choices")
        if choices:
            first = choices[0]
            reason = first.get("finish_reason") if isinstance(first, dict) else getattr(first, "finish_reason", None)
    return None if reason is None else str(getattr(reason, "value", reason))


def valid_text(text: str) -> str:
    """``text`` with each lone surrogate (half of a UTF-16 pair, which no UTF-8 output can
    encode) replaced by U+FFFD; paired surrogates become the character they encode."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _call(lm: dspy.BaseLM, prompt: str, settings: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    with dspy.track_usage() as tracker:
        outputs = lm(prompt, **settings)
    first = outputs[0] if outputs else None
    text = first.get("text") if isinstance(first, dict) else first
    return valid_text(text or ""), tracker.get_total_tokens().get(lm.model, {})


#: Errors of code, not of a server: never read as a refused setting, whatever their text says.
_PROGRAMMING_ERRORS = (TypeError, AttributeError, NameError, KeyError, IndexError, AssertionError)


def generate(lm: dspy.BaseLM, prompt: str, settings: dict[str, Any], filled: set[str] = frozenset()) -> Reply:
    """One call with ``prompt`` as a single user message.

    A setting named in ``filled`` that the model refuses (an error whose text names it;
    not an error of code such as ``TypeError``) is dropped, with a warning, and the call
    made once more.

    Raises:
        Whatever the LM raises (e.g. ``dspy.utils.exceptions.LMError``), refusals of
        settings the caller asked for included.
    """
    settings = dict(settings)
    while True:
        try:
            text, usage = _call(lm, prompt, settings)
            break
        except _PROGRAMMING_ERRORS:
            raise  # a bug, whatever its text names: never a refused setting
        except Exception as error:
            refused = [name for name in filled if name in settings and name in str(error).lower()]
            if not refused:
                raise
            for name in refused:
                logger.warning("the generator refused %s=%r (%s); calling it without", name, settings[name], error)
                settings.pop(name)
    return Reply(text=text, usage=usage, finish_reason=finish_reason_of(lm, prompt, finish_reason), settings=settings)
