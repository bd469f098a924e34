#!/usr/bin/env bash
# Configure and compile the patched llama.cpp with CUDA (ggml-cuda), as the
# package build would with CMAKE_ARGS="-DGGML_CUDA=ON ...", and report the
# time. Needs nvcc; no GPU needed to compile.
#   scripts/build_cuda.sh [build-dir] [cuda-archs]      (defaults: build/cuda, 90)
#   CONFIGURE_ONLY=1 scripts/build_cuda.sh              (stop after cmake)
#
# A toolkit without cuBLAS (nvcc and cudart only, as on the project's CPU
# machines) gets it from NVIDIA's nvidia-cublas wheel of the same CUDA major
# on PyPI (headers and libcublas.so.N), installed under the build folder. A
# machine without a GPU driver has no libcuda to link CUDA's virtual-memory
# pool against, so the build then sets GGML_CUDA_NO_VMM (llama.cpp's own
# option; the pool falls back to cudaMalloc). Both are said when they happen.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-build/cuda}
archs=${2:-90}
mkdir -p "$out"
src=$(python3 native/llama_patch/prepare.py --out "$out/llama-src" --cache build/sdist)
nvcc_bin=$(command -v nvcc)
cuda_root=$(dirname "$(dirname "$(readlink -f "$nvcc_bin")")")
major=$(nvcc --version | sed -n 's/.*release \([0-9]*\)\..*/\1/p')
extra=()
if ! compgen -G "$cuda_root/lib64/libcublas.so*" >/dev/null && ! compgen -G "$cuda_root/targets/*/lib/libcublas.so*" >/dev/null; then
    wheel_dir="$out/cublas-cu$major"
    if [ "$major" -ge 13 ]; then pkg="nvidia-cublas==$major.*"; else pkg="nvidia-cublas-cu$major"; fi
    if ! compgen -G "$wheel_dir/nvidia/*/lib/libcublas.so.*" >/dev/null && ! compgen -G "$wheel_dir/nvidia/*/*/lib/libcublas.so.*" >/dev/null; then
        echo "no cuBLAS in $cuda_root: installing $pkg into $wheel_dir"
        python3 -m pip install -q --no-deps --target "$wheel_dir" "$pkg"
    fi
    inc=$(readlink -f "$(dirname "$(find "$wheel_dir" -name cublas_v2.h | head -n 1)")")
    lib=$(readlink -f "$(dirname "$(find "$wheel_dir" -name "libcublas.so.*" | head -n 1)")")
    extra+=("-DCUDA_cublas_LIBRARY=$lib/libcublas.so.$major" "-DCUDA_cublasLt_LIBRARY=$lib/libcublasLt.so.$major"
            "-DCMAKE_CUDA_FLAGS=-I$inc" "-DCMAKE_CXX_FLAGS=-I$inc")
    echo "cuBLAS from $pkg: $lib"
fi
if ! ldconfig -p | grep -q "libcuda\.so"; then
    extra+=(-DGGML_CUDA_NO_VMM=ON)
    echo "no libcuda (GPU driver) here: GGML_CUDA_NO_VMM=ON"
fi
t0=$(date +%s)
cmake -S "$src" -B "$out/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
    -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$archs" -DGGML_NATIVE=OFF \
    -DLLAMA_BUILD_COMMON=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
    -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF "${extra[@]}" > "$out/configure.log"
t1=$(date +%s)
echo "configure: $((t1 - t0)) s (log: $out/configure.log)"
[ "${CONFIGURE_ONLY:-0}" = 1 ] && exit 0
ninja -C "$out/build" llama ggml-cuda > "$out/build.log"
t2=$(date +%s)
echo "compile: $((t2 - t1)) s (log: $out/build.log)"
nm -D "$out/build/bin/libllama.so" | grep -c " T llama_kv_ext_" | sed 's/^/llama_kv_ext_ functions exported: /'
readelf -d "$out/build/bin/libggml-cuda.so" | grep -E "NEEDED.*(cublas|cudart)" | sed 's/^ */linked: /'
