#!/usr/bin/env bash
# Stop deployment processes by their PID files, in the order given: SuperNodes first, then the
# SuperLink (a SuperLink stopped first leaves its SuperNodes retrying forever).
#
#   deploy/stop.sh RUN_DIR/nodes/*.pid RUN_DIR/link/superlink.pid
#
# Each process gets SIGTERM (a SuperNode then deactivates itself on the SuperLink) and, if it is
# still running after STOP_TIMEOUT seconds (default 15), SIGKILL. Its flower-superexec child
# notices that its parent is gone and exits by itself.
set -uo pipefail
[[ $# -ge 1 && "$1" != "-h" && "$1" != "--help" ]] || { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 2; }

alive() { [[ -e /proc/$1 ]] && ! grep -q '^[0-9]* (.*) Z' "/proc/$1/stat" 2>/dev/null; }

for pidfile in "$@"; do
    [[ -f "$pidfile" ]] || { echo "stop.sh: no PID file $pidfile" >&2; continue; }
    pid=$(cat "$pidfile")
    if ! alive "$pid"; then
        echo "$pidfile: PID $pid is not running"; rm -f "$pidfile"; continue
    fi
    kill -TERM "$pid" 2>/dev/null
    for ((t = 0; t < ${STOP_TIMEOUT:-15} * 10; t++)); do alive "$pid" || break; sleep 0.1; done
    if alive "$pid"; then kill -KILL "$pid" 2>/dev/null; echo "$pidfile: PID $pid killed (SIGKILL)"
    else echo "$pidfile: PID $pid stopped"; fi
    rm -f "$pidfile"
done
