#!/usr/bin/env bash
# Serve the frozen follower LM of the Prompt-MII reward with vLLM's OpenAI-compatible server.
#
#   training/serve_follower.sh [extra `vllm serve` flags]
#
# The reward sends one short chat request per test example (m=20 per rollout, ~128 in
# flight per rollout engine); every request of a task shares the instruction as its
# prefix, so prefix caching is on. Point the trainer at it with
#   export PROMPTMII_FOLLOWER_URL=http://<this host>:$PORT/v1 PROMPTMII_FOLLOWER_MODEL=$SERVED_NAME
#
# Environment (default):
#   FOLLOWER_MODEL  HF name or local folder of the follower   (meta-llama/Llama-3.1-8B-Instruct)
#   SERVED_NAME     model name clients send                   (follower)
#   HOST, PORT      where to listen                           (0.0.0.0, 8000)
#   GPUS            CUDA_VISIBLE_DEVICES for the server       (0,1)
#   TP              tensor-parallel size                      (1)
#   DP              data-parallel replicas (one per GPU)      (number of GPUS / TP)
#   GPU_MEM         --gpu-memory-utilization                  (0.90; 0.20 when sharing a GPU, see below)
#   MAX_MODEL_LEN   context of the follower                   (4096: instruction + one input + label)
#   MAX_NUM_SEQS    sequences batched at once                 (256)
#   PROMPTMII_PRINT_ARGS=1  print the vllm arguments (NUL-separated) and exit
#
# Hardware, paper configuration: 2 of the 8 GPUs (80 GB each), Llama-3.1-8B-Instruct in
# bf16, one replica per GPU: ~16 GB of weights, the rest of GPU_MEM x 80 GB is KV cache.
# Single-GPU smoke run: a 0.5B follower on the training GPU, GPUS=0 DP=1 GPU_MEM=0.20
# (~1 GB of weights, ~7 GB of KV cache on a 40 GB GPU); start it BEFORE the trainer so
# that vLLM's memory check sees the free memory it expects.
# Estimates from model sizes; not measured (no GPU was available when this was written).
set -euo pipefail

FOLLOWER_MODEL=${FOLLOWER_MODEL:-meta-llama/Llama-3.1-8B-Instruct}
SERVED_NAME=${SERVED_NAME:-follower}
HOST=${HOST:-0.0.0.0}
PORT=${PORT:-8000}
GPUS=${GPUS:-0,1}
TP=${TP:-1}
n_gpus=$(awk -F, '{print NF}' <<<"$GPUS")
DP=${DP:-$(( n_gpus / TP > 0 ? n_gpus / TP : 1 ))}
GPU_MEM=${GPU_MEM:-0.90}
MAX_MODEL_LEN=${MAX_MODEL_LEN:-4096}
MAX_NUM_SEQS=${MAX_NUM_SEQS:-256}

ARGS=(
  serve "$FOLLOWER_MODEL"
  --served-model-name "$SERVED_NAME"
  --host "$HOST"
  --port "$PORT"
  --dtype bfloat16
  --tensor-parallel-size "$TP"
  --gpu-memory-utilization "$GPU_MEM"
  --max-model-len "$MAX_MODEL_LEN"
  --max-num-seqs "$MAX_NUM_SEQS"
  --enable-prefix-caching
)
if (( DP > 1 )); then
  ARGS+=(--data-parallel-size "$DP")
fi
ARGS+=("$@")

if [[ ${PROMPTMII_PRINT_ARGS:-0} == 1 ]]; then
  printf '%s\0' "${ARGS[@]}"
  exit 0
fi

echo "follower: $FOLLOWER_MODEL as '$SERVED_NAME' on http://$HOST:$PORT/v1 (GPUs $GPUS, TP $TP, DP $DP)" >&2
CUDA_VISIBLE_DEVICES=$GPUS exec vllm "${ARGS[@]}"
