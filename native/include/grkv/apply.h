// Apply backends: where a compressed layout goes back into llama.cpp. Both
// read the sequence into the same SeqState (the view every method scores) and
// write a compressed SeqState back; the math never knows which one runs.
//   blob:    llama_state_seq_get/set_data (any llama.cpp build; Python side)
//   inplace: the patched library's llama_kv_ext_* calls (this file)
#pragma once
#include <cstdint>
#include <vector>

#include "grkv/kv_ext_abi.h"
#include "grkv/state_blob.h"

namespace grkv {

// Sequence `seq`'s cells in every cache part, as parse_state() of its state
// blob would give them (cells in ascending cell index, the blob's row layouts).
// rows_of >= 0: only that part's K/V rows are read; the other parts keep their
// cells, positions and row sizes with no row data (do not serialise them);
// rows_of = -1: every part's rows; any other negative value: none.
SeqState inplace_read(const kvx::Api & api, void * ctx, int32_t seq, int rows_of = -1);

// The sequence's cells of part `part` in position order (as StreamView
// numbers the tokens): token t is cell cells[t] at position pos[t].
struct SeqCells {
    std::vector<int32_t> cells, pos;
};
SeqCells seq_cells_by_position(const kvx::Api & api, void * ctx, int part, int32_t seq);

// Write part `part` of `st` (its active stream) over the sequence's cells.
// The library checks everything before its first write, so on an error the
// cache is unchanged; throws Error with the library's code.
void inplace_apply(const kvx::Api & api, void * ctx, int32_t seq, const SeqState & st, int part);

// The same layout as compact_per_head / compact_shared would build from
// `keep` ([n_layer][n_head_kv][n] position-order token indices of the
// sequence as read) at positions `pos` [n], gathered by the library on the
// cache's own backend: only indices cross, no row does. Returns false, the
// cache unchanged, when the library cannot gather this cache byte for byte
// (LLAMA_KV_EXT_E_UNSUPPORTED: write host rows with inplace_apply instead);
// throws Error with the library's code on any other refusal.
// graph: run the ggml graph even where the cache is in host memory (which the
// library otherwise copies on the host, faster there).
bool inplace_gather(const kvx::Api & api, void * ctx, int32_t seq, int part, const std::vector<int32_t> & keep,
                    int n_head_kv, const std::vector<int32_t> & pos, bool graph = false);

}  // namespace grkv
