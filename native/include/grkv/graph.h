// Scoring and selection as ggml graphs: the math on the cache's device.
//
// The graph path builds the same computation as the C++ core (score/, select)
// out of ggml ops, so that it runs on whichever ggml backend holds the cache:
// CPU here, CUDA or Metal where llama.cpp was built for them. Only the kept
// indices (and, for tests, the scores) come back to the host.
//
// Built only with the patched llama.cpp (GRKV_LLAMA=ON), which provides ggml.
// Methods so far: snapkv (avg pooling), knorm, streaming; per-head selection.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "grkv/compress.h"
#include "grkv/kv_ext_abi.h"
#include "grkv/score.h"

namespace grkv::graph {

bool available();

// Which scorer the graph runs, with the core's parameters (MethodParams').
struct GraphMethod {
    std::string name = "snapkv";  // snapkv | knorm | streaming
    int kernel = 5;               // SnapKV pooling kernel (odd)
    int n_sink = 4;               // StreamingLLM sinks
};

struct SelectResult {
    std::vector<float> scores;    // [n_head_kv][T]; protected tokens (SnapKV's window, the sinks) read 0
    std::vector<int32_t> keep;    // [n_head_kv][budget], each head's token indices ascending
    std::string backend;          // the backend that ran it
};

// One layer on host arrays (LayerInput: k [T][n_head_kv][d]; q and qpos for
// SnapKV), on `backend` ("CPU", a device name such as "CUDA0", or "" for the
// best available). Scores and selection equal score_<method> + select_per_head.
SelectResult select_layer(const LayerInput & in, const GraphMethod & m, int budget, const std::string & backend,
                          int n_threads);

// Every layer of cache part `part` of sequence `seq`, read straight from the
// patched llama.cpp's K tensors (ggml_get_rows over the sequence's cells) on
// the backend whose buffer holds them. queries: SnapKV's observation window
// per cache layer (host; they are small), empty for the others. Returns keep
// [n_layer][n_head_kv][budget], token indices in position order (as
// StreamView numbers them). Refuses rotated (Hadamard) key caches.
std::vector<int32_t> select_cache(const kvx::Api & api, void * ctx, int part, int32_t seq,
                                  const std::vector<LayerQueries> & queries, const ModelShape & shape,
                                  const GraphMethod & m, int budget, int n_threads,
                                  std::string * backend_name = nullptr);

}  // namespace grkv::graph
