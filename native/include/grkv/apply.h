// Apply backends: where a compressed layout goes back into llama.cpp. Both
// read the sequence into the same SeqState (the view every method scores) and
// write a compressed SeqState back; the math never knows which one runs.
//   blob:    llama_state_seq_get/set_data (any llama.cpp build; Python side)
//   inplace: the patched library's llama_kv_ext_* calls (this file)
#pragma once
#include <cstdint>

#include "grkv/kv_ext_abi.h"
#include "grkv/state_blob.h"

namespace grkv {

// Sequence `seq`'s cells in every cache part, as parse_state() of its state
// blob would give them (cells in ascending cell index, the blob's row layouts).
// rows_of >= 0: only that part's K/V rows are read; the other parts keep their
// cells, positions and row sizes with no row data (do not serialise them).
SeqState inplace_read(const kvx::Api & api, void * ctx, int32_t seq, int rows_of = -1);

// Write part `part` of `st` (its active stream) over the sequence's cells.
// The library checks everything before its first write, so on an error the
// cache is unchanged; throws Error with the library's code.
void inplace_apply(const kvx::Api & api, void * ctx, int32_t seq, const SeqState & st, int part);

}  // namespace grkv
