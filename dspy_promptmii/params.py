"""Declarative parameter constraints, after scikit-learn's ``_parameter_constraints``:
each parameter's rule is written once, as a :class:`Constraint`, and checked by
:func:`check_params`, so that the optimizer, the protocol, the command line and the
training data builder accept the same values and say the same thing about a bad one.

A rule raises ``TypeError`` for a value of the wrong type and ``ValueError`` for one of
the right type but out of range, both naming the parameter and quoting the value.
``bool`` is never taken for a number.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Constraint",
    "Integer",
    "Number",
    "OneOf",
    "Boolean",
    "InstanceOf",
    "check_params",
    "SHARED",
    "COUNT",
    "COUNT_OR_ZERO",
]


class Constraint:
    """A rule one parameter's value must follow."""

    def check(self, name: str, value: Any) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def argparse_type(self, name: str) -> Callable[[str], Any]:
        """A converter for ``argparse`` that applies this rule to a command-line text."""
        raise NotImplementedError(f"{type(self).__name__} has no command-line form")


def _is_number(value: Any, kinds: tuple[type, ...]) -> bool:
    return not isinstance(value, bool) and isinstance(value, kinds)


@dataclass(frozen=True)
class Integer(Constraint):
    """An integer of at least ``low`` (any integer when ``low`` is None), or None when
    ``none`` is set."""

    low: int | None = None
    none: bool = False

    def describe(self) -> str:
        text = "an integer" if self.low is None else f"an integer >= {self.low}"
        return text + (" or None" if self.none else "")

    def check(self, name: str, value: Any) -> None:
        if value is None and self.none:
            return
        if not _is_number(value, (int,)):
            raise TypeError(f"{name} must be {self.describe()}, got {value!r}")
        if self.low is not None and value < self.low:
            raise ValueError(f"{name} must be {self.describe()}, got {value!r}")

    def argparse_type(self, name: str) -> Callable[[str], int]:
        import argparse

        def convert(text: str) -> int:
            try:
                value = int(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected {self.describe()}, got {text!r}") from None
            try:
                self.check(name, value)
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected {self.describe()}, got {value}") from None
            return value

        convert.__name__ = name
        return convert


@dataclass(frozen=True)
class Number(Constraint):
    """A finite number of at least ``low`` (``bool`` excluded), or None when ``none`` is set."""

    low: float | None = None
    none: bool = False

    def check(self, name: str, value: Any) -> None:
        if value is None and self.none:
            return
        if not _is_number(value, (int, float)):
            raise TypeError(f"{name} must be a number{' or None' if self.none else ''}, got {value!r}")
        if not math.isfinite(value) or (self.low is not None and value < self.low):
            bound = "" if self.low is None else f" >= {self.low:g}"
            raise ValueError(f"{name} must be a finite number{bound}, got {value!r}")


@dataclass(frozen=True)
class OneOf(Constraint):
    """One of ``options`` (compared with ``==``)."""

    options: tuple[Any, ...]

    def check(self, name: str, value: Any) -> None:
        if value not in self.options:
            raise ValueError(f"{name} must be one of {self.options}, got {value!r}")


@dataclass(frozen=True)
class Boolean(Constraint):
    """``True`` or ``False`` (not a number), or None when ``none`` is set."""

    none: bool = False

    def check(self, name: str, value: Any) -> None:
        if value is None and self.none:
            return
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False{', or None' if self.none else ''}, got {value!r}")


@dataclass(frozen=True)
class InstanceOf(Constraint):
    """An instance of one of ``types`` (``callable`` stands for any callable), or None
    when ``none`` is set; ``described`` is how the message names what is wanted."""

    types: tuple[Any, ...]
    described: str
    none: bool = False
    exclude: tuple[type, ...] = ()

    def check(self, name: str, value: Any) -> None:
        if value is None and self.none:
            return
        ok = not isinstance(value, self.exclude) and any(
            callable(value) if kind is callable else isinstance(value, kind) for kind in self.types
        )
        if not ok:
            raise TypeError(f"{name} must be {self.described}, got {type(value).__name__}")


#: Command-line counts (argparse types; see :meth:`Integer.argparse_type`).
COUNT = Integer(low=1)
COUNT_OR_ZERO = Integer(low=0)
#: A local llama.cpp server's context size in tokens (``n_ctx``): 512 at least, room for a
#: chat-framed prompt and a reply.
CONTEXT_SIZE = Integer(low=512)

#: Rules that several components share (the optimizer, the protocol, the command line and
#: the training data builder): one definition of each count, budget and setting.
SHARED: dict[str, Constraint] = {
    "n": Integer(low=1),
    "seed": Integer(),
    "max_prompt_tokens": Integer(low=1, none=True),
    "max_tokens": Integer(low=1, none=True),
    "max_instruction_tokens": Integer(low=1, none=True),
    "reply_limit": Integer(low=1, none=True),
    "exemplars": Integer(low=0),
    "candidates": Integer(low=1),
    "val_size": Integer(low=1),
    "demos": Integer(low=0),
    "temperature": Number(low=0, none=True),
    "include_naive": Boolean(none=True),
}


def check_params(values: Mapping[str, Any], constraints: Mapping[str, Constraint]) -> None:
    """Check each value in ``values`` that ``constraints`` has a rule for, in order.

    Raises:
        TypeError, ValueError: the first value that breaks its rule (named).
    """
    for name, value in values.items():
        rule = constraints.get(name)
        if rule is not None:
            rule.check(name, value)
