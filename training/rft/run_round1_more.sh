#!/usr/bin/env bash
# More round-1 data (issue 18): k=6 samples of the untrained generator on new training contexts.
# Another --seed draws other shown and held-out rows of the same train tasks (never a held-out
# validation task, never a dev task); each seed has its own folder, and training.confirm and
# training.select pool folders by context. Resumes where it stopped; run from the repository root.
#   SEED=2 bash training/rft/run_round1_more.sh
# then train on every folder:
#   ROLLOUTS="training/rft/round1/rollouts training/rft/round1/rollouts-seed2" OUT=training/rft/round1e \
#     bash training/rft/run_round1_confirmed.sh
set -euo pipefail
SEED=${SEED:-2}
python -m training.rollouts --out training/rft/round1/rollouts-seed$SEED --seed "$SEED" --samples 6 --no-progress
