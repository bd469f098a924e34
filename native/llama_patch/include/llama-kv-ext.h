// llama-kv-ext.h: grkv-cpp's additive KV-cache extension for llama.cpp 0c1e57098
// (the commit llama-cpp-python 0.3.36 vendors). Applied at build time by
// native/llama_patch/apply.py; nothing here changes llama.cpp while unused.
//
// One prefix, llama_kv_ext_. Every function takes the context first. Return
// codes: >= 0 success (a count where stated), < 0 an error from the
// LLAMA_KV_EXT_E_* list, and then nothing was changed.
//
// Cache parts: a plain KV cache is part 0; an iSWA model's memory has the
// base (global-layer) cache as part 0 and the sliding-window cache as part 1.
// Layers are numbered by their place in the part (0 .. n_layer-1); `il` is the
// model's layer index.
#pragma once

#include "llama.h"

#ifdef __cplusplus
extern "C" {
#endif

#define LLAMA_KV_EXT_VERSION 2

#define LLAMA_KV_EXT_E_NOT_KV     -1  // the context's memory is not a KV cache (recurrent, hybrid, none)
#define LLAMA_KV_EXT_E_PART       -2  // no such cache part
#define LLAMA_KV_EXT_E_LAYER      -3  // no such layer in the part
#define LLAMA_KV_EXT_E_SEQ        -4  // bad sequence id, or a cell shared with another sequence
#define LLAMA_KV_EXT_E_ARG        -5  // a bad count, position order, cell index or null pointer
#define LLAMA_KV_EXT_E_ROOM       -6  // not enough free cells for the new layout
#define LLAMA_KV_EXT_E_UNSUPPORTED -7 // the cache stores per-cell extensions (M-RoPE, PLE), or the layout cannot be gathered
#define LLAMA_KV_EXT_E_ALLOC      -8  // the backend could not allocate the gather's work buffer

// The version of this API (LLAMA_KV_EXT_VERSION of the build).
LLAMA_API int32_t llama_kv_ext_version(void);

// Number of cache parts (1, or 2 for iSWA), or LLAMA_KV_EXT_E_NOT_KV.
LLAMA_API int32_t llama_kv_ext_n_parts(struct llama_context * ctx);

struct llama_kv_ext_part_info {
    int32_t  n_layer;   // cache layers in this part
    uint32_t kv_size;   // cells allocated (per stream)
    int32_t  type_k;    // enum ggml_type of K
    int32_t  type_v;    // enum ggml_type of V
    bool     v_trans;   // V stored transposed ([n_embd_v][kv_size]; flash attention off)
    bool     rot_k;     // K stored in a Hadamard-rotated basis (quantised caches)
    bool     rot_v;
};

// Describe cache part `part`. Returns 0 or an error.
LLAMA_API int32_t llama_kv_ext_get_part(struct llama_context * ctx, int32_t part, struct llama_kv_ext_part_info * out);

struct llama_kv_ext_layer {
    int32_t il;               // model layer index
    int32_t n_embd_k;         // K elements per cell (n_head_kv * head_dim)
    int32_t n_embd_v;         // V elements per cell
    uint64_t k_row_bytes;     // bytes of one cell's K row
    uint64_t v_row_bytes;     // bytes of one cell's V row (untransposed)
    struct ggml_tensor * k;   // K storage of the sequence's stream: [n_embd_k, kv_size]
    struct ggml_tensor * v;   // V storage of the stream: [n_embd_v, kv_size], or transposed when v_trans
};

// Describe layer `layer` of part `part` for sequence `seq` (its stream). Returns 0 or an error.
LLAMA_API int32_t llama_kv_ext_get_layer(struct llama_context * ctx, int32_t part, int32_t layer, llama_seq_id seq,
                                     struct llama_kv_ext_layer * out);

// The cells that hold sequence `seq` in part `part`, in ascending cell index,
// with their positions. Fills up to `cap` entries of `cells` and `pos` (either
// may be NULL when cap is 0) and returns the number of cells the sequence holds.
// In a sliding-window part, cells masked for the sequence's last position are
// left out (llama.cpp reuses them, and the state blob does not save them).
// A cell shared with another sequence is LLAMA_KV_EXT_E_SEQ.
LLAMA_API int32_t llama_kv_ext_seq_cells(struct llama_context * ctx, int32_t part, llama_seq_id seq,
                                         int32_t * cells, llama_pos * pos, int32_t cap);

// Copy the K and V data of `n` cells (`cells`, any order) of layer `layer` to
// the host: `k_out` gets [n][k_row_bytes]; `v_out` gets [n][v_row_bytes], or
// [n_embd_v][n] elements when V is transposed (the state blob's layouts).
// Synchronises the context first. Returns 0 or an error.
LLAMA_API int32_t llama_kv_ext_read(struct llama_context * ctx, int32_t part, llama_seq_id seq, int32_t layer,
                                    const int32_t * cells, int32_t n, void * k_out, void * v_out);

// Replace sequence `seq`'s cells in part `part` with `n` new cells: cell i at
// position pos[i] (strictly ascending), with layer l's data k_rows[l] and
// v_data[l] in the layouts of llama_kv_ext_read (the cache's own types). The
// cells are placed as a state-blob restore of the same sequence would place
// them, and every other cell of the sequence is freed. Everything is checked
// before the first write; on an error the cache is unchanged. Returns n.
LLAMA_API int32_t llama_kv_ext_seq_apply(struct llama_context * ctx, int32_t part, llama_seq_id seq, int32_t n,
                                         const llama_pos * pos, const void * const * k_rows,
                                         const void * const * v_data);

// Replace sequence `seq`'s cells in part `part` with `n` new cells gathered
// from the cells it holds now, on the backend that holds the cache (a ggml
// graph of get_rows and copies; on a GPU only these indices cross from the
// host). New cell i gets position pos[i] (strictly ascending). In layer l,
// KV head h of new cell i takes its K and V head slices from cell
// src[l][h * n + i], which must be one of the sequence's cells (as listed by
// llama_kv_ext_seq_cells). n_head_kv splits every layer's K and V rows into
// equal head slices.
//
// Bytes are copied exactly: K rows, and V rows when V is not transposed, move
// as raw 4-byte words (any cache type, quantised included, whose head slice is
// a whole number of blocks and of 4-byte words); a transposed V (f16, bf16,
// f32) moves through f32, which is exact for these types. Otherwise
// LLAMA_KV_EXT_E_UNSUPPORTED, and llama_kv_ext_seq_apply with host rows is
// the way. The cells are placed as llama_kv_ext_seq_apply places them. Every
// check and the work buffer's allocation run before the first write; on an
// error the cache is unchanged. Returns n.
//
// A layer in host memory (the CPU backend's) is copied on the host, which
// measures faster there than the graph; LLAMA_KV_EXT_GATHER_GRAPH in `flags`
// runs the graph for it too (the CPU backend then computes it).
#define LLAMA_KV_EXT_GATHER_GRAPH 1

LLAMA_API int32_t llama_kv_ext_seq_gather(struct llama_context * ctx, int32_t part, llama_seq_id seq, int32_t n,
                                          const llama_pos * pos, int32_t n_head_kv, const int32_t * const * src,
                                          int32_t flags);

// Called by llama_decode after a successful batch, once per sequence in the
// batch, with the positions [p0, p1] that sequence now holds in part 0. The
// context is idle (the batch is written); the hook may read and rewrite the
// cache through this API or the state-blob API. Not called when llama_decode
// fails or is aborted.
typedef void (*llama_kv_ext_hook)(struct llama_context * ctx, llama_seq_id seq, llama_pos p0, llama_pos p1,
                                  void * user_data);

// Install (or with NULL remove) the context's hook.
LLAMA_API void llama_kv_ext_set_hook(struct llama_context * ctx, llama_kv_ext_hook hook, void * user_data);

// Install (or with NULL remove) the eval callback while the context lives;
// it takes effect from the next llama_decode (llama_context_params.cb_eval
// can only be given at creation).
LLAMA_API void llama_kv_ext_set_eval_callback(struct llama_context * ctx, ggml_backend_sched_eval_callback cb,
                                              void * user_data);

#ifdef __cplusplus
}

// Internal: llama_decode's call into the hook (llama-context.cpp).
void llama_kv_ext_after_decode(struct llama_context * ctx, const struct llama_batch & batch, int32_t ret);
#endif
