// Context reconstruction (KVzip, Kim et al. 2025): after the context, the
// model is made to repeat it; a context token's score is the largest
// attention any re-reading query pays it. The softmax is restricted to the
// sinks, the chunk being re-read and the re-read tokens themselves, so
// chunks are scored independently and scores compare across heads.
#include <cmath>
#include <vector>

#include "../gemm.h"
#include "context_common.h"
#include "grkv/softcap.h"

namespace grkv {

Scores score_reconstruct(const LayerInput & in, const ContextParams & p) {
    check_context_input(in, "reconstruct");
    if (!in.q || !in.rk || !in.qchunk || in.w <= 0) throw Error("reconstruct needs the re-read pass's queries and keys");
    if (in.n_chunk < 1 || !in.chunk_lo || !in.chunk_hi) throw Error("reconstruct needs the re-read chunks");
    const int d = in.head_dim, T = in.T, G = in.n_head / in.n_head_kv;
    for (int c = 0; c < in.n_chunk; ++c) {
        if (in.chunk_lo[c] < 0 || in.chunk_hi[c] > T || in.chunk_lo[c] >= in.chunk_hi[c]) {
            throw Error("reconstruct: chunk " + std::to_string(c) + " is not a token range of the context");
        }
    }
    for (int i = 0; i < in.w; ++i) {
        if (in.qchunk[i] < 0 || in.qchunk[i] >= in.n_chunk || (i && in.qchunk[i] < in.qchunk[i - 1])) {
            throw Error("reconstruct: query chunks must ascend within [0, n_chunk)");
        }
    }
    Scores sc = empty_scores(in);
    constexpr int QB = 128;  // query rows per block: bounds the logit buffer
    std::vector<float> KT, Lg;
    for (int i0 = 0, c = 0; c < in.n_chunk; ++c) {
        int i1 = i0;
        while (i1 < in.w && in.qchunk[i1] == c) ++i1;
        const int lo = in.chunk_lo[c], hi = in.chunk_hi[c];
        const int nP = std::min(p.n_sink, lo), nC = hi - lo, nR = i1 - i0, N = nP + nC + nR;
        if (nR == 0) continue;
        KT.assign((size_t) d * N, 0.0f);
        Lg.assign((size_t) QB * N, 0.0f);
        for (int hk = 0; hk < in.n_head_kv; ++hk) {
            // keys [sinks | chunk | re-read], transposed to [d][N]
            auto put = [&](int col, const float * k) {
                for (int e = 0; e < d; ++e) KT[(size_t) e * N + col] = k[e];
            };
            for (int t = 0; t < nP; ++t) put(t, in.k + ((size_t) t * in.n_head_kv + hk) * d);
            for (int t = 0; t < nC; ++t) put(nP + t, in.k + ((size_t) (lo + t) * in.n_head_kv + hk) * d);
            for (int r = 0; r < nR; ++r) put(nP + nC + r, in.rk + ((size_t) (i0 + r) * in.n_head_kv + hk) * d);
            float * out = sc.s.data() + (size_t) hk * T;
            for (int g = 0; g < G; ++g) {
                const int hq = hk * G + g;
                for (int b0 = 0; b0 < nR; b0 += QB) {
                    const int nb = std::min(QB, nR - b0);
                    gemm(nb, N, d, in.q + ((size_t) (i0 + b0) * in.n_head + hq) * d, (size_t) in.n_head * d, 1,
                         KT.data(), Lg.data());
                    for (int r = 0; r < nb; ++r) {
                        float * row = Lg.data() + (size_t) r * N;
                        const int n_vis = nP + nC + b0 + r + 1;  // causal among the re-read tokens
                        float mx = -INFINITY;
                        for (int t = 0; t < n_vis; ++t) mx = std::max(mx, row[t] = soft_cap(row[t] * in.scale, in.softcap));
                        double z = 0;
                        for (int t = 0; t < n_vis; ++t) z += (row[t] = std::exp(row[t] - mx));
                        const float inv = (float) (1.0 / z);
                        for (int t = 0; t < nP; ++t) out[t] = std::max(out[t], row[t] * inv);
                        for (int t = 0; t < nC; ++t) out[lo + t] = std::max(out[lo + t], row[nP + t] * inv);
                    }
                }
            }
        }
        i0 = i1;
    }
    protect_ends(sc, p.n_sink, p.n_recent);
    return sc;
}

}  // namespace grkv
