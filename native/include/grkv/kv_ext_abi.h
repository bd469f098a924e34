// The patched llama.cpp's KV-cache extension (native/llama_patch/include/
// llama-kv-ext.h) as the core sees it: the two structs and the functions it
// calls, resolved at run time from the loaded libllama, so the core builds
// without llama.cpp's headers and runs against a stock library too (the
// in-place backend is then simply not offered).
#pragma once
#include <cstddef>
#include <cstdint>

namespace grkv::kvx {

constexpr int32_t kVersion = 2;

struct PartInfo {
    int32_t n_layer;
    uint32_t kv_size;
    int32_t type_k, type_v;
    bool v_trans, rot_k, rot_v;
};

struct LayerInfo {
    int32_t il, n_embd_k, n_embd_v;
    uint64_t k_row_bytes, v_row_bytes;
    void * k;  // struct ggml_tensor *
    void * v;
};

struct Api {
    int32_t (*version)() = nullptr;
    int32_t (*n_parts)(void * ctx) = nullptr;
    int32_t (*get_part)(void * ctx, int32_t part, PartInfo * out) = nullptr;
    int32_t (*get_layer)(void * ctx, int32_t part, int32_t layer, int32_t seq, LayerInfo * out) = nullptr;
    int32_t (*seq_cells)(void * ctx, int32_t part, int32_t seq, int32_t * cells, int32_t * pos, int32_t cap) = nullptr;
    int32_t (*read)(void * ctx, int32_t part, int32_t seq, int32_t layer, const int32_t * cells, int32_t n,
                    void * k_out, void * v_out) = nullptr;
    int32_t (*seq_apply)(void * ctx, int32_t part, int32_t seq, int32_t n, const int32_t * pos,
                         const void * const * k_rows, const void * const * v_data) = nullptr;
    int32_t (*seq_gather)(void * ctx, int32_t part, int32_t seq, int32_t n, const int32_t * pos, int32_t n_head_kv,
                          const int32_t * const * src, int32_t flags) = nullptr;
};

}  // namespace grkv::kvx
