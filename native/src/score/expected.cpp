// Expected Attention (Devoto et al. 2025): the attention future queries are
// expected to pay each key, with queries modelled as a Gaussian fitted to the
// context's own (de-rotated) queries and RoPE averaged over the next positions.
#include <cmath>
#include <vector>

#include "../gemm.h"
#include "context_common.h"

namespace grkv {

Scores score_expected(const LayerInput & in, const ContextParams & p) {
    check_context_input(in, "expected attention");
    if (!in.q || in.w <= 0) throw Error("expected attention needs the context's captured queries");
    if (in.rope.n_rot <= 0 || in.rope.n_rot > in.head_dim) throw Error("expected attention needs the model's RoPE");
    if (p.n_future < 1) throw Error("expected attention: n_future must be >= 1");
    // E[exp(q.k)] over Gaussian queries is closed-form only without the tanh cap
    if (in.softcap > 0) throw Error("expected attention has no closed form under soft-capped logits (Gemma-2)");
    in.rope.check();
    const int d = in.head_dim, T = in.T, G = in.n_head / in.n_head_kv, half = in.rope.n_rot / 2;
    const int n_sink = std::min(p.n_sink, T);
    const double next_pos = p.next_pos >= 0 ? p.next_pos : (double) in.pos[T - 1] + 1;

    // R̄ = mean over tau in [next_pos, next_pos + n_future) of R(tau), as a dense d x d matrix
    std::vector<double> R((size_t) d * d, 0.0);
    for (int e = 0; e < d; ++e) R[(size_t) e * d + e] = 1.0;
    for (int i = 0; i < half; ++i) {
        const double th = in.rope.theta(i);
        double c = 0, s = 0;
        for (int k = 0; k < p.n_future; ++k) {
            c += std::cos((next_pos + k) * th);
            s += std::sin((next_pos + k) * th);
        }
        c /= p.n_future;
        s /= p.n_future;
        const int a = in.rope.neox ? i : 2 * i, b = in.rope.neox ? i + half : 2 * i + 1;
        R[(size_t) a * d + a] = c;
        R[(size_t) a * d + b] = -s;
        R[(size_t) b * d + a] = s;
        R[(size_t) b * d + b] = c;
    }

    Scores sc = empty_scores(in);
    const std::vector<float> vn = value_norms(in);
    std::vector<float> tmp(d), Sb((size_t) d * d), KS((size_t) T * d), logit(T);
    std::vector<double> mu(d), cov((size_t) d * d), mub(d), RS((size_t) d * d);
    // keys of one KV head, contiguous [T][d]
    std::vector<float> Kh((size_t) T * d);
    for (int hk = 0; hk < in.n_head_kv; ++hk) {
        for (int t = 0; t < T; ++t) {
            const float * k = in.k + ((size_t) t * in.n_head_kv + hk) * d;
            std::copy(k, k + d, Kh.begin() + (size_t) t * d);
        }
        float * out = sc.s.data() + (size_t) hk * T;
        for (int g = 0; g < G; ++g) {
            const int hq = hk * G + g;
            // Gaussian statistics of the pre-RoPE queries after the sinks
            std::fill(mu.begin(), mu.end(), 0.0);
            std::fill(cov.begin(), cov.end(), 0.0);
            long n = 0;
            for (int j = 0; j < in.w; ++j) {
                if (in.qpos[j] < n_sink) continue;
                derotate(in.q + ((size_t) j * in.n_head + hq) * d, d, in.rope, in.qpos[j], tmp.data());
                for (int a = 0; a < d; ++a) {
                    mu[a] += tmp[a];
                    for (int b = 0; b <= a; ++b) cov[(size_t) a * d + b] += (double) tmp[a] * tmp[b];
                }
                ++n;
            }
            if (n == 0) throw Error("expected attention: no context queries after the sinks");
            for (int a = 0; a < d; ++a) mu[a] /= n;
            for (int a = 0; a < d; ++a)
                for (int b = 0; b <= a; ++b) {
                    const double c = cov[(size_t) a * d + b] / n - mu[a] * mu[b];
                    cov[(size_t) a * d + b] = cov[(size_t) b * d + a] = c;
                }
            // μ̄ = R̄ μ, Σ̄ = R̄ Σ R̄ᵀ
            for (int a = 0; a < d; ++a) {
                double s = 0;
                for (int b = 0; b < d; ++b) s += R[(size_t) a * d + b] * mu[b];
                mub[a] = s;
            }
            for (int a = 0; a < d; ++a)
                for (int b = 0; b < d; ++b) {
                    double s = 0;
                    for (int c = 0; c < d; ++c) s += R[(size_t) a * d + c] * cov[(size_t) c * d + b];
                    RS[(size_t) a * d + b] = s;
                }
            for (int a = 0; a < d; ++a)
                for (int b = 0; b < d; ++b) {
                    double s = 0;
                    for (int c = 0; c < d; ++c) s += RS[(size_t) a * d + c] * R[(size_t) b * d + c];
                    Sb[(size_t) a * d + b] = p.use_cov ? (float) s : 0.0f;
                }
            // l_j = s μ̄·k_j + s²/2 kᵀ Σ̄ k over the non-sink keys, softmax
            gemm(T, d, d, Kh.data(), d, 1, Sb.data(), KS.data());
            const float s1 = in.scale, s2 = 0.5f * in.scale * in.scale;
            float mx = -INFINITY;
            for (int t = n_sink; t < T; ++t) {
                const float * k = Kh.data() + (size_t) t * d;
                const float * ks = KS.data() + (size_t) t * d;
                double lin = 0, quad = 0;
                for (int e = 0; e < d; ++e) {
                    lin += mub[e] * k[e];
                    quad += (double) ks[e] * k[e];
                }
                logit[t] = (float) (s1 * lin + s2 * quad);
                mx = std::max(mx, logit[t]);
            }
            double z = 0;
            for (int t = n_sink; t < T; ++t) z += (logit[t] = std::exp(logit[t] - mx));
            for (int t = n_sink; t < T; ++t) out[t] += (float) (logit[t] / z) / (float) G;
        }
        for (int t = 0; t < T; ++t) out[t] = (out[t] + p.eps) * vn[(size_t) hk * T + t];
    }
    protect_ends(sc, n_sink, p.n_recent);
    return sc;
}

}  // namespace grkv
