"""Turning a generator's raw reply into an instruction, and removing reasoning blocks from
any LM reply.

Cleaning removes only what is not the instruction: reasoning blocks (``<think>...``),
code fences and a JSON wrapping (``{"instruction": "..."}``), header lines that
announce the instruction ("Instruction:", "Sure! Here are the guidelines:"), wrapping
quotes, an echo of the answer-format line (the protocol appends its own), lines that
repeat an earlier line word for word (greedy decoding loops), lines that copy the shown
examples (and a trailing block of them), and, only when the reply was cut off by the
token limit (finish reason ``length``), its unfinished last line (in a reply of one
line, its unfinished last sentence). Every other sentence of the reply is kept.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dspy_promptmii.protocol.render import Example, field_title

__all__ = ["Cleaned", "strip_reasoning", "clean_reply", "unknown_labels"]

_REASONING_TAGS = r"think|thinking|thought|reasoning|reflection"
_CLOSED_BLOCK = re.compile(rf"<({_REASONING_TAGS})>.*?</\1\s*>", re.DOTALL | re.IGNORECASE)
_CLOSING_TAG = re.compile(rf"</(?:{_REASONING_TAGS})\s*>", re.IGNORECASE)
_OPENING_TAG = re.compile(rf"<(?:{_REASONING_TAGS})>", re.IGNORECASE)


def strip_reasoning(text: str | None) -> str:
    """``text`` without reasoning blocks: every ``<think>...</think>`` (also ``thinking``,
    ``reasoning``...) is removed; text before a lone closing tag (the opening one was in
    the prompt or cut off) is reasoning too; an opening tag that is never closed (a reply
    cut off while thinking) starts reasoning that runs to the end."""
    if not text:
        return ""
    text = _CLOSED_BLOCK.sub("", text)
    closing = list(_CLOSING_TAG.finditer(text))
    if closing:
        text = text[closing[-1].end() :]
    opening = _OPENING_TAG.search(text)
    if opening:
        text = text[: opening.start()]
    return text.strip()


@dataclass(frozen=True)
class Cleaned:
    """A cleaned reply: the instruction text and what was removed from it.

    ``copied_fraction`` is the share of the reply's characters (after reasoning blocks and
    fences are removed) that were lines copying the shown examples.
    """

    text: str
    copied_lines: int = 0
    copied_fraction: float = 0.0
    reasoning_removed: bool = False
    truncated_line_removed: bool = False


_FENCE = re.compile(r"^\s*```[\w-]*\s*$")
_HEADER_WORDS = r"(?:final\s+)?(?:instructions?|guidelines?|prompt|annotation\s+guidelines?|task\s+instructions?)"
# A line that only announces what follows: "Instruction:", "**Guidelines**", "### Prompt",
# "Here is the instruction:", "Sure! Here's a prompt for the model:".
_HEADER_LINE = re.compile(rf"\b{_HEADER_WORDS}\b", re.IGNORECASE)
# What makes a line a header rather than a sentence: it ends with a colon, it is
# markdown-decorated as a heading or in bold, or it opens with "Here is"/"Sure".
_HEADER_FORM = re.compile(
    r"(?::[*_\s]*$)|(?:^\s*#)|(?:^\s*[*_]{2}.*[*_]{2}\s*$)|(?:^\s*(?:sure|okay|ok|certainly|here\s+(?:is|are)|here's)\b)",
    re.IGNORECASE,
)
_INLINE_HEADER = re.compile(rf"^\s*[#>*_\s]*{_HEADER_WORDS}\s*[*_]*\s*:\s*[*_]*\s*", re.IGNORECASE)
_QUOTES = {('"', '"'), ("'", "'"), ("\u201c", "\u201d"), ("\u2018", "\u2019"), ("`", "`")}
_FORMAT_ECHO = re.compile(r"^\s*only return one of these options\b.*$", re.IGNORECASE)
# A line ending like a sentence ("These guidelines explain how to label reviews.") is
# part of the instruction, never a header to drop, even when it names a header word.
_SENTENCE_END = re.compile(r"[.!?][\"'\u201d\u2019)*_]*\s*$")
_INNER_SENTENCE_END = re.compile(r"[.!?][\"'\u201d\u2019)*_]*(?=\s)")
#: Keys under which a generator that answers in JSON puts the instruction.
_JSON_KEYS = ("instruction", "instructions", "guidelines", "prompt", "text")
_LIST_MARKER = re.compile(r"^\s*(?:[-*+\u2022]|\(?\d+[.)]|[a-z][.)])\s+", re.IGNORECASE)
_DANGLING = re.compile(r"^\s*(?:#.*|.*:[*_\s]*|[*_]{2}[^*_]+[*_]{2})\s*$")
_NOTE_PREFIXES = ("reason:", "reasoning:", "explanation:", "rationale:", "why:")
#: Shown inputs shorter than this (plain characters) are not looked for inside a line of
#: a trailing block of examples, nor (the second figure) anywhere else in the text:
#: short inputs are too likely to be ordinary words of an instruction.
_MIN_QUOTED_CHARS = 8
_MIN_QUOTED_CHARS_ANYWHERE = 16
#: A line at least this many words long that is part of a shown input is a quote of it.
_MIN_QUOTE_WORDS = 5


def _strip_wrapping_quotes(text: str) -> str:
    while len(text) >= 2 and (text[0], text[-1]) in _QUOTES:
        if text[0] in text[1:-1] or text[-1] in text[1:-1]:
            return text  # '"pos" means ... else "neg"': two quoted words, not one wrapped text
        inner = text[1:-1].strip()
        if not inner:
            return ""  # nothing but quotes: no instruction
        text = inner
    return text


def _unwrapped_json(lines: list[str]) -> list[str]:
    """A reply that is only a JSON string or object ({"instruction": "..."}, as models
    tuned for JSON output answer): the instruction it holds, as lines; else ``lines``."""
    text = "\n".join(lines).strip()
    if not text.startswith(("{", '"')):
        return lines
    try:
        value = json.loads(text)
    except ValueError:
        return lines
    if isinstance(value, dict):
        strings = {key.casefold(): item for key, item in value.items() if isinstance(item, str) and item.strip()}
        found = next((strings[key] for key in _JSON_KEYS if key in strings), None)
        value = found if found is not None else (next(iter(strings.values())) if len(strings) == 1 else None)
    return value.strip().splitlines() if isinstance(value, str) and value.strip() else lines


def _plain(line: str) -> str:
    """A line without markdown emphasis, quotes, list markers or case: what it says."""
    text = re.sub(r"[*_`]+", "", line).strip()
    text = _LIST_MARKER.sub("", text).lstrip("#>- \t")
    return re.sub(r"\s+", " ", text).strip().strip("\"'\u201c\u201d").casefold()


class _Examples:
    """What the shown examples look like, to recognise lines that copy them."""

    def __init__(self, field_names: Sequence[str], examples: Sequence[Example], labels: Sequence[Any]):
        self.prefixes = ("input:", "label:", *(f"{field_title(name).lower()}:" for name in field_names))
        plains = {_plain(str(value)) for inputs, _ in examples for value in inputs.values()}
        self.inputs = {plain for plain in plains if len(plain) >= _MIN_QUOTED_CHARS}
        self.long_inputs = {plain for plain in plains if len(plain) >= _MIN_QUOTED_CHARS_ANYWHERE}
        self.labels = {_plain(str(label)) for label in labels} | {_plain(label) for _, label in examples}

    def quotes_input(self, line: str, anywhere: bool = False) -> bool:
        """The line holds a whole shown input, or is a long enough piece of one (``anywhere``:
        only inputs long enough to be looked for outside a trailing block of examples)."""
        inputs = self.long_inputs if anywhere else self.inputs
        plain = _plain(line)
        for key in (plain, plain.split(":", 1)[-1].strip()):
            if any(text in key for text in inputs):
                return True
            if len(key.split()) >= _MIN_QUOTE_WORDS and any(key in text for text in inputs):
                return True
        return False

    def kind(self, line: str) -> str | None:
        """"copy" (a Label: line or a quoted input), "part" (a field line, a bare label, a
        note on an example) or None (a line of the instruction)."""
        plain = _plain(line)
        if plain.startswith("label:") or self.quotes_input(line):
            return "copy"
        return "part" if self.is_part(line) else None

    def is_part(self, line: str) -> bool:
        """A field or ``Label:`` line, a bare label, or a note on an example ("Reason: ...")."""
        plain = _plain(line)
        return plain.startswith(self.prefixes) or plain.rstrip(":") in self.labels or plain.startswith(_NOTE_PREFIXES)


def _trailing_examples_start(lines: list[str], shown: _Examples) -> int | None:
    """Index where a trailing copy of the labelled examples begins, if there is one.

    From there on every non-blank line is a copy or a part of an example (see
    :meth:`_Examples.kind`), and at least one is a copy (a closing list of label names
    alone is kept). A header such as "Examples:" just before the copy goes too.
    """
    start, copies = None, 0
    for i in range(len(lines) - 1, -1, -1):
        if not lines[i].strip():
            continue
        found = shown.kind(lines[i])
        if found is None:
            break
        copies += found == "copy"
        start = i
    if start is None or not copies:
        return None
    before = start - 1
    while before >= 0 and not lines[before].strip():
        before -= 1
    if before >= 0 and lines[before].rstrip().endswith(":") and "example" in lines[before].lower():
        start = before
    return start


def _without_copies(lines: list[str], shown: _Examples) -> list[str]:
    """Drop lines quoting a shown input anywhere in the text, with the field, label and
    note lines of the same copied example right after them (up to a blank line)."""
    kept: list[str] = []
    in_copy = False
    for line in lines:
        if not line.strip():
            in_copy = False
        elif shown.quotes_input(line, anywhere=True):
            in_copy = True
            continue
        elif in_copy and shown.is_part(line):
            continue
        else:
            in_copy = False
        kept.append(line)
    return kept


def _is_header(line: str) -> bool:
    """A short line that only announces what follows ("Instruction:", "### Guidelines",
    "Sure! Here's a prompt for the model:"), not a sentence of the instruction."""
    return (
        len(line) <= 80
        and bool(_HEADER_LINE.search(line))
        and bool(_HEADER_FORM.search(line))
        and not _SENTENCE_END.search(line)
    )


def _line_key(line: str) -> str:
    """A line's content for spotting repeats: no list marker, case or spacing."""
    return re.sub(r"\s+", " ", _LIST_MARKER.sub("", line)).strip().casefold()


def _without_repeats(lines: list[str]) -> list[str]:
    """Drop every line that repeats an earlier one (ignoring list markers, so "7. Avoid
    X." repeats "4. Avoid X.") and runs of blank lines: small generators decoding
    greedily loop on a line until the token limit."""
    seen: set[str] = set()
    kept: list[str] = []
    for line in lines:
        key = _line_key(line)
        if not key:
            if kept and kept[-1].strip():
                kept.append("")
            continue
        if key in seen:
            continue
        seen.add(key)
        kept.append(line)
    return kept


def _characters(lines: Sequence[str]) -> int:
    return sum(len(line.strip()) for line in lines)


def clean_reply(
    reply: str | None,
    field_names: Sequence[str] = ("text",),
    *,
    truncated: bool = False,
    examples: Sequence[Example] = (),
    labels: Sequence[Any] = (),
) -> Cleaned:
    """Clean a generator's raw reply (see the module docstring) and say what was removed.

    Args:
        reply: The generator's text.
        field_names: The task's input fields (to recognise copied example lines).
        truncated: The reply stopped at the token limit (finish reason ``length``); only
            then is an unfinished last line dropped.
        examples: The labelled examples the generator was shown.
        labels: The task's labels.
    """
    if not reply:
        return Cleaned("")
    without_reasoning = strip_reasoning(reply)
    reasoning_removed = without_reasoning != reply.strip()
    lines = [line for line in without_reasoning.splitlines() if not _FENCE.match(line)]
    lines = _unwrapped_json(lines)
    total = _characters(lines)
    truncated_line_removed = False
    if truncated and lines and not _SENTENCE_END.search(lines[-1]):
        # The reply stopped mid-sentence: drop its unfinished last line; a reply of one
        # line keeps its full sentences (and, with none, all of it: an unfinished
        # instruction beats none).
        if len(lines) > 1:
            lines.pop()
            truncated_line_removed = True
        elif ends := list(_INNER_SENTENCE_END.finditer(lines[0])):
            lines[0] = lines[0][: ends[-1].end()]
            truncated_line_removed = True
    # Drop leading blank and header-only lines ("Instruction:", "**Guidelines**").
    while lines and (not lines[0].strip() or _is_header(lines[0])):
        lines.pop(0)
    if lines:
        lines[0] = _INLINE_HEADER.sub("", lines[0], count=1)
    shown = _Examples(field_names, examples, labels)
    before_copies = list(lines)
    cut = _trailing_examples_start(lines, shown)
    if cut is not None and cut > 0:
        lines = lines[:cut]
    lines = _without_copies(lines, shown)
    copied_lines = sum(1 for line in before_copies if line.strip()) - sum(1 for line in lines if line.strip())
    copied_chars = _characters(before_copies) - _characters(lines)
    lines = _without_repeats([line for line in lines if not _FORMAT_ECHO.match(line)])
    # A heading or a line ending in ":" with nothing after it introduces nothing.
    while len(lines) > 1 and (not lines[-1].strip() or _DANGLING.match(lines[-1])):
        lines.pop()
    text = _strip_wrapping_quotes("\n".join(lines).strip()).strip()
    return Cleaned(
        text=text,
        copied_lines=copied_lines,
        copied_fraction=round(copied_chars / total, 4) if total else 0.0,
        reasoning_removed=reasoning_removed,
        truncated_line_removed=truncated_line_removed,
    )


# CamelCase (GetWeather) or snake_case (not_equivalent) names: how label names look.
_LABEL_LIKE = re.compile(r"\b(?:[A-Za-z][a-z0-9]+(?:[A-Z][a-z0-9]+)+|[A-Za-z][A-Za-z0-9]*(?:_[A-Za-z0-9]+)+)\b")


def _label_key(text: str) -> str:
    return re.sub(r"[\s_\-]+", " ", re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", text)).casefold().strip()


def unknown_labels(instruction: str, labels: Sequence[Any]) -> list[str]:
    """Names in an instruction that look like labels (CamelCase or snake_case) but are
    not among ``labels`` (compared case- and separator-blind), in order of appearance:
    an instruction that tells the follower to answer with a label that does not exist."""
    known = {_label_key(str(label)) for label in labels}
    found: list[str] = []
    for match in _LABEL_LIKE.finditer(instruction or ""):
        name = match.group(0)
        if _label_key(name) not in known and name not in found:
            found.append(name)
    return found
