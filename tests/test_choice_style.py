"""The ``choice`` follower style: what the request carries, how LabelAdapter reads each
label's probability from the reply, and the label server's answer (with a fake model)."""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import math
from typing import Any, Literal

import dspy
import numpy as np
import pytest
from support.chat_stub import ChatStub, completion

from dspy_promptmii.adapter import PROBABILITIES, LabelAdapter, label_probabilities
from dspy_promptmii.local.label_server import LabelChoiceError, answer, chat_prompt
from dspy_promptmii.protocol import CHOICE_PREFIX, CHOICE_SUFFIX, Protocol

LABELS = ["negative", "positive", "neutral"]


class Review(dspy.Signature):
    text: str = dspy.InputField()
    sentiment: Literal["negative", "positive", "neutral"] = dspy.OutputField()


def choice_reply(label: str, probabilities: dict[str, float]) -> dict[str, Any]:
    body = completion(CHOICE_PREFIX + label + CHOICE_SUFFIX)
    ranked = sorted(probabilities.items(), key=lambda item: -item[1])
    body["choices"][0]["logprobs"] = {
        "content": [
            {
                "token": label,
                "logprob": math.log(probabilities[label]),
                "bytes": None,
                "top_logprobs": [{"token": k, "logprob": math.log(v), "bytes": None} for k, v in ranked],
            }
        ]
    }
    return body


def _lm(stub: ChatStub) -> dspy.LM:
    return dspy.LM("hosted_vllm/follower", api_base=stub.url, api_key="local", cache=False, num_retries=0)


def test_the_request_names_the_labels_and_asks_for_their_logprobs():
    body = Protocol(constrained="choice").request_body("m", "Classify.", LABELS, {"text": "fine"}, ["text"])
    assert body["label_choice"] == {"labels": LABELS, "prefix": '{"label": "', "suffix": '"}'}
    assert body["logprobs"] is True and body["top_logprobs"] == 3
    assert "response_format" not in body and "grammar" not in body


@pytest.mark.parametrize("asynchronous", [False, True])
def test_predictions_carry_each_labels_probability(asynchronous):
    probabilities = {"positive": 0.7, "neutral": 0.2, "negative": 0.1}
    with ChatStub(lambda body, headers: (200, choice_reply("positive", probabilities))) as stub:
        program = dspy.Predict(Review)
        with dspy.context(lm=_lm(stub), adapter=LabelAdapter(constrained="choice")):
            if asynchronous:
                prediction = asyncio.run(program.acall(text="a joy"))
            else:
                prediction = program(text="a joy")
        [sent] = stub.bodies
    assert prediction.sentiment == "positive"
    assert prediction[PROBABILITIES] == pytest.approx({"negative": 0.1, "positive": 0.7, "neutral": 0.2})
    assert sent["label_choice"]["labels"] == LABELS  # LiteLLM forwarded the extra field as is
    assert sent["logprobs"] is True and sent["top_logprobs"] == 3


def test_a_server_that_ignores_the_choice_gives_no_probabilities_and_a_warning(caplog):
    with ChatStub(lambda body, headers: (200, "positive")) as stub:
        adapter = LabelAdapter(constrained="choice")
        with dspy.context(lm=_lm(stub), adapter=adapter), caplog.at_level(logging.WARNING, "dspy_promptmii.adapter"):
            first = dspy.Predict(Review)(text="a joy")
            dspy.Predict(Review)(text="a bore")
    assert first.sentiment == "positive" and PROBABILITIES not in first
    warnings = [r for r in caplog.records if "no label probabilities" in r.getMessage()]
    assert len(warnings) == 1  # once per adapter, not per call


def test_token_logprobs_of_generated_text_are_not_taken_for_label_probabilities():
    generated = {"content": [{"token": "pos", "logprob": -0.1, "top_logprobs": [{"token": "pos", "logprob": -0.1}]}]}
    assert label_probabilities(generated, LABELS) is None
    assert label_probabilities(None, LABELS) is None
    top = [{"token": "positive", "logprob": 0.0}]
    partial = {"content": [{"token": "positive", "logprob": -0.1, "top_logprobs": top}]}
    assert label_probabilities(partial, LABELS) == {"negative": 0.0, "positive": 1.0, "neutral": 0.0}


# --- the label server's answer, on a fake llama ----------------------------------------------

TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class CharLlama:
    """A llama_cpp.Llama stand-in: one token per character, logits favouring one letter."""

    def __init__(
        self, favourite: str = "p", chat_format: str = "chat_template.default", n_ctx: int = 4096, also: str = ""
    ):
        self.chat_format = chat_format
        self.chat_handler = None
        self.metadata = {"tokenizer.chat_template": TEMPLATE}
        self.input_ids = np.zeros(n_ctx, dtype=np.intc)
        self.n_tokens = 0
        self._n_ctx = n_ctx
        self._requires_eval = False
        self._logits = np.zeros(0x110000 // 64, dtype=np.single)
        self._logits[ord(favourite)] = 5.0
        for char in also:  # liked less than the favourite, more than the rest
            self._logits[ord(char)] = 3.0
        outer = self

        class Model:
            def token_get_text(self, token: int) -> str:
                return {1: "<|endoftext|>", 2: ""}[token]

        class Ctx:
            def get_logits_ith(self, i):
                return outer._logits.ctypes.data_as(ctypes.POINTER(ctypes.c_float))

        self._model, self._ctx = Model(), Ctx()

    def tokenize(self, data: bytes, add_bos: bool = False, special: bool = True) -> list[int]:
        return [ord(c) % len(self._logits) for c in data.decode("utf-8")]

    def n_vocab(self) -> int:
        return len(self._logits)

    def n_ctx(self) -> int:
        return self._n_ctx

    def token_eos(self) -> int:
        return 1

    def token_bos(self) -> int:
        return -1

    def eval(self, tokens):
        self.input_ids[self.n_tokens : self.n_tokens + len(tokens)] = tokens
        self.n_tokens += len(tokens)


def test_the_server_answers_with_the_likeliest_label_in_json_and_its_logprobs():
    body = Protocol(constrained="choice").request_body("m", "Classify.", LABELS, {"text": "fine"}, ["text"])
    llama = CharLlama(favourite="p")

    reply = answer(llama, body, "m")

    [choice] = reply["choices"]
    assert choice["message"]["content"] == '{"label": "positive"}'
    assert json.loads(choice["message"]["content"]) == {"label": "positive"}
    assert choice["finish_reason"] == "stop"
    [entry] = choice["logprobs"]["content"]
    top = {item["token"]: math.exp(item["logprob"]) for item in entry["top_logprobs"]}
    assert set(top) == set(LABELS) and sum(top.values()) == pytest.approx(1.0)
    assert max(top, key=top.get) == "positive" == entry["token"]
    prompt = chat_prompt(llama, body["messages"])
    assert prompt.startswith("<|im_start|>user\nClassify.") and prompt.endswith("<|im_start|>assistant\n")
    assert reply["usage"]["prompt_tokens"] == len(prompt + CHOICE_PREFIX)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda b: b["label_choice"].update(labels=[]), "non-empty list"),
        (lambda b: b["label_choice"].update(labels=["a", "a"]), "duplicates"),
        (lambda b: b["label_choice"].update(suffix=3), "strings"),
        (lambda b: b.update(label_choice="yes"), "must be an object"),
        (lambda b: b.update(messages=[]), "messages"),
        (lambda b: b["label_choice"].update(tolerance=2), "tolerance must be a number from 0 to 1"),
        (lambda b: b["label_choice"].update(tolerance="all"), "tolerance must be a number from 0 to 1"),
        (lambda b: b.update(stream=True), "without stream=true"),
        (lambda b: b.update(n=2), "n must be 1"),
    ],
)
def test_bad_choice_requests_are_refused_by_name(change, message):
    body = Protocol(constrained="choice").request_body("m", "Classify.", LABELS, {"text": "fine"}, ["text"])
    change(body)
    with pytest.raises(LabelChoiceError, match=message):
        answer(CharLlama(), body, "m")


def test_a_model_without_its_own_chat_template_is_refused():
    body = Protocol(constrained="choice").request_body("m", "Classify.", LABELS, {"text": "fine"}, ["text"])
    with pytest.raises(LabelChoiceError, match="chat template"):
        answer(CharLlama(chat_format="chatml"), body, "m")


def test_a_prompt_longer_than_the_context_is_refused():
    body = Protocol(constrained="choice").request_body("m", "Classify.", LABELS, {"text": "x" * 600}, ["text"])
    with pytest.raises(LabelChoiceError, match="more than the context"):
        answer(CharLlama(n_ctx=512), body, "m")


def test_tolerance_zero_explores_every_branch_and_the_default_stops_at_the_best_label():
    labels = ["alarm_set", "alarm_query", "weather"]  # one shared prefix: a branch point below the first
    body = Protocol(constrained="choice").request_body("m", "Classify.", labels, {"text": "fine"}, ["text"])

    def probabilities(reply):
        top = reply["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
        return {item["token"]: math.exp(item["logprob"]) for item in top}

    fast = probabilities(answer(CharLlama(favourite="w", also="q"), body, "m"))  # "weather" certain at once
    body["label_choice"]["tolerance"] = 0
    exact = probabilities(answer(CharLlama(favourite="w", also="q"), body, "m"))
    assert max(fast, key=fast.get) == max(exact, key=exact.get) == "weather"
    assert fast["weather"] == pytest.approx(exact["weather"])  # the chosen label's probability is exact
    assert fast["alarm_set"] == fast["alarm_query"]  # its unexplored branch shared evenly
    assert exact["alarm_query"] > 10 * exact["alarm_set"]  # explored: "q" is liked, "s" is not
    assert fast["alarm_set"] + fast["alarm_query"] == pytest.approx(exact["alarm_set"] + exact["alarm_query"])
    assert sum(fast.values()) == pytest.approx(1.0) and sum(exact.values()) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "labels, favourite",
    [
        (['say "hi"', "bye"], "s"),
        (["a\\b", "c"], "a"),
        (['a"}', "a"], "a"),  # the answer's suffix inside a label: told apart once escaped
        (["tab\there", "other"], "t"),
    ],
)
def test_a_label_that_json_escapes_is_written_and_scored_escaped_and_parses_back(labels, favourite):
    protocol = Protocol(constrained="choice")
    body = protocol.request_body("m", "Classify.", labels, {"text": "fine"}, ["text"])

    reply = answer(CharLlama(favourite=favourite), body, "m")

    content = reply["choices"][0]["message"]["content"]
    [entry] = reply["choices"][0]["logprobs"]["content"]
    assert json.loads(content) == {"label": entry["token"]}  # valid JSON, as json_object writes it
    assert protocol.parse(content, labels) == entry["token"] == labels[0]
    top = {item["token"]: math.exp(item["logprob"]) for item in entry["top_logprobs"]}
    assert set(top) == set(labels) and sum(top.values()) == pytest.approx(1.0)


def test_plain_labels_carry_no_texts():
    body = Protocol(constrained="choice").request_body("m", "Classify.", ["été", "😀"], {"text": "x"}, ["text"])
    assert "texts" not in body["label_choice"]
