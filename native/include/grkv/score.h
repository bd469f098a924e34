// Token scores per KV head, one layer at a time. Higher = more worth keeping.
// Tokens are in position order; `protect` marks tokens every method must keep
// (SnapKV's observation window, StreamingLLM's sinks).
#pragma once
#include <cstdint>
#include <vector>

#include "grkv/rope.h"

namespace grkv {

struct LayerInput {
    const float * k = nullptr;       // [T][n_head_kv][head_dim], post-RoPE
    const int32_t * pos = nullptr;   // [T] ascending
    int T = 0, n_head_kv = 0, head_dim = 0;
    const float * q = nullptr;       // [w][n_head][head_dim], post-RoPE window queries
    const int32_t * qpos = nullptr;  // [w]
    int w = 0, n_head = 0;
    float scale = 1.0f;              // logit scale (1/sqrt(d) for llama)
    float softcap = 0.0f;            // attention-logit soft cap (Gemma-2), 0 = none
    // Context scorers (expected, compactor, reconstruct) only:
    const float * v = nullptr;       // [T][n_head_kv][head_dim] values
    RopeParams rope;                 // the model's RoPE, to undo or average it
    // Keys' true positions per head [n_head_kv][T], where a per-head layout
    // relabelled the cells (budgeted prefill); null: `pos`.
    const int32_t * kpos = nullptr;
    // reconstruct: the re-read tokens' own keys [w][n_head_kv][head_dim], the
    // chunk each re-read query belongs to [w] (ascending), and per chunk the
    // context token range [lo, hi) it re-reads.
    const float * rk = nullptr;
    const int32_t * qchunk = nullptr;
    const int32_t * chunk_lo = nullptr;
    const int32_t * chunk_hi = nullptr;
    int n_chunk = 0;
};

struct Scores {
    int n_head_kv = 0, T = 0;
    std::vector<float> s;             // [n_head_kv][T]
    std::vector<uint8_t> protect;     // [T]
};

// SnapKV as in kvpress: window attention (causal inside the window), mean over
// window queries, avg-pool over the prefix (zero padding, count_include_pad;
// or max-pool, the original SnapKV's other option), mean over each KV head's
// query group; the window is protected.
Scores score_snapkv(const LayerInput & in, int kernel, bool max_pool = false);
struct GkvParams {
    float alpha = 0.8f;          // history decay (max smoothing)
    float mix_lambda = 0.5f;     // weight of the global score against redundancy
    float sim_threshold = 0.5f;  // cosine above which a key counts as a copy
};

// G-KV: s_loc = window attention, max over the GQA group, mean over the
// window, divided by its max; global g = max(alpha * hist, s_loc) (hist
// [n_head_kv][T] or null = none); score = lambda * g - (1 - lambda) * redundancy.
// The window is protected. `global` receives g ([n_head_kv][T], 0 in the
// window): the history of the next compression.
Scores score_gkv(const LayerInput & in, const float * hist, const GkvParams & p, std::vector<float> * global);
// LASER-KV "exact": attention of the scoring queries, summed over queries and
// each KV head's query group; the first n_sink and last n_local tokens are
// protected. Selection sums over layers and heads (select_shared_sum).
Scores score_laser(const LayerInput & in, int n_sink, int n_local);
// Context scorers: they score the whole context without the question.
struct ContextParams {
    int n_sink = 4;              // first tokens protected (the sinks / template prefix)
    int n_recent = 0;            // last tokens protected
    // Expected Attention
    int n_future = 512;          // future positions RoPE is averaged over
    int32_t next_pos = -1;       // the first of them (< 0: the context's next position)
    float eps = 0.0f;            // added to the expected attention before the value-norm product
    bool use_cov = true;
    // Compactor
    int chunk = 256;             // non-causal attention tile
    float beta = -1.0f;          // leverage weight (< 0: the fraction removed, as kvpress)
    float ridge = 1e-2f;         // leverage ridge, relative to the mean key variance
    bool chunk_scale = false;    // scale chunk logits by the model's scale (kvpress does not)
};

// Expected Attention: queries modelled as a Gaussian (mean and covariance of
// the de-rotated context queries `in.q`), RoPE averaged over n_future next
// positions; score = (mean over the group of the expected softmax + eps) * ||v||.
Scores score_expected(const LayerInput & in, const ContextParams & p);
// Compactor: z(non-causal chunked attention * ||v||, width-3 average) +
// beta * z(ridge leverage of the de-rotated, centred keys), z over the layer.
// A token's tile attention depends on its own tile only, so it can be carried:
// with `hist` ([n_head_kv][T]) the queries may cover only the last w cells
// (tiled from the first of them) and the earlier cells take their attention
// from `hist`; `carry` receives every cell's tile attention (budgeted prefill).
Scores score_compactor(const LayerInput & in, const ContextParams & p, const float * hist = nullptr,
                       std::vector<float> * carry = nullptr);
// Context reconstruction (KVzip): the largest attention a context token gets
// from the re-read queries, softmax restricted to sinks + chunk + re-read keys,
// max over the GQA group. Comparable across heads and layers (probabilities).
Scores score_reconstruct(const LayerInput & in, const ContextParams & p);

// Protect the first n_sink and last n_recent tokens of a score set.
void protect_ends(Scores & sc, int n_sink, int n_recent);

// KNorm: keys with a low L2 norm are kept (score = -||k||).
Scores score_knorm(const LayerInput & in);
// StreamingLLM: the first n_sink tokens are protected, the rest ranked by recency.
Scores score_streaming(const LayerInput & in, int n_sink);

}  // namespace grkv
