#!/usr/bin/env bash
# Round 2 of issue 18, on-policy: k=6 samples of the shipped round-1 generator
# (promptmii-qwen2.5-0.5b = the base model + the round-1d LoRA) on new training contexts
# (seed 3: other shown and held-out rows of the same train tasks; never a held-out validation
# task, never a dev task), each scored with the follower's reward as in round 1.
# Resumes where it stopped; stop it with SIGTERM (SIGINT is ignored under nohup):
#   pkill -TERM -f "training.rollouts --out training/rft/round2/rollouts"
# Run from the repository root, never beside a torch job. Afterwards: bash training/rft/run_round2_train.sh
set -euo pipefail
python -m training.rollouts --out training/rft/round2/rollouts --seed 3 --samples 6 \
  --generator promptmii-qwen2.5-0.5b --no-progress
