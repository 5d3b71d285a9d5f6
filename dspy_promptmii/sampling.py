"""Which labelled examples the generator sees.

One seeded order of the whole trainset is computed, and the first ``n`` are taken, so
that for a given seed a smaller ``n`` is always a prefix of a larger one (paper protocol).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Literal, TypeVar

__all__ = ["SAMPLING", "example_order", "select_examples"]

T = TypeVar("T")
Sampling = Literal["stratified", "random"]
SAMPLING = ("stratified", "random")


def example_order(labels: Sequence[str], seed: int, sampling: Sampling = "stratified") -> list[int]:
    """A seeded order of the indices of ``labels``.

    ``random``: one seeded shuffle. ``stratified``: the same shuffle, but the first
    example of each label comes first, so that any prefix at least as long as the
    number of labels contains every label.
    """
    if sampling not in SAMPLING:
        raise ValueError(f"sampling must be one of {SAMPLING}, got {sampling!r}")
    order = list(range(len(labels)))
    random.Random(seed).shuffle(order)
    if sampling == "random":
        return order
    seen: set[str] = set()
    first: list[int] = []
    for i in order:
        if labels[i] not in seen:
            seen.add(labels[i])
            first.append(i)
    chosen = set(first)
    return first + [i for i in order if i not in chosen]


def select_examples(
    examples: Sequence[tuple[T, str]], n: int, seed: int, sampling: Sampling = "stratified"
) -> list[tuple[T, str]]:
    """The first ``n`` (input, label) examples in :func:`example_order`."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    order = example_order([label for _, label in examples], seed, sampling)
    return [examples[i] for i in order[:n]]
