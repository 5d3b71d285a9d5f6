#!/usr/bin/env bash
# Round 1 again, with the winner's-curse check (issue 18): the targets training.select would
# keep are scored once more on fresh rows (training.confirm), only the confirmed ones are SFT
# pairs; then SFT from the untrained generator, export, and the validation reward on the same
# 12 held-out contexts as rounds 0 and 1. Run from the repository root after run_round1.sh
# stopped (never a torch job beside a llama.cpp server). Every step resumes or redoes cheaply.
set -euo pipefail
R=training/rft
python -m training.confirm --rollouts $R/round1/rollouts --out $R/round1/confirm --no-progress
python -m training.select --rollouts $R/round1/rollouts --confirm $R/round1/confirm --out $R/round1c/select
python -m training.sft --pairs $R/round1c/select --out $R/round1c/sft --seed 1 \
  --lora-r 8 --lora-alpha 16 --epochs "${EPOCHS:-3}" --batch-size "${BATCH:-4}" --lr "${LR:-0.0002}" \
  --valid-fraction 0 \
  --no-progress ${SFT_ARGS:-}
python -m training.export --run $R/round1c/sft --out $R/round1c/adapter.gguf --round 1 \
  --name promptmii-qwen2.5-0.5b
python -m training.rollouts --split valid --out $R/round1c/valid --lora $R/round1c/adapter.gguf --no-progress
