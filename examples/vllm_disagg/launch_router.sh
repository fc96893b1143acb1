#!/usr/bin/env bash
# Start a prefill and a decode `vllm serve` that use LLMDataDistConnector, then vllm-router (`pip install
# vllm-router`) in its prefill/decode mode in front of them, instead of proxy.py. Pull mode only: the router sends
# the prefill request first and hands its kv_transfer_params to the decode request, which is the connector's pull.
#
#   MODEL=Qwen/Qwen2.5-0.5B-Instruct bash launch_router.sh   # Ctrl-C stops all three
#
# Environment: MODEL (required), PREFILL_PORT (8100), DECODE_PORT (8200), ROUTER_PORT (8000), CONTROL_PORT (7100:
# the prefill's llm_datadist port), HOST (127.0.0.1), VLLM_PYTHON (python3: the Python that has vLLM; serve.py there
# runs `vllm serve`), VLLM_ROUTER (vllm-router: the router's command), ROUTER_METRICS_PORT (29000: the router's
# Prometheus port), ROUTER_ARGS (more vllm-router arguments, e.g. --policy round_robin), VLLM_ARGS (more
# `vllm serve` arguments for both), PREFILL_ARGS / DECODE_ARGS (for one of them only), LINK_SECRET (optional:
# authenticates the llm_datadist links), READY_TIMEOUT_S (600).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
: "${MODEL:?set MODEL to a model path or name}"
HOST=${HOST:-127.0.0.1}; VLLM_PYTHON=${VLLM_PYTHON:-python3}; VLLM_ROUTER=${VLLM_ROUTER:-vllm-router}
PREFILL_PORT=${PREFILL_PORT:-8100}; DECODE_PORT=${DECODE_PORT:-8200}; ROUTER_PORT=${ROUTER_PORT:-8000}
CONTROL_PORT=${CONTROL_PORT:-7100}; ROUTER_METRICS_PORT=${ROUTER_METRICS_PORT:-29000}
READY_TIMEOUT_S=${READY_TIMEOUT_S:-600}
read -r -a vllm_args <<< "${VLLM_ARGS:-}"
read -r -a prefill_args <<< "${PREFILL_ARGS:-}"
read -r -a decode_args <<< "${DECODE_ARGS:-}"
read -r -a router_args <<< "${ROUTER_ARGS:-}"

MODE=pull  # the router sends the prefill request first: the connector's pull
source "$here/servers.sh"

# --kv-connector nixl (the default) is the router's two-stage flow: prefill with max_tokens 1 and
# kv_transfer_params {"do_remote_decode": true, ...}, then the decode with the prefill's kv_transfer_params.
"$VLLM_ROUTER" --vllm-pd-disaggregation --kv-connector nixl \
  --prefill "http://$HOST:$PREFILL_PORT" --decode "http://$HOST:$DECODE_PORT" \
  --host "$HOST" --port "$ROUTER_PORT" --prometheus-host "$HOST" --prometheus-port "$ROUTER_METRICS_PORT" \
  --worker-startup-check-interval 1 "${router_args[@]}" &
pids+=($!)
wait -n "${pids[@]}"
