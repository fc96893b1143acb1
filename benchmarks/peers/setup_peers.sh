#!/usr/bin/env bash
# Install the peer engines (NIXL 1.5.1, Mooncake TE 0.3.13.post1) into their own virtual environment, .venv-peers.
# They are never dependencies of llm-datadist: `llm-datadist bench --peers --peer-python .venv-peers/bin/python`
# runs benchmarks/peers/*_bench.py with that interpreter as separate processes and merges their JSON lines.
# Usage: bash benchmarks/peers/setup_peers.sh [VENV_DIR]   (root or sudo is needed for apt-get)
set -u
VENV="${1:-.venv-peers}"
PY="${PYTHON:-python3}"
status=0

"$PY" -m venv "$VENV" || { echo "setup_peers: cannot create $VENV" >&2; exit 1; }
"$VENV/bin/pip" install --quiet numpy || status=1

# NIXL: the wheels declare torch and other heavy dependencies that the driver does not need.
if "$VENV/bin/pip" install --quiet --no-deps nixl==1.5.1 nixl-cu12==1.5.1; then
  echo "setup_peers: nixl 1.5.1 installed"
else
  echo "setup_peers: NIXL install FAILED (the bench reports it as missing)" >&2; status=1
fi

# Mooncake: the non-CUDA wheel imports only with Debian's libibverbs1 present.
if ! ldconfig -p 2>/dev/null | grep -q libibverbs.so.1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq libibverbs1; } \
    || echo "setup_peers: apt-get install libibverbs1 FAILED; Mooncake will not import" >&2
fi
if "$VENV/bin/pip" install --quiet mooncake-transfer-engine-non-cuda==0.3.13.post1; then
  echo "setup_peers: mooncake-transfer-engine-non-cuda 0.3.13.post1 installed"
else
  echo "setup_peers: Mooncake install FAILED (the bench reports it as missing)" >&2; status=1
fi

# NIXL segfaults at exit once libibverbs1 is installed unless UCX is limited to CMA (the drivers set this).
UCX_MODULES=cma NIXL_LOG_LEVEL=WARN "$VENV/bin/python" -c "import nixl._api" 2>/dev/null \
  && echo "setup_peers: nixl imports" || { echo "setup_peers: nixl does not import" >&2; status=1; }
"$VENV/bin/python" -c "import mooncake.engine" 2>/dev/null \
  && echo "setup_peers: mooncake imports" || { echo "setup_peers: mooncake does not import" >&2; status=1; }
exit $status
