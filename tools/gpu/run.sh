#!/usr/bin/env bash
# Runs on a GPU machine, from the repository root, after tools/gpu-bundle.sh built gpu-bundle/:
# every CUDA test binary, then `kiln bench kernels`, then a GPT-2 124M train step; logs go to
# $OUT (or gpu-bundle/logs), and the last thing printed is one summary table.
# Fails when no GPU is present: a GPU check that skips is not a pass.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
logs="${OUT:-$here/logs}"
mkdir -p "$logs"
if ! nvidia-smi -L >"$logs/gpu.txt" 2>&1; then
    cat "$logs/gpu.txt"; echo "FAIL: no GPU found (nvidia-smi -L failed); this script checks kernels on a GPU"; exit 1
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv >>"$logs/gpu.txt" 2>&1
if [ ! -x "$here/kiln" ]; then
    python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' "$here/bins.tar.xz" "$here" \
        || { echo "FAIL: cannot unpack $here/bins.tar.xz"; exit 1; }
fi
# The tests that run the kiln binary find this one (their build machine's path does not exist here).
export KILN_BIN="$here/kiln"
# cuBLAS (the GEMM baseline of kiln bench kernels) ships with PyTorch's wheels on the GPU machine:
# CUDA 12 wheels keep it in nvidia/cublas/lib, CUDA 13 wheels in nvidia/cu13/lib; look for the
# library itself under every nvidia package directory.
cublas_dir=$(python3 - <<'PY' 2>/dev/null
import glob, os
import nvidia
hits = [h for p in nvidia.__path__ for h in glob.glob(os.path.join(p, "**", "libcublas.so*"), recursive=True)]
print(os.path.dirname(sorted(hits)[-1]) if hits else "")
PY
)
[ -n "$cublas_dir" ] && export LD_LIBRARY_PATH="$cublas_dir:${LD_LIBRARY_PATH:-}"
echo "cuBLAS: ${cublas_dir:-not found (bench kernels reports its ceiling as missing)}" >>"$logs/gpu.txt"
# Each step gets a time limit, so one hang still leaves the others' logs and the summary.
step_limit="${KILN_STEP_TIMEOUT:-300}"
rows=()
status=0
for t in "$here"/tests/*; do
    name=$(basename "$t")
    start=$(date +%s.%N)
    timeout "$step_limit" "$t" --test-threads=1 >"$logs/test-$name.log" 2>&1
    rc=$?
    [ $rc -eq 124 ] && echo "TIMEOUT after ${step_limit}s" >>"$logs/test-$name.log"
    secs=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')
    passed=$(grep -o '[0-9]* passed' "$logs/test-$name.log" | awk '{s+=$1} END{print s+0}')
    failed=$(grep -o '[0-9]* failed' "$logs/test-$name.log" | awk '{s+=$1} END{print s+0}')
    skipped=$(grep -c 'SKIPPED' "$logs/test-$name.log")
    verdict=ok
    if [ $rc -ne 0 ] || [ "$failed" -gt 0 ] || [ "$skipped" -gt 0 ]; then verdict=FAIL; status=1; fi
    rows+=("$(printf '%-22s %-5s %7s %7s %8s %7ss' "test $name" "$verdict" "$passed" "$failed" "$skipped" "$secs")")
    grep -E "(FAILED|^---- |panicked|SKIPPED|TIMEOUT)" "$logs/test-$name.log" | head -20
done
timeout "$step_limit" "$here/kiln" bench kernels --device cuda 2>&1 | tee "$logs/bench-kernels.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || { status=1; rows+=("bench kernels          FAIL"); }
timeout "$step_limit" "$here/kiln" bench train-step --preset gpt2 --batch 4 --seq 1024 --device cuda 2>&1 | tee "$logs/bench-train-step.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || { status=1; rows+=("train step (cuda)      FAIL"); }
echo
echo "== summary ($(head -1 "$logs/gpu.txt"))"
printf '%-22s %-5s %7s %7s %8s %8s\n' "what" "ok?" "passed" "failed" "skipped" "time"
printf '%s\n' "${rows[@]}"
echo "kernel benchmarks: see above and $logs/bench-kernels.txt"
exit $status
