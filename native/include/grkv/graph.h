// Scoring and selection as ggml graphs (issue: the math on the cache's device).
//
// The graph path builds the same computation as the C++ core (score/, select)
// out of ggml ops, so that it runs on whichever ggml backend holds the cache:
// CPU here, CUDA or Metal where llama.cpp was built for them. Only the kept
// indices (and, for tests and reports, the scores) come back to the host.
//
// Built only with the patched llama.cpp (GRKV_LLAMA=ON), which provides ggml;
// graph_available() says whether this build has it.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "grkv/compress.h"
#include "grkv/kv_ext_abi.h"
#include "grkv/score.h"

namespace grkv::graph {

bool available();

// One layer's SnapKV scores and per-head selection, computed by a ggml graph
// on `backend` ("CPU", or a device name such as "CUDA0"; "" = the best
// available). Same inputs as score_snapkv (avg pooling; max pooling is not in
// the graph path) plus the budget. Returns scores [n_head_kv][T] for the
// prefix before the window (window columns 0: they are protected) and keep
// [n_head_kv][budget], each head's kept token indices ascending.
struct SnapkvGraphResult {
    std::vector<float> scores;
    std::vector<int32_t> keep;
    std::string backend;  // the backend that ran it
};
SnapkvGraphResult snapkv_select(const LayerInput & in, int kernel, int budget, const std::string & backend,
                                int n_threads);

// SnapKV selection of every layer of cache part `part` of sequence `seq`,
// read straight from the patched llama.cpp's K tensors (ggml_get_rows over the
// sequence's cells) on the backend whose buffer holds them. queries: the
// observation window per cache layer (host; they are small). Returns keep
// [n_layer][n_head_kv][budget], token indices in position order (as
// StreamView numbers them), each head's ascending. Refuses rotated
// (Hadamard) key caches. backend_name, if given, receives the backend's name.
std::vector<int32_t> snapkv_select_cache(const kvx::Api & api, void * ctx, int part, int32_t seq,
                                         const std::vector<LayerQueries> & queries, const ModelShape & shape,
                                         int kernel, int budget, int n_threads, std::string * backend_name = nullptr);

}  // namespace grkv::graph
