#!/usr/bin/env bash
# NVRTC (CUDA's run-time compiler, no GPU needed) from the `nvidia-cuda-nvrtc-cu12` PyPI wheel,
# for the test that compiles every CUDA kernel (crates/cuda/tests/nvrtc_compile.rs).
# Idempotent; installs into testmodels/nvrtc and prints the folder to put on LD_LIBRARY_PATH:
#   LD_LIBRARY_PATH="$(bash scripts/fetch-nvrtc.sh)" cargo test -p demovlp-cuda --features cuda
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="$root/testmodels/nvrtc"
lib="$dest/nvidia/cuda_nvrtc/lib"
if ! ls "$lib"/libnvrtc.so* >/dev/null 2>&1; then
    pip=(pip)
    command -v pip >/dev/null 2>&1 || pip=(python3 -m pip)
    rm -rf "$dest.partial"
    "${pip[@]}" install --quiet --no-deps --target "$dest.partial" nvidia-cuda-nvrtc-cu12 >&2
    rm -rf "$dest"
    mv "$dest.partial" "$dest"
    echo "fetch-nvrtc: installed $lib" >&2
fi
echo "$lib"
