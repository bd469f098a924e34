// The few ggml ABI facts the eval callback needs, declared here so that the
// core builds without llama.cpp's headers. Layout of `struct ggml_tensor` in
// ggml 0.25.3 (llama-cpp-python 0.3.36, ggml.h); sizeof is checked at compile
// time and the op codes are looked up at run time by name.
#pragma once
#include <cstddef>
#include <cstdint>

namespace grkv::ggml {

constexpr int kMaxDims = 4;
constexpr int kMaxOpParams = 64;
constexpr int kMaxSrc = 10;
constexpr int kMaxName = 64;

struct Tensor {
    int32_t type;
    void * buffer;
    int64_t ne[kMaxDims];
    size_t nb[kMaxDims];
    int32_t op;
    int32_t op_params[kMaxOpParams / sizeof(int32_t)];
    int32_t flags;
    Tensor * src[kMaxSrc];
    Tensor * view_src;
    size_t view_offs;
    void * data;
    char name[kMaxName];
    void * extra;
    char padding[8];
};
static_assert(sizeof(Tensor) == 336, "ggml_tensor layout changed: re-check against ggml.h");
static_assert(offsetof(Tensor, name) == 256, "ggml_tensor.name moved");

// Functions resolved from the already loaded libggml-base at run time.
using TensorGetFn = void (*)(const Tensor * t, void * dst, size_t offset, size_t size);
using OpNameFn = const char * (*)(int32_t op);

}  // namespace grkv::ggml
