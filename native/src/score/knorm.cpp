// KNorm: keys with a small L2 norm tend to draw attention; keep them.
#include <cmath>

#include "grkv/score.h"

namespace grkv {

Scores score_knorm(const LayerInput & in) {
    Scores sc;
    sc.n_head_kv = in.n_head_kv;
    sc.T = in.T;
    sc.s.resize((size_t) in.n_head_kv * in.T);
    sc.protect.assign(in.T, 0);
    const int d = in.head_dim;
    for (int h = 0; h < in.n_head_kv; ++h) {
        for (int t = 0; t < in.T; ++t) {
            const float * k = in.k + ((size_t) t * in.n_head_kv + h) * d;
            double n2 = 0.0;
            for (int e = 0; e < d; ++e) n2 += (double) k[e] * k[e];
            sc.s[(size_t) h * in.T + t] = -(float) std::sqrt(n2);
        }
    }
    return sc;
}

}  // namespace grkv
