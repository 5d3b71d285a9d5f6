"""How labels, examples, field descriptions and the follower's messages are written out.

Rendering rules (one place, used at compile time, in evaluation, in the benchmarks and
in the training reward):

* Labels are listed as strings, comma-separated, in the order given (paper protocol).
  When a label itself contains a comma, every label is written as a JSON string
  (``"a, b", "c"``) so the list stays unambiguous.
* A labelled example is its inputs, then ``Label: <label>``. A single input field is
  written ``Input: <value>`` whatever its name (paper protocol); several input fields
  are each written under their own title (``text_pair`` -> ``Text pair``). A title
  that would read as the answer marker ``Label`` gets `` (input)`` appended, and if two
  fields would share a title, the raw field names are used instead.
* Field descriptions the program's author wrote (``InputField(desc=...)``,
  ``OutputField(desc=...)``) are listed under ``Fields:``, one ``- <title>: <desc>``
  line each, after the format line of the follower prompt and after the label list of
  the meta-prompt. Nothing is written when no field has a description.
* Multi-label fields (``list[Literal[...]]``): their label set is a :class:`MultiLabels`
  (a tuple that says so), and an answer, wherever the protocol writes or reads one, is a
  JSON array of the labels that apply, in the label set's order (:func:`label_array`,
  ``["a", "c"]``; ``[]`` when none does). An example is rendered ``Label: ["a", "c"]``, and
  the format line asks for such an array. Every function that takes ``labels`` follows
  the set's kind, so a call site cannot mix the two; single-label output is unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "MultiLabels",
    "is_multilabel",
    "label_array",
    "LABEL_MARKER",
    "DEMO_STYLES",
    "label_list",
    "format_line",
    "with_format_line",
    "field_title",
    "input_titles",
    "render_inputs",
    "render_example",
    "render_examples",
    "render_field_descriptions",
    "follower_prompt",
    "follower_messages",
]

#: The answer marker: examples end with ``Label: <label>`` and the follower prompt with ``Label:``.
LABEL_MARKER = "Label"

#: How demos are shown to the follower: inside the one user message, or as chat turns.
DEMO_STYLES = ("inline", "turns")

_FORMAT_LINE = 'Only return one of these options: {labels}. Do not output "Label:" or any extra text.'
_MULTILABEL_FORMAT_LINE = (
    'Return a JSON array of the options that apply, from: {labels}. Several may apply, or none ([]). '
    'Do not output "Label:" or any extra text.'
)


class MultiLabels(tuple):
    """The label set of a multi-label field (``list[Literal[...]]``, ``list[Enum]``): any
    number of its labels, none included, may apply to one input. A tuple of the labels in
    the field's order; see the module docstring for what changes with it."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"MultiLabels({list(self)!r})"


def is_multilabel(labels: Sequence[Any]) -> bool:
    """Whether ``labels`` is a multi-label set (:class:`MultiLabels`)."""
    return isinstance(labels, MultiLabels)


def label_array(chosen: Sequence[Any]) -> str:
    """A multi-label answer: the labels as a JSON array, ``["a", "c"]`` (``[]`` for none).
    Callers give them in the label set's order."""
    return json.dumps([str(label) for label in chosen], ensure_ascii=False)

Example = tuple[Mapping[str, Any], str]


def label_list(labels: Sequence[Any]) -> str:
    """Labels as the protocol lists them: strings, comma-separated, in the given order
    (each JSON-quoted when any label contains a comma)."""
    texts = [str(label) for label in labels]
    if any("," in text for text in texts):
        return ", ".join(json.dumps(text, ensure_ascii=False) for text in texts)
    return ", ".join(texts)


def format_line(labels: Sequence[Any]) -> str:
    """The answer-format line appended to every method's instruction (paper protocol);
    for a :class:`MultiLabels` set, the line asking for a JSON array of the labels that apply."""
    if is_multilabel(labels):
        return _MULTILABEL_FORMAT_LINE.format(labels=label_list(labels))
    return _FORMAT_LINE.format(labels=label_list(labels))


def with_format_line(instruction: str | None, labels: Sequence[Any]) -> str:
    """``instruction`` followed by the format line, unless it already ends with it."""
    line = format_line(labels)
    instruction = (instruction or "").rstrip()
    if instruction.endswith(line):
        return instruction
    return f"{instruction}\n{line}" if instruction else line


def field_title(name: str) -> str:
    """A field name as a title: ``text_pair`` -> ``Text pair``."""
    words = name.replace("_", " ").strip()
    return words[:1].upper() + words[1:]


def input_titles(field_names: Sequence[str]) -> dict[str, str]:
    """The title each input field is written under (see the module docstring)."""
    if len(field_names) == 1:
        return {field_names[0]: "Input"}
    titles = {}
    for name in field_names:
        title = field_title(name) or name
        if title.casefold() == LABEL_MARKER.casefold():
            title = f"{title} (input)"
        titles[name] = title
    if len({title.casefold() for title in titles.values()}) < len(titles):
        return {name: name for name in field_names}
    return titles


def render_inputs(inputs: Mapping[str, Any], field_names: Sequence[str]) -> str:
    """One example's inputs, one ``<title>: <value>`` line per field."""
    titles = input_titles(field_names)
    return "\n".join(f"{titles[name]}: {inputs[name]}" for name in field_names)


def render_example(inputs: Mapping[str, Any], label: str, field_names: Sequence[str]) -> str:
    """One labelled example: its inputs, then ``Label: <label>``."""
    return f"{render_inputs(inputs, field_names)}\n{LABEL_MARKER}: {label}"


def render_examples(examples: Sequence[Example], field_names: Sequence[str]) -> str:
    """Labelled examples, one block each, separated by a blank line."""
    return "\n\n".join(render_example(inputs, label, field_names) for inputs, label in examples)


def render_field_descriptions(descriptions: Mapping[str, str] | None, field_names: Sequence[str]) -> str:
    """The ``Fields:`` block for the author's field descriptions, or ``""`` when there are
    none. ``descriptions`` maps input field names, and ``LABEL_MARKER`` for the label
    field, to their descriptions."""
    if not descriptions:
        return ""
    titles = input_titles(field_names)
    lines = [f"- {titles[name]}: {descriptions[name]}" for name in field_names if descriptions.get(name)]
    if descriptions.get(LABEL_MARKER):
        lines.append(f"- {LABEL_MARKER}: {descriptions[LABEL_MARKER]}")
    return "Fields:\n" + "\n".join(lines) if lines else ""


def _system_text(instruction: str, labels: Sequence[Any], descriptions: str) -> str:
    return "\n\n".join(part for part in (with_format_line(instruction, labels), descriptions) if part)


def follower_prompt(
    instruction: str,
    labels: Sequence[Any],
    inputs: Mapping[str, Any],
    field_names: Sequence[str],
    demos: Sequence[Example] = (),
    descriptions: Mapping[str, str] | None = None,
) -> str:
    """The follower's single user message: the instruction, the format line, the field
    descriptions (if any), demonstrations as Input/Label pairs (if any), then the input
    to label, ending in ``Label:``."""
    parts = [_system_text(instruction, labels, render_field_descriptions(descriptions, field_names))]
    if demos:
        parts.append(render_examples(demos, field_names))
    parts.append(f"{render_inputs(inputs, field_names)}\n{LABEL_MARKER}:")
    return "\n\n".join(parts)


def follower_messages(
    instruction: str,
    labels: Sequence[Any],
    inputs: Mapping[str, Any],
    field_names: Sequence[str],
    demos: Sequence[Example] = (),
    demo_style: str = "inline",
    descriptions: Mapping[str, str] | None = None,
) -> list[dict[str, str]]:
    """The follower's chat messages.

    Without demos, or with ``demo_style="inline"`` (the paper's protocol): one user
    message, :func:`follower_prompt`. With ``demo_style="turns"``: the instruction,
    format line and field descriptions as the system message, each demo as a user turn
    (its inputs) and an assistant turn (its label), then the input as the last user
    turn; small chat models follow many demos far better this way.

    Raises ``ValueError`` for an unknown ``demo_style``.
    """
    if demo_style not in DEMO_STYLES:
        raise ValueError(f"demo_style must be one of {DEMO_STYLES}, got {demo_style!r}")
    if not demos or demo_style == "inline":
        prompt = follower_prompt(instruction, labels, inputs, field_names, demos, descriptions)
        return [{"role": "user", "content": prompt}]
    system = _system_text(instruction, labels, render_field_descriptions(descriptions, field_names))
    messages = [{"role": "system", "content": system}]
    for demo_inputs, label in demos:
        messages.append({"role": "user", "content": render_inputs(demo_inputs, field_names)})
        messages.append({"role": "assistant", "content": str(label)})
    messages.append({"role": "user", "content": render_inputs(inputs, field_names)})
    return messages
