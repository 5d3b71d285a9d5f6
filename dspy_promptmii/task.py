"""Task introspection: which predictors of a DSPy program are classifiers, with what
input fields and labels, and the labelled examples a trainset gives each of them.

A classifier's last output field is a ``Literal[...]``, an ``Enum`` or a ``bool`` (one
label an input), or a ``list`` of a ``Literal`` or an ``Enum`` (multi-label: any of the
labels, several or none). A multi-label example's label is the protocol's answer for it,
the JSON array of its labels in the field's order (``["a", "c"]``).
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, get_args, get_origin

import dspy

from dspy_promptmii.dspy_private import default_instructions
from dspy_promptmii.protocol import LABEL_MARKER, MultiLabels, format_line, label_array
from dspy_promptmii.secrets import protected_logger

logger = protected_logger(__name__)

__all__ = ["ClassificationTask", "signature_task", "classification_tasks", "LabelledExample"]

class LabelledExample(NamedTuple):
    """One labelled example as the protocol uses it, from the plan to the evaluation: the
    input values by field name, and the label string (a multi-label example's label is
    the JSON array of its labels). A tuple, so ``inputs, label = example`` works."""

    inputs: dict[str, Any]
    label: str


def _multilabel_values(annotation: Any) -> tuple[Any, ...] | None:
    """The values of a multi-label field (``list[Literal[...]]``, ``list[Enum]``), or None."""
    if get_origin(annotation) is not list or len(get_args(annotation)) != 1:
        return None
    (item,) = get_args(annotation)
    if item is bool:  # a list of booleans is not a set of labels
        return None
    return _label_values(item)


def _label_values(annotation: Any) -> tuple[Any, ...] | None:
    """The values a classification field can take, or None if it is not one."""
    if get_origin(annotation) is Literal:
        return tuple(get_args(annotation))
    if annotation is bool:
        return (True, False)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return tuple(annotation)
    return None


def _as_label(value: Any) -> str:
    return str(value.value) if isinstance(value, enum.Enum) else str(value)


def _is_text_like(annotation: Any) -> bool:
    """A type whose values read the same as their ``str()``: text, numbers, booleans, a
    Literal or an Enum of them (or a type DSPy left unannotated)."""
    if annotation in (str, int, float, bool, Any, None) or get_origin(annotation) is Literal:
        return True
    return isinstance(annotation, type) and issubclass(annotation, (str, int, float, enum.Enum))


def _description(field_info: Any, name: str) -> str | None:
    """The author's description of a field, or None when DSPy filled in its placeholder."""
    extra = getattr(field_info, "json_schema_extra", None) or {}
    desc = str(extra.get("desc") or "").strip()
    return None if not desc or desc == f"${{{name}}}" else desc


def _task_description(signature: type[dspy.Signature], labels: Sequence[str]) -> str | None:
    """The signature's instructions if its author wrote them, without the format line."""
    text = (signature.instructions or "").strip()
    if not text or text == default_instructions(signature).strip():
        return None
    line = format_line(labels)
    if text.endswith(line):
        text = text[: -len(line)].strip()
    return text or None


@dataclass(frozen=True)
class ClassificationTask:
    """A classification predictor: its input fields and its label field (one label an
    input, or, with ``multilabel``, any number of them).

    ``descriptions`` holds the author's field descriptions (``InputField(desc=...)``,
    ``OutputField(desc=...)``; DSPy's ``${name}`` placeholders are not descriptions),
    keyed by input field name, and by ``"Label"`` for the label field.
    ``task_description`` is the signature's own instructions when the author wrote some
    (DSPy's generated "Given the fields ..." sentence and the protocol's format line are
    not), and ``input_types`` each input field's annotation.
    """

    predictor_name: str
    input_fields: tuple[str, ...]
    label_field: str
    values: tuple[Any, ...]
    descriptions: dict[str, str] = field(default_factory=dict, hash=False, compare=True)
    task_description: str | None = None
    input_types: tuple[Any, ...] = field(default=(), hash=False, compare=False)
    multilabel: bool = False

    @property
    def labels(self) -> tuple[str, ...]:
        """The label strings, in the order the field declares them (a
        :class:`~dspy_promptmii.protocol.MultiLabels` for a multi-label field)."""
        labels = tuple(_as_label(v) for v in self.values)
        return MultiLabels(labels) if self.multilabel else labels

    def rendering_problem(self) -> str | None:
        """Why the protocol's prompts cannot show this task faithfully, or None: a label
        that is empty or spans lines, labels that read the same as strings, or an input
        field whose type is not text, a number or a boolean (an image, a list, a model)."""
        labels = self.labels
        for label in labels:
            if not label.strip():
                return f"the label field {self.label_field!r} has an empty label"
            if "\n" in label or "\r" in label:
                return f"the label {label!r} of {self.label_field!r} spans several lines"
        if len(set(labels)) < len(labels):
            return f"the labels of {self.label_field!r} are not distinct as strings: {list(labels)}"
        for name, annotation in zip(self.input_fields, self.input_types):
            if not _is_text_like(annotation):
                return f"the input field {name!r} has type {getattr(annotation, '__name__', annotation)!s}, not text"
        return None

    def label_of(self, value: Any) -> str | None:
        """The label string for a value given in data (a Literal value, an Enum member,
        its value or name, a bool or its text), or None if it is not one of the labels.
        For a multi-label field: a list, tuple or set of such values (or their JSON array
        text) gives the JSON array of their labels in the field's order; None when one of
        them is not a label."""
        if self.multilabel:
            return self._labels_of(value)
        return self._single_label_of(value)

    def _labels_of(self, value: Any) -> str | None:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                return None
        if not isinstance(value, (list, tuple, set, frozenset)):
            return None
        chosen = set()
        for item in value:
            label = self._single_label_of(item)
            if label is None:
                return None
            chosen.add(label)
        return label_array([label for label in self.labels if label in chosen])

    def _single_label_of(self, value: Any) -> str | None:
        for v in self.values:
            if value is v or (type(value) is type(v) and value == v):
                return _as_label(v)
        text = str(value.value if isinstance(value, enum.Enum) else value).strip()
        for v in self.values:
            if text == _as_label(v) or (isinstance(v, enum.Enum) and text == v.name):
                return _as_label(v)
        if isinstance(self.values[0], bool) and text.lower() in ("true", "false"):
            return str(text.lower() == "true")
        return None

    def value_of(self, label: str) -> Any:
        """The Python value of a label string (what the predictor's output field holds);
        for a multi-label field, the list of values of a JSON array of labels."""
        if self.multilabel:
            return [self._single_value_of(item) for item in json.loads(label)]
        return self._single_value_of(label)

    def _single_value_of(self, label: str) -> Any:
        for v in self.values:
            if _as_label(v) == label:
                return v
        raise KeyError(f"{label!r} is not a label of {self.label_field!r}; labels: {list(self.labels)}")

    def labelled_examples(self, trainset: Sequence[Any], name: str = "trainset") -> list[LabelledExample]:
        """Validate a trainset against this task and return its labelled examples.

        Raises ``ValueError`` for an empty trainset, for the first example missing an
        input field or the label field, and for labels outside the field's label set
        (all of them listed). A single distinct label only logs a warning.
        """
        if not trainset:
            raise ValueError(f"{name} is empty: PromptMIIOptimizer needs labelled examples")
        result: list[LabelledExample] = []
        unknown: dict[str, None] = {}
        for index, example in enumerate(trainset):
            values = _fields_of(example, index)
            missing = [name for name in (*self.input_fields, self.label_field) if values.get(name) is None]
            if missing:
                raise ValueError(
                    f"{name}[{index}] has no value for field(s) {missing} needed by predictor "
                    f"{self.predictor_name!r} (inputs {list(self.input_fields)}, label {self.label_field!r})"
                )
            label = self.label_of(values[self.label_field])
            if label is None:
                unknown[repr(values[self.label_field])] = None
                continue
            result.append(LabelledExample({name: values[name] for name in self.input_fields}, label))
        if unknown:
            raise ValueError(
                f"{name} has labels outside the label set of {self.predictor_name!r}."
                f"{self.label_field}: {', '.join(unknown)}; allowed: {list(self.labels)}"
            )
        distinct = {label for _, label in result}
        if len(distinct) == 1:
            logger.warning(
                "%s for predictor %r has a single label (%s): the instruction can only describe that class",
                name,
                self.predictor_name,
                next(iter(distinct)),
            )
        return result


def _fields_of(example: Any, index: int) -> Mapping[str, Any]:
    if isinstance(example, dspy.Example):
        return example.toDict()
    if isinstance(example, Mapping):
        return example
    raise TypeError(f"trainset[{index}] is a {type(example).__name__}; expected a dspy.Example or a dict")


def signature_task(signature: type[dspy.Signature], name: str = "") -> ClassificationTask | None:
    """The classification task of a signature whose last output field is a ``Literal``,
    an ``Enum`` or a ``bool``, or a ``list`` of a ``Literal`` or an ``Enum`` (multi-label);
    None for any other signature."""
    outputs = list(signature.output_fields.items())
    if not outputs:
        return None
    label_field, label_info = outputs[-1]
    values = _label_values(label_info.annotation)
    multilabel = False
    if not values:
        values = _multilabel_values(label_info.annotation)
        multilabel = True
    if not values:
        return None
    descriptions = {
        name_: desc for name_, info in signature.input_fields.items() if (desc := _description(info, name_))
    }
    if desc := _description(label_info, label_field):
        descriptions[LABEL_MARKER] = desc
    return ClassificationTask(
        predictor_name=name,
        input_fields=tuple(signature.input_fields),
        label_field=label_field,
        values=values,
        descriptions=descriptions,
        task_description=_task_description(
            signature, (MultiLabels if multilabel else tuple)(_as_label(v) for v in values)
        ),
        input_types=tuple(info.annotation for info in signature.input_fields.values()),
        multilabel=multilabel,
    )


def classification_tasks(program: dspy.Module) -> Iterable[tuple[str, dspy.Predict, ClassificationTask | None]]:
    """Every predictor of a program with its classification task (None for non-classifiers)."""
    for name, predictor in program.named_predictors():
        yield name, predictor, signature_task(predictor.signature, name)
