"""What a follower request carries besides its messages: constrained decoding and the
reply limit."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Literal

__all__ = [
    "ConstrainedStyle",
    "CONSTRAINED_STYLES",
    "label_grammar",
    "label_response_format",
    "constrained_body",
    "default_reply_limit",
    "label_choice",
    "CHOICE_PREFIX",
    "CHOICE_SUFFIX",
]

ConstrainedStyle = Literal["json_schema", "json_object", "grammar", "choice"]
#: ``json_schema``: OpenAI's ``response_format`` (vLLM, SGLang, OpenAI); ``json_object``:
#: the same schema in the form llama-cpp-python's server takes; ``grammar``: a llama.cpp
#: GBNF grammar of the bare labels (no JSON wrapper); ``choice``: no generation, the label
#: read off the follower's log-probabilities after the JSON answer's opening (the embedded
#: server, :mod:`dspy_promptmii.local.label_server`).
CONSTRAINED_STYLES: tuple[str, ...] = ("json_schema", "json_object", "grammar", "choice")
#: The answer the ``choice`` style scores a label in: what ``json_object`` has the
#: follower write, ``{"label": "<label>"}``, opened before the label and closed after it.
CHOICE_PREFIX = '{"label": "'
CHOICE_SUFFIX = '"}'


def label_grammar(labels: Sequence[Any]) -> str:
    """A GBNF grammar (llama.cpp) whose only sentences are the labels themselves."""
    return "root ::= " + " | ".join(json.dumps(str(label), ensure_ascii=False) for label in labels)


def label_response_format(labels: Sequence[Any], style: ConstrainedStyle = "json_schema") -> dict[str, Any]:
    """A ``response_format`` that lets the LM write only ``{"label": <one of labels>}``.

    Raises ``ValueError`` for a style other than ``json_schema`` or ``json_object``.
    """
    schema = {
        "type": "object",
        "properties": {"label": {"type": "string", "enum": [str(label) for label in labels]}},
        "required": ["label"],
        "additionalProperties": False,
    }
    if style == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": "label", "schema": schema, "strict": True}}
    if style == "json_object":
        return {"type": "json_object", "schema": schema}
    raise ValueError(f"a response_format style is 'json_schema' or 'json_object', got {style!r}")


def label_choice(labels: Sequence[Any]) -> dict[str, Any]:
    """The ``label_choice`` request field of the ``choice`` style: the labels and the
    answer they are scored in (:data:`CHOICE_PREFIX` + label + :data:`CHOICE_SUFFIX`)."""
    return {"labels": [str(label) for label in labels], "prefix": CHOICE_PREFIX, "suffix": CHOICE_SUFFIX}


def constrained_body(labels: Sequence[Any], style: ConstrainedStyle) -> dict[str, Any]:
    """The fields an OpenAI-compatible request body needs so that the LM can answer with
    nothing but one of the labels: a ``response_format`` (JSON styles), a top-level
    llama.cpp ``grammar``, or (``choice``) a ``label_choice`` with OpenAI's ``logprobs``
    and ``top_logprobs`` (one per label), which the reply answers with each label's
    probability. Raises ``ValueError`` for an unknown style."""
    if style == "grammar":
        return {"grammar": label_grammar(labels)}
    if style == "choice":
        return {"logprobs": True, "top_logprobs": len(labels), "label_choice": label_choice(labels)}
    if style in ("json_schema", "json_object"):
        return {"response_format": label_response_format(labels, style)}
    raise ValueError(f"constrained decoding style must be one of {CONSTRAINED_STYLES}, got {style!r}")


def default_reply_limit(labels: Sequence[Any], constrained: ConstrainedStyle | Literal[False]) -> int:
    """The follower's reply limit in tokens when none is set: room for the longest label
    (a token is at least one character) plus, with a JSON style, the ``{"label": ""}``
    wrapper; at least 10."""
    longest = max((len(str(label)) for label in labels), default=1)
    if constrained in ("json_schema", "json_object", "choice"):
        return 16 + longest
    return max(10, longest + 2)
