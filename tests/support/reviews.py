"""A two-label review task shared by the option and pipeline tests: its signature, n
labelled examples (odd rows praise, even rows complain), and an instruction that names
the rule."""

from __future__ import annotations

from typing import Literal

import dspy

GOOD = "Praise means pos; complaints mean neg."


class Review(dspy.Signature):
    text: str = dspy.InputField()
    label: Literal["pos", "neg"] = dspy.OutputField()


def reviews(n: int) -> list[dspy.Example]:
    return [
        dspy.Example(text=f"review {i}: {'loved it' if i % 2 else 'hated it'}", label="pos" if i % 2 else "neg")
        .with_inputs("text")
        for i in range(n)
    ]
