// Softmax attention of one window query over the cached keys it may see, the
// step every query-based score (SnapKV, G-KV, LASER-KV) starts from.
#pragma once
#include <algorithm>
#include <cmath>
#include <limits>

#include "grkv/score.h"
#include "grkv/softcap.h"

namespace grkv {

// Query j of head hq against KV head hk: p[t] = softmax over the visible
// tokens (positions <= qpos[j]; positions ascend). Returns how many are visible.
inline int window_softmax(const LayerInput & in, int j, int hq, int hk, float * p) {
    const int d = in.head_dim;
    const float * q = in.q + ((size_t) j * in.n_head + hq) * d;
    float mx = -std::numeric_limits<float>::infinity();
    int n_vis = 0;
    for (int t = 0; t < in.T; ++t) {
        if (in.pos[t] > in.qpos[j]) break;  // causal
        const float * k = in.k + ((size_t) t * in.n_head_kv + hk) * d;
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int e = 0; e < d; ++e) dot += q[e] * k[e];
        p[t] = soft_cap(dot * in.scale, in.softcap);
        mx = std::max(mx, p[t]);
        n_vis = t + 1;
    }
    float z = 0.0f;
#pragma omp simd reduction(+ : z)
    for (int t = 0; t < n_vis; ++t) {
        p[t] = std::exp(p[t] - mx);  // vectorised via libmvec (-fno-math-errno)
        z += p[t];
    }
    const float inv = 1.0f / z;
    for (int t = 0; t < n_vis; ++t) p[t] *= inv;
    return n_vis;
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
