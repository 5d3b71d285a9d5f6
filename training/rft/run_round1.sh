#!/usr/bin/env bash
# Round 1 of rejection-sampling fine-tuning on the 2-core CPU (issue 18): the validation reward
# of the untrained generator, then k=6 samples per training context. Both resume where they
# stopped; run from the repository root.
set -euo pipefail
R=training/rft
python -m training.rollouts --split valid --out $R/round0/valid --no-progress
python -m training.rollouts --out $R/round1/rollouts --seed 1 --samples 6 --no-progress
