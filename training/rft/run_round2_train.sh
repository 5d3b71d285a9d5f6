#!/usr/bin/env bash
# Round 2 of issue 18, second half (after run_round2.sh stopped; never beside a llama.cpp job):
# the winner's-curse check of the round-2 targets on fresh rows (training.confirm, its own
# folder), selection, then SFT from the untrained generator on the confirmed pairs of both
# rounds (round 1d's and round 2's: expert iteration as STaR does it, a fresh adapter), export,
# and the validation reward on the same held-out contexts, the curve round0 -> round1d -> round2.
# Run from the repository root; every step resumes or redoes cheaply.
set -euo pipefail
R=training/rft
python -m training.confirm --rollouts $R/round2/rollouts --out $R/round2/confirm --no-progress
ROLLOUTS=$R/round2/rollouts OUT=$R/round2 SELECT_ARGS="--confirm $R/round2/confirm" \
  PAIRS="$R/round1d/select $R/round2/select" ROUND=2 CURVE="round1d=$R/round1d/valid_large" \
  bash "$(dirname "$0")/run_round1_train.sh"
