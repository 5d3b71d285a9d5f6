"""The baselines Prompt-MII is compared with: a naive instruction, and in-context
learning (ICL) with the same labelled examples as demos."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import dspy
from dspy.teleprompt import LabeledFewShot

from dspy_promptmii.protocol import Protocol, naive_instruction, with_format_line
from dspy_promptmii.secrets import protected_logger
from dspy_promptmii.task import classification_tasks

logger = protected_logger(__name__)

__all__ = ["naive_program", "icl_program", "fit_icl_demos"]


def naive_program(student: dspy.Module) -> dspy.Module:
    """A copy of ``student`` whose classifiers carry the naive instruction (plus format
    line); other predictors are left as they are. The student is not modified."""
    program = student.deepcopy()
    for _, predictor, task in classification_tasks(program):
        if task is not None:
            instruction = with_format_line(naive_instruction(task.labels), task.labels)
            predictor.signature = predictor.signature.with_instructions(instruction)
    return program


#: Chat-template tokens around each message (ChatML: ``<|im_start|>role\n`` ... ``<|im_end|>\n``;
#: Llama 3's headers are about as long). Counted when the prompt has several messages.
MESSAGE_OVERHEAD = 6


def fit_icl_demos(
    student: dspy.Module,
    examples: Sequence[dspy.Example],
    max_prompt_tokens: int,
    token_counter: Callable[[str], int],
    longest_input: dict[str, str] | None = None,
    protocol: Protocol | None = None,
) -> int:
    """The largest k such that the follower prompt (``protocol``'s, default
    ``Protocol()``) with the first k examples as demos and the longest input fits
    ``max_prompt_tokens``; 0 if none fits. A prompt of several messages (demos as turns)
    also costs :data:`MESSAGE_OVERHEAD` tokens per message. Raises ``ValueError`` for a
    program with no classification predictor."""
    protocol = protocol or Protocol()
    tasks = [task for _, _, task in classification_tasks(student) if task is not None]
    if not tasks:
        raise ValueError("the program has no classification predictor")
    task = tasks[-1]

    def tokens(k: int) -> int:
        demos = [({f: ex[f] for f in task.input_fields}, task.label_of(ex[task.label_field])) for ex in examples[:k]]
        query = longest_input or {f: examples[0][f] for f in task.input_fields}
        messages = protocol.messages(
            naive_instruction(task.labels), task.labels, query, task.input_fields, demos, task.descriptions
        )
        framing = MESSAGE_OVERHEAD * len(messages) if len(messages) > 1 else 0
        return sum(token_counter(message["content"]) for message in messages) + framing

    low, high = 0, len(examples)
    while low < high:
        mid = (low + high + 1) // 2
        if tokens(mid) <= max_prompt_tokens:
            low = mid
        else:
            high = mid - 1
    return low


def icl_program(student: dspy.Module, examples: Sequence[dspy.Example]) -> dspy.Module:
    """The naive program with ``examples`` (in the given order) as every predictor's demos,
    through DSPy's ``LabeledFewShot``. The student is not modified."""
    return LabeledFewShot(k=len(examples)).compile(naive_program(student), trainset=list(examples), sample=False)
