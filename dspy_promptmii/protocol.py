"""The one Prompt-MII protocol: how examples, meta-prompts and follower prompts look,
how a follower's reply becomes a label, and how predictions are scored.

The optimizer, the :class:`~dspy_promptmii.adapter.LabelAdapter`, the benchmarks and
the training reward all import from here, so that what the generator is trained on
is exactly what it sees at compile time, and what the follower is scored on in
training is exactly what it is scored on in evaluation.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from sklearn.metrics import accuracy_score, f1_score

__all__ = [
    "INVALID",
    "TEMPLATES",
    "NAIVE_INSTRUCTION",
    "PLACEHOLDERS",
    "label_list",
    "format_line",
    "with_format_line",
    "field_title",
    "render_inputs",
    "render_example",
    "render_examples",
    "check_template",
    "build_meta_prompt",
    "clean_instruction",
    "follower_prompt",
    "follower_messages",
    "CONSTRAINED_STYLES",
    "label_grammar",
    "label_response_format",
    "constrained_body",
    "DEMO_STYLES",
    "normalize_label",
    "parse_label",
    "macro_f1",
    "score",
]

#: What an unparseable follower reply is scored as: a class of its own, never a gold label.
INVALID = "<invalid>"

#: Placeholders a meta-prompt template must contain.
PLACEHOLDERS = ("{label_names}", "{examples}")

# Two meta-prompt templates, after the structure of the paper's "meta1" (a prompt for
# a classifier model; used with Llama generators) and "meta2" (guidelines for a human
# annotator; used with Qwen generators). The wording is this project's own.
TEMPLATES: dict[str, str] = {
    "meta1": (
        "You are helping to write the prompt of a language model whose job is to sort "
        "texts into these categories: {label_names}.\n\n"
        "Here are some texts with the category each one belongs to:\n\n"
        "{examples}\n\n"
        "Write an instruction for that model. It should explain what the task is in a way "
        "that carries over to texts the model has not seen, point out the cues and "
        "strategies that tell the categories apart, and tell the model to answer with the "
        "category name alone. Reply with the instruction only."
    ),
    "meta2": (
        "You are drafting guidelines for a person who will annotate texts with exactly one "
        "of these labels: {label_names}.\n\n"
        "Some texts that were already annotated:\n\n"
        "{examples}\n\n"
        "Write the annotation guidelines. Say what the task is and what each label means, "
        "give general rules for deciding on new texts rather than rules about these "
        "particular ones, and warn about common pitfalls and borderline cases. Keep them "
        "short and do not repeat yourself. Reply with the guidelines only."
    ),
}

#: The "naive" baseline instruction: the task stated with no induction at all.
NAIVE_INSTRUCTION = "Read the input and assign it the label that fits it best."

_FORMAT_LINE = 'Only return one of these options: {labels}. Do not output "Label:" or any extra text.'


def label_list(labels: Sequence[Any]) -> str:
    """Labels as the protocol lists them: strings, comma-separated, in the given order."""
    return ", ".join(str(label) for label in labels)


def format_line(labels: Sequence[Any]) -> str:
    """The answer-format line appended to every method's instruction (paper protocol)."""
    return _FORMAT_LINE.format(labels=label_list(labels))


def with_format_line(instruction: str, labels: Sequence[Any]) -> str:
    """``instruction`` followed by the format line, unless it already ends with it."""
    line = format_line(labels)
    instruction = (instruction or "").rstrip()
    if instruction.endswith(line):
        return instruction
    return f"{instruction}\n{line}" if instruction else line


def field_title(name: str) -> str:
    """How an input field is named in a rendered example: ``text_pair`` -> ``Text pair``."""
    words = name.replace("_", " ").strip()
    return words[:1].upper() + words[1:]


def render_inputs(inputs: Mapping[str, Any], field_names: Sequence[str]) -> str:
    """Render one example's inputs: ``Input: ...`` for a single field, else each field by name."""
    if len(field_names) == 1:
        return f"Input: {inputs[field_names[0]]}"
    return "\n".join(f"{field_title(name)}: {inputs[name]}" for name in field_names)


def render_example(inputs: Mapping[str, Any], label: str, field_names: Sequence[str]) -> str:
    """One labelled example: its inputs, then ``Label: <label>``."""
    return f"{render_inputs(inputs, field_names)}\nLabel: {label}"


def render_examples(examples: Sequence[tuple[Mapping[str, Any], str]], field_names: Sequence[str]) -> str:
    """Labelled examples, one block each, separated by a blank line."""
    return "\n\n".join(render_example(inputs, label, field_names) for inputs, label in examples)


def check_template(template: str) -> None:
    """Raise ``ValueError`` naming every placeholder a custom template lacks."""
    if not isinstance(template, str) or not template.strip():
        raise ValueError("template must be 'meta1', 'meta2', 'auto' or a non-empty template string")
    missing = [p for p in PLACEHOLDERS if p not in template]
    if missing:
        raise ValueError(
            f"custom template is missing the placeholder(s) {', '.join(missing)}; a template is "
            f"'meta1', 'meta2', 'auto', or a string containing both {' and '.join(PLACEHOLDERS)}"
        )


def build_meta_prompt(
    template: str,
    labels: Sequence[Any],
    examples: Sequence[tuple[Mapping[str, Any], str]],
    field_names: Sequence[str],
) -> str:
    """The generator's prompt: a template (a name in :data:`TEMPLATES` or a custom string)
    filled with the label list and the rendered examples."""
    text = TEMPLATES.get(template, template)
    check_template(text)
    # str.replace, not str.format: examples and custom templates may hold braces.
    return text.replace("{label_names}", label_list(labels)).replace(
        "{examples}", render_examples(examples, field_names)
    )


# --- cleaning a generator's reply into an instruction -------------------------------

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


def _strip_wrapping_quotes(text: str) -> str:
    while len(text) >= 2 and (text[0], text[-1]) in _QUOTES:
        inner = text[1:-1].strip()
        if not inner:
            return ""  # nothing but quotes: no instruction
        text = inner
    return text


def _plain(line: str) -> str:
    """A line without markdown emphasis, quotes, list markers or case: what it says."""
    text = re.sub(r"[*_`]+", "", line).strip()
    text = _LIST_MARKER.sub("", text).lstrip("#>- \t")
    return re.sub(r"\s+", " ", text).strip().strip("\"'\u201c\u201d").casefold()


_DANGLING = re.compile(r"^\s*(?:#.*|.*:[*_\s]*|[*_]{2}[^*_]+[*_]{2})\s*$")
_NOTE_PREFIXES = ("reason:", "reasoning:", "explanation:", "rationale:", "why:")


def _trailing_examples_start(
    lines: list[str],
    field_names: Sequence[str],
    examples: Sequence[tuple[Mapping[str, Any], str]] = (),
    labels: Sequence[Any] = (),
) -> int | None:
    """Index where a trailing copy of the labelled examples begins, if there is one.

    From there on every non-blank line is an ``Input:``/field/``Label:`` line, a line
    quoting a shown example's input, a bare label, or a note on an example ("Reason:"),
    markdown and list markers aside; and at least one is a ``Label:`` line or a quoted
    input (a closing list of label names alone is kept). A header such as "Examples:"
    just before the copy goes too.
    """
    prefixes = ("input:", "label:", *(f"{field_title(name).lower()}:" for name in field_names))
    # Inputs shorter than this are not matched inside a line: too likely to be ordinary words.
    texts = {_plain(str(v)) for inputs, _ in examples for v in inputs.values() if len(_plain(str(v))) >= 8}
    label_set = {_plain(str(label)) for label in labels} | {_plain(label) for _, label in examples}

    def kind(line: str) -> str | None:
        plain = _plain(line)
        if plain.startswith("label:") or any(text in plain for text in texts):
            return "copy"
        if plain.startswith(prefixes) or plain.rstrip(":") in label_set or plain.startswith(_NOTE_PREFIXES):
            return "part"
        return None

    start, copies = None, 0
    for i in range(len(lines) - 1, -1, -1):
        if not lines[i].strip():
            continue
        found = kind(lines[i])
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


def _is_header(line: str) -> bool:
    """A short line that only announces what follows ("Instruction:", "### Guidelines",
    "Sure! Here's a prompt for the model:"), not a sentence of the instruction."""
    return (
        len(line) <= 80
        and bool(_HEADER_LINE.search(line))
        and bool(_HEADER_FORM.search(line))
        and not _SENTENCE_END.search(line)
    )


_LIST_MARKER = re.compile(r"^\s*(?:[-*+\u2022]|\(?\d+[.)]|[a-z][.)])\s+", re.IGNORECASE)


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


def clean_instruction(
    reply: str | None,
    field_names: Sequence[str] = ("text",),
    *,
    truncated: bool = False,
    examples: Sequence[tuple[Mapping[str, Any], str]] = (),
    labels: Sequence[Any] = (),
) -> str:
    """Turn a generator's raw reply into an instruction.

    Removes code fences, leading header lines ("Instruction:", "Here are the
    guidelines:"), wrapping quotes, an echoed format line, a trailing copy of the
    labelled examples (examples used as illustrations inside the text are kept; given
    the shown ``examples`` and ``labels``, a copy in markdown, numbered, or without
    ``Input:`` markers is recognised too), and lines that repeat earlier ones. With
    ``truncated`` (the reply hit the token limit), an unfinished last line is dropped
    too. Returns ``""`` when nothing is left.
    """
    if not reply:
        return ""
    lines = [line for line in reply.strip().splitlines() if not _FENCE.match(line)]
    if truncated and len(lines) > 1 and not _SENTENCE_END.search(lines[-1]):
        lines.pop()
    # Drop leading blank and header-only lines ("Instruction:", "**Guidelines**").
    while lines and (not lines[0].strip() or _is_header(lines[0])):
        lines.pop(0)
    if lines:
        lines[0] = _INLINE_HEADER.sub("", lines[0], count=1)
    cut = _trailing_examples_start(lines, field_names, examples, labels)
    if cut is not None and cut > 0:
        lines = lines[:cut]
    lines = _without_repeats([line for line in lines if not _FORMAT_ECHO.match(line)])
    # A heading or a line ending in ":" with nothing after it introduces nothing.
    while len(lines) > 1 and (not lines[-1].strip() or _DANGLING.match(lines[-1])):
        lines.pop()
    text = "\n".join(lines).strip()
    return _strip_wrapping_quotes(text).strip()


# --- the follower -----------------------------------------------------------------


def follower_prompt(
    instruction: str,
    labels: Sequence[Any],
    inputs: Mapping[str, Any],
    field_names: Sequence[str],
    demos: Sequence[tuple[Mapping[str, Any], str]] = (),
) -> str:
    """The follower's single user message: the instruction, the format line, any
    demonstrations as Input/Label pairs, then the input to label."""
    parts = [with_format_line(instruction, labels)]
    if demos:
        parts.append(render_examples(demos, field_names))
    parts.append(f"{render_inputs(inputs, field_names)}\nLabel:")
    return "\n\n".join(parts)


DEMO_STYLES = ("inline", "turns")


def follower_messages(
    instruction: str,
    labels: Sequence[Any],
    inputs: Mapping[str, Any],
    field_names: Sequence[str],
    demos: Sequence[tuple[Mapping[str, Any], str]] = (),
    demo_style: str = "inline",
) -> list[dict[str, str]]:
    """The follower's chat messages.

    Without demos, and with ``demo_style="inline"`` (the paper's protocol), one user
    message: :func:`follower_prompt`. With ``demo_style="turns"``, the instruction and
    format line as the system message, each demo as a user turn (its input) and an
    assistant turn (its label), then the input as the last user turn; small chat
    models follow many demos far better this way.
    """
    if demo_style not in DEMO_STYLES:
        raise ValueError(f"demo_style must be one of {DEMO_STYLES}, got {demo_style!r}")
    if not demos or demo_style == "inline":
        return [{"role": "user", "content": follower_prompt(instruction, labels, inputs, field_names, demos)}]
    messages = [{"role": "system", "content": with_format_line(instruction, labels)}]
    for demo_inputs, label in demos:
        messages.append({"role": "user", "content": render_inputs(demo_inputs, field_names)})
        messages.append({"role": "assistant", "content": str(label)})
    messages.append({"role": "user", "content": render_inputs(inputs, field_names)})
    return messages


# --- constrained decoding ------------------------------------------------------

ConstrainedStyle = Literal["json_schema", "json_object", "grammar"]
CONSTRAINED_STYLES = ("json_schema", "json_object", "grammar")


def label_grammar(labels: list[str] | tuple[str, ...]) -> str:
    """A GBNF grammar (llama.cpp) whose only sentences are the labels themselves."""
    return "root ::= " + " | ".join(json.dumps(str(label), ensure_ascii=False) for label in labels)


def label_response_format(labels: list[str] | tuple[str, ...], style: ConstrainedStyle = "json_schema") -> dict:
    """A ``response_format`` that lets the LM write only ``{"label": <one of labels>}``.

    ``json_schema`` is the OpenAI form (vLLM, SGLang, OpenAI); ``json_object`` with a
    ``schema`` key is the form llama.cpp's Python server (llama-cpp-python) accepts.
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


def constrained_body(labels: list[str] | tuple[str, ...], style: ConstrainedStyle) -> dict:
    """The fields an OpenAI-compatible request body needs so that the LM can answer with
    nothing but one of the labels: a ``response_format`` (JSON styles) or a llama.cpp
    ``grammar`` of the bare labels (no JSON wrapper: fewer tokens, about as fast as
    unconstrained decoding)."""
    if style == "grammar":
        return {"grammar": label_grammar(labels)}
    if style in ("json_schema", "json_object"):
        return {"response_format": label_response_format(labels, style)}
    raise ValueError(f"constrained decoding style must be one of {CONSTRAINED_STYLES}, got {style!r}")


_LABEL_PREFIX = re.compile(r"^\s*[*_`#>\s]*label\s*[*_]*\s*:\s*", re.IGNORECASE)
_EDGE_PUNCT = " \t\"'`*_.,;:!?()[]{}<>\u201c\u201d\u2018\u2019\u00ab\u00bb"


def normalize_label(text: Any) -> str:
    """Case-folded, with surrounding punctuation and quotes removed and ``_``, ``-``
    and runs of white space folded to one space."""
    text = str(text).strip().strip(_EDGE_PUNCT)
    text = re.sub(r"[\s_\-]+", " ", text)
    return text.casefold().strip()


def _json_label(text: str) -> str | None:
    if not text.startswith("{"):
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if isinstance(value, dict) and len(value) == 1:
        (only,) = value.values()
        return str(only) if isinstance(only, (str, int, float, bool)) else None
    return None


def parse_label(reply: str | None, labels: Sequence[Any]) -> str | None:
    """The label a follower's reply names, or ``None`` (invalid).

    Reads a JSON object with one key (constrained decoding) or the first non-empty
    line of text, minus a leading ``Label:``. An exact match wins; otherwise the one
    label whose normalised form equals the reply's; anything else is invalid.
    """
    if reply is None:
        return None
    text = str(reply).strip()
    whole_json = _json_label(text)
    if whole_json is not None:
        text = whole_json.strip()
    text = next((line for line in text.splitlines() if line.strip()), "").strip()
    text = _LABEL_PREFIX.sub("", text, count=1).strip()
    as_str = [str(label) for label in labels]
    if text in as_str:
        return text
    key = normalize_label(text)
    if not key:
        return None
    matches = [label for label in as_str if normalize_label(label) == key]
    return matches[0] if len(matches) == 1 else None


# --- scoring ----------------------------------------------------------------------


def _with_invalid(predicted: Sequence[str | None]) -> list[str]:
    return [INVALID if p is None else str(p) for p in predicted]


def macro_f1(gold: Sequence[Any], predicted: Sequence[str | None]) -> float:
    """Macro-F1 (scikit-learn) over the classes present in gold or predictions, where an
    invalid prediction (``None``) is its own class: wrong for every gold label, and a
    class with F1 0 that counts in the average."""
    if len(gold) != len(predicted):
        raise ValueError(f"gold has {len(gold)} labels but there are {len(predicted)} predictions")
    if not gold:
        raise ValueError("macro-F1 of an empty set of predictions is undefined")
    return float(f1_score([str(g) for g in gold], _with_invalid(predicted), average="macro", zero_division=0))


def score(gold: Sequence[Any], predicted: Sequence[str | None]) -> dict[str, float]:
    """Macro-F1, accuracy and invalid-output rate of a list of predictions."""
    f1 = macro_f1(gold, predicted)
    pred = _with_invalid(predicted)
    return {
        "macro_f1": f1,
        "accuracy": float(accuracy_score([str(g) for g in gold], pred)),
        "invalid_rate": sum(p is None for p in predicted) / len(predicted),
        "n": len(predicted),
    }
