#!/usr/bin/env bash
# Round 1 again, with the winner's-curse check (issue 18): the targets training.select would
# keep are scored once more on fresh rows (training.confirm), only the confirmed ones are SFT
# pairs; then SFT from the untrained generator, export, and the validation reward on the same
# 12 held-out contexts as rounds 0 and 1 (run_round1_train.sh, in OUT: training/rft/round1c by
# default; OUT=training/rft/round1d for a try on more rollouts; ROLLOUTS="A B" pools folders). Run from
# the repository root after run_round1.sh stopped (never a torch job beside a llama.cpp server).
set -euo pipefail
R=training/rft
# ROLLOUTS: the rollouts folders to pool (space-separated; default the seed-1 folder).
ROLLOUTS=${ROLLOUTS:-$R/round1/rollouts}
export ROLLOUTS
# shellcheck disable=SC2086 # ROLLOUTS is a list of folders
python -m training.confirm --rollouts $ROLLOUTS --out $R/round1/confirm --no-progress
OUT=${OUT:-$R/round1c} SELECT_ARGS="--confirm $R/round1/confirm" bash "$(dirname "$0")/run_round1_train.sh"
