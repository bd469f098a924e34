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
    // "snapkv" | "knorm" | "streaming" | "gkv" | "laser" | "expected" | "compactor" | "reconstruct"
    std::string name = "snapkv";
    int kernel = 5;                // SnapKV pooling kernel
    bool max_pool = false;         // SnapKV pooling: average (kvpress) or max
    int n_sink = 4;                // StreamingLLM sinks
    GkvParams gkv;                 // G-KV
    int protect_divisor = 4;       // LASER-KV: budget/n sinks and budget/n local tokens
    int n_local = 0;               // LASER-KV: set from the budget by compress_stream
    ContextParams ctx;             // expected, compactor, reconstruct
    RopeParams rope;               // the model's RoPE (context scorers undo or average it)
    std::vector<int32_t> chunk_lo, chunk_hi;  // reconstruct: context token range of each re-read chunk
};

struct LayerQueries {
    std::vector<float> q;          // [w][n_head][head_dim]
    std::vector<int32_t> qpos;     // [w]
    std::vector<float> rk;         // reconstruct: the re-read tokens' keys [w][n_head_kv][head_dim]
    std::vector<int32_t> qchunk;   // reconstruct: the re-read chunk of each query [w]
    std::vector<int32_t> kpos;     // compactor: the keys' true positions [n_head_kv][n_cells], or empty
};

struct ModelShape {
    int n_head = 0, n_head_kv = 0;
    float scale = 1.0f;
    float softcap = 0.0f;  // attention-logit soft cap, 0 = none
};

bool method_needs_queries(const std::string & name);

// Scores for every layer of the stream (cache-layer order). `queries` is
// indexed like the cache layers; it may be empty for query-free methods.
// G-KV: `history` holds per layer [n_head_kv][T] (or is empty) and `global`
// receives the new global scores in the same shape.
std::vector<Scores> score_layers(const StreamView & view, const MethodParams & m, const ModelShape & shape,
                                 const std::vector<LayerQueries> & queries, int n_threads,
                                 const std::vector<std::vector<float>> * history = nullptr,
                                 std::vector<std::vector<float>> * global = nullptr);

// keep[l][h][j] flattened: per (layer, KV head) top-`budget` token indices.
std::vector<int32_t> select_layers_per_head(const std::vector<Scores> & scores, int budget, int n_threads);

}  // namespace grkv

#include "grkv/merge.h"

namespace grkv {

struct MergeParams {
    std::string name = "none";     // none | merge | pivot | weighted | grkv
    GrkvParams grkv;
    float guard = 0.1f;            // GRKV: fraction of the kept prefix fixed as anchors
};

// Surrogate queries of one cache layer for GRKV: [n_q][n_head][head_dim].
struct LayerSurrogate {
    std::vector<float> q;
    std::vector<int32_t> qpos;     // causal: query j sees positions <= qpos[j]
    bool causal = true;
    float weight = 1.0f;
};

struct MergeReport {
    std::vector<int> choice;                           // per layer: index into the candidates
    std::vector<double> obj_none, obj_v, obj_kv;       // per layer, summed over heads
    std::vector<int> n_mutable;                        // per layer, summed over heads
    GrkvTiming timing;                                 // GRKV: seconds per phase, summed over layers
};

struct CompressRequest {
    MethodParams method;
    ModelShape shape;
    std::vector<LayerQueries> queries;     // scoring window (SnapKV)
    int budget = 0;
    bool shared = false;
    int32_t label_end = 0;
    MergeParams merge;
    std::vector<LayerSurrogate> surrogate; // GRKV only
    int32_t window_start = 0;              // tokens at/after this position stay fixed (GRKV)
    int n_threads = 1;
    std::vector<std::vector<float>> history;  // G-KV, compactor: carried per-cell scores [n_head_kv][n_cells] per layer, or empty
    std::string headwise = "none";         // none | adakv (per layer) | global (over layers): head-wise budgets
    float headwise_alpha = 0.2f;           // their per-head floor, as a fraction of the budget
    bool plan_only = false;                // eviction without a merge: leave the stream as it is and return
                                           // the plan (keep, positions) for a backend that gathers itself
};

struct CompressOutcome {
    std::vector<int32_t> keep;             // [L][n_head_kv][slots]
    std::vector<int32_t> positions;        // [slots]: the new cells' positions
    bool rebuilt = true;                   // false: plan_only left the stream as read
    int slots = 0;                         // cells kept: the budget, or a head-wise allocation's busiest head
    std::vector<int32_t> headwise_count;   // head-wise budgets: each head's own allocation [L][n_head_kv]
    MergeReport report;
    std::vector<float> global;             // G-KV, compactor: kept tokens' carried scores [L][n_head_kv][budget]
};

// score -> select -> merge -> rebuild the stream (replaces `st`). Per-head
// selections use the contiguous-label layout; a shared selection without a
// merge keeps original positions.
void merge_layers(const StreamView & view, const std::vector<int32_t> & keep, int n_head_kv, int budget,
                  const std::vector<Scores> & scores, const CompressRequest & req, std::vector<float> & new_k,
                  std::vector<float> & new_v, MergeReport & rep);

CompressOutcome compress_stream(Stream & st, const CompressRequest & req);

}  // namespace grkv
