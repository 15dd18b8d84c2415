#!/usr/bin/env bash
# Installs a pinned nvcc (CUDA 13.0, the release the H200 machines' driver 580 runs) from NVIDIA's
# pip wheels into .cuda/ in the project, which is git-ignored and which build.rs finds on its own,
# and libclang (LLVM 18, from the `libclang` wheel) for bindgen, which build.rs runs on
# kernels/kiln_kernels.h with feature `cuda`. Reuses an existing install; needs python3 with pip and
# network access once (~330 MB).
# Users with a CUDA toolkit need none of this: build.rs also looks at KILN_NVCC, CUDA_HOME and PATH.
#
#   tools/install-cuda.sh          # install (or reuse) .cuda/
#   tools/install-cuda.sh --print  # print the nvcc path it would use
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="$root/.cuda"
nvcc="$dest/nvidia/cu13/bin/nvcc"
# One release for all five: a newer nvidia-nvvm emits PTX that the 13.0 ptxas rejects.
pins=(nvidia-cuda-nvcc==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-crt==13.0.88
      nvidia-nvvm==13.0.88 nvidia-cuda-cccl==13.0.85 libclang==18.1.1)
stamp="$dest/.pins"

if [ "${1:-}" = "--print" ]; then echo "$nvcc"; exit 0; fi
if [ -x "$nvcc" ] && [ "$(cat "$stamp" 2>/dev/null)" = "${pins[*]}" ]; then
    echo "nvcc already installed: $nvcc"
else
    command -v python3 >/dev/null || { echo "error: python3 with pip is needed to install nvcc from NVIDIA's wheels" >&2; exit 1; }
    echo "installing nvcc 13.0 and libclang 18 from pip wheels into $dest (about 330 MB)"
    rm -rf "$dest"
    # All in one call: `pip install --target` replaces the whole nvidia/ folder on every call.
    python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$dest" "${pins[@]}"
    echo "${pins[*]}" > "$stamp"
fi
"$nvcc" --version | tail -2
echo "libclang: $dest/clang/native/libclang.so"
