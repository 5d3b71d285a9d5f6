"""The one place where the package leans on DSPy beyond its public API.

Each function here wraps something DSPy does not document: a private function, or the
shape of ``lm.history``. If DSPy moves or changes one, the package keeps working with a
stated fallback (and a warning), and ``tests/test_dspy_private.py`` fails loudly, naming
it: :data:`MISSING` lists what could not be imported.

Public API is used everywhere else, e.g. ``Example.inputs()`` for an example's declared
inputs (see :func:`declared_inputs`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import dspy

from dspy_promptmii.secrets import protected_logger

logger = protected_logger(__name__)

__all__ = ["MISSING", "default_instructions", "is_openai_reasoning_model", "declared_inputs", "finish_reason_of"]

#: Names of the private DSPy functions this module could not import (empty when DSPy is
#: the one this package is tested with).
MISSING: list[str] = []

try:
    from dspy.signatures.signature import _default_instructions as _dspy_default_instructions
except ImportError:  # pragma: no cover - only with a DSPy that moved it
    MISSING.append("dspy.signatures.signature._default_instructions")
    _dspy_default_instructions = None

try:
    from dspy.clients.lm import _is_openai_reasoning_model as _dspy_is_reasoning
except ImportError:  # pragma: no cover - only with a DSPy that moved it
    MISSING.append("dspy.clients.lm._is_openai_reasoning_model")
    _dspy_is_reasoning = None

if MISSING:  # pragma: no cover
    logger.warning("DSPy no longer has %s: dspy-promptmii falls back on its own rules", ", ".join(MISSING))


def default_instructions(signature: type[dspy.Signature]) -> str:
    """The instructions DSPy writes for a signature whose author wrote none ("Given the
    fields ..."). Fallback: the same sentence built here."""
    if _dspy_default_instructions is not None:
        return _dspy_default_instructions(signature)
    inputs = ", ".join(f"`{name}`" for name in signature.input_fields)  # pragma: no cover
    outputs = ", ".join(f"`{name}`" for name in signature.output_fields)  # pragma: no cover
    return f"Given the fields {inputs}, produce the fields {outputs}."  # pragma: no cover


def is_openai_reasoning_model(model: str) -> bool:
    """Whether DSPy treats ``model`` as an OpenAI reasoning model (one that takes no
    temperature but its default). Fallback: False."""
    rule: Callable[[str], Any] | None = _dspy_is_reasoning
    return bool(rule(model)) if rule is not None else False


def declared_inputs(example: dspy.Example) -> tuple[str, ...]:
    """The input fields an example declares (``with_inputs``), by DSPy's public
    ``Example.inputs()``; empty when it declares none."""
    try:
        return tuple(example.inputs().keys())
    except ValueError:  # inputs() raises when with_inputs() was never called
        return ()


def finish_reason_of(lm: dspy.BaseLM, prompt: str, response_reason: Callable[[Any], str | None]) -> str | None:
    """The finish reason of ``lm``'s latest call with ``prompt``, read from its history
    (``lm.history`` entries hold ``prompt``, ``messages`` and ``response``; DSPy returns
    only the text). The last 8 entries are searched, newest first, so that a call made
    meanwhile by another thread is passed over; None when no entry matches (no history
    kept)."""
    for entry in reversed(getattr(lm, "history", [])[-8:]):
        if entry.get("prompt") == prompt or prompt in str(entry.get("messages") or ""):
            return response_reason(entry.get("response"))
    return None
