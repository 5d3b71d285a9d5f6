"""``LabelAdapter``: a compact DSPy adapter for single-label classification predictors.

It sends the protocol's follower prompt (one user message: instruction, format line,
demos as Input/Label pairs, then the input) instead of DSPy's field-marker prompt,
and parses the reply with the protocol's label parser. Small followers answer it
with far fewer prompt tokens and far fewer unparseable replies.
"""

from __future__ import annotations

from typing import Any, Literal

from dspy.adapters.base import Adapter
from dspy.adapters.chat_adapter import ChatAdapter
from dspy.clients.base_lm import BaseLM
from dspy.signatures.signature import Signature
from dspy.utils.exceptions import AdapterParseError

from dspy_promptmii.protocol import (
    CONSTRAINED_STYLES,
    DEMO_STYLES,
    ConstrainedStyle,
    constrained_body,
    follower_messages,
    label_grammar,
    label_response_format,
    parse_label,
    render_inputs,
)
from dspy_promptmii.task import ClassificationTask, signature_task

__all__ = [
    "LabelAdapter",
    "label_response_format",
    "label_grammar",
    "constrained_body",
    "CONSTRAINED_STYLES",
    "FOLLOWER_REPLY_LIMIT",
]

#: Default max_tokens of a follower call per adapter kind: a bare label (or its one-key JSON
#: object) fits 16 tokens; DSPy's ChatAdapter needs room for its field markers
#: (``[[ ## label ## ]]`` ... ``[[ ## completed ## ]]``), so 16 would truncate it.
FOLLOWER_REPLY_LIMIT: dict[str, int] = {"label": 16, "chat": 128}


def _signature_task(signature: type[Signature]) -> ClassificationTask | None:
    """The task of a signature whose only output is a classification field."""
    if len(signature.output_fields) != 1:
        return None
    return signature_task(signature)


class LabelAdapter(Adapter):
    """Paper-style follower prompts for single-label classification predictors.

    Args:
        constrained: Constrained decoding (see :func:`label_response_format`). ``False``
            (default) sends plain text; ``True`` or ``"json_schema"`` asks for a
            JSON-schema ``response_format`` with an enum of the labels (vLLM, OpenAI);
            ``"json_object"`` sends that schema the way llama.cpp's Python server takes
            it; ``"grammar"`` sends a llama.cpp grammar of the bare labels (fastest there).
        fallback: Adapter used for predictors that are not single-label classifiers
            (e.g. a ChainOfThought's reasoning + label, or a free-text step).
            Defaults to ``dspy.ChatAdapter()``.
        demos: How a predictor's demos are shown. ``"inline"`` (default, the paper's
            protocol): Input/Label pairs inside the one user message. ``"turns"``: one
            user/assistant exchange per demo after a system message holding the
            instruction; much better for ICL with small chat models (README).
    """

    def __init__(
        self,
        constrained: bool | ConstrainedStyle = False,
        fallback: Adapter | None = None,
        callbacks: list | None = None,
        demos: str = "inline",
    ):
        super().__init__(callbacks=callbacks)
        if demos not in DEMO_STYLES:
            raise ValueError(f"demos must be one of {DEMO_STYLES}, got {demos!r}")
        self.demos = demos
        if constrained is True:
            constrained = "json_schema"
        if constrained is not False and constrained not in CONSTRAINED_STYLES:
            raise ValueError(f"constrained must be False, True or one of {CONSTRAINED_STYLES}, got {constrained!r}")
        self.constrained: ConstrainedStyle | Literal[False] = constrained
        self.fallback = fallback if fallback is not None else ChatAdapter()

    def _lm_kwargs(self, lm: BaseLM, lm_kwargs: dict[str, Any], task: ClassificationTask) -> dict[str, Any]:
        if not self.constrained:
            return lm_kwargs
        # The JSON wrapper costs tokens that a bare label does not: make room for the
        # longest label (a token is at least one character), never lowering a larger limit.
        needed = 16 + max(len(label) for label in task.labels)
        limit = lm_kwargs.get("max_tokens") or lm.kwargs.get("max_tokens") or 0
        body = constrained_body(task.labels, self.constrained)
        if "grammar" in body:  # not an OpenAI parameter: LiteLLM forwards it in the body as is
            body = {"extra_body": {**lm_kwargs.get("extra_body", {}), **body}}
        return {**lm_kwargs, **body, "max_tokens": max(limit, needed)}

    def __call__(
        self,
        lm: BaseLM,
        lm_kwargs: dict[str, Any],
        signature: type[Signature],
        demos: list[dict[str, Any]],
        inputs: dict[str, Any],
    ) -> list[dict[str, Any]]:
        task = _signature_task(signature)
        if task is None:
            return self.fallback(lm, lm_kwargs, signature, demos, inputs)
        return super().__call__(lm, self._lm_kwargs(lm, lm_kwargs, task), signature, demos, inputs)

    async def acall(
        self,
        lm: BaseLM,
        lm_kwargs: dict[str, Any],
        signature: type[Signature],
        demos: list[dict[str, Any]],
        inputs: dict[str, Any],
    ) -> list[dict[str, Any]]:
        task = _signature_task(signature)
        if task is None:
            return await self.fallback.acall(lm, lm_kwargs, signature, demos, inputs)
        return await super().acall(lm, self._lm_kwargs(lm, lm_kwargs, task), signature, demos, inputs)

    # -- prompt ---------------------------------------------------------------------

    def format(
        self, signature: type[Signature], demos: list[dict[str, Any]], inputs: dict[str, Any]
    ) -> list[dict[str, Any]]:
        task = _signature_task(signature)
        if task is None:
            return self.fallback.format(signature, demos, inputs)
        shown = []
        for demo in demos:
            label = task.label_of(demo.get(task.label_field)) if demo.get(task.label_field) is not None else None
            if label is not None and all(demo.get(name) is not None for name in task.input_fields):
                shown.append(({name: demo[name] for name in task.input_fields}, label))
        return follower_messages(
            signature.instructions, task.labels, inputs, task.input_fields, shown, demo_style=self.demos
        )

    def format_field_description(self, signature: type[Signature]) -> str:
        return ""

    def format_field_structure(self, signature: type[Signature]) -> str:
        return ""

    def format_task_description(self, signature: type[Signature]) -> str:
        return signature.instructions

    def format_user_message_content(
        self,
        signature: type[Signature],
        inputs: dict[str, Any],
        prefix: str = "",
        suffix: str = "",
        main_request: bool = False,
    ) -> str:
        names = [name for name in signature.input_fields if name in inputs]
        body = render_inputs(inputs, names) if names else ""
        return "\n\n".join(part for part in (prefix, body, suffix) if part)

    def format_assistant_message_content(
        self, signature: type[Signature], outputs: dict[str, Any], missing_field_message: str | None = None
    ) -> str:
        task = _signature_task(signature)
        if task is None:
            return self.fallback.format_assistant_message_content(signature, outputs, missing_field_message)
        value = outputs.get(task.label_field)
        return task.label_of(value) or "" if value is not None else (missing_field_message or "")

    # -- reply ----------------------------------------------------------------------

    def parse(self, signature: type[Signature], completion: str) -> dict[str, Any]:
        task = _signature_task(signature)
        if task is None:
            return self.fallback.parse(signature, completion)
        label = parse_label(completion, task.labels)
        if label is None:
            raise AdapterParseError(
                adapter_name=type(self).__name__,
                signature=signature,
                lm_response=completion,
                message=f"The reply names none of the labels {list(task.labels)}.",
            )
        return {task.label_field: task.value_of(label)}
