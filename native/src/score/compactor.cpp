// Compactor (Chari & Van Durme 2025): what each token receives from the
// queries of its own tile under non-causal attention, blended with the
// statistical leverage of its de-rotated key.
#include <cmath>
#include <vector>

#include "../linalg.h"
#include "../gemm.h"
#include "context_common.h"
#include "grkv/softcap.h"

namespace grkv {
Scores score_compactor(const LayerInput & in, const ContextParams & p, const float * hist, std::vector<float> * carry) {
    check_context_input(in, "compactor");
    if (!in.q || in.w > in.T || (in.w != in.T && !hist)) {
        throw Error("compactor needs the queries of every context token (or the earlier ones' carried attention)");
    }
    const int t0 = in.T - in.w;  // cells before t0 take their tile attention from hist
    for (int t = 0; t < in.w; ++t)
        if (in.qpos[t] != in.pos[t0 + t]) {
            throw Error("compactor: query positions must be the last cached tokens' positions");
        }
    if (p.chunk < 1) throw Error("compactor: chunk must be >= 1");
    if (in.rope.n_rot <= 0 || in.rope.n_rot > in.head_dim) throw Error("compactor needs the model's RoPE");
    const int d = in.head_dim, T = in.T, G = in.n_head / in.n_head_kv;
    Scores sc = empty_scores(in);
    protect_ends(sc, p.n_sink, p.n_recent);  // marks the protected tokens; scores are written below

    // 1. non-causal chunked attention, mean over the group, times ||v||, width-3 average
    std::vector<float> att((size_t) in.n_head_kv * T, 0.0f);
    if (hist)
        for (int hk = 0; hk < in.n_head_kv; ++hk)
            std::copy(hist + (size_t) hk * T, hist + (size_t) hk * T + t0, att.begin() + (size_t) hk * T);
    // kvpress scores chunks with unscaled logits (a heuristic, not the model's
    // attention); with chunk_scale the model's scale and soft cap apply
    const float zs = p.chunk_scale ? in.scale : 1.0f, cap = p.chunk_scale ? in.softcap : 0.0f;
    std::vector<float> KT, L;
    for (int a = t0; a < T; a += p.chunk) {
        const int n = std::min(p.chunk, T - a);
        KT.assign((size_t) d * n, 0.0f);
        L.assign((size_t) n * n, 0.0f);
        for (int hk = 0; hk < in.n_head_kv; ++hk) {
            for (int t = 0; t < n; ++t)
                for (int e = 0; e < d; ++e) KT[(size_t) e * n + t] = in.k[((size_t) (a + t) * in.n_head_kv + hk) * d + e];
            for (int g = 0; g < G; ++g) {
                const int hq = hk * G + g;
                gemm(n, n, d, in.q + ((size_t) (a - t0) * in.n_head + hq) * d, (size_t) in.n_head * d, 1, KT.data(), L.data());
                for (int i = 0; i < n; ++i) {
                    float * row = L.data() + (size_t) i * n;
                    float mx = -INFINITY;
                    for (int t = 0; t < n; ++t) mx = std::max(mx, row[t] = soft_cap(row[t] * zs, cap));
                    double z = 0;
                    for (int t = 0; t < n; ++t) z += (row[t] = std::exp(row[t] - mx));
                    const float inv = (float) (1.0 / z) / (float) G;
                    float * acc = att.data() + (size_t) hk * T + a;
                    for (int t = 0; t < n; ++t) acc[t] += row[t] * inv;
                }
            }
        }
    }
    if (carry) *carry = att;
    const std::vector<float> vn = value_norms(in);
    std::vector<float> A((size_t) in.n_head_kv * T);
    for (int hk = 0; hk < in.n_head_kv; ++hk) {
        const float * x = att.data() + (size_t) hk * T;
        for (int t = 0; t < T; ++t) {
            float s = 0;
            for (int u = std::max(0, t - 1); u <= std::min(T - 1, t + 1); ++u) s += x[u] * vn[(size_t) hk * T + u];
            A[(size_t) hk * T + t] = s / 3.0f;  // zero padding counted, as avg_pool1d
        }
    }

    // 2. ridge leverage of the de-rotated keys, centred over the context
    std::vector<float> lev((size_t) in.n_head_kv * T);
    std::vector<float> X((size_t) T * d);
    std::vector<double> M((size_t) d * d), y(d), mean(d);
    for (int hk = 0; hk < in.n_head_kv; ++hk) {
        std::fill(mean.begin(), mean.end(), 0.0);
        for (int t = 0; t < T; ++t) {
            const int32_t kp = in.kpos ? in.kpos[(size_t) hk * T + t] : in.pos[t];
            derotate(in.k + ((size_t) t * in.n_head_kv + hk) * d, d, in.rope, kp, X.data() + (size_t) t * d);
            for (int e = 0; e < d; ++e) mean[e] += X[(size_t) t * d + e];
        }
        for (int e = 0; e < d; ++e) mean[e] /= T;
        for (int t = 0; t < T; ++t)
            for (int e = 0; e < d; ++e) X[(size_t) t * d + e] -= (float) mean[e];
        std::fill(M.begin(), M.end(), 0.0);
        for (int t = 0; t < T; ++t) {
            const float * x = X.data() + (size_t) t * d;
            for (int a = 0; a < d; ++a)
                for (int b = 0; b <= a; ++b) M[(size_t) a * d + b] += (double) x[a] * x[b];
        }
        double tr = 0;
        for (int a = 0; a < d; ++a) tr += M[(size_t) a * d + a];
        const double lam = std::max(1e-12, (double) p.ridge * tr / d);
        for (int a = 0; a < d; ++a) {
            M[(size_t) a * d + a] += lam;
            for (int b = 0; b < a; ++b) M[(size_t) b * d + a] = M[(size_t) a * d + b];
        }
        if (!cholesky(M, d)) throw Error("compactor: key Gram matrix is not positive definite");
        for (int t = 0; t < T; ++t) {  // l_t = |L^-1 x_t|^2
            const float * x = X.data() + (size_t) t * d;
            double l2 = 0;
            for (int a = 0; a < d; ++a) {
                double s = x[a];
                for (int b = 0; b < a; ++b) s -= M[(size_t) a * d + b] * y[b];
                y[a] = s / M[(size_t) a * d + a];
                l2 += y[a] * y[a];
            }
            lev[(size_t) hk * T + t] = (float) l2;
        }
    }

    // 3. blend (beta unset outside a compression: half, kvpress's 50%)
    const float beta = p.beta >= 0 ? p.beta : 0.5f;
    zscore(A, in.n_head_kv, T, sc.protect);
    zscore(lev, in.n_head_kv, T, sc.protect);
    for (size_t i = 0; i < sc.s.size(); ++i) sc.s[i] = A[i] + beta * lev[i];
    protect_ends(sc, p.n_sink, p.n_recent);  // protected tokens above every other
    return sc;
}

}  // namespace grkv
