"""dspy-promptmii: Prompt-MII instruction induction as a DSPy optimizer.

>>> import dspy
>>> from dspy_promptmii import PromptMIIOptimizer
>>> optimizer = PromptMIIOptimizer(generator_lm=dspy.LM("openai/gpt-4o-mini"), n=20)
>>> compiled = optimizer.compile(program, trainset=trainset)  # doctest: +SKIP

Names are imported on first use, so that ``dspy_promptmii.protocol`` (the one protocol,
which needs only scikit-learn) can be used where DSPy is not installed, e.g. by the
training reward on GPU nodes.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "PromptMIIOptimizer": "dspy_promptmii.optimizer",
    "GenerationError": "dspy_promptmii.optimizer",
    "PromptBudgetError": "dspy_promptmii.optimizer",
    "choose_template": "dspy_promptmii.optimizer",
    "LabelAdapter": "dspy_promptmii.adapter",
    "Protocol": "dspy_promptmii.protocol",
    "evaluate": "dspy_promptmii.evaluation",
    "load_library": "dspy_promptmii.library",
    "label_response_format": "dspy_promptmii.protocol",
    "NAIVE_INSTRUCTION": "dspy_promptmii.protocol",
    "TEMPLATES": "dspy_promptmii.protocol",
    "format_line": "dspy_promptmii.protocol",
    "macro_f1": "dspy_promptmii.protocol",
    "parse_label": "dspy_promptmii.protocol",
    "score": "dspy_promptmii.protocol",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from dspy_promptmii.adapter import LabelAdapter
    from dspy_promptmii.evaluation import evaluate
    from dspy_promptmii.library import load_library
    from dspy_promptmii.optimizer import GenerationError, PromptBudgetError, PromptMIIOptimizer, choose_template
    from dspy_promptmii.protocol import (
        NAIVE_INSTRUCTION,
        TEMPLATES,
        Protocol,
        format_line,
        label_response_format,
        macro_f1,
        parse_label,
        score,
    )


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dspy_promptmii' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
