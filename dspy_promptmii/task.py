"""Task introspection: which predictors of a DSPy program are classifiers, with what
input fields and labels, and the labelled examples a trainset gives each of them."""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args, get_origin

import dspy

logger = logging.getLogger(__name__)

__all__ = ["ClassificationTask", "signature_task", "classification_tasks", "LabelledExample"]

#: One labelled example as the protocol uses it: the input values by field name, and the label string.
LabelledExample = tuple[dict[str, Any], str]


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


@dataclass(frozen=True)
class ClassificationTask:
    """A single-label classification predictor: its input fields and its label field."""

    predictor_name: str
    input_fields: tuple[str, ...]
    label_field: str
    values: tuple[Any, ...]

    @property
    def labels(self) -> tuple[str, ...]:
        """The label strings, in the order the field declares them."""
        return tuple(_as_label(v) for v in self.values)

    def label_of(self, value: Any) -> str | None:
        """The label string for a value given in data (a Literal value, an Enum member,
        its value or name, a bool or its text), or None if it is not one of the labels."""
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
        """The Python value of a label string (what the predictor's output field holds)."""
        for v in self.values:
            if _as_label(v) == label:
                return v
        raise KeyError(f"{label!r} is not a label of {self.label_field!r}; labels: {list(self.labels)}")

    def examples(self, trainset: Sequence[Any]) -> list[LabelledExample]:
        """Validate a trainset against this task and return its labelled examples.

        Raises ``ValueError`` for an empty trainset, for the first example missing an
        input field or the label field, and for labels outside the field's label set
        (all of them listed). A single distinct label only logs a warning.
        """
        if not trainset:
            raise ValueError("trainset is empty: PromptMIIOptimizer needs labelled examples")
        result: list[LabelledExample] = []
        unknown: dict[str, None] = {}
        for index, example in enumerate(trainset):
            values = _fields_of(example, index)
            missing = [name for name in (*self.input_fields, self.label_field) if values.get(name) is None]
            if missing:
                raise ValueError(
                    f"trainset[{index}] has no value for field(s) {missing} needed by predictor "
                    f"{self.predictor_name!r} (inputs {list(self.input_fields)}, label {self.label_field!r})"
                )
            label = self.label_of(values[self.label_field])
            if label is None:
                unknown[repr(values[self.label_field])] = None
                continue
            result.append(({name: values[name] for name in self.input_fields}, label))
        if unknown:
            raise ValueError(
                f"trainset has labels outside the label set of {self.predictor_name!r}."
                f"{self.label_field}: {', '.join(unknown)}; allowed: {list(self.labels)}"
            )
        distinct = {label for _, label in result}
        if len(distinct) == 1:
            logger.warning(
                "trainset for predictor %r has a single label (%s): the instruction can only describe that class",
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
    an ``Enum`` or a ``bool``; None for any other signature."""
    outputs = list(signature.output_fields.items())
    if not outputs:
        return None
    label_field, field = outputs[-1]
    values = _label_values(field.annotation)
    if not values:
        return None
    return ClassificationTask(
        predictor_name=name,
        input_fields=tuple(signature.input_fields),
        label_field=label_field,
        values=values,
    )


def classification_tasks(program: dspy.Module) -> Iterable[tuple[str, dspy.Predict, ClassificationTask | None]]:
    """Every predictor of a program with its classification task (None for non-classifiers)."""
    for name, predictor in program.named_predictors():
        yield name, predictor, signature_task(predictor.signature, name)
