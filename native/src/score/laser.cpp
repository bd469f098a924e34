// LASER-KV's "exact" ranking (arXiv 2602.02199; spec §8.2): attention that the
// scoring queries (the chunk's window, or the question) pay to each token,
// summed over heads; the layer sum and the budget split (sinks, local window,
// global memory) happen in selection.
#include <algorithm>
#include <cmath>
#include <limits>

#include "grkv/common.h"
#include "grkv/score.h"
#include "window_attention.h"

namespace grkv {

Scores score_laser(const LayerInput & in, int n_sink, int n_local) {
    if (!in.q || in.w <= 0) throw Error("LASER-KV needs the scoring queries (none were captured)");
    if (in.n_head % in.n_head_kv) throw Error("n_head must be a multiple of n_head_kv");
    if (n_sink < 0 || n_local < 0) throw Error("LASER-KV sink and local sizes must be >= 0");
    const int T = in.T, G = in.n_head / in.n_head_kv;
    Scores sc;
    sc.n_head_kv = in.n_head_kv;
    sc.T = T;
    sc.s.assign((size_t) in.n_head_kv * T, 0.0f);
    sc.protect.assign(T, 0);
    for (int t = 0; t < std::min(n_sink, T); ++t) sc.protect[t] = 1;           // anchors
    for (int t = std::max(0, T - n_local); t < T; ++t) sc.protect[t] = 1;      // local window
    std::vector<float> P;
    for (int hk = 0; hk < in.n_head_kv; ++hk) {
        window_attention(in, hk, P);
        float * out = sc.s.data() + (size_t) hk * T;
        for (int r = 0; r < G * in.w; ++r) {
            const float * p = P.data() + (size_t) r * T;
#pragma omp simd
            for (int t = 0; t < T; ++t) out[t] += p[t];
        }
    }
    return sc;
}

}  // namespace grkv
