// Parse and rebuild llama.cpp's per-sequence state blob
// (llama_state_seq_get_data / llama_state_seq_set_data, buffer variant).
//
// Layout (llama-cpp-python 0.3.36 / llama.cpp 0c1e57098), little-endian:
//   u32 magic 0xaf143cd8; i32 seq_id
//   one memory part per llama_kv_cache (an iSWA model writes [base][swa]):
//     u32 n_stream; per stream: u32 cell_count, then if cell_count > 0:
//       cell_count x { i32 pos; u32 n_seq; i32 seq[n_seq] }
//       u32 v_trans; u32 n_layer
//       n_layer x { i32 k_type; u64 k_row_bytes; rows[cell_count] }
//       V rows like K when !v_trans, else
//       n_layer x { i32 v_type; u32 v_el_bytes; u32 n_embd_v; [n_embd_v][cell_count] }
// Models that store a per-cell extension (M-RoPE, PLE) are refused before a
// blob is ever parsed, so no extension bytes are expected here.
#pragma once
#include <cstdint>
#include <vector>

#include "grkv/common.h"

namespace grkv {

constexpr uint32_t kStateMagic = 0xaf143cd8u;

struct LayerRows {
    int32_t type = 0;
    uint64_t row_bytes = 0;        // K rows, and V rows when !v_trans
    uint32_t el_bytes = 0;         // transposed V only
    uint32_t n_embd = 0;           // elements per token (K: row width; V^T: dims)
    std::vector<uint8_t> bytes;    // as in the blob: [cell][row] or [dim][cell]
};

struct Stream {
    uint32_t cell_count = 0;
    std::vector<int32_t> pos;                    // per cell
    std::vector<std::vector<int32_t>> seq_ids;   // per cell
    uint32_t v_trans = 0;
    std::vector<LayerRows> k, v;                 // per cache layer
    // Walsh-Hadamard block llama.cpp rotated quantised K / V rows with before
    // storing them (0: not rotated). Not in the blob: the caller sets it from
    // the cache types and head size (quant.h hadamard_block_k/v).
    int rot_k = 0, rot_v = 0;
};

struct MemoryPart {
    std::vector<Stream> streams;
    // The stream that holds the sequence (the only one with cells); -1 if none.
    int active_stream() const;
    // Bytes of K and V stored per cell, summed over layers.
    uint64_t bytes_per_cell() const;
};

struct SeqState {
    int32_t seq_id = 0;
    std::vector<MemoryPart> parts;
};

SeqState parse_state(const uint8_t * data, size_t size);
std::vector<uint8_t> serialize_state(const SeqState & s);

// Float views of one stream, tokens sorted by position.
struct StreamView {
    const Stream * s;
    std::vector<int32_t> order;   // order[i] = cell index of the i-th token by position
    explicit StreamView(const Stream & st);
    int n_tokens() const { return (int) order.size(); }
    std::vector<int32_t> positions() const;
    // [n_tokens][n_embd] float32 in position order; quantised rows come back
    // dequantised and, where the stream says so, un-rotated.
    std::vector<float> keys(int layer) const;
    std::vector<float> values(int layer) const;
};

// Rebuild a stream that keeps `budget` slots. keep[(l*n_head_kv + h)*budget + j]
// is the position-order index of the token that (layer l, KV head h) keeps in
// slot j. Slots are labelled with positions label_end-budget+1 .. label_end.
// new_k / new_v, when not null, give replacement float rows
// [layer][slot][n_embd] (un-rotated), stored through the layer's RowCodec
// (quantised caches: rotated and requantised); a head slice equal to what its
// cell already decodes to keeps the cell's bytes. Quantised rows move as
// whole 32-value blocks, so each head's slice must be whole blocks.
Stream compact_per_head(const StreamView & view, const std::vector<int32_t> & keep,
                        int n_head_kv, int budget, int32_t label_end,
                        const float * new_k = nullptr, const float * new_v = nullptr);

// Keep one token set for all layers and heads, with their original positions.
Stream compact_shared(const StreamView & view, const std::vector<int32_t> & keep);

}  // namespace grkv
