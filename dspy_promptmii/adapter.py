"""``LabelAdapter``: a compact DSPy adapter for classification predictors (single-label,
and multi-label ``list[Literal[...]]`` ones, whose answer is a JSON array of labels).

It sends the protocol's follower prompt (one user message: instruction, format line,
demos as Input/Label pairs, then the input) instead of DSPy's field-marker prompt,
and parses the reply with the protocol's label parser. Small followers answer it
with far fewer prompt tokens and far fewer unparseable replies.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from typing import Any, Literal

from dspy.adapters.base import Adapter
from dspy.adapters.chat_adapter import ChatAdapter
from dspy.clients.base_lm import BaseLM
from dspy.signatures.signature import Signature
from dspy.utils.exceptions import AdapterParseError

from dspy_promptmii.protocol import (
    CONSTRAINED_STYLES,
    ConstrainedStyle,
    Protocol,
    constrained_body,
    label_grammar,
    label_response_format,
)
from dspy_promptmii.task import ClassificationTask, signature_task

logger = logging.getLogger(__name__)

__all__ = [
    "LabelAdapter",
    "label_response_format",
    "label_grammar",
    "constrained_body",
    "CONSTRAINED_STYLES",
    "FOLLOWER_REPLY_LIMIT",
    "PROBABILITIES",
    "label_probabilities",
]

#: max_tokens of a follower LM for DSPy's ChatAdapter, whose field markers
#: (``[[ ## label ## ]]`` ... ``[[ ## completed ## ]]``) a label-sized limit would cut.
#: With ``LabelAdapter`` the limit comes from its :class:`~dspy_promptmii.protocol.Protocol`.
FOLLOWER_REPLY_LIMIT: dict[str, int | None] = {"label": None, "chat": 128}
#: The prediction field that holds each label's probability (``constrained="choice"``).
PROBABILITIES = "probabilities"


def _get(item: Any, key: str) -> Any:
    return item.get(key) if isinstance(item, dict) else getattr(item, key, None)


def label_probabilities(logprobs: Any, labels: Sequence[str]) -> dict[str, float] | None:
    """Label -> probability from a ``choice``-style reply's logprobs (OpenAI's shape: one
    content entry whose ``top_logprobs`` are the labels), or None when the reply has none
    (or has the token logprobs of generated text instead). Labels the reply leaves out
    (a ``top_logprobs`` below their count) get 0."""
    content = _get(logprobs, "content") if logprobs is not None else None
    if not content:
        return None
    top = _get(content[0], "top_logprobs") or []
    found = {str(_get(entry, "token")): math.exp(float(_get(entry, "logprob"))) for entry in top}
    if not found or not set(found) <= set(labels):  # token logprobs of generated text, not a label choice
        return None
    return {label: found.get(label, 0.0) for label in labels}


class LabelAdapter(Adapter):
    """Paper-style follower prompts for classification predictors: single-label ones, and
    multi-label ones (``list[Literal[...]]``), whose answer is a JSON array of labels.

    Prompts, the reply limit, constrained decoding and parsing all come from one
    :class:`~dspy_promptmii.protocol.Protocol` (:attr:`protocol`), the same value the
    optimizer, the benchmarks and the training reward use. The protocol's follower
    temperature and reply limit apply when neither the LM nor the call sets one (an LM
    configured with ``max_tokens`` keeps it, raised if needed to fit a JSON-wrapped label).

    Predictors it cannot show faithfully go to ``fallback`` with a log line: those with
    more than one output field or no ``Literal``/``Enum``/``bool`` label (e.g. a
    ChainOfThought), labels that are empty, span lines or read the same as strings, and
    input fields whose type is not text, a number or a boolean.

    Args:
        constrained: Shortcut for ``Protocol(constrained=...)``: ``False`` (default,
            plain text), ``True``/``"json_schema"`` (vLLM, OpenAI), ``"json_object"`` or
            ``"grammar"`` (llama.cpp's server), ``"choice"`` (the embedded server: no
            generation, and each prediction gets ``probabilities``, label -> probability).
        fallback: Adapter for the predictors above; defaults to ``dspy.ChatAdapter()``.
        callbacks: DSPy adapter callbacks.
        demos: Deprecated name of ``demo_style`` (``demos`` elsewhere is a count).
        demo_style: Shortcut for ``Protocol(demo_style=...)``: ``"inline"`` (default,
            paper) or ``"turns"`` (one chat exchange per demo; better for ICL with small
            models).
        protocol: The whole protocol; not together with ``constrained`` or ``demo_style``.
        on_invalid: A reply that names no label: ``"raise"`` (default) raises DSPy's
            ``AdapterParseError`` (evaluation counts it as invalid); ``"none"`` returns
            the label field as ``None`` and the raw reply as ``invalid_reply`` (for
            optimizers whose metric explains failures, e.g. GEPA's feedback).

    Raises:
        ValueError: ``protocol`` given with ``constrained`` or ``demo_style``, or an invalid value.
        TypeError: ``protocol`` is not a :class:`~dspy_promptmii.protocol.Protocol`.
    """

    def __init__(
        self,
        constrained: bool | ConstrainedStyle | None = None,
        fallback: Adapter | None = None,
        callbacks: list | None = None,
        demos: str | None = None,
        *,
        protocol: Protocol | None = None,
        on_invalid: Literal["raise", "none"] = "raise",
        demo_style: str | None = None,
    ):
        super().__init__(callbacks=callbacks)
        if demos is not None:
            warnings.warn(
                "LabelAdapter(demos=...) is deprecated: pass demo_style=...", DeprecationWarning, stacklevel=2
            )
            if demo_style is not None:
                raise ValueError("pass demo_style= only (demos= is its deprecated name)")
            demo_style = demos
        if on_invalid not in ("raise", "none"):
            raise ValueError(f"on_invalid must be 'raise' or 'none', got {on_invalid!r}")
        self.on_invalid = on_invalid
        if protocol is not None:
            if not isinstance(protocol, Protocol):
                raise TypeError(f"protocol must be a dspy_promptmii.protocol.Protocol, got {type(protocol).__name__}")
            if constrained is not None or demo_style is not None:
                raise ValueError("pass either protocol= or the constrained=/demo_style= shortcuts, not both")
        else:
            protocol = Protocol(constrained=constrained or False, demo_style=demo_style or "inline")
        self.protocol = protocol
        self.fallback = fallback if fallback is not None else ChatAdapter()
        self._told: set[str] = set()

    @property
    def constrained(self) -> ConstrainedStyle | Literal[False]:
        return self.protocol.constrained

    @property
    def demo_style(self) -> str:
        return self.protocol.demo_style

    def task(self, signature: type[Signature]) -> ClassificationTask | None:
        """The classification task of ``signature`` when this adapter renders it itself,
        else None (it goes to the fallback; the reason is logged once)."""
        return self._task(signature)

    def _task(self, signature: type[Signature]) -> ClassificationTask | None:
        """The task of a signature this adapter renders itself, else None (with a log line once)."""
        task = signature_task(signature) if len(signature.output_fields) == 1 else None
        reason = None
        if task is None:
            reason = "it is not a single-label classifier (one Literal, Enum or bool output)"
        else:
            reason = task.rendering_problem()
        if reason is None:
            return task
        key = f"{signature.__name__}:{reason}"
        if key not in self._told:
            self._told.add(key)
            logger.info("LabelAdapter: %s goes to %s: %s", signature.__name__, type(self.fallback).__name__, reason)
        return None

    def _lm_kwargs(self, lm: BaseLM, lm_kwargs: dict[str, Any], task: ClassificationTask) -> dict[str, Any]:
        """The call's settings: the protocol's, where neither the LM nor the call has one."""
        settings = self.protocol.settings(task.labels)
        configured = getattr(lm, "kwargs", {}) or {}
        out = dict(lm_kwargs)
        if "temperature" in settings and out.get("temperature", configured.get("temperature")) is None:
            out["temperature"] = settings["temperature"]
        limit = out.get("max_tokens") or configured.get("max_tokens") or configured.get("max_completion_tokens")
        json_wrapped = "response_format" in settings
        if limit is None or (json_wrapped and limit < settings["max_tokens"]):
            out["max_tokens"] = settings["max_tokens"]
        for key in ("response_format", "logprobs", "top_logprobs"):  # OpenAI parameters
            if key in settings:
                out[key] = settings[key]
        extra = {key: settings[key] for key in ("grammar", "label_choice") if key in settings}
        if extra:  # not OpenAI parameters: LiteLLM forwards extra_body as is
            out["extra_body"] = {**out.get("extra_body", {}), **extra}
        return out

    def _with_probabilities(self, task: ClassificationTask, values: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """With the ``choice`` style, each prediction gets ``probabilities`` (label -> its
        probability, from the reply's ``top_logprobs``), as DSPy's ``Choice`` type keys them."""
        if self.protocol.constrained != "choice" or task.label_field == PROBABILITIES or task.multilabel:
            return values
        for value in values:
            probabilities = label_probabilities(value.get("logprobs"), task.labels)
            if probabilities is not None:
                value[PROBABILITIES] = probabilities
            elif "choice" not in self._told:
                self._told.add("choice")
                logger.warning(
                    "LabelAdapter(constrained='choice'): the follower's reply has no label probabilities, so its "
                    "server did not answer the label choice and generated freely; the choice style needs "
                    "dspy-promptmii's embedded server (LocalServer, `promptmii serve`); use 'json_schema' (vLLM, "
                    "OpenAI) or 'json_object' (llama.cpp) elsewhere"
                )
        return values

    def __call__(
        self,
        lm: BaseLM,
        lm_kwargs: dict[str, Any],
        signature: type[Signature],
        demos: list[dict[str, Any]],
        inputs: dict[str, Any],
    ) -> list[dict[str, Any]]:
        task = self._task(signature)
        if task is None:
            return self.fallback(lm, lm_kwargs, signature, demos, inputs)
        try:
            values = super().__call__(lm, self._lm_kwargs(lm, lm_kwargs, task), signature, demos, inputs)
            return self._with_probabilities(task, values)
        except AdapterParseError as error:
            return self._invalid(task, error)

    async def acall(
        self,
        lm: BaseLM,
        lm_kwargs: dict[str, Any],
        signature: type[Signature],
        demos: list[dict[str, Any]],
        inputs: dict[str, Any],
    ) -> list[dict[str, Any]]:
        task = self._task(signature)
        if task is None:
            return await self.fallback.acall(lm, lm_kwargs, signature, demos, inputs)
        try:
            values = await super().acall(lm, self._lm_kwargs(lm, lm_kwargs, task), signature, demos, inputs)
            return self._with_probabilities(task, values)
        except AdapterParseError as error:
            return self._invalid(task, error)

    def _invalid(self, task: ClassificationTask, error: AdapterParseError) -> list[dict[str, Any]]:
        """An unparseable (or empty) reply: raised again, or a None label (``on_invalid="none"``)."""
        if self.on_invalid == "raise":
            raise error
        return [{task.label_field: None, "invalid_reply": error.lm_response}]

    # -- prompt ---------------------------------------------------------------------

    def format(
        self, signature: type[Signature], demos: list[dict[str, Any]], inputs: dict[str, Any]
    ) -> list[dict[str, Any]]:
        """The follower's messages (:meth:`Protocol.messages`). Demos missing an input or
        a valid label are left out. Raises ``ValueError`` naming a missing input field."""
        task = self._task(signature)
        if task is None:
            return self.fallback.format(signature, demos, inputs)
        missing = [name for name in task.input_fields if inputs.get(name) is None]
        if missing:
            raise ValueError(f"{signature.__name__} was called without a value for input field(s) {missing}")
        shown = []
        for demo in demos:
            label = task.label_of(demo.get(task.label_field)) if demo.get(task.label_field) is not None else None
            if label is not None and all(demo.get(name) is not None for name in task.input_fields):
                shown.append(({name: demo[name] for name in task.input_fields}, label))
        return self.protocol.messages(
            signature.instructions, task.labels, inputs, task.input_fields, shown, task.descriptions
        )

    # -- reply ----------------------------------------------------------------------

    def parse(self, signature: type[Signature], completion: str) -> dict[str, Any]:
        task = self._task(signature)
        if task is None:
            return self.fallback.parse(signature, completion)
        label = self.protocol.parse(completion, task.labels)
        if label is None:
            raise AdapterParseError(
                adapter_name=type(self).__name__,
                signature=signature,
                lm_response=completion,
                message=(
                    f"The reply is not a JSON array of the labels {list(task.labels)}."
                    if task.multilabel
                    else f"The reply names none of the labels {list(task.labels)}."
                ),
            )
        return {task.label_field: task.value_of(label)}
