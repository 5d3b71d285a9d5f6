"""Meta-prompt templates: the built-in ones, user templates (text or a file), and filling
a template with a task's labels and examples.

A template is text with the placeholders ``{label_names}`` and ``{examples}``
(required) and, optionally:

* ``{task_notes}``: what the program's author wrote about the task (the signature's
  own instructions and its field descriptions); a template without it leaves them out,
  with a log line;
* ``{exemplars}``: instructions that worked for other tasks, shown as worked examples
  (``PromptMIIOptimizer(exemplars=K)``; a template without it cannot take exemplars);
* ``{length_rule}``: a sentence asking for an instruction under a number of words
  (``PromptMIIOptimizer(max_instruction_tokens=N)``; empty otherwise).

Filling is one pass, so braces inside examples or labels are never read as placeholders.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dspy_promptmii.protocol.render import (
    Example,
    is_multilabel,
    label_list,
    render_examples,
    render_field_descriptions,
)

logger = logging.getLogger(__name__)

__all__ = [
    "TEMPLATES",
    "MULTILABEL_TEMPLATES",
    "MULTILABEL_NOTE",
    "NAIVE_INSTRUCTION",
    "NAIVE_MULTILABEL_INSTRUCTION",
    "naive_instruction",
    "PLACEHOLDERS",
    "OPTIONAL_PLACEHOLDERS",
    "check_template",
    "load_template",
    "names_a_file",
    "template_text",
    "task_notes",
    "length_rule",
    "render_exemplars",
    "build_meta_prompt",
]

#: Placeholders every template must contain.
PLACEHOLDERS = ("{label_names}", "{examples}")
#: Placeholders a template may contain.
OPTIONAL_PLACEHOLDERS = ("{task_notes}", "{exemplars}", "{length_rule}")

# Two meta-prompt templates after the structure of the paper's "meta1" (a prompt for a
# classifier model; used with Llama generators) and "meta2" (guidelines for a human
# annotator; used with Qwen generators), and a third of this project's ("label_defs").
# All wording is this project's own.
TEMPLATES: dict[str, str] = {
    "meta1": (
        "You are helping to write the prompt of a language model whose job is to sort "
        "texts into these categories: {label_names}.\n\n"
        "{task_notes}"
        "{exemplars}"
        "Here are some texts with the category each one belongs to:\n\n"
        "{examples}\n\n"
        "Write an instruction for that model. It should explain what the task is in a way "
        "that carries over to texts the model has not seen, point out the cues and "
        "strategies that tell the categories apart, and tell the model to answer with the "
        "category name alone.{length_rule} Reply with the instruction only."
    ),
    "meta2": (
        "You are drafting guidelines for a person who will annotate texts with exactly one "
        "of these labels: {label_names}.\n\n"
        "{task_notes}"
        "{exemplars}"
        "Some texts that were already annotated:\n\n"
        "{examples}\n\n"
        "Write the annotation guidelines. Say what the task is and what each label means, "
        "give general rules for deciding on new texts rather than rules about these "
        "particular ones, and warn about common pitfalls and borderline cases. Keep them "
        "short and do not repeat yourself.{length_rule} Reply with the guidelines only."
    ),
    # A third form, this project's own: a definition per label, which small followers
    # can match a text against line by line.
    "label_defs": (
        "You are writing the instruction for a small language model that must put each text "
        "into exactly one of these categories: {label_names}.\n\n"
        "{task_notes}"
        "{exemplars}"
        "Texts with their categories:\n\n"
        "{examples}\n\n"
        "Write the instruction. Start with one sentence saying what the texts are and what is "
        "being decided. Then give one line per category, in the form '<category>: <what texts "
        "in this category have in common>', naming general cues, not these particular texts. "
        "End by telling the model to answer with the category name only.{length_rule} Reply "
        "with the instruction only."
    ),
}

# The same three for multi-label tasks (``list[Literal[...]]``): a text takes every label
# that applies, several or none, and the examples show each text's list of labels.
MULTILABEL_TEMPLATES: dict[str, str] = {
    "meta1": (
        "You are helping to write the prompt of a language model whose job is to tag texts "
        "with these categories: {label_names}. A text may belong to several of them, or to none.\n\n"
        "{task_notes}"
        "{exemplars}"
        "Here are some texts with the list of categories each one belongs to:\n\n"
        "{examples}\n\n"
        "Write an instruction for that model. It should explain what the task is in a way "
        "that carries over to texts the model has not seen, point out the cues that show when "
        "each category applies, and tell the model to answer with the list of the categories "
        "that apply (an empty list when none does).{length_rule} Reply with the instruction only."
    ),
    "meta2": (
        "You are drafting guidelines for a person who will annotate texts with every one of "
        "these labels that applies: {label_names}. A text may take several labels, or none.\n\n"
        "{task_notes}"
        "{exemplars}"
        "Some texts that were already annotated, each with the list of its labels:\n\n"
        "{examples}\n\n"
        "Write the annotation guidelines. Say what the task is and when each label applies, "
        "give general rules for deciding on new texts rather than rules about these "
        "particular ones, and warn about common pitfalls: labels that are easily confused, and "
        "texts that take no label. Keep them short and do not repeat yourself.{length_rule} "
        "Reply with the guidelines only."
    ),
    "label_defs": (
        "You are writing the instruction for a small language model that must tag each text "
        "with every one of these categories that applies (several, or none): {label_names}.\n\n"
        "{task_notes}"
        "{exemplars}"
        "Texts with their categories:\n\n"
        "{examples}\n\n"
        "Write the instruction. Start with one sentence saying what the texts are and what is "
        "being decided. Then give one line per category, in the form '<category>: <what texts "
        "in this category have in common>', naming general cues, not these particular texts. "
        "End by telling the model to answer with the list of the categories that apply.{length_rule} "
        "Reply with the instruction only."
    ),
}
#: What a user's own template gets after its label list for a multi-label task.
MULTILABEL_NOTE = " (a text may take several of these labels, or none)"

#: The "naive" baseline instruction: the task stated with no induction at all.
NAIVE_INSTRUCTION = "Read the input and assign it the label that fits it best."
#: The naive instruction of a multi-label task.
NAIVE_MULTILABEL_INSTRUCTION = "Read the input and list every label that applies to it."


def naive_instruction(labels: Sequence[Any]) -> str:
    """The naive instruction for a label set: :data:`NAIVE_MULTILABEL_INSTRUCTION` for a
    multi-label set, else :data:`NAIVE_INSTRUCTION`."""
    return NAIVE_MULTILABEL_INSTRUCTION if is_multilabel(labels) else NAIVE_INSTRUCTION

_PLACEHOLDER = re.compile(r"\{(label_names|examples|task_notes|exemplars|length_rule)\}")


def check_template(template: str) -> None:
    """Raise ``ValueError`` naming every required placeholder a template text lacks."""
    if not isinstance(template, str) or not template.strip():
        raise ValueError(
            "a template must be 'meta1', 'meta2', 'label_defs', 'auto', a template file or a non-empty template text"
        )
    missing = [p for p in PLACEHOLDERS if p not in template]
    if missing:
        raise ValueError(
            f"the template is missing the placeholder(s) {', '.join(missing)}; a template is a built-in name, "
            f"'auto', a path to a template file, or a text containing both {' and '.join(PLACEHOLDERS)}"
        )


def names_a_file(template: Any) -> bool:
    """Whether :func:`load_template` reads ``template`` from a file: a path, or a string
    that is neither a built-in name, ``"auto"``, nor a template text (with a placeholder)."""
    if isinstance(template, os.PathLike):
        return True
    return (
        isinstance(template, str)
        and template not in TEMPLATES
        and template != "auto"
        and "{examples}" not in template
        and "{label_names}" not in template
    )


def check_template_file(template: str | os.PathLike[str]) -> Path:
    """The file a ``template`` that :func:`names_a_file` stands for, without reading it.

    Raises ``ValueError`` when there is no such file: most often a misspelled built-in name
    (``"meta3"``), so the message lists the built-in names."""
    path = Path(template).expanduser()
    if not path.is_file():
        raise ValueError(
            f"template {str(template)!r} is not a built-in name ({', '.join(TEMPLATES)}) or 'auto', holds no "
            f"{PLACEHOLDERS[1]} placeholder, "
            "and is not an existing file"
        )
    return path


def load_template(template: str | os.PathLike[str]) -> tuple[str, str]:
    """Resolve what a user passed as ``template`` into (template, source).

    * a built-in name (``"meta1"``, ``"meta2"``, ``"label_defs"``) or ``"auto"``: returned as is
      (source ``"built-in"``).
    * A text containing the placeholders: returned as is (source ``"text"``).
    * A path to an existing file: its text (source ``"file:<path>"``), checked.

    The released ``milli19/promptmii-*`` generators were trained on the paper's own
    template text, which this project does not ship: pass that text, or a file holding
    it, here.

    Raises ``ValueError`` when the argument is none of these (naming the missing file or
    placeholders), ``TypeError`` when it is not a string or path.
    """
    if not isinstance(template, (str, os.PathLike)):
        raise TypeError(f"template must be a template name, a template text or a path, got {type(template).__name__}")
    if not names_a_file(template):
        if template in TEMPLATES or template == "auto":
            return template, "built-in"
        check_template(template)
        return template, "text"
    path = check_template_file(template)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"template file {path} cannot be read: {error}") from None
    try:
        check_template(text)
    except ValueError as error:
        raise ValueError(f"template file {path}: {error}") from None
    return text, f"file:{path}"


def template_text(template: str) -> str:
    """The text of a built-in template name, or ``template`` itself (a template text)."""
    return TEMPLATES.get(template, template)


def task_notes(task_description: str | None, descriptions: Mapping[str, str] | None, field_names: Sequence[str]) -> str:
    """What the program's author wrote about the task, as the meta-prompt shows it, or ``""``."""
    parts = []
    if task_description and task_description.strip():
        parts.append(task_description.strip())
    block = render_field_descriptions(descriptions, field_names)
    if block:
        parts.append(block)
    if not parts:
        return ""
    return "What the author of the task says about it:\n" + "\n".join(parts) + "\n\n"


def length_rule(max_words: int | None) -> str:
    """The ``{length_rule}`` sentence for a word budget (``""`` without one)."""
    return f" Keep it under {max_words} words." if max_words else ""


def render_exemplars(exemplars: Sequence[Mapping[str, Any]]) -> str:
    """The ``{exemplars}`` block: for each library entry (``labels``, ``inputs``,
    ``instruction``), its labels, one sample input and the instruction that worked;
    ``""`` for none."""
    if not exemplars:
        return ""
    blocks = []
    for number, entry in enumerate(exemplars, start=1):
        lines = [f"Task {number}. Labels: {label_list(entry['labels'])}"]
        inputs = list(entry.get("inputs") or [])
        if inputs:
            lines.append(f"Sample input: {inputs[0]}")
        lines.append(f"Instruction that worked:\n{entry['instruction']}")
        blocks.append("\n".join(lines))
    return (
        "Instructions written for other tasks that a model followed well (examples of the form to aim for; "
        "do not copy them, the task here is different):\n\n" + "\n\n".join(blocks) + "\n\n"
    )


def build_meta_prompt(
    template: str,
    labels: Sequence[Any],
    examples: Sequence[Example],
    field_names: Sequence[str],
    notes: str = "",
    exemplars: Sequence[Mapping[str, Any]] = (),
    max_words: int | None = None,
) -> str:
    """The generator's prompt: ``template`` (a built-in name or a template text) filled
    with the label list, the rendered examples, ``notes`` (see :func:`task_notes`), the
    ``exemplars`` (see :func:`render_exemplars`) and the length rule for ``max_words``.
    For a multi-label set, a built-in name means its :data:`MULTILABEL_TEMPLATES` form, and
    a user's template gets :data:`MULTILABEL_NOTE` after the label list.

    Raises ``ValueError`` when the template lacks a required placeholder, or has no
    ``{exemplars}`` placeholder while exemplars are given.
    """
    multilabel = is_multilabel(labels)
    text = MULTILABEL_TEMPLATES.get(template, template) if multilabel else template_text(template)
    check_template(text)
    if notes and "{task_notes}" not in text:
        logger.info("the template has no {task_notes} placeholder: the author's task notes are left out")
    if exemplars and "{exemplars}" not in text:
        raise ValueError("the template has no {exemplars} placeholder, so it cannot show exemplar instructions")
    if max_words and "{length_rule}" not in text:
        logger.info("the template has no {length_rule} placeholder: the length budget is only the generation limit")
    values = {
        "label_names": label_list(labels) + (MULTILABEL_NOTE if multilabel and template not in TEMPLATES else ""),
        "examples": render_examples(examples, field_names),
        "task_notes": notes,
        "exemplars": render_exemplars(exemplars),
        "length_rule": length_rule(max_words),
    }
    return _PLACEHOLDER.sub(lambda match: values[match.group(1)], text)
