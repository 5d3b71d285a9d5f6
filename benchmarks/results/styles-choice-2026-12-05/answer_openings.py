"""Which answer opening should the ``choice`` style score labels after?

Under ``json_object`` the 0.5B follower opens its answer in more than one way
(``{"label": "``, ``{"label":"``, ``{ "label": "``), so a fixed opening is a choice. On
the instructions and test rows of this run's results (the style study's 12 cells), in
one process with llama.cpp (no server), each test row is scored four ways:

* ``spaced``: labels after ``{"label": "`` (the protocol's CHOICE_PREFIX: what the server does);
* ``compact``: labels after ``{"label":"``;
* ``marginal``: each label's probability summed over the three openings, each weighted by
  the model's probability of writing that opening (constrained to the three);
* ``joint``: the most probable (opening, label) pair, as greedy json_object decoding
  would pick the opening first.

Run from the repository root:
    PYTHONPATH=. python benchmarks/results/styles-choice-2026-12-05/answer_openings.py \\
        benchmarks/results/styles-choice-2026-12-05/results.jsonl
"""

import json
import statistics
import sys
import time

import llama_cpp

from benchmarks.tasks import DEFAULT_DATA_DIR, make_split
from dspy_promptmii.adapter import LabelAdapter
from dspy_promptmii.data import load_task
from dspy_promptmii.local.label_choice import choose_label, label_sequences
from dspy_promptmii.local.label_server import LlamaLogits, chat_prompt
from dspy_promptmii.local.pull import cached_path
from dspy_promptmii.protocol import CHOICE_SUFFIX, Protocol

OPENINGS = ['{"label": "', '{"label":"', '{ "label": "']
VARIANTS = ["spaced", "compact", "marginal", "joint"]

llm = llama_cpp.Llama(str(cached_path("qwen2.5-coder-0.5b-instruct")), n_ctx=8192, n_threads=2, verbose=False)


def tokenize(text: str) -> list[int]:
    return llm.tokenize(text.encode(), add_bos=False, special=True)


adapter = LabelAdapter(protocol=Protocol(demo_style="turns", constrained="choice"))
scores = {}
for record in map(json.loads, open(sys.argv[1])):
    task = load_task(f"{DEFAULT_DATA_DIR}/{record['task']}")
    split = make_split(task, record["test_rows"], seed=record["seed"])
    labels, fields = list(task.labels), list(task.input_fields)
    signature = task.signature().with_instructions(record["instruction"])
    predicted = {name: [] for name in VARIANTS}
    gold = []
    started = time.time()
    for row in split.test:
        prompt = chat_prompt(llm, adapter.format(signature, [], {f: row[f] for f in fields}))
        logits = LlamaLogits(llm)
        given = {
            w: choose_label(logits, label_sequences(tokenize, prompt + w, labels, CHOICE_SUFFIX)) for w in OPENINGS
        }
        opening = choose_label(logits, label_sequences(tokenize, prompt, OPENINGS, "")).probabilities
        marginal = {label: sum(opening[w] * given[w].probabilities[label] for w in OPENINGS) for label in labels}
        pairs = [(w, label) for w in OPENINGS for label in labels]
        joint = max(pairs, key=lambda pair: opening[pair[0]] * given[pair[0]].probabilities[pair[1]])
        predicted["spaced"].append(given[OPENINGS[0]].label)
        predicted["compact"].append(given[OPENINGS[1]].label)
        predicted["marginal"].append(max(marginal, key=marginal.get))
        predicted["joint"].append(joint[1])
        gold.append(row["label"])
    cell = {name: round(Protocol.score(gold, p)["macro_f1"], 4) for name, p in predicted.items()}
    scores[(record["task"], record["method"])] = cell
    print(record["task"], record["method"], json.dumps(cell), f"{time.time() - started:.0f} s", flush=True)
means = {name: round(statistics.mean(cell[name] for cell in scores.values()), 4) for name in VARIANTS}
print("mean macro-F1 over the cells:", means)
