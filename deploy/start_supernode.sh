#!/usr/bin/env bash
# Start one FedMetaNAS SuperNode (one per device) in the background, with TLS and its auth key.
#
#   deploy/start_supernode.sh NAME SUPERLINK CA_CERT PRIVATE_KEY RUN_DIR [PORT=9094] [NODE_CONFIG]
#
# NAME         a label for the files: RUN_DIR/NAME.pid, RUN_DIR/NAME.log, RUN_DIR/NAME-home/
# SUPERLINK    the SuperLink's address, host:port (e.g. 127.0.0.1:9093 or superlink.example.org:9093)
# CA_CERT      the CA certificate that signed the SuperLink's certificate (ca.crt)
# PRIVATE_KEY  this SuperNode's ECDSA private key (OpenSSH format); its .pub must have been
#              registered on the SuperLink with `flwr supernode register KEY.pub <connection>`
# PORT         local port of the SuperNode's ClientApp runtime API (one per SuperNode on a host)
# NODE_CONFIG  which data this device trains on, parsed as TOML pairs (strings need quotes):
#                'partition-id=0 num-partitions=3'  a partition of the dataset (e.g. digits)
#                'data-dir="/abs/own/data"'         the device's own dataset (for dataset
#                                                   "imagefolder": train/<class>/*, test/<class>/*)
#                '... budget-macs=50000'            what the device can run (or budget-params=...):
#                                                   with a run's tiers, it searches for the largest
#                                                   tier within it (docs/tiers.md)
#
# The SuperNode never installs dependencies at run time (that is off by default for SuperNodes;
# we also export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1): the device's environment must
# already hold the app's dependencies (see docs/deployment.md, "What a device needs").
# Stop: kill "$(cat RUN_DIR/NAME.pid)"  (SuperNodes before the SuperLink).
set -euo pipefail

if [[ $# -lt 5 || $# -gt 7 || "$1" == "-h" || "$1" == "--help" ]]; then
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
    exit 2
fi
NAME=$1 SUPERLINK=$2 CA_CERT=$3 PRIVATE_KEY=$4
mkdir -p "$5"
RUN_DIR=$(cd "$5" && pwd)
PORT=${6:-9094}
NODE_CONFIG=${7:-}

for f in "$CA_CERT" "$PRIVATE_KEY"; do
    [[ -f "$f" ]] || { echo "start_supernode.sh: $f is missing" >&2; exit 1; }
done
command -v flower-supernode >/dev/null || { echo "start_supernode.sh: flower-supernode not on PATH (activate the venv)" >&2; exit 1; }
if [[ -f "$RUN_DIR/$NAME.pid" ]] && kill -0 "$(cat "$RUN_DIR/$NAME.pid")" 2>/dev/null; then
    echo "start_supernode.sh: SuperNode $NAME is already running (PID $(cat "$RUN_DIR/$NAME.pid"))" >&2
    exit 1
fi

export FLWR_TELEMETRY_ENABLED=${FLWR_TELEMETRY_ENABLED:-0}
export FLWR_DISABLE_UPDATE_CHECK=${FLWR_DISABLE_UPDATE_CHECK:-1}
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1} HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
export FLWR_HOME="$RUN_DIR/$NAME-home"   # each SuperNode installs the shipped app bundle here

node_config=()
[[ -n "$NODE_CONFIG" ]] && node_config=(--node-config "$NODE_CONFIG")

CA_CERT=$(cd "$(dirname "$CA_CERT")" && pwd)/$(basename "$CA_CERT")
PRIVATE_KEY=$(cd "$(dirname "$PRIVATE_KEY")" && pwd)/$(basename "$PRIVATE_KEY")
cd "$RUN_DIR"
setsid flower-supernode \
    --superlink "$SUPERLINK" \
    --root-certificates "$CA_CERT" \
    --auth-supernode-private-key "$PRIVATE_KEY" \
    --port "$PORT" \
    "${node_config[@]}" \
    </dev/null >"$RUN_DIR/$NAME.log" 2>&1 &
echo $! >"$RUN_DIR/$NAME.pid"
echo "SuperNode $NAME PID $(cat "$RUN_DIR/$NAME.pid") -> $SUPERLINK (${NODE_CONFIG:-no node config}), log $RUN_DIR/$NAME.log"
