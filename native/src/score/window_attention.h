// Softmax attention of the window queries over the cached keys they may see,
// the step every query-based score (SnapKV, G-KV, LASER-KV) starts from.
#pragma once
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "grkv/score.h"
#include "grkv/softcap.h"
#include "../gemm.h"
#include "../softmax.h"

namespace grkv {

// Every window query of KV head hk's group against the cached keys it may
// see: P[(g * w + j) * T + t] = softmax over the visible tokens (positions
// <= qpos[j]; positions ascend) for query head hk * G + g, 0 past them. One
// product over the group's queries instead of a dot per (query, key).
inline void window_attention(const LayerInput & in, int hk, std::vector<float> & P) {
    const int d = in.head_dim, T = in.T, G = in.n_head / in.n_head_kv, R = G * in.w;
    std::vector<float> Q((size_t) R * d), Kt((size_t) d * T);
    for (int g = 0; g < G; ++g)
        for (int j = 0; j < in.w; ++j) {
            const float * q = in.q + ((size_t) j * in.n_head + hk * G + g) * d;
            std::copy(q, q + d, Q.begin() + (size_t) (g * in.w + j) * d);
        }
    for (int t = 0; t < T; ++t) {
        const float * k = in.k + ((size_t) t * in.n_head_kv + hk) * d;
        for (int e = 0; e < d; ++e) Kt[(size_t) e * T + t] = k[e];
    }
    P.resize((size_t) R * T);
    gemm(R, T, d, Q.data(), d, 1, Kt.data(), P.data());
    for (int r = 0; r < R; ++r) {
        const int j = r % in.w;
        const int n_vis = (int) (std::upper_bound(in.pos, in.pos + T, in.qpos[j]) - in.pos);
        float * p = P.data() + (size_t) r * T;
        if (in.softcap > 0) {
            for (int t = 0; t < n_vis; ++t) p[t] = soft_cap(p[t] * in.scale, in.softcap);
            softmax_row(p, n_vis, 1.0f);
        } else {
            softmax_row(p, n_vis, in.scale);
        }
        std::fill(p + n_vis, p + T, 0.0f);
    }
}

// Zeroed scores whose window (the tokens at or after the first window query's
// position) is protected; `prefix` receives the number of tokens before it.
inline Scores window_protected_scores(const LayerInput & in, int & prefix) {
    const int32_t qpos_min = *std::min_element(in.qpos, in.qpos + in.w);
    prefix = 0;
    while (prefix < in.T && in.pos[prefix] < qpos_min) ++prefix;
    Scores sc;
    sc.n_head_kv = in.n_head_kv;
    sc.T = in.T;
    sc.s.assign((size_t) in.n_head_kv * in.T, 0.0f);
    sc.protect.assign(in.T, 0);
    for (int t = prefix; t < in.T; ++t) sc.protect[t] = 1;
    return sc;
}

}  // namespace grkv
