// Score -> select over all layers of one cache stream, in parallel.
// The apply step (compact_per_head / compact_shared) is separate so that a
// merge step can sit between selection and write-back.
#pragma once
#include <string>
#include <vector>

#include "grkv/score.h"
#include "grkv/state_blob.h"

namespace grkv {

struct MethodParams {
    std::string name = "snapkv";   // "snapkv" | "knorm" | "streaming"
    int kernel = 5;                // SnapKV pooling kernel
    bool max_pool = false;         // SnapKV pooling: average (kvpress) or max
    int n_sink = 4;                // StreamingLLM sinks
};

struct LayerQueries {
    std::vector<float> q;          // [w][n_head][head_dim]
    std::vector<int32_t> qpos;     // [w]
};

struct ModelShape {
    int n_head = 0, n_head_kv = 0;
    float scale = 1.0f;
};

bool method_needs_queries(const std::string & name);

// Scores for every layer of the stream (cache-layer order). `queries` is
// indexed like the cache layers; it may be empty for query-free methods.
std::vector<Scores> score_layers(const StreamView & view, const MethodParams & m, const ModelShape & shape,
                                 const std::vector<LayerQueries> & queries, int n_threads);

// keep[l][h][j] flattened: per (layer, KV head) top-`budget` token indices.
std::vector<int32_t> select_layers_per_head(const std::vector<Scores> & scores, int budget, int n_threads);

}  // namespace grkv
