"""Label choice from log-probabilities: which label a follower LM would write under
constrained decoding, read off its next-token distributions instead of generated.

The follower's prompt is processed once, followed by the protocol's answer prefix (e.g.
``{"label": "``); the labels, each followed by the answer suffix, form a token trie. A
label's probability is what constrained decoding gives it: at every node where the trie
branches, the model's probabilities of the allowed next tokens, renormalised over them;
a token forced by the trie (one child) has probability 1 and is never decoded alone. The
most probable label is found best-first, so a label set whose labels differ in their
first token costs one forward pass over the prompt and nothing else; shared prefixes
(``alarm_set``, ``alarm_query``) cost one short decode per branch point explored.

This module knows tokens and logits, not HTTP: :mod:`dspy_promptmii.local.label_server`
serves it from llama.cpp, and tests drive it with a fake model.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

__all__ = ["LabelChoice", "TokenTrie", "choose_label", "label_sequences", "common_prefix_length"]

#: ``logits_after(tokens, children)``: the model's logits, for each of ``children``
#: (token ids), at the position after the token sequence ``tokens`` (the whole context).
LogitsAfter = Callable[[Sequence[int], Sequence[int]], Sequence[float]]


@dataclass(frozen=True)
class LabelChoice:
    """The chosen label and every label's probability.

    Attributes:
        label: The most probable label under constrained decoding.
        probabilities: Label -> probability (sums to 1). Exact for every label whose
            branch points were explored; labels inside an unexplored branch (together
            at most ``tolerance`` of the mass, or cut by ``max_decodes``) share that
            branch's probability evenly.
        exact: Whether every probability is exact.
        prompt_tokens: Tokens before the first branch point (prompt, answer prefix and
            any token all labels share).
        decoded_tokens: Tokens decoded after them to explore branch points.
        decodes: Forward passes after the prompt's.
    """

    label: str
    probabilities: dict[str, float]
    exact: bool
    prompt_tokens: int
    decoded_tokens: int = 0
    decodes: int = 0


def common_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix that all ``sequences`` share."""
    if not sequences:
        return 0
    shortest = min(len(s) for s in sequences)
    for i in range(shortest):
        token = sequences[0][i]
        if any(s[i] != token for s in sequences[1:]):
            return i
    return shortest


def label_sequences(
    tokenize: Callable[[str], list[int]], context: str, labels: Sequence[str], suffix: str
) -> dict[str, list[int]]:
    """Each label's whole token sequence, ``context + label + suffix`` tokenized at once
    (so a label's tokens are the ones the tokenizer gives it in context).

    Raises ``ValueError`` when two labels give the same sequence or one label's sequence
    is a prefix of another's (the trie could not tell them apart).
    """
    sequences = {label: list(tokenize(context + label + suffix)) for label in labels}
    ordered = sorted(sequences.items(), key=lambda item: item[1])
    for (a, sa), (b, sb) in zip(ordered, ordered[1:]):
        if sb[: len(sa)] == sa:
            raise ValueError(
                f"labels {a!r} and {b!r} tokenize so that one is a prefix of the other, even with the answer "
                f"suffix {suffix!r}: their probabilities cannot be told apart"
            )
    return sequences


@dataclass
class _Node:
    children: dict[int, _Node] = field(default_factory=dict)
    labels: list[str] = field(default_factory=list)  # labels at or below this node


class TokenTrie:
    """The labels' token sequences after their shared prefix, as a trie."""

    def __init__(self, sequences: Mapping[str, Sequence[int]]):
        if not sequences:
            raise ValueError("no labels to choose from")
        values = list(sequences.values())
        self.shared = list(values[0][: common_prefix_length(values)])
        self.root = _Node()
        for label, tokens in sequences.items():
            node = self.root
            node.labels.append(label)
            for token in tokens[len(self.shared) :]:
                node = node.children.setdefault(token, _Node())
                node.labels.append(label)

    @staticmethod
    def descend(node: _Node) -> tuple[list[int], _Node]:
        """The tokens forced below ``node`` (single children) and the node they lead to:
        a branch point, or a leaf."""
        forced = []
        while len(node.children) == 1:
            token, node = next(iter(node.children.items()))
            forced.append(token)
        return forced, node


def _softmax(values: Sequence[float]) -> list[float]:
    top = max(values)
    weights = [math.exp(v - top) for v in values]
    total = sum(weights)
    return [w / total for w in weights]


def choose_label(
    logits_after: LogitsAfter,
    sequences: Mapping[str, Sequence[int]],
    *,
    tolerance: float = 0.01,
    max_decodes: int = 16,
) -> LabelChoice:
    """The most probable label under constrained decoding, and every label's probability.

    Args:
        logits_after: The model (see :data:`LogitsAfter`); called once for the shared
            prefix and once per branch point explored, each time with the whole context.
        sequences: Label -> its full token sequence (see :func:`label_sequences`).
        tolerance: Once the best label is certain, stop exploring when the unexplored
            branches hold at most this probability in all.
        max_decodes: Most forward passes after the prompt's; the best label is still
            explored to certainty first (at most one pass per branch point on its path).

    Raises:
        ValueError: no labels, or labels the trie cannot tell apart.
    """
    trie = TokenTrie(sequences)
    forced, node = TokenTrie.descend(trie.root)
    context = trie.shared + forced
    shared = len(context)
    if not node.children:  # one label
        label = node.labels[0]
        return LabelChoice(label=label, probabilities={label: 1.0}, exact=True, prompt_tokens=shared)
    # Frontier of unexplored branch points: (-mass, order, context, node).
    frontier: list[tuple[float, int, list[int], _Node]] = [(-1.0, 0, context, node)]
    resolved: dict[str, float] = {}
    order, decodes, decoded = 1, 0, 0
    while frontier:
        best = max(resolved.values(), default=0.0)
        certain = best >= -frontier[0][0]
        if certain and (sum(-item[0] for item in frontier) <= tolerance or decodes >= max_decodes):
            break
        neg_mass, _, tokens, branch = heapq.heappop(frontier)
        if tokens is not context:  # the prompt's own pass is not counted as a decode
            decodes += 1
            decoded += len(tokens) - len(context)
        children = list(branch.children)
        for token, share in zip(children, _softmax(logits_after(tokens, children))):
            child_forced, child = TokenTrie.descend(branch.children[token])
            mass = -neg_mass * share
            if not child.children:
                resolved[child.labels[0]] = mass
            else:
                heapq.heappush(frontier, (-mass, order, [*tokens, token, *child_forced], child))
                order += 1
    exact = not frontier
    probabilities = dict(resolved)
    for neg_mass, _, _, branch in frontier:  # unexplored: share evenly
        for label in branch.labels:
            probabilities[label] = -neg_mass / len(branch.labels)
    label = max(probabilities, key=lambda name: (probabilities[name], -list(sequences).index(name)))
    ordered = {name: probabilities[name] for name in sequences}
    return LabelChoice(
        label=label,
        probabilities=ordered,
        exact=exact,
        prompt_tokens=shared,
        decoded_tokens=decoded,
        decodes=decodes,
    )

