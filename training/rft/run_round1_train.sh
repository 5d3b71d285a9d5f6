#!/usr/bin/env bash
# Round 1, second half (issue 18): select the targets from the round-1 rollouts, LoRA SFT on them
# (never beside a llama.cpp server: stop run_round1.sh first), export the adapter as a GGUF LoRA,
# then the validation reward of the round-1 generator (greedy, the same 12 held-out contexts as
# round 0, then the larger set of run_valid_large.sh: 24 contexts x 40 rows) and the validation
# curve against round 0 (training.validation). Every step resumes or redoes cheaply; run from the
# repository root.
# OUT (default training/rft/round1) is the folder of this try; SELECT_ARGS go to training.select;
# ROLLOUTS (space-separated) are the rollouts folders to pool; PAIRS (space-separated, default
# OUT/select) the SFT pairs (a later round adds the earlier rounds' select folders); ROUND the
# round number recorded by the export (1); CURVE more NAME=valid_large folders for the curve.
set -euo pipefail
R=training/rft
OUT=${OUT:-$R/round1}
# shellcheck disable=SC2086 # ROLLOUTS is a list of folders (default the seed-1 folder)
python -m training.select --rollouts ${ROLLOUTS:-$R/round1/rollouts} --out $OUT/select ${SELECT_ARGS:-}
# shellcheck disable=SC2086 # PAIRS is a list of folders
python -m training.sft --pairs ${PAIRS:-$OUT/select} --out $OUT/sft --seed 1 \
  --lora-r 8 --lora-alpha 16 --epochs "${EPOCHS:-3}" --batch-size "${BATCH:-4}" --lr "${LR:-0.0002}" \
  --valid-fraction 0 \
  --no-progress ${SFT_ARGS:-}
python -m training.export --run $OUT/sft --out $OUT/adapter.gguf --round "${ROUND:-1}" \
  --name promptmii-qwen2.5-0.5b
python -m training.rollouts --split valid --out $OUT/valid --lora $OUT/adapter.gguf --no-progress
python -m training.rollouts --split valid --repeats 2 --m 40 --out $OUT/valid_large --lora $OUT/adapter.gguf \
  --no-progress
# shellcheck disable=SC2086 # CURVE is a list of NAME=FOLDER
python -m training.validation round0=$R/round0/valid_large ${CURVE:-} "$(basename "$OUT")=$OUT/valid_large" \
  --out $OUT/valid_large.md
