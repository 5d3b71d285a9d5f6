"""Scoring a list of predictions against gold labels: macro-F1, accuracy, invalid rate;
for a multi-label set, example-based, micro and macro F1 and exact match as well."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from sklearn.metrics import accuracy_score, f1_score

from dspy_promptmii.protocol.render import is_multilabel

__all__ = ["macro_f1", "score", "multilabel_score"]

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


def score(
    gold: Sequence[Any], predicted: Sequence[str | None], labels: Sequence[Any] | None = None
) -> dict[str, float]:
    """``macro_f1`` (see :func:`macro_f1`), ``accuracy`` (an invalid prediction is wrong),
    ``invalid_rate`` (share of ``None`` predictions) and ``n``. With a multi-label set as
    ``labels``, :func:`multilabel_score`. Raises ``ValueError`` like :func:`macro_f1`."""
    if labels is not None and is_multilabel(labels):
        return multilabel_score(gold, predicted, labels)
    y_true, y_pred, _ = _scored(gold, predicted)
    return {
        "macro_f1": macro_f1(gold, predicted),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "invalid_rate": sum(p is None for p in predicted) / len(predicted),
        "n": len(predicted),
    }


def _label_set(answer: Any) -> list[str]:
    """A multi-label answer (its JSON array text, or a list) as a list of label strings."""
    if isinstance(answer, str):
        answer = json.loads(answer)
    return [str(label) for label in answer]


def multilabel_score(
    gold: Sequence[Any], predicted: Sequence[Any | None], labels: Sequence[Any]
) -> dict[str, float]:
    """Scores of multi-label predictions (scikit-learn's multilabel metrics over the
    label set, binarised).

    Args:
        gold: Each example's labels: a JSON array text (the protocol's answer form) or a list.
        predicted: The same for each prediction, or ``None`` for an invalid reply, which
            counts as predicting no label (a miss on every gold label of its example) and
            in ``invalid_rate``.
        labels: The label set.

    Returns:
        ``macro_f1`` (F1 per label, averaged over the labels that occur in gold or in a
        prediction: a label nobody used does not count, as in :func:`macro_f1`),
        ``micro_f1`` (over all label decisions), ``example_f1`` (F1 of each example's set,
        averaged; an example with no gold label and no predicted label scores 1),
        ``exact_match`` (share of examples whose set is exactly right, also as
        ``accuracy``), ``invalid_rate`` and ``n``.

    Raises:
        ValueError: the lists differ in length or are empty, or a label is not in ``labels``.
    """
    if len(gold) != len(predicted):
        raise ValueError(f"gold has {len(gold)} label sets but there are {len(predicted)} predictions")
    if not gold:
        raise ValueError("scores of an empty set of predictions are undefined")
    names = [str(label) for label in labels]
    index = {name: i for i, name in enumerate(names)}
    true_sets = [_label_set(g) for g in gold]
    pred_sets = [[] if p is None else _label_set(p) for p in predicted]
    unknown = sorted({name for row in true_sets + pred_sets for name in row} - set(index))
    if unknown:
        raise ValueError(f"labels {unknown} are not in the label set {names}")

    def binarised(rows: list[list[str]]) -> list[list[int]]:
        # A set of one label gets an unused second column: scikit-learn reads one column as
        # a binary target, whose metrics have no per-example average.
        pad = [0] if len(names) == 1 else []
        return [[1 if name in row else 0 for name in names] + pad for row in rows]

    y_true, y_pred = binarised(true_sets), binarised(pred_sets)
    used = [i for i, name in enumerate(names) if any(name in row for row in true_sets + pred_sets)]
    macro = float(f1_score(y_true, y_pred, labels=used, average="macro", zero_division=0)) if used else 1.0
    micro = float(f1_score(y_true, y_pred, labels=list(range(len(names))), average="micro", zero_division=1))
    example = float(f1_score(y_true, y_pred, average="samples", zero_division=1))
    exact = float(accuracy_score(y_true, y_pred))
    return {
        "macro_f1": macro,
        "micro_f1": micro,
        "example_f1": example,
        "exact_match": exact,
        "accuracy": exact,
        "invalid_rate": sum(p is None for p in predicted) / len(predicted),
        "n": len(predicted),
    }
