"""ICL on the demo's split with the 20 demos inline in one user message vs as chat turns.

Same follower, rows, demos and constrained decoding as `promptmii demo --test-rows 40`;
only `LabelAdapter(demos=...)` changes. Run from the repository root:

    python benchmarks/results/adapters-2026-11-21/demos_inline_vs_turns.py
"""

import json
from pathlib import Path

import dspy

from dspy_promptmii.adapter import FOLLOWER_REPLY_LIMIT, LabelAdapter
from dspy_promptmii.baselines import icl_program
from dspy_promptmii.data import split_rows
from dspy_promptmii.demo import demo_task
from dspy_promptmii.evaluation import evaluate
from dspy_promptmii.routes import LMPool
from dspy_promptmii.sampling import select_examples

N, TEST_ROWS, SEED = 20, 40, 0

task = demo_task()
pool_rows, test_rows = split_rows(task.rows, train=len(task.rows) - TEST_ROWS, test=TEST_ROWS, seed=SEED)
shown = [ex for ex, _ in select_examples([(ex, ex.label) for ex in task.examples(pool_rows)], N, SEED)]
test = task.examples(test_rows)
program = icl_program(dspy.Predict(task.signature()), shown)

results = {}
with LMPool() as pool:
    follow = pool.endpoint("local", temperature=0.0, max_tokens=FOLLOWER_REPLY_LIMIT["label"], cache=False)
    for style in ("inline", "turns"):
        adapter = LabelAdapter(constrained=follow.constrained_style, demos=style)
        result = evaluate(program, test, lm=follow.lm, adapter=adapter, progress=False)
        results[style] = {
            "macro_f1": round(result.macro_f1, 3),
            "invalid_rate": result.invalid_rate,
            "prompt_tokens_per_query": result.prompt_tokens_per_query,
            "eval_seconds": result.seconds,
        }
        print(style, results[style], flush=True)

Path(__file__).with_name("demos-inline-vs-turns.json").write_text(json.dumps(results, indent=2) + "\n")
