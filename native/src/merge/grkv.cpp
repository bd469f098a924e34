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
#include "../gemm.h"
#include "../softmax.h"

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
// Blocked, so that neither side walks a column of 1-8 KB-apart rows.
void transpose_into(const float * X, int rows, int cols, float * t) {
    constexpr int TB = 16;
    for (int i0 = 0; i0 < rows; i0 += TB)
        for (int j0 = 0; j0 < cols; j0 += TB)
            for (int i = i0; i < std::min(rows, i0 + TB); ++i)
                for (int j = j0; j < std::min(cols, j0 + TB); ++j) t[(size_t) j * rows + i] = X[(size_t) i * cols + j];
}

std::vector<float> transpose(const float * X, int rows, int cols) {
    std::vector<float> t((size_t) rows * cols);
    transpose_into(X, rows, cols, t.data());
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
        int n_vis = 0;
        for (int s = 0; s < B; ++s) {
            if (vis[s]) ++n_vis;
            else a[s] = -std::numeric_limits<float>::infinity();
        }
        if (n_vis == 0) {  // sees nothing
            std::fill(a, a + B, 0.0f);
            if (dA) std::fill(dA->begin() + (size_t) r * B, dA->begin() + (size_t) (r + 1) * B, 0.0f);
            continue;
        }
        softmax_row(a, B, p.scale);  // masked logits are -inf: weight 0
        if (dA) {
            float * da = dA->data() + (size_t) r * B;
#pragma omp simd
            for (int s = 0; s < B; ++s) da[s] *= a[s];
        }
    }
    gemm(R, d, B, A.data(), B, 1, V, O.data());
}

namespace {

// The objective of (K, V) given the student's output O at them.
double objective_at(const GrkvProblem & p, const std::vector<float> & O, const float * K, const float * V,
                    float lambda) {
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

// Value step given the student's weights A at K and its output O0 = A V0.
std::vector<float> value_step_at(const GrkvProblem & p, const std::vector<float> & A, const std::vector<float> & O0,
                                 float lambda) {
    const int R = p.R, B = p.B, d = p.d;
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
    // Gram matrix At At^T through the tiled product (float accumulation over B,
    // then solved in double)
    const std::vector<float> AtT = transpose(At.data(), R, B);  // [B][R]
    std::vector<float> Mf((size_t) R * R);
    gemm(R, R, B, At.data(), B, 1, AtT.data(), Mf.data());
    std::vector<double> M((size_t) R * R);
    for (int i = 0; i < R; ++i) {
        for (int j = 0; j <= i; ++j) {
            const double s = 0.5 * ((double) Mf[(size_t) i * R + j] + Mf[(size_t) j * R + i]);
            M[(size_t) i * R + j] = M[(size_t) j * R + i] = s + (i == j ? lambda : 0.0);
        }
    }
    cholesky_solve(M, R, Rt, d);  // Rt <- beta = (At At^T + lambda I)^-1 Rt
    std::vector<float> beta(Rt.begin(), Rt.end());
    std::vector<float> dV((size_t) B * d);
    gemm(B, d, R, At.data(), 1, B, beta.data(), dV.data());  // At^T beta
    return dV;
}

}  // namespace

double grkv_objective(const GrkvProblem & p, const float * K, const float * V, float lambda) {
    std::vector<float> A, O;
    grkv_student(p, K, V, A, O);
    return objective_at(p, O, K, V, lambda);
}

std::vector<float> grkv_value_step(const GrkvProblem & p, const float * K, float lambda) {
    std::vector<float> A, O0;
    grkv_student(p, K, p.v0.data(), A, O0);
    return value_step_at(p, A, O0, lambda);
}

// JVP and VJP are two dense products each (gemm.h) around an elementwise
// mask-and-scale by the attention weights. The CG calls them ~2x per
// iteration on the same (A, O, V): Jacobian keeps what does not change
// (V transposed, sqrt(w), the mutable mask as 0/1) and its scratch.
namespace {

struct Jacobian {
    const GrkvProblem & p;
    const float * A;  // grkv_student's dA [R][B]
    const float * O;  // its output [R][d]
    const float * V;  // [B][d]
    std::vector<float> Vt, sw, mutf, tmp_bd, tmp_rb, csum;

    Jacobian(const GrkvProblem & p_, const float * A_, const float * O_, const float * V_)
        : p(p_), A(A_), O(O_), V(V_), Vt(transpose(V_, p_.B, p_.d)), sw(p_.R), mutf(p_.B), tmp_bd((size_t) p_.B * p_.d),
          tmp_rb((size_t) p_.R * p_.B), csum(p_.R) {
        for (int r = 0; r < p.R; ++r) sw[r] = std::sqrt(p.w[r]);
        for (int s = 0; s < p.B; ++s) mutf[s] = p.mut[s] ? 1.0f : 0.0f;
    }

    // do_r = sqrt(w_r) * sum_s c_rs (v_s - o_r),  c_rs = a_rs * scale * (q_r . D_s), s mutable
    void jvp(const float * D, float * out) {
        const int R = p.R, B = p.B, d = p.d;
        transpose_into(D, B, d, tmp_bd.data());  // [d][B]
        float * c = tmp_rb.data();
        gemm(R, B, d, p.q.data(), d, 1, tmp_bd.data(), c);  // q_r . D_s
        for (int r = 0; r < R; ++r) {
            const float * a = A + (size_t) r * B;
            float * cr = c + (size_t) r * B;
            float t = 0.0f;
#pragma omp simd reduction(+ : t)
            for (int s = 0; s < B; ++s) {
                cr[s] = mutf[s] * a[s] * p.scale * cr[s];
                t += cr[s];
            }
            csum[r] = t;
        }
        gemm(R, d, B, c, B, 1, V, out);  // sum_s c_rs v_s
        for (int r = 0; r < R; ++r) {
            float * acc = out + (size_t) r * d;
            const float * o = O + (size_t) r * d;
#pragma omp simd
            for (int e = 0; e < d; ++e) acc[e] = sw[r] * (acc[e] - csum[r] * o[e]);
        }
    }

    // (J^T u)_s = scale * sum_r sqrt(w_r) a_rs (u_r . v_s - u_r . o_r) q_r, s mutable
    void vjp(const float * U, float * out) {
        const int R = p.R, B = p.B, d = p.d;
        float * g = tmp_rb.data();
        gemm(R, B, d, U, d, 1, Vt.data(), g);  // u_r . v_s
        for (int r = 0; r < R; ++r) {
            const float uo = dot(U + (size_t) r * d, O + (size_t) r * d, d);
            const float f = p.scale * sw[r];
            const float * a = A + (size_t) r * B;
            float * gr = g + (size_t) r * B;
#pragma omp simd
            for (int s = 0; s < B; ++s) gr[s] = mutf[s] * f * a[s] * (gr[s] - uo);
        }
        gemm(B, d, R, g, 1, B, p.q.data(), out);  // sum_r g_rs q_r (g read transposed)
    }
};

}  // namespace

std::vector<float> grkv_jvp(const GrkvProblem & p, const std::vector<float> & A, const std::vector<float> & O,
                            const float * V, const float * D) {
    std::vector<float> out((size_t) p.R * p.d);
    Jacobian(p, A.data(), O.data(), V).jvp(D, out.data());
    return out;
}

std::vector<float> grkv_vjp(const GrkvProblem & p, const std::vector<float> & A, const std::vector<float> & O,
                            const float * V, const float * U) {
    std::vector<float> out((size_t) p.B * p.d);
    Jacobian(p, A.data(), O.data(), V).vjp(U, out.data());
    return out;
}

namespace {

// Key step given the student at (Kc, V): A its JVP/VJP weights (dA), O its output.
// The step moves the active slots: the mutable ones whose largest weight
// reaches prm.key_active. J's column for slot s scales with a_rs, so a slot
// no surrogate query attends to adds almost nothing to J J^T and would barely
// move; leaving it fixed shrinks every CG product by the share of such slots.
std::vector<float> key_step_at(const GrkvProblem & p, const float * Kc, const float * V, const std::vector<float> & A,
                               const std::vector<float> & O, const GrkvParams & prm, long * n_iter = nullptr) {
    const int R = p.R, B = p.B, d = p.d;
    std::vector<int> act;
    for (int s = 0; s < B; ++s) {
        if (!p.mut[s]) continue;
        float mx = 0.0f;
        for (int r = 0; r < R; ++r) mx = std::max(mx, A[(size_t) r * B + s]);
        if (mx >= prm.key_active) act.push_back(s);
    }
    // the problem restricted to the active slots (jvp/vjp read q, w, scale, mut)
    GrkvProblem ps;
    ps.R = R;
    ps.B = (int) act.size();
    ps.d = d;
    ps.scale = p.scale;
    ps.q = p.q;
    ps.w = p.w;
    ps.mut.assign(ps.B, 1);
    std::vector<float> As((size_t) R * ps.B), Vs((size_t) ps.B * d), c((size_t) ps.B * d);
    for (int r = 0; r < R; ++r)
        for (int i = 0; i < ps.B; ++i) As[(size_t) r * ps.B + i] = A[(size_t) r * B + act[i]];
    for (int i = 0; i < ps.B; ++i) {
        for (int e = 0; e < d; ++e) {
            const size_t src = (size_t) act[i] * d + e;
            Vs[(size_t) i * d + e] = V[src];
            c[(size_t) i * d + e] = Kc[src] - p.k0[src];
        }
    }
    // inactive mutable slots keep their offset; fixed slots have none
    std::vector<float> offset((size_t) B * d, 0.0f);
    for (int s = 0; s < B; ++s) {
        if (!p.mut[s]) continue;
        for (int e = 0; e < d; ++e) offset[(size_t) s * d + e] = Kc[(size_t) s * d + e] - p.k0[(size_t) s * d + e];
    }
    if (ps.B == 0) return offset;
    // J c: zero on the first step, where K is still K0
    Jacobian J(ps, As.data(), O.data(), Vs.data());
    const bool moved = std::any_of(c.begin(), c.end(), [](float x) { return x != 0.0f; });
    std::vector<float> Jc((size_t) R * d, 0.0f);
    if (moved) J.jvp(c.data(), Jc.data());
    std::vector<double> b((size_t) R * d);
    for (int r = 0; r < R; ++r) {
        const double sw = std::sqrt((double) p.w[r]);
        for (int e = 0; e < d; ++e) {
            const size_t i = (size_t) r * d + e;
            b[i] = sw * ((double) p.ostar[i] - O[i]) + Jc[i];
        }
    }
    // CG on (J J^T + lambda I) u = b, J J^T u = jvp(vjp(u)). Measured and
    // dropped: a Jacobi preconditioner (no fewer iterations) and forming the
    // middle product through Q Q^T (raised Gemma-3's held-out error at 10%
    // kept: float rounding in this ill-conditioned system; no faster at cg_tol).
    const size_t n = b.size();
    std::vector<float> jt((size_t) ps.B * d), jjt_f(n);
    auto jjt = [&](const float * U) -> const std::vector<float> & {
        J.vjp(U, jt.data());
        J.jvp(jt.data(), jjt_f.data());
        return jjt_f;
    };
    std::vector<double> x(n, 0.0), res = b, dir = b, Ap(n);
    std::vector<float> dirf(n);
    double rz = 0;
    for (size_t i = 0; i < n; ++i) rz += res[i] * res[i];
    const double bnorm = std::sqrt(rz);
    int it = 0;
    if (bnorm > 0) {
        for (; it < prm.cg_iters; ++it) {
            for (size_t i = 0; i < n; ++i) dirf[i] = (float) dir[i];
            const std::vector<float> & jj = jjt(dirf.data());
            double pAp = 0;
            for (size_t i = 0; i < n; ++i) {
                Ap[i] = jj[i] + prm.lambda * dir[i];
                pAp += dir[i] * Ap[i];
            }
            if (pAp <= 0) break;
            const double alpha = rz / pAp;
            double rr = 0;
            for (size_t i = 0; i < n; ++i) {
                x[i] += alpha * dir[i];
                res[i] -= alpha * Ap[i];
                rr += res[i] * res[i];
            }
            if (std::sqrt(rr) <= prm.cg_tol * bnorm) {
                ++it;
                break;
            }
            const double beta = rr / rz;
            rz = rr;
            for (size_t i = 0; i < n; ++i) dir[i] = res[i] + beta * dir[i];
        }
    }
    if (n_iter) *n_iter += it;
    std::vector<float> xf(n);
    for (size_t i = 0; i < n; ++i) xf[i] = (float) x[i];
    std::vector<float> step((size_t) ps.B * d);
    J.vjp(xf.data(), step.data());  // active slots' new offset K - K0
    for (int i = 0; i < ps.B; ++i) {
        std::copy(step.begin() + (size_t) i * d, step.begin() + (size_t) (i + 1) * d, offset.begin() + (size_t) act[i] * d);
    }
    return offset;
}

}  // namespace

std::vector<float> grkv_key_step(const GrkvProblem & p, const float * Kc, const float * V, const GrkvParams & prm) {
    std::vector<float> A, O, dA;
    grkv_student(p, Kc, V, A, O, &dA);
    return key_step_at(p, Kc, V, dA, O, prm);
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

GrkvResult grkv_fit(const GrkvProblem & p, const GrkvParams & prm, GrkvTiming * timing) {
    if (prm.steps < 1) throw Error("GRKV steps must be >= 1");
    GrkvResult res;
    const int R = p.R, B = p.B, d = p.d;
    Stopwatch sw(timing);
    // The student's weights depend on K alone, so one softmax per K serves the
    // candidates' objectives, the value step (at V0) and the key step (at V).
    std::vector<float> A, dA, O;
    std::vector<float> K = p.k0, V = p.v0;
    grkv_student(p, K.data(), V.data(), A, O, &dA);
    auto add = [&](const std::vector<float> & Kx, const std::vector<float> & Vx, const std::vector<float> & Ox) {
        res.cand_k.push_back(Kx);
        res.cand_v.push_back(Vx);
        res.cand_obj.push_back(objective_at(p, Ox, Kx.data(), Vx.data(), prm.lambda));
    };
    add(K, V, O);
    sw.lap(&GrkvTiming::student_s);
    for (int step = 0; step < prm.steps; ++step) {
        std::vector<float> O0 = O;  // A V0
        if (step > 0) gemm(R, d, B, A.data(), B, 1, p.v0.data(), O0.data());
        const std::vector<float> dV = value_step_at(p, A, O0, prm.lambda);
        V = grkv_cap_round(p.v0, dV, p.mut, d, prm.cap_v, prm.codec_v);
        gemm(R, d, B, A.data(), B, 1, V.data(), O.data());  // the student at (K, V)
        add(K, V, O);
        sw.lap(&GrkvTiming::value_s);
        if (prm.update_k) {
            std::vector<float> dK = key_step_at(p, K.data(), V.data(), dA, O, prm, timing ? &timing->cg_steps : nullptr);
            K = grkv_cap_round(p.k0, dK, p.mut, d, prm.cap_k, prm.codec_k);
            sw.lap(&GrkvTiming::key_s);
            grkv_student(p, K.data(), V.data(), A, O, &dA);
            add(K, V, O);
            sw.lap(&GrkvTiming::student_s);
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
