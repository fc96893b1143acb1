#!/usr/bin/env bash
# Start a prefill and a decode `vllm serve` that use LLMDataDistConnector, then the proxy in front of them.
#
#   MODEL=Qwen/Qwen2.5-0.5B-Instruct bash launch.sh          # Ctrl-C stops all three
#
# Environment: MODEL (required), MODE (pull|push, default pull), PREFILL_PORT (8100), DECODE_PORT (8200),
# PROXY_PORT (8000), CONTROL_PORT (7100: the prefill's llm_datadist port), HOST (127.0.0.1),
# VLLM_PYTHON (python3: the Python that has vLLM; serve.py there runs `vllm serve`), PYTHON (python3, for the
# proxy, standard library only), VLLM_ARGS (more `vllm serve` arguments for both, e.g. --max-model-len 4096),
# PREFILL_ARGS / DECODE_ARGS (arguments for one of them only, e.g. --tensor-parallel-size 2),
# LINK_SECRET (optional: authenticates the llm_datadist links, which carry the connector's messages), READY_TIMEOUT_S (600).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
: "${MODEL:?set MODEL to a model path or name}"
MODE=${MODE:-pull}; HOST=${HOST:-127.0.0.1}; VLLM_PYTHON=${VLLM_PYTHON:-python3}; PYTHON=${PYTHON:-python3}
PREFILL_PORT=${PREFILL_PORT:-8100}; DECODE_PORT=${DECODE_PORT:-8200}; PROXY_PORT=${PROXY_PORT:-8000}
CONTROL_PORT=${CONTROL_PORT:-7100}; READY_TIMEOUT_S=${READY_TIMEOUT_S:-600}
read -r -a vllm_args <<< "${VLLM_ARGS:-}"
read -r -a prefill_args <<< "${PREFILL_ARGS:-}"
read -r -a decode_args <<< "${DECODE_ARGS:-}"

source "$here/servers.sh"

"$PYTHON" "$here/proxy.py" --host "$HOST" --port "$PROXY_PORT" --mode "$MODE" \
  --prefill "http://$HOST:$PREFILL_PORT" --decode "http://$HOST:$DECODE_PORT" \
  --prefill-control "$HOST:$CONTROL_PORT" &
pids+=($!)
wait -n "${pids[@]}"
