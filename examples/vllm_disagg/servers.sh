# Sourced by launch.sh and launch_router.sh: start the prefill and the decode `vllm serve` with
# LLMDataDistConnector and wait until both answer /health (stop at once if one of them exits). Reads MODEL, MODE,
# HOST, PREFILL_PORT, DECODE_PORT, CONTROL_PORT, VLLM_PYTHON, READY_TIMEOUT_S, LINK_SECRET and the argument arrays
# vllm_args, prefill_args, decode_args; leaves the servers' pids in ``pids`` (killed when the script exits).
kv_config() {  # role, extra config (JSON object)
  printf '{"kv_connector": "LLMDataDistConnector", "kv_connector_module_path": "llm_datadist.integrations.vllm",'
  printf ' "kv_role": "%s", "kv_connector_extra_config": %s}' "$1" "$2"
}
secret=""
[ -n "${LINK_SECRET:-}" ] && secret=", \"link_secret\": \"$LINK_SECRET\""
prefill_extra="{\"host\": \"$HOST\", \"datadist_port\": $CONTROL_PORT, \"mode\": \"$MODE\"$secret}"
decode_extra="{\"host\": \"$HOST\", \"mode\": \"$MODE\"$secret}"

pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

"$VLLM_PYTHON" "$here/serve.py" "$MODEL" --host "$HOST" --port "$PREFILL_PORT" \
  --kv-transfer-config "$(kv_config kv_producer "$prefill_extra")" "${vllm_args[@]}" "${prefill_args[@]}" &
pids+=($!)
"$VLLM_PYTHON" "$here/serve.py" "$MODEL" --host "$HOST" --port "$DECODE_PORT" \
  --kv-transfer-config "$(kv_config kv_consumer "$decode_extra")" "${vllm_args[@]}" "${decode_args[@]}" &
pids+=($!)

# wait until both answer /health; stop at once if one of them exits
"$VLLM_PYTHON" - "$READY_TIMEOUT_S" "${pids[*]}" "http://$HOST:$PREFILL_PORT/health" "http://$HOST:$DECODE_PORT/health" <<'PY'
import sys, time, urllib.request
deadline = time.monotonic() + float(sys.argv[1])
pids = [int(pid) for pid in sys.argv[2].split()]


def gone(pid):
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


for url in sys.argv[3:]:
    while True:
        try:
            urllib.request.urlopen(url, timeout=5).read()
            break
        except OSError:
            if any(gone(pid) for pid in pids):
                sys.exit(f"a vllm serve process exited before {url} was ready")
            if time.monotonic() > deadline:
                sys.exit(f"{url} not ready within {sys.argv[1]} s")
            time.sleep(1)
PY
