#!/usr/bin/env bash
# Round 1, second half (issue 18): select the targets from the round-1 rollouts, LoRA SFT on them
# (never beside a llama.cpp server: stop run_round1.sh first), export the adapter as a GGUF LoRA,
# then the validation reward of the round-1 generator (greedy, the same 12 held-out contexts as
# round 0). Every step resumes or redoes cheaply; run from the repository root.
set -euo pipefail
R=training/rft
python -m training.select --rollouts $R/round1/rollouts --out $R/round1/select
python -m training.sft --pairs $R/round1/select --out $R/round1/sft --seed 1 \
  --lora-r 8 --lora-alpha 16 --epochs "${EPOCHS:-3}" --batch-size "${BATCH:-4}" --lr "${LR:-0.0002}" \
  --valid-fraction 0 \
  --no-progress ${SFT_ARGS:-}
python -m training.export --run $R/round1/sft --out $R/round1/adapter.gguf --round 1 \
  --name promptmii-qwen2.5-0.5b
python -m training.rollouts --split valid --out $R/round1/valid --lora $R/round1/adapter.gguf --no-progress
