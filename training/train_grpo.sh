#!/usr/bin/env bash
# Prompt-MII GRPO meta-training with OpenRLHF 0.11.2 (Ray + DeepSpeed + vLLM), with the
# paper's settings (../shared/DESIGN.md section 4), in two configurations:
#
#   training/train_grpo.sh paper [extra OpenRLHF flags]   # 8 GPUs: policy training + separate follower
#   training/train_grpo.sh smoke [extra OpenRLHF flags]   # 1 GPU: 0.5B policy, everything colocated
#
# Before: build the data (python -m training.build_data --out "$DATA_DIR" ...), start
# the follower (training/serve_follower.sh) and a Ray head (`ray start --head ...`, see
# training/README.md). Each rollout is scored by training/agent.py: the policy writes an
# instruction, the follower labels the m=20 test examples with it, reward = macro-F1.
#
# Environment (default):
#   POLICY       policy to train        (paper: meta-llama/Llama-3.1-8B-Instruct; smoke: Qwen/Qwen2.5-0.5B-Instruct)
#   DATA_DIR     build_data output      ($REPO/data/promptmii)
#   OUT_DIR      run folder             ($REPO/runs/promptmii-<config>): hf/ = final HF model, ckpt/, tb/
#   RAY_ADDRESS  Ray dashboard          (http://127.0.0.1:8265)
#   PROMPTMII_FOLLOWER_URL, PROMPTMII_FOLLOWER_MODEL, PROMPTMII_FOLLOWER_CONCURRENCY, ...
#                the follower (training/follower.py); passed to the Ray workers
#   PROMPTMII_PRINT_ARGS=1  print the OpenRLHF arguments (NUL-separated) and exit
#   PROMPTMII_SKIP_CHECK=1  launch without first checking the flags against the installed OpenRLHF
set -euo pipefail

CONFIG=${1:-}
if [[ $CONFIG != paper && $CONFIG != smoke ]]; then
  echo "usage: $0 {paper|smoke} [extra OpenRLHF flags]" >&2
  exit 2
fi
shift

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DATA_DIR=${DATA_DIR:-$REPO/data/promptmii}
OUT_DIR=${OUT_DIR:-$REPO/runs/promptmii-$CONFIG}
RAY_ADDRESS=${RAY_ADDRESS:-http://127.0.0.1:8265}

# --- the paper's GRPO settings (both configurations) -----------------------------------
COMMON=(
  # GRPO: group-normalised advantages over 5 rollouts per prompt, no critic
  --algo.advantage.estimator group_norm
  --rollout.n_samples_per_prompt 5
  # DAPO clip-higher (0.2 low / 0.4 high), dual clip 3.0, every sequence weighs the same
  --actor.eps_clip_low_high 0.2 0.4
  --actor.dual_clip 3.0
  --actor.loss_agg_mode seq-mean-token-mean
  # no KL term (and so no reference model)
  --algo.kl.init_coef 0
  --actor.adam.lr 2e-6
  --actor.lr_warmup_ratio 0.033
  --rollout.temperature 1.0
  --rollout.top_p 1.0
  # prompt <= 4096 tokens (build_data drops longer ones) + response <= 1024
  --data.max_len 5120
  --rollout.max_new_tokens 1024
  --train.max_epochs 1
  --train.seed 42
  # data written by python -m training.build_data
  --data.prompt_dataset "$DATA_DIR/train.jsonl"
  --data.input_key prompt
  --data.label_key label
  --data.apply_chat_template
  # reward: the follower's macro-F1 on the m test examples (async agent, concurrent follower calls)
  --train.agent_func_path "$REPO/training/agent.py"
  --vllm.enable_prefix_caching
  --ds.param_dtype bf16
  --actor.gradient_checkpointing_enable
  --ckpt.output_dir "$OUT_DIR/hf"
  --ckpt.path "$OUT_DIR/ckpt"
  --ckpt.save_hf
  --logger.tensorboard_dir "$OUT_DIR/tb"
)
if [[ -s $DATA_DIR/valid.jsonl ]]; then
  # held-out tasks; greedy, one sample: eval_promptmii_pass1 = mean macro-F1
  COMMON+=(
    --eval.dataset "$DATA_DIR/valid.jsonl"
    --eval.temperature 0
    --eval.n_samples_per_prompt 1
    --ckpt.best_metric_key eval_promptmii_pass1
  )
fi

case $CONFIG in
  paper)
    # 8 x 80 GB GPUs (A100/H100), one node. GPUs 0-1: the follower (serve_follower.sh,
    # Llama-3.1-8B-Instruct, one replica per GPU). GPUs 2-7 belong to Ray
    # (CUDA_VISIBLE_DEVICES=2,3,4,5,6,7 ray start --head --num-gpus 6):
    #   - 4 GPUs DeepSpeed ZeRO-3 actor, 8B policy: weights + grads + Adam states
    #     ~ 16 B/param x 8e9 = 128 GB / 4 = ~32 GB per GPU, plus activations of
    #     2 x 5120-token micro-batches with gradient checkpointing: ~40-50 GB per GPU;
    #   - 2 GPUs vLLM rollout engines (policy copy, 16 GB bf16 weights + KV cache at 0.85).
    # No reference model (KL 0), no critic (GRPO). Estimates, not measured.
    POLICY=${POLICY:-meta-llama/Llama-3.1-8B-Instruct}
    ARGS=(
      "${COMMON[@]}"
      --actor.model_name_or_path "$POLICY"
      --actor.num_nodes 1
      --actor.num_gpus_per_node 4
      --vllm.num_engines 2
      --vllm.tensor_parallel_size 1
      --vllm.gpu_memory_utilization 0.85
      --ds.zero_stage 3
      --ds.packing_samples
      # 64 prompts x 5 rollouts = 320 samples a rollout batch, 2 optimizer steps of 160
      --rollout.batch_size 64
      --train.batch_size 160
      --train.micro_batch_size 2
      --rollout.micro_batch_size 4
      --train.num_episodes 15
      --eval.steps 10
      --ckpt.save_steps 20
    )
    ;;
  smoke)
    # 1 GPU with >= 40 GB (A100-40GB, L40S, H100), Qwen2.5-0.5B-Instruct policy, and a
    # 0.5B follower started first on the same GPU (serve_follower.sh with GPUS=0 DP=1
    # GPU_MEM=0.20, ~8 GB). Actor, rollout vLLM and DeepSpeed share the GPU and take
    # turns (sleep mode): vLLM 0.30 x 40 GB = 12 GB while generating; DeepSpeed ZeRO-2
    # ~16 B/param x 0.5e9 = 8 GB + 2-4 GB of activations while training. A 1.5B policy
    # needs ~24 GB for DeepSpeed: use an 80 GB GPU or add --ds.adam_offload.
    # Estimates, not measured.
    POLICY=${POLICY:-Qwen/Qwen2.5-0.5B-Instruct}
    ARGS=(
      "${COMMON[@]}"
      --actor.model_name_or_path "$POLICY"
      --actor.num_nodes 1
      --actor.num_gpus_per_node 1
      --vllm.num_engines 1
      --vllm.tensor_parallel_size 1
      --vllm.gpu_memory_utilization 0.30
      --train.colocate_all
      --vllm.enable_sleep
      --ds.enable_sleep
      --ds.zero_stage 2
      # 8 prompts x 5 rollouts = 40 samples, one optimizer step each
      --rollout.batch_size 8
      --train.batch_size 40
      --train.micro_batch_size 4
      --rollout.micro_batch_size 8
      --train.num_episodes 1
      --eval.steps 5
      --ckpt.save_steps -1
    )
    ;;
esac
ARGS+=("$@")

if [[ ${PROMPTMII_PRINT_ARGS:-0} == 1 ]]; then
  printf '%s\0' "${ARGS[@]}"
  exit 0
fi

if [[ ! -s $DATA_DIR/train.jsonl ]]; then
  echo "no training data at $DATA_DIR/train.jsonl: run python -m training.build_data --out $DATA_DIR first" >&2
  exit 1
fi
if [[ ${PROMPTMII_SKIP_CHECK:-0} != 1 ]]; then
  (cd "$REPO" && python -m training.openrlhf_compat check-args -- "${ARGS[@]}")
fi

# The follower settings must reach the rollout actors, which run in Ray workers.
RUNTIME_ENV=$(python - "$REPO" <<'PY'
import json, os, sys
env = {k: v for k, v in os.environ.items() if k.startswith("PROMPTMII_") and k not in ("PROMPTMII_PRINT_ARGS", "PROMPTMII_SKIP_CHECK")}
print(json.dumps({"working_dir": sys.argv[1], "excludes": ["runs/", "data/", ".venv/", ".git/"], "env_vars": env}))
PY
)
mkdir -p "$OUT_DIR"
echo "GRPO $CONFIG: policy $POLICY, follower ${PROMPTMII_FOLLOWER_URL:-http://127.0.0.1:8000/v1}, run folder $OUT_DIR" >&2
exec ray job submit --address="$RAY_ADDRESS" --runtime-env-json="$RUNTIME_ENV" \
  -- python3 -m openrlhf.cli.train_ppo_ray "${ARGS[@]}"
