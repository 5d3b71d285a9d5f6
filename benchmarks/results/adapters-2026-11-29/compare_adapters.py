"""The follower prompt on the demo's split: LabelAdapter (each constrained-decoding style,
demos as chat turns or inline) against DSPy's ChatAdapter, for the naive instruction, ICL
with the 20 shown examples, and one Prompt-MII instruction (compiled once, with the
demo's default settings, then followed through every adapter).

Same 40 held-out SNIPS rows and 20 shown examples as `promptmii demo --test-rows 40`.
Run from the repository root (writes adapters.json beside this file):

    python benchmarks/results/adapters-2026-11-29/compare_adapters.py
"""

import json
import time
from pathlib import Path

import dspy

from dspy_promptmii.adapter import FOLLOWER_REPLY_LIMIT, LabelAdapter
from dspy_promptmii.baselines import icl_program, naive_program
from dspy_promptmii.data import split_rows
from dspy_promptmii.demo import DEMO_EXEMPLARS, DEMO_GENERATOR, DEMO_MAX_INSTRUCTION_TOKENS, demo_task
from dspy_promptmii.evaluation import evaluate
from dspy_promptmii.generation import budget_limit
from dspy_promptmii.optimizer import PromptMIIOptimizer, meta_prompt_budget
from dspy_promptmii.protocol import Protocol
from dspy_promptmii.routes import LMPool
from dspy_promptmii.sampling import select_examples

N, TEST_ROWS, SEED = 20, 40, 0

task = demo_task()
pool_rows, test_rows = split_rows(task.rows, train=len(task.rows) - TEST_ROWS, test=TEST_ROWS, seed=SEED)
pool = task.examples(pool_rows)
shown = [ex for ex, _ in select_examples([(ex, ex.label) for ex in pool], N, SEED)]
test = task.examples(test_rows)
student = dspy.Predict(task.signature())

results: dict = {"test_rows": TEST_ROWS, "n": N, "seed": SEED, "rows": []}
with LMPool() as lms:
    plain = lms.endpoint("local", cache=False)  # LabelAdapter: the protocol sets temperature and reply limit
    chat = lms.endpoint("local", temperature=0.0, max_tokens=FOLLOWER_REPLY_LIMIT["chat"], cache=False)
    limit = budget_limit(DEMO_MAX_INSTRUCTION_TOKENS)  # as the demo
    generator = lms.endpoint(DEMO_GENERATOR or "local", max_tokens=limit, cache=False)
    optimizer = PromptMIIOptimizer(
        generator_lm=generator.lm,
        n=N,
        seed=SEED,
        exemplars=DEMO_EXEMPLARS,
        max_instruction_tokens=DEMO_MAX_INSTRUCTION_TOKENS,
        max_prompt_tokens=meta_prompt_budget(generator.context_tokens, 1024),
        token_counter=generator.token_counter,
    )
    compiled = optimizer.compile(student, trainset=pool)
    results["instruction"] = compiled.signature.instructions
    programs = {"naive": naive_program(student), "icl": icl_program(student, shown), "prompt-mii": compiled}

    def label(constrained: str | bool, demos: str) -> LabelAdapter:
        return LabelAdapter(protocol=Protocol(constrained=constrained, demo_style=demos))

    variants = [
        ("LabelAdapter json_object, demos as turns", plain, label("json_object", "turns")),
        ("LabelAdapter json_object, demos inline", plain, label("json_object", "inline")),
        ("LabelAdapter grammar, demos as turns", plain, label("grammar", "turns")),
        ("LabelAdapter unconstrained, demos as turns", plain, label(False, "turns")),
        ("DSPy ChatAdapter", chat, dspy.ChatAdapter()),
    ]
    for name, endpoint, adapter in variants:
        for method, program in programs.items():
            if method != "icl" and "inline" in name:
                continue  # without demos, inline and turns are the same prompt
            started = time.perf_counter()
            result = evaluate(program, test, lm=endpoint.lm, adapter=adapter, progress=False)
            row = {
                "adapter": name,
                "method": method,
                "macro_f1": round(result.macro_f1, 3),
                "accuracy": round(result.accuracy, 3),
                "invalid_rate": result.invalid_rate,
                "errors": result.errors,
                "prompt_tokens_per_query": result.prompt_tokens_per_query,
                "calls": result.calls,
                "seconds": round(time.perf_counter() - started, 1),
            }
            results["rows"].append(row)
            print(json.dumps(row), flush=True)

Path(__file__).with_name("adapters.json").write_text(json.dumps(results, indent=2) + "\n")
