#!/usr/bin/env bash
# The prepared GPU run: gpu_check.py (correctness, < 5 min), then gpu_step.py and cuda_kernels.py
# (speed). Usage: bash benchmarks/gpu_all.sh OUT_DIR [--quick]
# Each part has its own time limit, so one that hangs or fails does not cost the others. OUT_DIR gets
# each part's JSON + markdown and one log, all.log (7 files: what a device run can bring back).
# Exit status: the worst of the parts (0 all passed).
set -u
out=${1:?usage: gpu_all.sh OUT_DIR [--quick]}
quick=${2:-}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
log="$out/all.log"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1 | tee "$log"
rc=0
run() {  # run LIMIT NAME CMD...: one part, appended to all.log
    local limit=$1 name=$2; shift 2
    echo "== $name" | tee -a "$log"
    timeout "$limit" "$@" 2>&1 | tee -a "$log"
    local r=${PIPESTATUS[0]}
    echo "== $name: exit $r" | tee -a "$log"
    [ "$r" -gt "$rc" ] && rc=$r
}
run 280 gpu_check python3 benchmarks/gpu_check.py --out "$out" $quick
run 200 gpu_step python3 benchmarks/gpu_step.py --out "$out" --steps 30
run 90 cuda_kernels python3 benchmarks/cuda_kernels.py --out "$out"
exit $rc
