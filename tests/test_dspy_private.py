"""The DSPy internals dspy_promptmii.dspy_private wraps are still where and what they were:
this fails loudly, naming the one that changed, when DSPy moves or changes one."""

from __future__ import annotations

from typing import Literal

import dspy

from dspy_promptmii import dspy_private
from dspy_promptmii.generation import finish_reason


class Review(dspy.Signature):
    text: str = dspy.InputField()
    label: Literal["pos", "neg"] = dspy.OutputField()


def test_every_private_dspy_function_is_still_there() -> None:
    assert dspy_private.MISSING == [], f"DSPy moved {dspy_private.MISSING}: update dspy_promptmii/dspy_private.py"


def test_default_instructions_are_dspys_own() -> None:
    assert dspy_private.default_instructions(Review) == "Given the fields `text`, produce the fields `label`."
    assert Review.instructions == dspy_private.default_instructions(Review)


def test_reasoning_models_by_dspys_rule() -> None:
    assert dspy_private.is_openai_reasoning_model("openai/o3-mini")
    assert dspy_private.is_openai_reasoning_model("gpt-5")
    assert not dspy_private.is_openai_reasoning_model("openai/gpt-4o-mini")
    assert not dspy_private.is_openai_reasoning_model("hosted_vllm/qwen2.5")


def test_declared_inputs_by_the_public_api() -> None:
    assert dspy_private.declared_inputs(dspy.Example(text="a", label="pos").with_inputs("text")) == ("text",)
    assert dspy_private.declared_inputs(dspy.Example(text="a", label="pos")) == ()


def test_the_finish_reason_is_read_from_the_history_dspy_keeps() -> None:
    from fakes import fake_lm

    lm, _ = fake_lm(["An instruction."])
    lm("the meta-prompt")
    entry = lm.history[-1]
    assert {"prompt", "messages", "response"} <= set(entry), "DSPy changed the shape of lm.history"
    assert dspy_private.finish_reason_of(lm, "the meta-prompt", finish_reason) == finish_reason(entry["response"])
    assert dspy_private.finish_reason_of(lm, "another prompt", finish_reason) is None
