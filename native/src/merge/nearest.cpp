// Nearest-neighbour merging of evicted tokens into kept ones, K and V alike
// (KVMerger-style pivot / weighted rules, docs/grkv-spec.md §6.1).
#include <vector>

#include "grkv/merge.h"

namespace grkv {

void route_evicted(const HeadKV & h, std::vector<int> & slot, std::vector<float> & cosine);

void merge_nearest(const HeadKV & h, bool weighted, float * out_k, float * out_v) {
    std::vector<int> slot;
    std::vector<float> cosine;
    route_evicted(h, slot, cosine);
    const int d = h.d;
    for (int pass = 0; pass < 2; ++pass) {
        const bool is_k = pass == 0;
        float * out = is_k ? out_k : out_v;
        std::vector<double> acc((size_t) h.B * d), wsum(h.B, 1.0);
        for (int s = 0; s < h.B; ++s) {
            for (int e = 0; e < d; ++e) acc[(size_t) s * d + e] = h.kv(h.keep[s], e, is_k);
        }
        for (int t = 0; t < h.T; ++t) {
            if (slot[t] < 0) continue;
            const int s = slot[t];
            if (weighted) {
                const double w = (cosine[t] + 1.0) / 2.0;
                for (int e = 0; e < d; ++e) acc[(size_t) s * d + e] += w * h.kv(t, e, is_k);
                wsum[s] += w;
            } else {  // pivot: mean of the kept token and the midpoints (x_e + x_c) / 2
                for (int e = 0; e < d; ++e) {
                    acc[(size_t) s * d + e] += 0.5 * (h.kv(t, e, is_k) + h.kv(h.keep[s], e, is_k));
                }
                wsum[s] += 1.0;
            }
        }
        for (int s = 0; s < h.B; ++s) {
            for (int e = 0; e < d; ++e) out[(size_t) s * d + e] = (float) (acc[(size_t) s * d + e] / wsum[s]);
        }
    }
}

}  // namespace grkv
