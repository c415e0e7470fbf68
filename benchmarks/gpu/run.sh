#!/usr/bin/env bash
# On the GPU machine, after pack.py's parts were carried there:
#   bash benchmarks/gpu/run.sh --status            which parts have arrived
#   bash benchmarks/gpu/run.sh [check.py options]  install onnxruntime-gpu, run the check
# Results go to the folder $OUT names (the one that comes back from a remote run), else out/gpu.
set -uo pipefail
cd "$(dirname "$0")/../.."
if [ "${1:-}" = "--status" ]; then
  python3 benchmarks/gpu/install.py .gpu --status
  nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader || true
  exit 0
fi
out="${OUT:-out/gpu}"
mkdir -p "$out"
python3 benchmarks/gpu/install.py .gpu /tmp/site || exit $?
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
python3 benchmarks/gpu/check.py --out "$out" "$@" 2>&1 | tee "$out/log.txt"
