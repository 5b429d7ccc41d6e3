#!/usr/bin/env bash
# The device check for a lent GPU machine (issue 26, point 5): the speed benchmark on CUDA, then a
# short paper-scale cifar10 run of FedMetaNAS and FedNAS (same MACs budget, same rounds), in this
# process tree through LocalGrid (the GPU machine has no Ray). Everything it measures lands in $OUT.
#   bash benchmarks/gpu_check.sh [DATA_DIR] [ROUNDS] [META_ITERS] [SPEED_TIMEOUT_S] [RUN_TIMEOUT_S]
# DATA_DIR: a CIFAR-10 ImageFolder copy (train/, test/). Small values make a local dry run on CPU.
set -u
DATA=${1:-.gpu-data/cifar10}; ROUNDS=${2:-4}; ITERS=${3:-10}; SPEED_S=${4:-140}; RUN_S=${5:-300}
OUT=${OUT:-/tmp/gpu-check-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CUBLAS_WORKSPACE_CONFIG=:4096:8
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
  python3 -c 'import torch, sys; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")'
  nproc; } > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"
timeout "$SPEED_S" python3 -m benchmarks.speed --device auto --spaces paper,cifar10-cpu --reps 3 \
  --flower-clients "" --out "$OUT/speed-gpu.md" > "$OUT/speed.log" 2>&1; echo "speed rc=$?"
RUN="dataset=\"imagefolder\" data-dir=\"$DATA\" num-server-rounds=$ROUNDS warmup-rounds=1 discrete-round=3"
RUN="$RUN local-meta-iters=$ITERS budget=\"macs:40000000\" seed=0 device=\"auto\" ${EXTRA:-}"
for m in fedmetanas fednas; do
  timeout "$RUN_S" python3 -m benchmarks.inprocess -c conf/cifar10.toml -c "$RUN method=\"$m\"" \
    --clients 10 --results-dir "/tmp/gpu-runs/$m" > "/tmp/gpu-runs-$m.log" 2>&1 &
done
wait
for m in fedmetanas fednas; do tail -3 "/tmp/gpu-runs-$m.log"; cp "/tmp/gpu-runs-$m.log" /tmp/gpu-runs/ 2>/dev/null; done
tar czf "$OUT/runs.tgz" --exclude='*.pt' -C /tmp gpu-runs
tail -30 "$OUT/speed.log"
