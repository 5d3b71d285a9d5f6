"""dspy-promptmii: Prompt-MII instruction induction as a DSPy optimizer.

>>> import dspy
>>> from dspy_promptmii import PromptMIIOptimizer
>>> optimizer = PromptMIIOptimizer(generator_lm=dspy.LM("openai/gpt-4o-mini"), n=20)
>>> compiled = optimizer.compile(program, trainset=trainset)  # doctest: +SKIP
"""

from dspy_promptmii.adapter import LabelAdapter, label_response_format
from dspy_promptmii.optimizer import GenerationError, PromptBudgetError, PromptMIIOptimizer, choose_template
from dspy_promptmii.protocol import INVALID, NAIVE_INSTRUCTION, TEMPLATES, format_line, macro_f1, parse_label, score

__version__ = "0.1.0"

__all__ = [
    "PromptMIIOptimizer",
    "LabelAdapter",
    "label_response_format",
    "GenerationError",
    "PromptBudgetError",
    "choose_template",
    "INVALID",
    "NAIVE_INSTRUCTION",
    "TEMPLATES",
    "format_line",
    "macro_f1",
    "parse_label",
    "score",
]
