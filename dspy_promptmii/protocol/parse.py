"""Reading a label out of a follower's reply (or, for a multi-label set, the labels)."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from dspy_promptmii.protocol.clean import strip_reasoning
from dspy_promptmii.protocol.render import label_array

__all__ = ["normalize_label", "parse_label", "parse_labels"]

_LABEL_PREFIX = re.compile(r"^\s*[*_`#>\s]*label\s*[*_]*\s*:\s*", re.IGNORECASE)
_EDGE_PUNCT = " \t\"'`*_.,;:!?()[]{}<>\u201c\u201d\u2018\u2019\u00ab\u00bb"
_FENCED = re.compile(r"```[\w-]*[ \t]*\n?(.*?)(?:```|$)", re.DOTALL)
_JSON_OBJECT = re.compile(r"\{[^{}]*\}", re.DOTALL)
_JSON_ARRAY = re.compile(r"\[[^\[\]]*\]", re.DOTALL)


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


def _json_items(text: str) -> list[Any] | None:
    """The items of a JSON answer holding a list: a JSON array, an object's ``labels``
    (or ``label``) list, or a one-key object's list; None otherwise."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if isinstance(value, dict):
        if isinstance(value.get("labels"), list):
            value = value["labels"]
        elif isinstance(value.get("label"), list):
            value = value["label"]
        elif len(value) == 1 and isinstance(next(iter(value.values())), list):
            (value,) = value.values()
    return value if isinstance(value, list) else None


def parse_labels(reply: str | None, labels: Sequence[Any]) -> str | None:
    """The labels a follower's reply names for a multi-label set, as the protocol writes
    such an answer (:func:`~dspy_promptmii.protocol.render.label_array`: a JSON array in
    the label set's order, ``[]`` for none), or ``None`` (no valid answer).

    The reply is read without reasoning blocks and code fences. A JSON answer gives the
    items: an array, ``{"labels": [...]}`` or a one-key object holding an array (also
    inside other text); otherwise the first non-empty line, minus a leading ``Label:``, is
    split on commas and semicolons (``a, b``). Each item must name one label, exactly or by
    its normalised form (:func:`normalize_label`); an item that names none, or a reply with
    no items, is invalid. Repeated labels count once.
    """
    if reply is None:
        return None
    as_str = [str(label) for label in labels]
    text = strip_reasoning(str(reply)).strip()
    fenced = _FENCED.search(text)
    if fenced:
        text = fenced.group(1).strip()
    items = _json_items(text)
    if items is None:
        for pattern in (_JSON_ARRAY, _JSON_OBJECT):
            embedded = pattern.search(text)
            items = _json_items(embedded.group(0)) if embedded else None
            if items is not None:
                break
    if items is None:
        line = next((line for line in text.splitlines() if line.strip()), "").strip()
        line = _LABEL_PREFIX.sub("", line, count=1).strip()
        items = [part for part in re.split(r"\s*[,;]\s*", line) if part.strip()]
        if not items:
            return None
    chosen: set[str] = set()
    for item in items:
        if not isinstance(item, (str, int, float, bool)):
            return None
        name = str(item).strip()
        if name in as_str:
            chosen.add(name)
            continue
        key = normalize_label(name)
        matches = [label for label in as_str if key and normalize_label(label) == key]
        if len(matches) != 1:
            return None
        chosen.add(matches[0])
    return label_array([label for label in as_str if label in chosen])
