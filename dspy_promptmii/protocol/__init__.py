"""The one Prompt-MII protocol: how examples, meta-prompts and follower prompts look, how
a generator's reply becomes an instruction, how a follower's reply becomes a label, and
how predictions are scored.

Everything that must agree between compile (:class:`~dspy_promptmii.PromptMIIOptimizer`),
the follower adapter (:class:`~dspy_promptmii.LabelAdapter`), evaluation, the benchmarks
and the training reward is one value, :class:`Protocol`; call sites take one and call its
methods instead of assembling the pieces. Its parts live in one module per job:
:mod:`.render` (labels, examples, field descriptions, follower messages),
:mod:`.templates` (meta-prompts), :mod:`.clean` (generator replies), :mod:`.parse`
(follower replies), :mod:`.request` (constrained decoding, reply limit), :mod:`.score`
(macro-F1). This package needs only scikit-learn (no DSPy), so the training reward can
use it on GPU nodes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

from dspy_promptmii.params import SHARED, check_params
from dspy_promptmii.protocol.clean import Cleaned, clean_reply, strip_reasoning, unknown_labels
from dspy_promptmii.protocol.parse import normalize_label, parse_label, parse_labels
from dspy_promptmii.protocol.render import (
    DEMO_STYLES,
    LABEL_MARKER,
    Example,
    MultiLabels,
    field_title,
    follower_messages,
    follower_prompt,
    format_line,
    input_titles,
    is_multilabel,
    label_array,
    label_list,
    render_example,
    render_examples,
    render_field_descriptions,
    render_inputs,
    with_format_line,
)
from dspy_promptmii.protocol.request import (
    CHOICE_PREFIX,
    CHOICE_SUFFIX,
    CONSTRAINED_STYLES,
    FOLLOWER_STYLES,
    ConstrainedStyle,
    constrained_body,
    default_reply_limit,
    follower_decoding,
    follower_style_from_constrained,
    label_choice,
    label_grammar,
    label_response_format,
)
from dspy_promptmii.protocol.score import macro_f1, multilabel_score, score
from dspy_promptmii.protocol.templates import (
    MULTILABEL_NOTE,
    MULTILABEL_TEMPLATES,
    NAIVE_INSTRUCTION,
    NAIVE_MULTILABEL_INSTRUCTION,
    OPTIONAL_PLACEHOLDERS,
    PLACEHOLDERS,
    TEMPLATES,
    build_meta_prompt,
    check_template,
    check_template_file,
    length_rule,
    load_template,
    naive_instruction,
    names_a_file,
    render_exemplars,
    task_notes,
    template_text,
)

__all__ = [
    "Protocol",
    "Cleaned",
    "TEMPLATES",
    "MULTILABEL_TEMPLATES",
    "MULTILABEL_NOTE",
    "NAIVE_INSTRUCTION",
    "NAIVE_MULTILABEL_INSTRUCTION",
    "naive_instruction",
    "MultiLabels",
    "is_multilabel",
    "label_array",
    "parse_labels",
    "multilabel_score",
    "PLACEHOLDERS",
    "OPTIONAL_PLACEHOLDERS",
    "LABEL_MARKER",
    "DEMO_STYLES",
    "CONSTRAINED_STYLES",
    "FOLLOWER_STYLES",
    "follower_decoding",
    "follower_style_from_constrained",
    "ConstrainedStyle",
    "label_list",
    "format_line",
    "with_format_line",
    "field_title",
    "input_titles",
    "render_inputs",
    "render_example",
    "render_examples",
    "render_field_descriptions",
    "check_template",
    "check_template_file",
    "load_template",
    "names_a_file",
    "template_text",
    "task_notes",
    "length_rule",
    "render_exemplars",
    "build_meta_prompt",
    "strip_reasoning",
    "clean_reply",
    "unknown_labels",
    "follower_prompt",
    "follower_messages",
    "label_grammar",
    "label_response_format",
    "label_choice",
    "CHOICE_PREFIX",
    "CHOICE_SUFFIX",
    "constrained_body",
    "default_reply_limit",
    "normalize_label",
    "parse_label",
    "macro_f1",
    "score",
    "choose_template",
]


def choose_template(template: str, generator_model: str) -> tuple[str, str]:
    """Resolve ``template`` for a generator: (template name or text, why).

    ``"auto"`` gives ``meta1`` for Llama-family generators and ``meta2`` for any other
    (the paper used meta1 with Llama and meta2 with Qwen).
    """
    if template != "auto":
        return template, "given" if template in TEMPLATES else "custom"
    if "llama" in (generator_model or "").lower():
        return "meta1", f"auto: generator {generator_model!r} is Llama-family"
    return "meta2", f"auto: generator {generator_model!r} is not Llama-family"


@dataclass(frozen=True)
class Protocol:
    """Everything that must be the same wherever instructions are written, followed and scored.

    Args:
        template: The meta-prompt: ``"meta1"``, ``"meta2"``, ``"auto"`` (meta1 for
            Llama-family generators, meta2 otherwise), a template text with
            ``{label_names}`` and ``{examples}`` (optionally ``{task_notes}``), or a path
            to a file holding one (read once, here; the text is what is kept).
        demo_style: How demos reach the follower: ``"inline"`` in the one user message
            (paper) or ``"turns"`` (one chat exchange per demo).
        constrained: Constrained decoding of the follower's answer: ``False``,
            ``"json_schema"`` (vLLM, OpenAI), ``"json_object"`` or ``"grammar"``
            (llama.cpp), or ``"choice"`` (the embedded server: the label read off the
            follower's log-probabilities, no generation; the reply also gives each
            label's probability); ``True`` means ``"json_schema"``.
        reply_limit: The follower's ``max_tokens``; ``None`` picks
            :func:`~dspy_promptmii.protocol.request.default_reply_limit` per label set.
        temperature: The follower's temperature (paper: 0); ``None`` leaves it to the LM.
        field_descriptions: Show the author's field descriptions and task description
            (the signature's own instructions) to the generator and the follower.

    Raises:
        ValueError: an unknown template, demo style or constrained style, a template
            without its placeholders, or a reply limit below 1.
        TypeError: a template that is not a string or path.
    """

    template: str = "auto"
    demo_style: Literal["inline", "turns"] = "inline"
    constrained: ConstrainedStyle | Literal[False] = False
    reply_limit: int | None = None
    temperature: float | None = 0.0
    field_descriptions: bool = True

    def __post_init__(self) -> None:
        text, _ = load_template(self.template)
        object.__setattr__(self, "template", text)
        if self.demo_style not in DEMO_STYLES:
            raise ValueError(f"demo_style must be one of {DEMO_STYLES}, got {self.demo_style!r}")
        constrained = "json_schema" if self.constrained is True else self.constrained
        if constrained is not False and constrained not in CONSTRAINED_STYLES:
            raise ValueError(f"constrained must be False, True or one of {CONSTRAINED_STYLES}, got {constrained!r}")
        object.__setattr__(self, "constrained", constrained)
        check_params({"reply_limit": self.reply_limit, "temperature": self.temperature}, SHARED)

    # -- the generator side -------------------------------------------------------------

    def resolve_template(self, generator_model: str = "") -> tuple[str, str]:
        """(template name or text, why) for a generator model; see :func:`choose_template`."""
        return choose_template(self.template, generator_model)

    def meta_prompt(
        self,
        labels: Sequence[Any],
        examples: Sequence[Example],
        field_names: Sequence[str],
        *,
        generator_model: str = "",
        task_description: str | None = None,
        descriptions: Mapping[str, str] | None = None,
        exemplars: Sequence[Mapping[str, Any]] = (),
        max_words: int | None = None,
        template: str | None = None,
    ) -> str:
        """The generator's prompt for a task (see :mod:`.templates`): the author's task
        description and field descriptions when ``field_descriptions``, exemplar
        instructions of other tasks, and a length rule of ``max_words``. ``template``
        overrides the protocol's (a built-in name or a template text)."""
        if template is None:
            template, _ = self.resolve_template(generator_model)
        notes = task_notes(task_description, descriptions, field_names) if self.field_descriptions else ""
        return build_meta_prompt(template, labels, examples, field_names, notes, exemplars, max_words)

    def clean(
        self,
        reply: str | None,
        field_names: Sequence[str],
        *,
        labels: Sequence[Any] = (),
        examples: Sequence[Example] = (),
        truncated: bool = False,
    ) -> Cleaned:
        """A generator reply cleaned into an instruction (see :mod:`.clean`)."""
        return clean_reply(reply, field_names, truncated=truncated, examples=examples, labels=labels)

    @staticmethod
    def instruction(text: str, labels: Sequence[Any]) -> str:
        """A cleaned instruction as the follower gets it: with the format line."""
        return with_format_line(text, labels)

    # -- the follower side --------------------------------------------------------------

    def messages(
        self,
        instruction: str,
        labels: Sequence[Any],
        inputs: Mapping[str, Any],
        field_names: Sequence[str],
        demos: Sequence[Example] = (),
        descriptions: Mapping[str, str] | None = None,
    ) -> list[dict[str, str]]:
        """The follower's chat messages for one input (see :func:`follower_messages`)."""
        return follower_messages(
            instruction,
            labels,
            inputs,
            field_names,
            demos,
            demo_style=self.demo_style,
            descriptions=descriptions if self.field_descriptions else None,
        )

    def max_tokens(self, labels: Sequence[Any]) -> int:
        """The follower's reply limit for a label set."""
        return self.reply_limit or default_reply_limit(labels, self.constrained)

    def settings(self, labels: Sequence[Any]) -> dict[str, Any]:
        """The request body's fields besides ``model`` and ``messages``: temperature
        (unless None), ``max_tokens``, and the constrained-decoding fields."""
        body: dict[str, Any] = {}
        if self.temperature is not None:
            body["temperature"] = self.temperature
        body["max_tokens"] = self.max_tokens(labels)
        if self.constrained:
            body.update(constrained_body(labels, self.constrained))
        return body

    def request_body(
        self,
        model: str,
        instruction: str,
        labels: Sequence[Any],
        inputs: Mapping[str, Any],
        field_names: Sequence[str],
        demos: Sequence[Example] = (),
        descriptions: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """The OpenAI-compatible chat-completions body for one follower call."""
        return {
            "model": model,
            "messages": self.messages(instruction, labels, inputs, field_names, demos, descriptions),
            **self.settings(labels),
        }

    @staticmethod
    def parse(reply: str | None, labels: Sequence[Any]) -> str | None:
        """The label a follower reply names, or None (see :func:`parse_label`); for a
        multi-label set, the labels it names as a JSON array text (see :func:`parse_labels`)."""
        if is_multilabel(labels):
            return parse_labels(reply, labels)
        return parse_label(reply, labels)

    @staticmethod
    def score(
        gold: Sequence[Any], predicted: Sequence[str | None], labels: Sequence[Any] | None = None
    ) -> dict[str, float]:
        """Macro-F1, accuracy, invalid rate (see :func:`~dspy_promptmii.protocol.score.score`);
        with a multi-label set as ``labels``, also example-based and micro F1 and exact match."""
        return score(gold, predicted, labels)

    # -- serialisation ------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict; :meth:`from_dict` gives the same protocol back."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Protocol:
        """A protocol from :meth:`to_dict`'s output. Raises ``ValueError`` naming unknown keys."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a protocol is a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown protocol setting(s) {unknown}; known: {sorted(known)}")
        return cls(**dict(data))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | os.PathLike[str]) -> Protocol:
        """A protocol from JSON text or a JSON file's path."""
        if isinstance(text, os.PathLike) or (isinstance(text, str) and not text.lstrip().startswith("{")):
            with open(text, encoding="utf-8") as handle:
                text = handle.read()
        return cls.from_dict(json.loads(text))
