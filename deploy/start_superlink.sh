#!/usr/bin/env bash
# Start a FedMetaNAS SuperLink with TLS and SuperNode authentication, in the background.
#
#   deploy/start_superlink.sh CERT_DIR RUN_DIR [PORT=9093]
#
# CERT_DIR  output of deploy/make_certs.sh (ca.crt, server.pem, server.key)
# RUN_DIR   where the SuperLink keeps its state and writes superlink.pid, superlink.log,
#           state.db and its FLWR_HOME (flwr-home/: installed app bundles)
# PORT      the one port that serves the Fleet API (SuperNodes), the Control API (`flwr` CLI)
#           and the ServerApp runtime API (Flower 1.42 serves all of them over HTTPS)
#
# Environment:
#   HOST=127.0.0.1    listen address; 0.0.0.0 to accept devices from the network
#   SUPERNODE_AUTH=1  --enable-supernode-auth: only SuperNodes whose public key was registered
#                     with `flwr supernode register` may connect (0 = any SuperNode, not advised)
#
# Runtime dependency installation is turned OFF (flag + FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1):
# by default the SuperLink `uv sync`s the app's dependencies into a fresh venv per run, which is
# slow, needs the internet and would pull a multi-GB CUDA torch. Install the app's dependencies
# (`pip install -e .`) into the environment this script runs flower-superlink from instead.
#
# The ServerApp writes results to the run config's `results-dir` (use an absolute path: the
# ServerApp's working directory is the SuperLink's, i.e. RUN_DIR).
# Stop: kill "$(cat RUN_DIR/superlink.pid)"  (after stopping the SuperNodes; see deploy/stop.sh)
set -euo pipefail

if [[ $# -lt 2 || $# -gt 3 || "$1" == "-h" || "$1" == "--help" ]]; then
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
    exit 2
fi
CERT_DIR=$(cd "$1" && pwd)
mkdir -p "$2"
RUN_DIR=$(cd "$2" && pwd)
PORT=${3:-9093}
HOST=${HOST:-127.0.0.1}

for f in ca.crt server.pem server.key; do
    [[ -f "$CERT_DIR/$f" ]] || { echo "start_superlink.sh: $CERT_DIR/$f is missing (run deploy/make_certs.sh)" >&2; exit 1; }
done
command -v flower-superlink >/dev/null || { echo "start_superlink.sh: flower-superlink not on PATH (activate the venv)" >&2; exit 1; }
if [[ -f "$RUN_DIR/superlink.pid" ]] && kill -0 "$(cat "$RUN_DIR/superlink.pid")" 2>/dev/null; then
    echo "start_superlink.sh: a SuperLink is already running (PID $(cat "$RUN_DIR/superlink.pid"))" >&2
    exit 1
fi

export FLWR_TELEMETRY_ENABLED=${FLWR_TELEMETRY_ENABLED:-0}
export FLWR_DISABLE_UPDATE_CHECK=${FLWR_DISABLE_UPDATE_CHECK:-1}
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1} HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
export FLWR_HOME="$RUN_DIR/flwr-home"

auth=()
[[ "${SUPERNODE_AUTH:-1}" == "1" ]] && auth=(--enable-supernode-auth)

cd "$RUN_DIR"
# setsid: own session, so closing the terminal or Ctrl-C there does not stop the daemon.
# setsid execs (no fork) here, so $! is flower-superlink's own PID.
setsid flower-superlink \
    --ssl-ca-certfile "$CERT_DIR/ca.crt" \
    --ssl-certfile "$CERT_DIR/server.pem" \
    --ssl-keyfile "$CERT_DIR/server.key" \
    "${auth[@]}" \
    --disable-runtime-dependency-installation \
    --database "$RUN_DIR/state.db" \
    --host "$HOST" --port "$PORT" \
    </dev/null >"$RUN_DIR/superlink.log" 2>&1 &
echo $! >"$RUN_DIR/superlink.pid"
echo "SuperLink PID $(cat "$RUN_DIR/superlink.pid") on $HOST:$PORT, log $RUN_DIR/superlink.log"
