// GRKV (arXiv 2605.31105), from docs/grkv-spec.md §4: ridge regression of the
// kept slots' V (closed form, dual) and K (one Gauss-Newton step, CG) so that
// attention over the kept set reproduces full-cache attention on surrogate queries.
#include <algorithm>
#include <cmath>
#include <limits>

#include "grkv/common.h"
#include "grkv/merge.h"
#include "grkv/softcap.h"
#include "../linalg.h"
#include "gemm.h"

namespace grkv {
namespace {

// float dot product, vectorised (the remaining d- and B-long dots; products go through gemm.h)
inline float dot(const float * a, const float * b, int n) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int i = 0; i < n; ++i) s += a[i] * b[i];
    return s;
}

// In-place Cholesky of an SPD n x n matrix (lower), then solve for nrhs columns.
void cholesky_solve(std::vector<double> & M, int n, std::vector<double> & rhs, int nrhs) {
    if (!cholesky(M, n)) throw Error("GRKV: value-step system is not positive definite");
    for (int c = 0; c < nrhs; ++c) {  // rhs is [n][nrhs]
        for (int i = 0; i < n; ++i) {
            double t = rhs[(size_t) i * nrhs + c];
            for (int k = 0; k < i; ++k) t -= M[(size_t) i * n + k] * rhs[(size_t) k * nrhs + c];
            rhs[(size_t) i * nrhs + c] = t / M[(size_t) i * n + i];
        }
        for (int i = n - 1; i >= 0; --i) {
            double t = rhs[(size_t) i * nrhs + c];
            for (int k = i + 1; k < n; ++k) t -= M[(size_t) k * n + i] * rhs[(size_t) k * nrhs + c];
            rhs[(size_t) i * nrhs + c] = t / M[(size_t) i * n + i];
        }
    }
}

// Row-major [rows][cols] -> [cols][rows]: gemm's B operand is read row-major.
std::vector<float> transpose(const float * X, int rows, int cols) {
    std::vector<float> t((size_t) rows * cols);
    for (int i = 0; i < rows; ++i)
        for (int j = 0; j < cols; ++j) t[(size_t) j * rows + i] = X[(size_t) i * cols + j];
    return t;
}

}  // namespace

void grkv_student(const GrkvProblem & p, const float * K, const float * V, std::vector<float> & A,
                  std::vector<float> & O, std::vector<float> * dA) {
    const int R = p.R, B = p.B, d = p.d;
    const std::vector<float> Kt = transpose(K, B, d);  // [d][B]
    A.assign((size_t) R * B, 0.0f);
    O.assign((size_t) R * d, 0.0f);
    gemm(R, B, d, p.q.data(), d, 1, Kt.data(), A.data());  // logits q_r . k_s, softmaxed in place
    for (int r = 0; r < R; ++r) {
        const uint8_t * vis = p.vis.data() + (size_t) r * B;
        float * a = A.data() + (size_t) r * B;
        if (p.softcap > 0) {
            for (int s = 0; s < B; ++s) a[s] = soft_cap(p.scale * a[s], p.softcap) / p.scale;
        }
        if (dA) {  // the slope at each capped logit, overwritten by A * slope below
            dA->resize((size_t) R * B);
            for (int s = 0; s < B; ++s) (*dA)[(size_t) r * B + s] = soft_cap_slope(p.scale * a[s], p.softcap);
        }
        double mx = -std::numeric_limits<double>::infinity();
        for (int s = 0; s < B; ++s) if (vis[s]) mx = std::max(mx, (double) p.scale * a[s]);
        if (mx == -std::numeric_limits<double>::infinity()) {  // sees nothing
            std::fill(a, a + B, 0.0f);
            if (dA) std::fill(dA->begin() + (size_t) r * B, dA->begin() + (size_t) (r + 1) * B, 0.0f);
            continue;
        }
        double z = 0;
        for (int s = 0; s < B; ++s) {
            const double e = vis[s] ? std::exp((double) p.scale * a[s] - mx) : 0.0;
            a[s] = (float) e;
            z += e;
        }
        const float inv = (float) (1.0 / z);
        for (int s = 0; s < B; ++s) a[s] *= inv;
        if (dA) for (int s = 0; s < B; ++s) (*dA)[(size_t) r * B + s] *= a[s];
    }
    gemm(R, d, B, A.data(), B, 1, V, O.data());
}

double grkv_objective(const GrkvProblem & p, const float * K, const float * V, float lambda) {
    std::vector<float> A, O;
    grkv_student(p, K, V, A, O);
    double L = 0;
    for (int r = 0; r < p.R; ++r) {
        double e = 0;
        for (int c = 0; c < p.d; ++c) {
            const double diff = (double) O[(size_t) r * p.d + c] - p.ostar[(size_t) r * p.d + c];
            e += diff * diff;
        }
        L += p.w[r] * e;
    }
    double reg = 0;
    for (int s = 0; s < p.B; ++s) {
        if (!p.mut[s]) continue;
        for (int c = 0; c < p.d; ++c) {
            const size_t i = (size_t) s * p.d + c;
            const double dk = (double) K[i] - p.k0[i], dv = (double) V[i] - p.v0[i];
            reg += dk * dk + dv * dv;
        }
    }
    return L + lambda * reg;
}

std::vector<float> grkv_value_step(const GrkvProblem & p, const float * K, float lambda) {
    const int R = p.R, B = p.B, d = p.d;
    std::vector<float> A, O0;
    grkv_student(p, K, p.v0.data(), A, O0);
    // At = sqrt(w) * A[:, M]; residual Rt = sqrt(w) * (O* - A V0)
    std::vector<float> At((size_t) R * B);
    std::vector<double> Rt((size_t) R * d);
    for (int r = 0; r < R; ++r) {
        const double sw = std::sqrt((double) p.w[r]);
        for (int s = 0; s < B; ++s) At[(size_t) r * B + s] = p.mut[s] ? (float) (sw * A[(size_t) r * B + s]) : 0.0f;
        for (int c = 0; c < d; ++c) {
            Rt[(size_t) r * d + c] = sw * ((double) p.ostar[(size_t) r * d + c] - O0[(size_t) r * d + c]);
        }
    }
    std::vector<double> M((size_t) R * R);
    for (int i = 0; i < R; ++i) {
        for (int j = 0; j <= i; ++j) {
            const double s = dot(At.data() + (size_t) i * B, At.data() + (size_t) j * B, B);
            M[(size_t) i * R + j] = M[(size_t) j * R + i] = s + (i == j ? lambda : 0.0);
        }
    }
    cholesky_solve(M, R, Rt, d);  // Rt <- beta = (At At^T + lambda I)^-1 Rt
    std::vector<float> beta(Rt.begin(), Rt.end());
    std::vector<float> dV((size_t) B * d);
    gemm(B, d, R, At.data(), 1, B, beta.data(), dV.data());  // At^T beta
    return dV;
}

// JVP and VJP are two dense products each (gemm.h) around an elementwise
// mask-and-scale by the attention weights.

std::vector<float> grkv_jvp(const GrkvProblem & p, const std::vector<float> & A, const std::vector<float> & O,
                            const float * V, const float * D) {
    // do_r = sqrt(w_r) * sum_s c_rs (v_s - o_r),  c_rs = a_rs * scale * (q_r . D_s), s mutable
    const int R = p.R, B = p.B, d = p.d;
    const std::vector<float> Dt = transpose(D, B, d);  // [d][B]
    std::vector<float> c((size_t) R * B), out((size_t) R * d);
    gemm(R, B, d, p.q.data(), d, 1, Dt.data(), c.data());  // q_r . D_s
    std::vector<float> csum(R, 0.0f);
    for (int r = 0; r < R; ++r) {
        const float * a = A.data() + (size_t) r * B;
        float * cr = c.data() + (size_t) r * B;
        float t = 0.0f;
        for (int s = 0; s < B; ++s) {
            cr[s] = p.mut[s] ? a[s] * p.scale * cr[s] : 0.0f;
            t += cr[s];
        }
        csum[r] = t;
    }
    gemm(R, d, B, c.data(), B, 1, V, out.data());  // sum_s c_rs v_s
    for (int r = 0; r < R; ++r) {
        float * acc = out.data() + (size_t) r * d;
        const float * o = O.data() + (size_t) r * d;
        const float sw = std::sqrt(p.w[r]);
        for (int e = 0; e < d; ++e) acc[e] = sw * (acc[e] - csum[r] * o[e]);
    }
    return out;
}

std::vector<float> grkv_vjp(const GrkvProblem & p, const std::vector<float> & A, const std::vector<float> & O,
                            const float * V, const float * U) {
    // (J^T u)_s = scale * sum_r sqrt(w_r) a_rs (u_r . v_s - u_r . o_r) q_r, s mutable
    const int R = p.R, B = p.B, d = p.d;
    const std::vector<float> Vt = transpose(V, B, d);  // [d][B]
    std::vector<float> g((size_t) R * B), out((size_t) B * d);
    gemm(R, B, d, U, d, 1, Vt.data(), g.data());  // u_r . v_s
    for (int r = 0; r < R; ++r) {
        const float uo = dot(U + (size_t) r * d, O.data() + (size_t) r * d, d);
        const float f = p.scale * std::sqrt(p.w[r]);
        const float * a = A.data() + (size_t) r * B;
        float * gr = g.data() + (size_t) r * B;
        for (int s = 0; s < B; ++s) gr[s] = p.mut[s] ? f * a[s] * (gr[s] - uo) : 0.0f;
    }
    gemm(B, d, R, g.data(), 1, B, p.q.data(), out.data());  // sum_r g_rs q_r (g read transposed)
    return out;
}

std::vector<float> grkv_key_step(const GrkvProblem & p, const float * Kc, const float * V, const GrkvParams & prm) {
    const int R = p.R, B = p.B, d = p.d;
    std::vector<float> A0, O, A;
    grkv_student(p, Kc, V, A0, O, &A);  // A: the JVP/VJP weights
    std::vector<float> c((size_t) B * d, 0.0f);
    for (size_t i = 0; i < c.size(); ++i) c[i] = p.mut[i / d] ? Kc[i] - p.k0[i] : 0.0f;
    const std::vector<float> Jc = grkv_jvp(p, A, O, V, c.data());
    std::vector<double> b((size_t) R * d);
    for (int r = 0; r < R; ++r) {
        const double sw = std::sqrt((double) p.w[r]);
        for (int e = 0; e < d; ++e) {
            const size_t i = (size_t) r * d + e;
            b[i] = sw * ((double) p.ostar[i] - O[i]) + Jc[i];
        }
    }
    // CG on (J J^T + lambda I) u = b
    const size_t n = b.size();
    std::vector<double> x(n, 0.0), res = b, dir = b;
    std::vector<float> dirf(n);
    double rs = 0, bnorm = 0;
    for (size_t i = 0; i < n; ++i) rs += res[i] * res[i];
    bnorm = std::sqrt(rs);
    if (bnorm > 0) {
        for (int it = 0; it < prm.cg_iters; ++it) {
            for (size_t i = 0; i < n; ++i) dirf[i] = (float) dir[i];
            const std::vector<float> jt = grkv_vjp(p, A, O, V, dirf.data());
            const std::vector<float> jjt = grkv_jvp(p, A, O, V, jt.data());
            double pAp = 0;
            std::vector<double> Ap(n);
            for (size_t i = 0; i < n; ++i) {
                Ap[i] = jjt[i] + prm.lambda * dir[i];
                pAp += dir[i] * Ap[i];
            }
            if (pAp <= 0) break;
            const double alpha = rs / pAp;
            double rs_new = 0;
            for (size_t i = 0; i < n; ++i) {
                x[i] += alpha * dir[i];
                res[i] -= alpha * Ap[i];
                rs_new += res[i] * res[i];
            }
            if (std::sqrt(rs_new) <= prm.cg_tol * bnorm) break;
            const double beta = rs_new / rs;
            rs = rs_new;
            for (size_t i = 0; i < n; ++i) dir[i] = res[i] + beta * dir[i];
        }
    }
    std::vector<float> xf(n);
    for (size_t i = 0; i < n; ++i) xf[i] = (float) x[i];
    return grkv_vjp(p, A, O, V, xf.data());  // new total offset K - K0
}

std::vector<float> grkv_cap_round(const std::vector<float> & X0, const std::vector<float> & dX,
                                  const std::vector<uint8_t> & mut, int d, float cap, const RowCodec & codec) {
    double n0 = 0, nd = 0;
    for (size_t i = 0; i < X0.size(); ++i) {
        if (!mut[i / d]) continue;
        n0 += (double) X0[i] * X0[i];
        nd += (double) dX[i] * dX[i];
    }
    n0 = std::sqrt(n0);
    nd = std::sqrt(nd);
    double s = 1.0;
    if (cap > 0 && nd > 0) s = std::min(1.0, cap * n0 / nd);
    std::vector<float> X = X0;
    const size_t B = X0.size() / d;
    for (int attempt = 0; attempt <= 4; ++attempt) {
        double nr = 0;
        for (size_t r = 0; r < B; ++r) {
            if (!mut[r]) continue;
            float * x = X.data() + r * d;
            for (int e = 0; e < d; ++e) x[e] = (float) (X0[r * d + e] + s * dX[r * d + e]);
            codec_round_trip(codec, x, d);  // a quantised row moves as whole blocks
            for (int e = 0; e < d; ++e) {
                const double diff = (double) x[e] - X0[r * d + e];
                nr += diff * diff;
            }
        }
        if (cap <= 0 || std::sqrt(nr) <= cap * n0) return X;
        s *= 0.9;
    }
    return X0;  // storage keeps pushing past the cap: leave the head unchanged
}

GrkvResult grkv_fit(const GrkvProblem & p, const GrkvParams & prm) {
    if (prm.steps < 1) throw Error("GRKV steps must be >= 1");
    GrkvResult res;
    const int d = p.d;
    auto add = [&](const std::vector<float> & K, const std::vector<float> & V) {
        res.cand_k.push_back(K);
        res.cand_v.push_back(V);
        res.cand_obj.push_back(grkv_objective(p, K.data(), V.data(), prm.lambda));
    };
    add(p.k0, p.v0);
    std::vector<float> K = p.k0, V = p.v0;
    for (int step = 0; step < prm.steps; ++step) {
        const std::vector<float> dV = grkv_value_step(p, K.data(), prm.lambda);
        V = grkv_cap_round(p.v0, dV, p.mut, d, prm.cap_v, prm.codec_v);
        add(K, V);
        if (prm.update_k) {
            std::vector<float> dK = grkv_key_step(p, K.data(), V.data(), prm);
            K = grkv_cap_round(p.k0, dK, p.mut, d, prm.cap_k, prm.codec_k);
            add(K, V);
        }
    }
    res.obj_none = res.cand_obj[0];
    res.obj_v = res.cand_obj[res.cand_obj.size() - (prm.update_k ? 2 : 1)];
    res.obj_kv = res.cand_obj.back();
    const size_t best = std::min_element(res.cand_obj.begin(), res.cand_obj.end()) - res.cand_obj.begin();
    res.k = res.cand_k[best];
    res.v = res.cand_v[best];
    return res;
}

}  // namespace grkv
