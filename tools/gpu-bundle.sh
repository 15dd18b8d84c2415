#!/usr/bin/env bash
# Builds, on this machine (the GPU machines have no Rust toolchain), everything a GPU machine needs
# to check and time kiln's CUDA backend in one call, into gpu-bundle/ (git-ignored, under 64 MiB):
#   gpu-bundle/bins.tar.xz   kiln (bench kernels, bench train-step) and the CUDA test binaries
#   gpu-bundle/run.sh        unpacks them, runs every test, then the benchmarks, and prints one
#                            summary table
# Then, from the repository root on the GPU machine: `gpu-bundle/run.sh` (it fails without a GPU).
# Machine code is built for sm_90a only (the H200s lent here) to keep the bundle small; set
# KILN_CUDA_ARCHS to build for others. The binaries are packed with xz through Python's tarfile,
# since every test binary carries the same kernels and xz's window spans them.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
out=gpu-bundle
tests=(ptxas hopper gemm attention layernorm rmsnorm rope elementwise embedding xent reduce adamw adamw8bit nf4 backend gpt2_cuda qlora compare llama_parity)

tools/install-cuda.sh >/dev/null
export KILN_CUDA_ARCHS="${KILN_CUDA_ARCHS:-90a}"
rm -rf "$out" && mkdir -p "$out/tests"
cargo build --release --features cuda --bin kiln
cp target/release/kiln "$out/kiln"
# `cargo test --no-run` names each test executable in its JSON messages.
cargo test --release --features cuda --no-run --message-format=json $(printf -- '--test %s ' "${tests[@]}") \
  | python3 -c '
import json, sys, shutil
for line in sys.stdin:
    try: m = json.loads(line)
    except ValueError: continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and "test" in m["target"]["kind"]:
        shutil.copy(m["executable"], sys.argv[1] + "/tests/" + m["target"]["name"])
' "$out"
strip "$out/kiln" "$out"/tests/* 2>/dev/null || true
python3 - "$out" <<'PY'
import sys, tarfile, os, shutil
out = sys.argv[1]
with tarfile.open(os.path.join(out, "bins.tar.xz"), "w:xz", preset=9) as tar:
    tar.add(os.path.join(out, "kiln"), arcname="kiln")
    tar.add(os.path.join(out, "tests"), arcname="tests")
os.remove(os.path.join(out, "kiln"))
shutil.rmtree(os.path.join(out, "tests"))
PY
cp tools/gpu/run.sh "$out/run.sh" && chmod +x "$out/run.sh"
du -sh "$out"
size=$(du -sm "$out" | cut -f1)
if [ "$size" -gt 60 ]; then echo "error: the bundle is ${size} MiB; the device tool carries at most 64 MiB" >&2; exit 1; fi
echo "bundle ready (sm_${KILN_CUDA_ARCHS}): carry gpu-bundle and run gpu-bundle/run.sh"
