"""Reading a label out of a follower's reply."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from dspy_promptmii.protocol.clean import strip_reasoning

__all__ = ["normalize_label", "parse_label"]

_LABEL_PREFIX = re.compile(r"^\s*[*_`#>\s]*label\s*[*_]*\s*:\s*", re.IGNORECASE)
_EDGE_PUNCT = " \t\"'`*_.,;:!?()[]{}<>\u201c\u201d\u2018\u2019\u00ab\u00bb"
_FENCED = re.compile(r"```[\w-]*[ \t]*\n?(.*?)(?:```|$)", re.DOTALL)
_JSON_OBJECT = re.compile(r"\{[^{}]*\}", re.DOTALL)


def normalize_label(text: Any) -> str:
    """Case-folded, with surrounding punctuation and quotes removed and ``_``, ``-``
    and runs of white space folded to one space."""
    text = str(text).strip().strip(_EDGE_PUNCT)
    text = re.sub(r"[\s_\-]+", " ", text)
    return text.casefold().strip()


def _json_answer(text: str) -> str | None:
    """The answer in a JSON reply: the value of a one-key object (or of its ``label``
    key), or a JSON string; None when ``text`` is not such JSON."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if isinstance(value, dict):
        if "label" in value:
            value = value["label"]
        elif len(value) == 1:
            (value,) = value.values()
        else:
            return None
    if isinstance(value, (str, int, float, bool)):
        return str(value)
    return None


def parse_label(reply: str | None, labels: Sequence[Any]) -> str | None:
    """The label a follower's reply names, or ``None`` (no valid label).

    The reply is read without reasoning blocks (``<think>...</think>``) and code fences
    (```` ```json ... ``` ````). A JSON answer gives X: ``{"label": X}`` or a one-key
    object ``{..: X}`` (also inside other text), or a whole-reply JSON value X; otherwise the first non-empty
    line, minus a leading ``Label:``, is the answer. An exact match with a label wins,
    then the one label whose normalised form (:func:`normalize_label`) equals the
    answer's; anything else is invalid.
    """
    if reply is None:
        return None
    as_str = [str(label) for label in labels]
    text = strip_reasoning(str(reply))
    if text in as_str:
        return text
    fenced = _FENCED.search(text)
    if fenced:
        text = fenced.group(1).strip()
    answer = _json_answer(text)
    if answer is None:
        embedded = _JSON_OBJECT.search(text)
        answer = _json_answer(embedded.group(0)) if embedded else None
    if answer is not None:
        text = answer.strip()
    text = next((line for line in text.splitlines() if line.strip()), "").strip()
    text = _LABEL_PREFIX.sub("", text, count=1).strip()
    if text in as_str:
        return text
    key = normalize_label(text)
    if not key:
        return None
    matches = [label for label in as_str if normalize_label(label) == key]
    return matches[0] if len(matches) == 1 else None
