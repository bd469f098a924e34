#!/usr/bin/env bash
# Configure and compile the patched llama.cpp with CUDA (ggml-cuda), as the
# package build would with CMAKE_ARGS="-DGGML_CUDA=ON ...", and report the
# time. Needs nvcc; no GPU needed to compile.
#   scripts/build_cuda.sh [build-dir] [cuda-archs]      (defaults: build/cuda, 90)
#   CONFIGURE_ONLY=1 scripts/build_cuda.sh              (stop after cmake)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-build/cuda}
archs=${2:-90}
src=$(python3 native/llama_patch/prepare.py --out "$out/llama-src" --cache build/sdist)
t0=$(date +%s)
cmake -S "$src" -B "$out/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
    -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$archs" -DGGML_NATIVE=OFF \
    -DLLAMA_BUILD_COMMON=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
    -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF > "$out/configure.log"
t1=$(date +%s)
echo "configure: $((t1 - t0)) s (log: $out/configure.log)"
[ "${CONFIGURE_ONLY:-0}" = 1 ] && exit 0
ninja -C "$out/build" llama ggml-cuda > "$out/build.log"
t2=$(date +%s)
echo "compile: $((t2 - t1)) s (log: $out/build.log)"
nm -D "$out/build/bin/libllama.so" | grep -c " T llama_kv_ext_" | sed 's/^/llama_kv_ext_ functions exported: /'
