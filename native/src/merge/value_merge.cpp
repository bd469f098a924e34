// kvpress-style value merging: evicted values folded into their most
// key-similar kept token; keys untouched (positions stay exact).
#include <cmath>
#include <vector>

#include "grkv/merge.h"

namespace grkv {
namespace {

std::vector<float> unit_keys(const HeadKV & h) {
    std::vector<float> u((size_t) h.T * h.d);
    for (int t = 0; t < h.T; ++t) {
        double n = 0;
        for (int e = 0; e < h.d; ++e) n += (double) h.kv(t, e, true) * h.kv(t, e, true);
        const float inv = n > 0 ? (float) (1.0 / std::sqrt(n)) : 0.0f;
        for (int e = 0; e < h.d; ++e) u[(size_t) t * h.d + e] = h.kv(t, e, true) * inv;
    }
    return u;
}

}  // namespace

// Routing shared by the baselines: for each evicted token, its most
// cosine-similar kept slot and that similarity.
void route_evicted(const HeadKV & h, std::vector<int> & slot, std::vector<float> & cosine) {
    const std::vector<float> u = unit_keys(h);
    std::vector<uint8_t> kept(h.T, 0);
    for (int s = 0; s < h.B; ++s) kept[h.keep[s]] = 1;
    slot.assign(h.T, -1);
    cosine.assign(h.T, 0.0f);
    for (int t = 0; t < h.T; ++t) {
        if (kept[t]) continue;
        float best = -2.0f;
        int bs = 0;
        for (int s = 0; s < h.B; ++s) {
            const float * a = u.data() + (size_t) t * h.d;
            const float * b = u.data() + (size_t) h.keep[s] * h.d;
            float c = 0;
#pragma omp simd reduction(+ : c)
            for (int e = 0; e < h.d; ++e) c += a[e] * b[e];
            if (c > best) { best = c; bs = s; }
        }
        slot[t] = bs;
        cosine[t] = best;
    }
}

void merge_values(const HeadKV & h, float * out_k, float * out_v) {
    std::vector<int> slot;
    std::vector<float> cosine;
    route_evicted(h, slot, cosine);
    const int d = h.d;
    std::vector<double> acc((size_t) h.B * d), wsum(h.B, 1.0), nsum(h.B);
    for (int s = 0; s < h.B; ++s) {
        double n = 0;
        for (int e = 0; e < d; ++e) {
            const float v = h.kv(h.keep[s], e, false);
            acc[(size_t) s * d + e] = v;
            n += (double) v * v;
            out_k[(size_t) s * d + e] = h.kv(h.keep[s], e, true);
        }
        nsum[s] = std::sqrt(n);
    }
    for (int t = 0; t < h.T; ++t) {
        if (slot[t] < 0 || cosine[t] <= 0) continue;
        const int s = slot[t];
        const double w = cosine[t];
        double n = 0;
        for (int e = 0; e < d; ++e) {
            const float v = h.kv(t, e, false);
            acc[(size_t) s * d + e] += w * v;
            n += (double) v * v;
        }
        wsum[s] += w;
        nsum[s] += w * std::sqrt(n);
    }
    for (int s = 0; s < h.B; ++s) {
        double n = 0;
        for (int e = 0; e < d; ++e) n += acc[(size_t) s * d + e] * acc[(size_t) s * d + e];
        n = std::sqrt(n);
        // weighted mean direction, rescaled to the weighted mean norm (averaging shrinks vectors)
        const double target = nsum[s] / wsum[s];
        const double f = n > 0 ? target / n : 0.0;
        for (int e = 0; e < d; ++e) out_v[(size_t) s * d + e] = (float) (acc[(size_t) s * d + e] * f);
    }
}

}  // namespace grkv
