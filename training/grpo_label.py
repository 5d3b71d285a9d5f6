"""The one schema of a GRPO prompt line's ``label``: what ``python -m training.build_data``
writes beside each meta-prompt and what the reward (:mod:`training.follower`) reads back.

:class:`GRPOLabel` is written with :meth:`GRPOLabel.to_json` (by the builder) and read
with :meth:`GRPOLabel.from_json` (by the reward, the agent, the rollouts and the library
builder, through :func:`training.follower.parse_payload` or directly). Every field has one type across
all lines, so that the ``datasets`` JSON loader reads a file as one table. Imports only
the protocol (no DSPy), as the reward runs on GPU nodes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from dspy_promptmii.protocol import Protocol

__all__ = ["GRPOLabel", "HeldOutSet"]

#: Keys a label must carry (non-empty) for the reward to score a reply.
REQUIRED = ("labels", "input_fields", "test_inputs", "test_labels", "protocol")


@dataclass(frozen=True)
class HeldOutSet:
    """What the reward needs of a label: the task's labels and input fields, the m test
    examples (``inputs`` in ``input_fields`` order, ``gold``), the protocol to follow, and
    the examples the generator was shown (which the reward's cleaning recognises)."""

    task: str
    labels: tuple[str, ...]
    input_fields: tuple[str, ...]
    inputs: tuple[tuple[str, ...], ...]
    gold: tuple[str, ...]
    protocol: Protocol = field(default_factory=Protocol)
    shown: tuple[tuple[dict[str, str], str], ...] = ()

    def test_inputs(self) -> list[dict[str, str]]:
        return [dict(zip(self.input_fields, row, strict=True)) for row in self.inputs]


def _rows(value: Any, key: str, width: int) -> tuple[tuple[str, ...], ...]:
    rows = tuple(tuple(str(v) for v in row) for row in value or ())
    bad = [i for i, row in enumerate(rows) if len(row) != width]
    if bad:
        raise ValueError(f"{key} row(s) {bad[:5]} do not have one value per input field")
    return rows


@dataclass(frozen=True)
class GRPOLabel:
    """One prompt line's ``label``.

    ``task``, ``source`` and ``split`` name where the context comes from; ``labels`` are
    in the format line's order; ``input_fields`` name the input columns; ``n_shot``,
    ``repeat``, ``template`` and ``context_seed`` say how the meta-prompt was made;
    ``context_ids``/``test_ids`` are row numbers in the task file;
    ``context_inputs``/``context_labels`` the shown examples and
    ``test_inputs``/``test_labels`` the m held-out ones (inputs in ``input_fields``
    order); ``protocol`` is what the reward follows exactly.
    """

    task: str
    labels: tuple[str, ...]
    input_fields: tuple[str, ...]
    test_inputs: tuple[tuple[str, ...], ...]
    test_labels: tuple[str, ...]
    protocol: Protocol
    source: str | None = None
    split: str | None = None
    n_shot: int | None = None
    repeat: int | None = None
    template: str | None = None
    context_seed: int | None = None
    context_ids: tuple[int, ...] = ()
    test_ids: tuple[int, ...] = ()
    context_inputs: tuple[tuple[str, ...], ...] = ()
    context_labels: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """The label as a JSON object, in the builder's key order."""
        return {
            "task": self.task,
            "source": self.source,
            "split": self.split,
            "labels": list(self.labels),
            "input_fields": list(self.input_fields),
            "n_shot": self.n_shot,
            "repeat": self.repeat,
            "template": self.template,
            "context_seed": self.context_seed,
            "context_ids": list(self.context_ids),
            "test_ids": list(self.test_ids),
            "context_inputs": [list(row) for row in self.context_inputs],
            "context_labels": list(self.context_labels),
            "test_inputs": [list(row) for row in self.test_inputs],
            "test_labels": list(self.test_labels),
            "protocol": self.protocol.to_dict(),
        }

    @classmethod
    def from_json(cls, label: Mapping[str, Any] | str | bytes) -> GRPOLabel:
        """A label from its JSON object (or its text).

        Raises:
            ValueError: text that is not JSON, a value that is not an object, a missing
                required key (a line without ``protocol`` was written by an older data
                builder: rebuild it), rows without one value per input field, counts of
                inputs and labels that differ, or an unusable protocol (each named).
        """
        if isinstance(label, (str, bytes)):
            try:
                label = json.loads(label)
            except ValueError:
                raise ValueError(f"label is a string but not JSON: {str(label)[:80]!r}") from None
        if not isinstance(label, Mapping):
            raise ValueError(f"label must be a dict (the data builder's label), got {type(label).__name__}")
        for key in REQUIRED:
            if not label.get(key):
                raise ValueError(f"label has no {key!r}: was the file written by the current training.build_data?")
        fields = tuple(str(f) for f in label["input_fields"])
        inputs = _rows(label["test_inputs"], "test_inputs", len(fields))
        gold = tuple(str(g) for g in label["test_labels"])
        if len(inputs) != len(gold):
            raise ValueError(f"label has {len(inputs)} test inputs but {len(gold)} test labels")
        context = _rows(label.get("context_inputs"), "context_inputs", len(fields))
        context_labels = tuple(str(x) for x in label.get("context_labels") or ())
        if len(context) != len(context_labels):
            raise ValueError(f"label has {len(context)} context inputs but {len(context_labels)} context labels")
        try:
            protocol = Protocol.from_dict(label["protocol"])
        except (ValueError, TypeError) as error:
            raise ValueError(f"label's protocol is unusable: {error}") from None
        return cls(
            task=str(label.get("task", "?")),
            labels=tuple(str(x) for x in label["labels"]),
            input_fields=fields,
            test_inputs=inputs,
            test_labels=gold,
            protocol=protocol,
            source=label.get("source"),
            split=label.get("split"),
            n_shot=label.get("n_shot"),
            repeat=label.get("repeat"),
            template=label.get("template"),
            context_seed=label.get("context_seed"),
            context_ids=tuple(label.get("context_ids") or ()),
            test_ids=tuple(label.get("test_ids") or ()),
            context_inputs=context,
            context_labels=context_labels,
        )

    def held_out(self) -> HeldOutSet:
        """What the reward scores a reply against."""
        return HeldOutSet(
            task=self.task,
            labels=self.labels,
            input_fields=self.input_fields,
            inputs=self.test_inputs,
            gold=self.test_labels,
            protocol=self.protocol,
            shown=tuple(
                (dict(zip(self.input_fields, row, strict=True)), label)
                for row, label in zip(self.context_inputs, self.context_labels)
            ),
        )
