// LASER-KV's "exact" ranking (arXiv 2602.02199; spec §8.2): attention that the
// scoring queries (the chunk's window, or the question) pay to each token,
// summed over heads; the layer sum and the budget split (sinks, local window,
// global memory) happen in selection.
#include <algorithm>
#include <cmath>
#include <limits>

#include "grkv/common.h"
#include "grkv/score.h"

namespace grkv {

Scores score_laser(const LayerInput & in, int n_sink, int n_local) {
    if (!in.q || in.w <= 0) throw Error("LASER-KV needs the scoring queries (none were captured)");
    if (in.n_head % in.n_head_kv) throw Error("n_head must be a multiple of n_head_kv");
    if (n_sink < 0 || n_local < 0) throw Error("LASER-KV sink and local sizes must be >= 0");
    const int T = in.T, d = in.head_dim, G = in.n_head / in.n_head_kv;
    Scores sc;
    sc.n_head_kv = in.n_head_kv;
    sc.T = T;
    sc.s.assign((size_t) in.n_head_kv * T, 0.0f);
    sc.protect.assign(T, 0);
    for (int t = 0; t < std::min(n_sink, T); ++t) sc.protect[t] = 1;           // anchors
    for (int t = std::max(0, T - n_local); t < T; ++t) sc.protect[t] = 1;      // local window
    std::vector<float> logits(T);
    for (int hq = 0; hq < in.n_head; ++hq) {
        const int hk = hq / G;
        float * out = sc.s.data() + (size_t) hk * T;
        for (int j = 0; j < in.w; ++j) {
            const float * q = in.q + ((size_t) j * in.n_head + hq) * d;
            float mx = -std::numeric_limits<float>::infinity();
            int n_vis = 0;
            for (int t = 0; t < T; ++t) {
                if (in.pos[t] > in.qpos[j]) break;  // causal
                const float * k = in.k + ((size_t) t * in.n_head_kv + hk) * d;
                float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                for (int e = 0; e < d; ++e) dot += q[e] * k[e];
                logits[t] = dot * in.scale;
                mx = std::max(mx, logits[t]);
                n_vis = t + 1;
            }
            float z = 0.0f;
#pragma omp simd reduction(+ : z)
            for (int t = 0; t < n_vis; ++t) {
                logits[t] = std::exp(logits[t] - mx);
                z += logits[t];
            }
            const float inv = 1.0f / z;
            for (int t = 0; t < n_vis; ++t) out[t] += logits[t] * inv;
        }
    }
    return sc;
}

}  // namespace grkv
