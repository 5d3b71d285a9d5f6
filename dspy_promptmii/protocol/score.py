"""Scoring a list of predictions against gold labels: macro-F1, accuracy, invalid rate."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sklearn.metrics import accuracy_score, f1_score

__all__ = ["macro_f1", "score"]

# Stands in for a missing prediction inside scikit-learn; never one of the scored labels.
_MISS = "\x00no valid label\x00"


def _scored(gold: Sequence[Any], predicted: Sequence[str | None]) -> tuple[list[str], list[str], list[str]]:
    if len(gold) != len(predicted):
        raise ValueError(f"gold has {len(gold)} labels but there are {len(predicted)} predictions")
    if not gold:
        raise ValueError("scores of an empty set of predictions are undefined")
    y_true = [str(g) for g in gold]
    y_pred = [_MISS if p is None else str(p) for p in predicted]
    classes = sorted(set(y_true) | {p for p in y_pred if p != _MISS})
    return y_true, y_pred, classes


def macro_f1(gold: Sequence[Any], predicted: Sequence[str | None]) -> float:
    """Macro-F1 of ``predicted`` against ``gold`` (scikit-learn ``f1_score``, ``average="macro"``).

    A prediction of ``None`` (an invalid reply: no label recognised, or a call that
    failed) is a miss for its gold label: it lowers that label's recall and is not a
    class of its own. The average runs over the gold labels and the valid predicted
    labels (a predicted label absent from gold has F1 0 and counts); a label with no
    prediction and no gold example does not count. Example: on 100 balanced binary
    examples with 99 right and one invalid, macro-F1 is (98/99 + 1) / 2 = 0.995.

    Args:
        gold: The gold labels (compared as strings).
        predicted: One label string or ``None`` per gold label.

    Returns:
        Macro-F1 in [0, 1].

    Raises:
        ValueError: the lists differ in length, or are empty.
    """
    y_true, y_pred, classes = _scored(gold, predicted)
    return float(f1_score(y_true, y_pred, labels=classes, average="macro", zero_division=0))


def score(gold: Sequence[Any], predicted: Sequence[str | None]) -> dict[str, float]:
    """``macro_f1`` (see :func:`macro_f1`), ``accuracy`` (an invalid prediction is wrong),
    ``invalid_rate`` (share of ``None`` predictions) and ``n``. Raises ``ValueError`` like
    :func:`macro_f1`."""
    y_true, y_pred, _ = _scored(gold, predicted)
    return {
        "macro_f1": macro_f1(gold, predicted),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "invalid_rate": sum(p is None for p in predicted) / len(predicted),
        "n": len(predicted),
    }
