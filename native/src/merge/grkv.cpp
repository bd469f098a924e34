// GRKV (arXiv 2605.31105), from docs/grkv-spec.md §4: ridge regression of the
// kept slots' V (closed form, dual) and K (one Gauss-Newton step, CG) so that
// attention over the kept set reproduces full-cache attention on surrogate queries.
#include <algorithm>
#include <cmath>
#include <limits>

#include "grkv/common.h"
#include "grkv/merge.h"

namespace grkv {
namespace {

// float dot product, vectorised: the fit's inner loops are all d- or B-long dots and axpys
inline float dot(const float * a, const float * b, int n) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int i = 0; i < n; ++i) s += a[i] * b[i];
    return s;
}

inline void axpy(float a, const float * x, float * y, int n) {
#pragma omp simd
    for (int i = 0; i < n; ++i) y[i] += a * x[i];
}

// In-place Cholesky of an SPD n x n matrix (lower), then solve for nrhs columns.
void cholesky_solve(std::vector<double> & M, int n, std::vector<double> & rhs, int nrhs) {
    for (int j = 0; j < n; ++j) {
        double s = M[(size_t) j * n + j];
        for (int k = 0; k < j; ++k) s -= M[(size_t) j * n + k] * M[(size_t) j * n + k];
        if (s <= 0) throw Error("GRKV: value-step system is not positive definite");
        const double ljj = std::sqrt(s);
        M[(size_t) j * n + j] = ljj;
        for (int i = j + 1; i < n; ++i) {
            double t = M[(size_t) i * n + j];
            for (int k = 0; k < j; ++k) t -= M[(size_t) i * n + k] * M[(size_t) j * n + k];
            M[(size_t) i * n + j] = t / ljj;
        }
    }
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

}  // namespace

void grkv_student(const GrkvProblem & p, const float * K, const float * V, std::vector<float> & A,
                  std::vector<float> & O) {
    const int R = p.R, B = p.B, d = p.d;
    A.assign((size_t) R * B, 0.0f);
    O.assign((size_t) R * d, 0.0f);
    std::vector<double> l(B);
    for (int r = 0; r < R; ++r) {
        const float * q = p.q.data() + (size_t) r * d;
        const uint8_t * vis = p.vis.data() + (size_t) r * B;
        double mx = -std::numeric_limits<double>::infinity();
        for (int s = 0; s < B; ++s) {
            if (!vis[s]) continue;
            l[s] = p.scale * dot(q, K + (size_t) s * d, d);
            mx = std::max(mx, l[s]);
        }
        if (mx == -std::numeric_limits<double>::infinity()) continue;  // sees nothing
        double z = 0;
        for (int s = 0; s < B; ++s) if (vis[s]) z += (l[s] = std::exp(l[s] - mx));
        float * a = A.data() + (size_t) r * B;
        float * o = O.data() + (size_t) r * d;
        for (int s = 0; s < B; ++s) {
            if (!vis[s]) continue;
            a[s] = (float) (l[s] / z);
            axpy(a[s], V + (size_t) s * d, o, d);
        }
    }
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
    std::vector<float> dV((size_t) B * d, 0.0f);
    for (int r = 0; r < R; ++r) {
        const float * ar = At.data() + (size_t) r * B;
        const float * br = beta.data() + (size_t) r * d;
        for (int s = 0; s < B; ++s) {
            if (ar[s] != 0.0f) axpy(ar[s], br, dV.data() + (size_t) s * d, d);
        }
    }
    return dV;
}

// JVP and VJP are written as row-times-matrix products over a transposed
// copy (axpys over contiguous rows vectorise; no horizontal reductions).
namespace {

std::vector<float> transpose(const float * X, int rows, int cols) {
    std::vector<float> t((size_t) rows * cols);
    for (int i = 0; i < rows; ++i)
        for (int j = 0; j < cols; ++j) t[(size_t) j * rows + i] = X[(size_t) i * cols + j];
    return t;
}

}  // namespace

// Rows are processed four at a time so that each streamed row of D^T / V^T /
// V feeds four accumulators (the fit is bound by these loads otherwise).
constexpr int kRowBlock = 4;

// c[k][s] = q_k . X_s for the rows of one block, X given transposed ([d][B]).
static void block_dots(const float * const * q, int nk, const std::vector<float> & Xt, int B, int d,
                       std::vector<float> * c) {
    for (int k = 0; k < nk; ++k) std::fill(c[k].begin(), c[k].end(), 0.0f);
    for (int e = 0; e < d; ++e) {
        const float * x = Xt.data() + (size_t) e * B;
        if (nk == kRowBlock) {
            const float q0 = q[0][e], q1 = q[1][e], q2 = q[2][e], q3 = q[3][e];
            float *c0 = c[0].data(), *c1 = c[1].data(), *c2 = c[2].data(), *c3 = c[3].data();
#pragma omp simd
            for (int s = 0; s < B; ++s) {
                c0[s] += q0 * x[s];
                c1[s] += q1 * x[s];
                c2[s] += q2 * x[s];
                c3[s] += q3 * x[s];
            }
        } else {
            for (int k = 0; k < nk; ++k) axpy(q[k][e], x, c[k].data(), B);
        }
    }
}

std::vector<float> grkv_jvp(const GrkvProblem & p, const std::vector<float> & A, const std::vector<float> & O,
                            const float * V, const float * D) {
    // do_r = sqrt(w_r) * sum_s c_rs (v_s - o_r),  c_rs = a_rs * scale * (q_r . D_s), s mutable
    const int R = p.R, B = p.B, d = p.d;
    const std::vector<float> Dt = transpose(D, B, d);  // [d][B]
    std::vector<float> out((size_t) R * d, 0.0f);
    std::vector<float> c[kRowBlock];
    for (auto & x : c) x.resize(B);
    for (int r0 = 0; r0 < R; r0 += kRowBlock) {
        const int nk = std::min(kRowBlock, R - r0);
        const float * q[kRowBlock];
        for (int k = 0; k < nk; ++k) q[k] = p.q.data() + (size_t) (r0 + k) * d;
        block_dots(q, nk, Dt, B, d, c);
        float csum[kRowBlock] = {0, 0, 0, 0};
        for (int k = 0; k < nk; ++k) {
            const float * a = A.data() + (size_t) (r0 + k) * B;
            for (int s = 0; s < B; ++s) {
                c[k][s] = p.mut[s] ? a[s] * p.scale * c[k][s] : 0.0f;
                csum[k] += c[k][s];
            }
        }
        for (int s = 0; s < B; ++s) {
            const float * v = V + (size_t) s * d;
            for (int k = 0; k < nk; ++k) {
                if (c[k][s] != 0.0f) axpy(c[k][s], v, out.data() + (size_t) (r0 + k) * d, d);
            }
        }
        for (int k = 0; k < nk; ++k) {
            float * acc = out.data() + (size_t) (r0 + k) * d;
            const float * o = O.data() + (size_t) (r0 + k) * d;
            const float sw = std::sqrt(p.w[r0 + k]);
            for (int e = 0; e < d; ++e) acc[e] = sw * (acc[e] - csum[k] * o[e]);
        }
    }
    return out;
}

std::vector<float> grkv_vjp(const GrkvProblem & p, const std::vector<float> & A, const std::vector<float> & O,
                            const float * V, const float * U) {
    // (J^T u)_s = scale * sum_r sqrt(w_r) a_rs (u_r . v_s - u_r . o_r) q_r, s mutable
    const int R = p.R, B = p.B, d = p.d;
    const std::vector<float> Vt = transpose(V, B, d);  // [d][B]
    std::vector<float> out((size_t) B * d, 0.0f);
    std::vector<float> uv[kRowBlock];
    for (auto & x : uv) x.resize(B);
    for (int r0 = 0; r0 < R; r0 += kRowBlock) {
        const int nk = std::min(kRowBlock, R - r0);
        const float * u[kRowBlock];
        for (int k = 0; k < nk; ++k) u[k] = U + (size_t) (r0 + k) * d;
        block_dots(u, nk, Vt, B, d, uv);
        for (int k = 0; k < nk; ++k) {
            const float uo = dot(u[k], O.data() + (size_t) (r0 + k) * d, d);
            const float f = p.scale * std::sqrt(p.w[r0 + k]);
            const float * a = A.data() + (size_t) (r0 + k) * B;
            for (int s = 0; s < B; ++s) uv[k][s] = p.mut[s] ? f * a[s] * (uv[k][s] - uo) : 0.0f;
        }
        for (int s = 0; s < B; ++s) {
            if (!p.mut[s]) continue;
            float * os = out.data() + (size_t) s * d;
            for (int k = 0; k < nk; ++k) {
                if (uv[k][s] != 0.0f) axpy(uv[k][s], p.q.data() + (size_t) (r0 + k) * d, os, d);
            }
        }
    }
    return out;
}

std::vector<float> grkv_key_step(const GrkvProblem & p, const float * Kc, const float * V, const GrkvParams & prm) {
    const int R = p.R, B = p.B, d = p.d;
    std::vector<float> A, O;
    grkv_student(p, Kc, V, A, O);
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
                                  const std::vector<uint8_t> & mut, int d, float cap, int32_t dtype) {
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
    for (int attempt = 0; attempt <= 4; ++attempt) {
        double nr = 0;
        for (size_t i = 0; i < X0.size(); ++i) {
            if (!mut[i / d]) continue;
            X[i] = round_trip(dtype, (float) (X0[i] + s * dX[i]));
            const double diff = (double) X[i] - X0[i];
            nr += diff * diff;
        }
        if (cap <= 0 || std::sqrt(nr) <= cap * n0) return X;
        s *= 0.9;
    }
    return X0;  // rounding keeps pushing past the cap: leave the head unchanged
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
        V = grkv_cap_round(p.v0, dV, p.mut, d, prm.cap_v, prm.dtype);
        add(K, V);
        if (prm.update_k) {
            std::vector<float> dK = grkv_key_step(p, K.data(), V.data(), prm);
            K = grkv_cap_round(p.k0, dK, p.mut, d, prm.cap_k, prm.dtype);
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
