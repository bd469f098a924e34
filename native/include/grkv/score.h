// Token scores per KV head, one layer at a time. Higher = more worth keeping.
// Tokens are in position order; `protect` marks tokens every method must keep
// (SnapKV's observation window, StreamingLLM's sinks).
#pragma once
#include <cstdint>
#include <vector>

namespace grkv {

struct LayerInput {
    const float * k = nullptr;       // [T][n_head_kv][head_dim], post-RoPE
    const int32_t * pos = nullptr;   // [T] ascending
    int T = 0, n_head_kv = 0, head_dim = 0;
    const float * q = nullptr;       // [w][n_head][head_dim], post-RoPE window queries
    const int32_t * qpos = nullptr;  // [w]
    int w = 0, n_head = 0;
    float scale = 1.0f;              // logit scale (1/sqrt(d) for llama)
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
// KNorm: keys with a low L2 norm are kept (score = -||k||).
Scores score_knorm(const LayerInput & in);
// StreamingLLM: the first n_sink tokens are protected, the rest ranked by recency.
Scores score_streaming(const LayerInput & in, int n_sink);

}  // namespace grkv
