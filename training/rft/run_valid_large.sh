#!/usr/bin/env bash
# A larger validation set (issue 18): the 12 held-out contexts of rounds 0-1 measure a
# generator's reward with a per-context spread of about 0.12 (round 1c - round 0), too wide to
# see +0.05. Here the same held-out tasks (--split-seed 0), 2 contexts per task and shot count
# (--repeats 2; repeat 0 is the context already measured) and 40 scored rows each (--m 40):
# 24 contexts x 40 rows for the untrained generator and for the round-1c adapter, greedy.
# Resumes; run from the repository root, never beside a torch job.
set -euo pipefail
R=training/rft
ARGS="--split valid --repeats 2 --m 40 --no-progress"
python -m training.rollouts $ARGS --out $R/round0/valid_large
python -m training.rollouts $ARGS --out $R/round1c/valid_large --lora $R/round1c/adapter.gguf
