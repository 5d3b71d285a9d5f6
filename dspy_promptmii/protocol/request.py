"""What a follower request carries besides its messages: constrained decoding and the
reply limit.

For a multi-label set (:class:`~dspy_promptmii.protocol.render.MultiLabels`) the answer is a
JSON array of labels: ``json_schema``/``json_object`` constrain ``{"labels": [...]}`` (an
array of the labels' enum), ``grammar`` a bare JSON array of them; ``choice``, which scores
one label off the log-probabilities, cannot pick a set, so such a request takes the
``json_object`` form instead (the embedded server answers both).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any, Literal

from dspy_promptmii.protocol.render import is_multilabel

logger = logging.getLogger(__name__)

__all__ = [
    "ConstrainedStyle",
    "CONSTRAINED_STYLES",
    "FOLLOWER_STYLES",
    "follower_decoding",
    "follower_style_from_constrained",
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
#: What a run's ``follower_style`` takes: ``"endpoint"`` (the follower endpoint's own
#: style, :attr:`dspy_promptmii.routes.Endpoint.constrained_style`), ``"none"`` (no
#: constrained decoding), or one of :data:`CONSTRAINED_STYLES`.
FOLLOWER_STYLES: tuple[str, ...] = ("endpoint", "none", *CONSTRAINED_STYLES)


def follower_decoding(follower_style: str, endpoint_style: str | None) -> ConstrainedStyle | Literal[False]:
    """The ``Protocol(constrained=...)`` a ``follower_style`` means for a follower endpoint
    whose own style is ``endpoint_style`` (``None``: it has none, so ``"endpoint"`` means
    no constrained decoding).

    Raises:
        ValueError: ``follower_style`` is not one of :data:`FOLLOWER_STYLES`.
    """
    if follower_style not in FOLLOWER_STYLES:
        raise ValueError(f"follower_style must be one of {FOLLOWER_STYLES}, got {follower_style!r}")
    if follower_style == "none":
        return False
    if follower_style == "endpoint":
        return endpoint_style or False  # type: ignore[return-value]
    return follower_style  # type: ignore[return-value]


def follower_style_from_constrained(constrained: bool | str) -> str:
    """The ``follower_style`` that the deprecated ``constrained=`` argument of
    ``RunConfig`` and ``run_demo`` meant: True the endpoint's own style (not the protocol's
    ``constrained=True``, which is json_schema), False none, a string that style."""
    return "endpoint" if constrained is True else "none" if constrained is False else str(constrained)


#: The answer the ``choice`` style scores a label in: what ``json_object`` has the
#: follower write, ``{"label": "<label>"}``, opened before the label and closed after it.
CHOICE_PREFIX = '{"label": "'
CHOICE_SUFFIX = '"}'


def label_grammar(labels: Sequence[Any]) -> str:
    """A GBNF grammar (llama.cpp) whose only sentences are the labels themselves; for a
    multi-label set, JSON arrays of them (``[]``, ``["a"]``, ``["a", "c"]``...)."""
    if is_multilabel(labels):
        quoted = (json.dumps(str(label), ensure_ascii=False) for label in labels)
        items = " | ".join(json.dumps(item, ensure_ascii=False) for item in quoted)
        return 'root ::= "[" ( item ( ", " item )* )? "]"\nitem ::= ' + items
    return "root ::= " + " | ".join(json.dumps(str(label), ensure_ascii=False) for label in labels)


def label_response_format(labels: Sequence[Any], style: ConstrainedStyle = "json_schema") -> dict[str, Any]:
    """A ``response_format`` that lets the LM write only ``{"label": <one of labels>}``
    (for a multi-label set, ``{"labels": [<labels>]}``).

    Raises ``ValueError`` for a style other than ``json_schema`` or ``json_object``.
    """
    enum = {"type": "string", "enum": [str(label) for label in labels]}
    key, value = ("labels", {"type": "array", "items": enum}) if is_multilabel(labels) else ("label", enum)
    schema = {
        "type": "object",
        "properties": {key: value},
        "required": [key],
        "additionalProperties": False,
    }
    if style == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": "label", "schema": schema, "strict": True}}
    if style == "json_object":
        return {"type": "json_object", "schema": schema}
    raise ValueError(f"a response_format style is 'json_schema' or 'json_object', got {style!r}")


def label_choice(labels: Sequence[Any]) -> dict[str, Any]:
    """The ``label_choice`` request field of the ``choice`` style: the labels and the
    answer they are scored in (:data:`CHOICE_PREFIX` + label + :data:`CHOICE_SUFFIX`).

    The answer is a JSON string, so a label with a quote, a backslash or a control
    character is written (and scored) escaped, as ``json_object`` would have the follower
    write it: such a request also carries ``texts``, each label's text inside the quotes."""
    names = [str(label) for label in labels]
    field: dict[str, Any] = {"labels": names, "prefix": CHOICE_PREFIX, "suffix": CHOICE_SUFFIX}
    texts = [json.dumps(name, ensure_ascii=False)[1:-1] for name in names]
    if texts != names:  # only then: the request of plain labels stays as it was
        field["texts"] = texts
    return field


def constrained_body(labels: Sequence[Any], style: ConstrainedStyle) -> dict[str, Any]:
    """The fields an OpenAI-compatible request body needs so that the LM can answer with
    nothing but one of the labels: a ``response_format`` (JSON styles), a top-level
    llama.cpp ``grammar``, or (``choice``) a ``label_choice`` with OpenAI's ``logprobs``
    and ``top_logprobs`` (one per label), which the reply answers with each label's
    probability. Raises ``ValueError`` for an unknown style."""
    if style == "grammar":
        return {"grammar": label_grammar(labels)}
    if style == "choice" and is_multilabel(labels):
        logger.debug("the choice style scores one label: a multi-label request takes json_object instead")
        style = "json_object"
    if style == "choice":
        return {"logprobs": True, "top_logprobs": len(labels), "label_choice": label_choice(labels)}
    if style in ("json_schema", "json_object"):
        return {"response_format": label_response_format(labels, style)}
    raise ValueError(f"constrained decoding style must be one of {CONSTRAINED_STYLES}, got {style!r}")


def default_reply_limit(labels: Sequence[Any], constrained: ConstrainedStyle | Literal[False]) -> int:
    """The follower's reply limit in tokens when none is set: room for the longest label
    (a token is at least one character) plus, with a JSON style, the ``{"label": ""}``
    wrapper; at least 10. A multi-label set: room for all its labels in an array and the
    ``{"labels": []}`` wrapper."""
    if is_multilabel(labels):  # every label, quoted, with separators, and the JSON wrapper
        return 16 + sum(len(str(label)) + 4 for label in labels)
    longest = max((len(str(label)) for label in labels), default=1)
    if constrained in ("json_schema", "json_object", "choice"):
        return 16 + longest
    return max(10, longest + 2)
