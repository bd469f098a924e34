// G-KV decode-time score (arXiv 2512.00504; spec §8.1): the window's attention
// (local score) folded into a decayed history (global score), minus a
// key-redundancy term taken from R-KV.
#include <algorithm>
#include <cmath>
#include <limits>

#include "grkv/common.h"
#include "grkv/score.h"
#include "window_attention.h"

namespace grkv {
namespace {

// Redundancy of each prefix token of one KV head (spec §8.1, "Redundancy"):
// cosine similarity of the keys, diagonal zeroed and, per row, the most recent
// key with cos > threshold zeroed (the newest copy of a repeated key is not
// redundant); column mean; softmax over tokens; divided by its max.
void redundancy(const LayerInput & in, int hk, int n, float threshold, float * out) {
    const int d = in.head_dim;
    std::vector<float> kn((size_t) n * d);
    for (int t = 0; t < n; ++t) {
        const float * k = in.k + ((size_t) t * in.n_head_kv + hk) * d;
        float nn = 0.0f;
        for (int e = 0; e < d; ++e) nn += k[e] * k[e];
        const float inv = 1.0f / (std::sqrt(nn) + 1e-8f);
        for (int e = 0; e < d; ++e) kn[(size_t) t * d + e] = k[e] * inv;
    }
    std::vector<double> col(n, 0.0);
    std::vector<float> row(n);
    for (int i = 0; i < n; ++i) {
        const float * a = kn.data() + (size_t) i * d;
        int last = -1;
        for (int j = 0; j < n; ++j) {
            const float * b = kn.data() + (size_t) j * d;
            float c = 0.0f;
#pragma omp simd reduction(+ : c)
            for (int e = 0; e < d; ++e) c += a[e] * b[e];
            row[j] = j == i ? 0.0f : c;
            if (row[j] > threshold) last = j;
        }
        if (last >= 0) row[last] = 0.0f;
        for (int j = 0; j < n; ++j) col[j] += row[j];
    }
    double mx = -std::numeric_limits<double>::infinity();
    for (int j = 0; j < n; ++j) mx = std::max(mx, col[j] / n);
    // softmax over tokens divided by its max is exp(x - max x)
    for (int j = 0; j < n; ++j) out[j] = (float) std::exp(col[j] / n - mx);
}

}  // namespace

Scores score_gkv(const LayerInput & in, const float * hist, const GkvParams & p, std::vector<float> * global) {
    if (!in.q || in.w <= 0) throw Error("G-KV needs the recent window's queries (none were captured)");
    if (in.n_head % in.n_head_kv) throw Error("n_head must be a multiple of n_head_kv");
    if (p.alpha < 0.0f || p.alpha > 1.0f || p.mix_lambda < 0.0f || p.mix_lambda > 1.0f) {
        throw Error("G-KV alpha and lambda must lie in [0, 1]");
    }
    const int T = in.T, G = in.n_head / in.n_head_kv;
    // window = the tokens whose queries were captured; the prefix before it are the candidates
    int prefix = 0;
    Scores sc = window_protected_scores(in, prefix);
    if (global) global->assign((size_t) in.n_head_kv * T, 0.0f);

    std::vector<float> P, grp(T), loc(T), red(std::max(prefix, 1));
    for (int hk = 0; hk < in.n_head_kv; ++hk) {
        // local: per window query, max over the GQA group of the softmax; mean over queries
        window_attention(in, hk, P);
        std::fill(loc.begin(), loc.end(), 0.0f);
        for (int j = 0; j < in.w; ++j) {
            std::fill(grp.begin(), grp.end(), 0.0f);
            for (int g = 0; g < G; ++g) {
                const float * p = P.data() + (size_t) (g * in.w + j) * T;
                for (int t = 0; t < T; ++t) grp[t] = std::max(grp[t], p[t]);
            }
            for (int t = 0; t < T; ++t) loc[t] += grp[t] / (float) in.w;
        }
        float lmax = 0.0f;
        for (int t = 0; t < prefix; ++t) lmax = std::max(lmax, loc[t]);
        const float linv = lmax > 0.0f ? 1.0f / lmax : 0.0f;
        if (prefix) redundancy(in, hk, prefix, p.sim_threshold, red.data());
        float * out = sc.s.data() + (size_t) hk * T;
        const float * h = hist ? hist + (size_t) hk * T : nullptr;
        for (int t = 0; t < prefix; ++t) {
            // global = max(alpha * history, local): a token once important decays slowly
            const float g = std::max(h ? p.alpha * h[t] : 0.0f, loc[t] * linv);
            if (global) (*global)[(size_t) hk * T + t] = g;
            out[t] = p.mix_lambda * g - (1.0f - p.mix_lambda) * red[t];
        }
        const float top = prefix ? *std::max_element(out, out + prefix) + 1.0f : 1.0f;
        // the protected recent window; its global score stays 0 (it has no
        // local score yet: at the next compression it starts from s_loc alone)
        for (int t = prefix; t < T; ++t) out[t] = top;
    }
    return sc;
}

}  // namespace grkv
