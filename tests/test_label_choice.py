"""Label choice from log-probabilities (dspy_promptmii.local.label_choice): the trie, the
best-first search and its stopping rule, against exhaustive computation on fake models."""

from __future__ import annotations

import ctypes
import itertools
import math
import random

import numpy as np
import pytest

from dspy_promptmii.local.label_choice import (
    TokenTrie,
    choose_label,
    common_prefix_length,
    label_sequences,
)
from dspy_promptmii.local.label_server import LlamaLogits


class FakeModel:
    """Deterministic logits per context (a hash of it), with a call log."""

    def __init__(self, seed: int = 0, table: dict[tuple[int, ...], dict[int, float]] | None = None):
        self.seed = seed
        self.table = table or {}
        self.calls: list[tuple[tuple[int, ...], tuple[int, ...]]] = []

    def logit(self, context: tuple[int, ...], token: int) -> float:
        if context in self.table and token in self.table[context]:
            return self.table[context][token]
        return random.Random(hash((self.seed, context, token))).gauss(0, 2)

    def __call__(self, tokens, children):
        context = tuple(tokens)
        self.calls.append((context, tuple(children)))
        return [self.logit(context, c) for c in children]


def exact_probabilities(model: FakeModel, sequences: dict[str, list[int]]) -> dict[str, float]:
    """Constrained-decoding probability of each label by walking every branch point."""
    shared = common_prefix_length(list(sequences.values()))
    out = {}
    for label, tokens in sequences.items():
        p = 1.0
        for i in range(shared, len(tokens)):
            siblings = sorted({s[i] for s in sequences.values() if s[:i] == tokens[:i] and len(s) > i})
            if len(siblings) > 1:
                logits = [model.logit(tuple(tokens[:i]), c) for c in siblings]
                top = max(logits)
                weights = [math.exp(v - top) for v in logits]
                p *= weights[siblings.index(tokens[i])] / sum(weights)
        out[label] = p
    return out


def char_tokenize(text: str) -> list[int]:
    return [ord(c) for c in text]


def test_distinct_first_tokens_cost_one_pass_and_give_renormalised_probabilities():
    prompt = [1, 2, 3]
    sequences = {"pos": [*prompt, 10, 99], "neg": [*prompt, 11, 99], "neu": [*prompt, 12, 99]}
    model = FakeModel(table={(1, 2, 3): {10: 2.0, 11: 1.0, 12: 0.0}})

    choice = choose_label(model, sequences)

    assert model.calls == [((1, 2, 3), (10, 11, 12))]  # the prompt once, the suffix token never decoded
    weights = [math.exp(2.0), math.exp(1.0), 1.0]
    assert choice.label == "pos"
    assert choice.probabilities == pytest.approx({"pos": weights[0] / sum(weights), "neg": weights[1] / sum(weights),
                                                  "neu": weights[2] / sum(weights)})
    assert choice.exact and choice.decodes == 0 and choice.prompt_tokens == 3


def test_shared_prefix_is_decoded_only_where_it_branches():
    prompt = [1]
    sequences = {
        "alarm_set": [*prompt, 50, 51, 60, 99],
        "alarm_query": [*prompt, 50, 51, 61, 99],
        "weather": [*prompt, 70, 99],
    }
    model = FakeModel(table={(1,): {50: 3.0, 70: 0.0}, (1, 50, 51): {60: 0.0, 61: 1.0}})

    choice = choose_label(model, sequences)

    # The alarm branch's forced token (51) rides along with its first token in one decode.
    assert [call[0] for call in model.calls] == [(1,), (1, 50, 51)]
    assert choice.label == "alarm_query"
    assert choice.decodes == 1 and choice.decoded_tokens == 2
    assert choice.probabilities == pytest.approx(exact_probabilities(model, sequences))
    assert sum(choice.probabilities.values()) == pytest.approx(1.0)


def test_an_unlikely_branch_is_left_unexplored_within_the_tolerance():
    sequences = {"a1": [5, 1, 1], "a2": [5, 1, 2], "b": [5, 2, 9]}
    model = FakeModel(table={(5,): {1: -10.0, 2: 10.0}})

    choice = choose_label(model, sequences, tolerance=0.01)

    assert choice.label == "b" and not choice.exact
    assert len(model.calls) == 1  # the a-branch holds ~2e-9 of the mass: not worth a decode
    assert choice.probabilities["a1"] == choice.probabilities["a2"]  # its mass shared evenly
    assert sum(choice.probabilities.values()) == pytest.approx(1.0)


def test_one_label_needs_no_model():
    model = FakeModel()
    choice = choose_label(model, {"only": [1, 2, 3]})
    assert choice.label == "only" and choice.probabilities == {"only": 1.0} and model.calls == []


def test_a_label_that_prefixes_another_is_told_apart_by_the_suffix():
    sequences = label_sequences(char_tokenize, 'A: "', ["yes", "yes please"], '"}')
    model = FakeModel(seed=3)
    choice = choose_label(model, sequences, tolerance=0.0)
    assert choice.exact
    assert choice.probabilities == pytest.approx(exact_probabilities(model, sequences))


def test_labels_the_tokenizer_cannot_tell_apart_are_refused():
    with pytest.raises(ValueError, match="prefix of the other"):
        label_sequences(lambda text: [1, 2] if "a" in text else [1, 2, 3], "", ["a", "b"], "")
    with pytest.raises(ValueError, match="no labels"):
        TokenTrie({})


@pytest.mark.parametrize("seed", range(25))
def test_the_best_label_is_the_exact_argmax_on_random_tries(seed):
    rng = random.Random(seed)
    words = ["".join(rng.choice("abc") for _ in range(rng.randint(1, 4))) for _ in range(12)]
    labels = sorted(set(words))
    sequences = label_sequences(char_tokenize, "prompt:", labels, "!")
    model = FakeModel(seed=seed)

    exact = exact_probabilities(model, sequences)
    choice = choose_label(model, sequences)
    full = choose_label(FakeModel(seed=seed), sequences, tolerance=0.0, max_decodes=10**6)

    best = max(exact.values())
    assert exact[choice.label] == pytest.approx(best)
    assert full.exact and full.probabilities == pytest.approx(exact)
    for label, p in choice.probabilities.items():
        if choice.exact:
            assert p == pytest.approx(exact[label])
    assert sum(choice.probabilities.values()) == pytest.approx(1.0)
    assert choice.decodes <= len(full.probabilities)


def test_max_decodes_caps_exploration_after_the_best_label_is_certain():
    labels = ["".join(p) for p in itertools.product("ab", repeat=4)]  # 16 labels, a binary trie
    sequences = label_sequences(char_tokenize, ">", labels, ".")
    model = FakeModel(seed=7)
    capped = choose_label(model, sequences, tolerance=0.0, max_decodes=3)
    exact = exact_probabilities(FakeModel(seed=7), sequences)
    assert exact[capped.label] == pytest.approx(max(exact.values()))
    assert capped.decodes <= 3 + 4  # the cap, plus at most one decode per branch point on the best path


class FakeLlama:
    """What LlamaLogits touches of llama_cpp.Llama: a token cache, eval() and the last logits."""

    def __init__(self, vocab: int = 8):
        self.input_ids = np.zeros(64, dtype=np.intc)
        self.n_tokens = 0
        self.evaluated: list[list[int]] = []
        self._vocab = vocab
        self._logits = np.zeros(vocab, dtype=np.single)
        self._requires_eval = False
        outer = self

        class Ctx:
            def get_logits_ith(self, i):
                return outer._logits.ctypes.data_as(ctypes.POINTER(ctypes.c_float))

        self._ctx = Ctx()

    def n_vocab(self) -> int:
        return self._vocab

    def eval(self, tokens):
        self.evaluated.append(list(tokens))
        self.input_ids[self.n_tokens : self.n_tokens + len(tokens)] = tokens
        self.n_tokens += len(tokens)
        self._logits[:] = [float(self.n_tokens * 10 + v) for v in range(self._vocab)]
        self._requires_eval = False


def test_llama_logits_decodes_only_past_the_cached_prefix():
    llama = FakeLlama()
    logits = LlamaLogits(llama)

    assert logits([1, 2, 3, 4], [5, 6]) == [45.0, 46.0]
    assert logits([1, 2, 3, 7], [0]) == [40.0]  # a sibling branch: only its own token is decoded
    assert logits([1, 2, 3, 7], [1]) == [41.0]  # all cached: the last token is decoded again for its logits
    assert llama.evaluated == [[1, 2, 3, 4], [7], [7]]
    assert logits.decoded == 6
    assert llama._requires_eval  # the next generation re-reads its own prompt's logits


def test_a_recurrent_model_is_decoded_from_the_start_every_time():
    """A recurrent state cannot drop its tail, so no prefix is reused."""
    llama = FakeLlama()
    llama._is_recurrent = True
    resets = []
    llama.reset = lambda: (resets.append(True), setattr(llama, "n_tokens", 0))
    logits = LlamaLogits(llama)
    logits([1, 2, 3, 4], [5])
    logits([1, 2, 3, 7], [5])
    assert llama.evaluated == [[1, 2, 3, 4], [1, 2, 3, 7]] and len(resets) == 2
