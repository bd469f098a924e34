// Helpers shared by the context scorers (expected, compactor, reconstruct):
// RoPE undone on cached rows, value norms, z-scores, protected ends.
#pragma once
#include <algorithm>
#include <cmath>
#include <vector>

#include "grkv/common.h"
#include "grkv/rope.h"
#include "grkv/score.h"

namespace grkv {

inline Scores empty_scores(const LayerInput & in) {
    Scores sc;
    sc.n_head_kv = in.n_head_kv;
    sc.T = in.T;
    sc.s.assign((size_t) in.n_head_kv * in.T, 0.0f);
    sc.protect.assign(in.T, 0);
    return sc;
}

inline void check_context_input(const LayerInput & in, const char * who) {
    if (in.n_head <= 0 || in.n_head_kv <= 0 || in.n_head % in.n_head_kv) {
        throw Error(std::string(who) + ": n_head must be a positive multiple of n_head_kv");
    }
    if (in.T <= 0 || in.head_dim <= 0) throw Error(std::string(who) + ": no tokens to score");
}

// Row x of `rows` ([n][heads][d]) de-rotated by -pos: the pre-RoPE vector.
inline void derotate(const float * src, int d, const RopeParams & rope, int32_t pos, float * dst) {
    std::copy(src, src + d, dst);
    rope_rotate(dst, rope, -(double) pos);
}

// ||v|| per (KV head, token): [n_head_kv][T].
inline std::vector<float> value_norms(const LayerInput & in) {
    if (!in.v) throw Error("this scorer needs the cached values");
    const int d = in.head_dim;
    std::vector<float> out((size_t) in.n_head_kv * in.T);
    for (int t = 0; t < in.T; ++t) {
        for (int h = 0; h < in.n_head_kv; ++h) {
            const float * v = in.v + ((size_t) t * in.n_head_kv + h) * d;
            double s = 0;
            for (int e = 0; e < d; ++e) s += (double) v[e] * v[e];
            out[(size_t) h * in.T + t] = (float) std::sqrt(s);
        }
    }
    return out;
}

// In place: (x - mean) / std over the entries whose token is not protected,
// every head of the layer jointly; protected entries are left as they are.
inline void zscore(std::vector<float> & x, int n_head_kv, int T, const std::vector<uint8_t> & prot) {
    double s = 0, s2 = 0;
    long n = 0;
    for (int h = 0; h < n_head_kv; ++h)
        for (int t = 0; t < T; ++t)
            if (!prot[t]) {
                const double v = x[(size_t) h * T + t];
                s += v;
                s2 += v * v;
                ++n;
            }
    if (n == 0) return;
    const double mean = s / n, var = std::max(0.0, s2 / n - mean * mean);
    const double inv = var > 0 ? 1.0 / std::sqrt(var) : 1.0;
    for (int h = 0; h < n_head_kv; ++h)
        for (int t = 0; t < T; ++t)
            if (!prot[t]) x[(size_t) h * T + t] = (float) ((x[(size_t) h * T + t] - mean) * inv);
}

}  // namespace grkv
