#!/usr/bin/env bash
# One preset's whole `fedmetanas run` on two revisions, back to back on this machine: NEW, OLD, NEW.
# Times the whole command (wall seconds) and keeps each run's results, so that a speed-up is a ratio
# measured in one sitting on a quiet machine, with the same accuracy check (docs/speed.md, 1b).
#
#   bash benchmarks/ab_run.sh OLD_REV NEW_REV [PRESET] [OUT]
#   bash benchmarks/ab_run.sh 64f3d25 HEAD conf/cifar10-cpu.toml benchmarks/results/speed/cifar10-cpu-ab
#
# Each revision runs from its own git worktree (removed afterwards) with this environment's Python.
set -euo pipefail
old=${1:?OLD_REV}
new=${2:?NEW_REV}
preset=${3:-conf/cifar10-cpu.toml}
repo=$(cd "$(dirname "$0")/.." && pwd)
out=$(realpath -m "${4:-$repo/benchmarks/results/speed/ab}")
mkdir -p "$out"
trees=$(mktemp -d)
trap 'for t in "$trees"/*; do git -C "$repo" worktree remove --force "$t" 2>/dev/null || true; done; rm -rf "$trees"' EXIT

# presets name their data relative to the checkout (../shared/data): the trees see the same folder
if [ -e "$repo/../shared" ]; then ln -s "$(realpath "$repo/../shared")" "$trees/shared"; fi

free_port() { python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

run() { # name rev
  local tree="$trees/$1" module=harness.cli
  git -C "$repo" worktree add --detach -q "$tree" "$2"
  [ -f "$tree/harness/cli.py" ] || module=fedmetanas_core.cli  # the CLI's home before harness/ existed
  # its own Flower home and ports: an older CLI may leave its local SuperLink running, stopped below by PID
  local home="$trees/flwr-$1" t0 t1 pid
  mkdir -p "$home"
  t0=$(date +%s.%N)
  (cd "$tree" && FLWR_HOME="$home" FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=$(free_port) FLWR_LOCAL_CONTROL_API_PORT=$(free_port) \
    PYTHONPATH="$tree" python -m "$module" run -c "$preset" -c "results-dir=\"$out/$1\"") > "$out/$1.log" 2>&1
  t1=$(date +%s.%N)
  for pid in $(pgrep -f flower-superlink || true); do
    if tr '\0' '\n' < "/proc/$pid/environ" 2>/dev/null | grep -qx "FLWR_HOME=$home"; then kill "$pid"; fi
  done
  python - "$out" "$1" "$2" "$t0" "$t1" <<'EOF'
import json, sys
from pathlib import Path
out, name, rev, t0, t1 = Path(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4]), float(sys.argv[5])
summary = json.loads((out / name / "summary.json").read_text())
row = {"run": name, "rev": rev, "wall_s": round(t1 - t0, 1), "final_test_accuracy": summary["final_test_accuracy"],
       "load_average_after": open("/proc/loadavg").read().split()[:3]}
with open(out / "ab.jsonl", "a") as f:
    f.write(json.dumps(row) + "\n")
print(json.dumps(row))
EOF
  git -C "$repo" worktree remove --force "$tree"
}

new_rev=$(git -C "$repo" rev-parse --short "$new")
old_rev=$(git -C "$repo" rev-parse --short "$old")
run new-1 "$new_rev"
run old-1 "$old_rev"
run new-2 "$new_rev"
