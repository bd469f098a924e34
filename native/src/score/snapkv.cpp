// SnapKV scores (kvpress variant): what the observation window attends to.
#include <algorithm>
#include <cmath>
#include <limits>

#include "grkv/common.h"
#include "grkv/score.h"
#include "window_attention.h"

namespace grkv {

Scores score_snapkv(const LayerInput & in, int kernel, bool max_pool) {
    if (!in.q || in.w <= 0) throw Error("SnapKV needs the observation window's queries (none were captured)");
    if (in.n_head % in.n_head_kv) throw Error("n_head must be a multiple of n_head_kv");
    if (kernel < 1 || kernel % 2 == 0) throw Error("SnapKV pooling kernel must be odd and positive");
    const int T = in.T, G = in.n_head / in.n_head_kv;
    // window = the tokens whose queries were captured; the prefix before it are the candidates
    int prefix = 0;
    Scores sc = window_protected_scores(in, prefix);

    std::vector<float> attn_sum(T), P;
    std::vector<float> pooled(prefix);
    for (int hk = 0; hk < in.n_head_kv; ++hk) {
        window_attention(in, hk, P);
        for (int g = 0; g < G; ++g) {
            std::fill(attn_sum.begin(), attn_sum.end(), 0.0f);
            for (int j = 0; j < in.w; ++j) {
                const float * p = P.data() + (size_t) (g * in.w + j) * T;
#pragma omp simd
                for (int t = 0; t < T; ++t) attn_sum[t] += p[t];
            }
            // mean over window queries, then pool over positions: average with zero
            // padding (count_include_pad, as kvpress) or max (original SnapKV option)
            const int r = kernel / 2;
            for (int t = 0; t < prefix; ++t) {
                float acc = 0.0f;
                for (int u = std::max(0, t - r); u <= std::min(prefix - 1, t + r); ++u) {
                    acc = max_pool ? std::max(acc, attn_sum[u]) : acc + attn_sum[u];
                }
                pooled[t] = acc / (float) ((max_pool ? 1 : kernel) * in.w);
            }
            float * out = sc.s.data() + (size_t) hk * T;
            for (int t = 0; t < prefix; ++t) out[t] += pooled[t] / (float) G;
        }
    }
    // Window tokens rank above every prefix token (they are protected anyway).
    for (int hk = 0; hk < in.n_head_kv; ++hk) {
        float * out = sc.s.data() + (size_t) hk * T;
        const float top = prefix ? *std::max_element(out, out + prefix) + 1.0f : 1.0f;
        for (int t = prefix; t < T; ++t) out[t] = top;
    }
    return sc;
}

}  // namespace grkv
