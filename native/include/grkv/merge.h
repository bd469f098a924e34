// Merge step: rewrite the kept slots' K/V after selection.
//
// Every merge works on one (layer, KV head) at a time: the full-cache K/V of
// that head, the kept token indices (ascending, position order), and writes
// the kept slots' new K/V. Fixed slots are returned unchanged.
#pragma once
#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include "grkv/codec.h"

namespace grkv {

struct HeadKV {
    const float * k = nullptr;       // [T][stride] full cache (position order); head at offset
    const float * v = nullptr;
    int T = 0, d = 0;
    size_t stride = 0;               // floats per token row (n_embd)
    size_t offset = 0;               // this head's first float in a row
    const int32_t * pos = nullptr;   // [T]
    const int32_t * keep = nullptr;  // [B] ascending token indices
    int B = 0;
    float kv(int t, int e, bool is_k) const { return (is_k ? k : v)[(size_t) t * stride + offset + e]; }
};

// ---- Baselines -------------------------------------------------------------
// kvpress-style value merging: each evicted token's value is folded into its
// most key-similar (cosine) kept token, weighted by max(cos, 0); the merged
// value keeps the weighted mean norm of its parts. Keys are untouched.
void merge_values(const HeadKV & h, float * out_k, float * out_v);

// Nearest-neighbour merging (KVMerger / KVCache-Factory style): route each
// evicted token to its most cosine-similar kept key; "pivot" averages the
// kept token with the midpoints of its routed tokens, "weighted" uses
// w = (cos + 1) / 2. Applied to K and V.
void merge_nearest(const HeadKV & h, bool weighted, float * out_k, float * out_v);

// ---- GRKV ------------------------------------------------------------------
struct GrkvParams {
    float lambda = 0.01f;
    float cap_v = 0.1f, cap_k = 0.025f;   // <= 0 disables a cap
    int steps = 1;
    int cg_iters = 16;
    float cg_tol = 0.03f;          // CG stops when the residual falls below cg_tol * ||b||
    float key_active = 0.0f;       // key step: slots whose largest attention weight is below this stay fixed
    bool update_k = true;
    // how the cache stores K and V: the fit is judged on the stored values
    // (f16 rounding, or q8_0/q4_0 requantisation in the rotated basis)
    RowCodec codec_k{1, 0}, codec_v{1, 0};
};

// One KV head's regression problem. Rows r = (query head g in the group, query j).
struct GrkvProblem {
    int R = 0, B = 0, d = 0;
    float scale = 1.0f;
    float softcap = 0.0f;          // attention-logit soft cap (Gemma-2), 0 = none
    std::vector<float> q;          // [R][d]
    std::vector<float> w;          // [R] row weights
    std::vector<uint8_t> vis;      // [R][B] student visibility (causal test on original positions)
    std::vector<float> ostar;      // [R][d] teacher: attention over the full cache
    std::vector<float> k0, v0;     // [B][d]
    std::vector<uint8_t> mut;      // [B] 1 = mutable
};

struct GrkvResult {
    std::vector<float> k, v;       // [B][d] chosen
    // regularised objective per candidate: none, V only, K and V (last step)
    double obj_none = 0, obj_v = 0, obj_kv = 0;
    std::vector<double> cand_obj;  // objective of every candidate in cand_k/cand_v order
    std::vector<std::vector<float>> cand_k, cand_v;
};

// Student attention A [R][B] (0 where not visible) and output O [R][d].
// `dA`, if given, receives A times d(logit)/d(scale q.k): the weights the
// JVP and VJP take (A itself without soft-capping).
void grkv_student(const GrkvProblem & p, const float * K, const float * V, std::vector<float> & A,
                  std::vector<float> & O, std::vector<float> * dA = nullptr);
double grkv_objective(const GrkvProblem & p, const float * K, const float * V, float lambda);
// Value step in dual form: returns dV [B][d] (total offset from V0 at keys K).
std::vector<float> grkv_value_step(const GrkvProblem & p, const float * K, float lambda);
// JVP of sqrt(w)*o(K) at (K, V) along D [B][d] -> [R][d]; VJP of U [R][d] -> [B][d].
// A here is grkv_student's dA; O its output.
std::vector<float> grkv_jvp(const GrkvProblem & p, const std::vector<float> & A, const std::vector<float> & O,
                            const float * V, const float * D);
std::vector<float> grkv_vjp(const GrkvProblem & p, const std::vector<float> & A, const std::vector<float> & O,
                            const float * V, const float * U);
// Gauss-Newton ridge step for K at (Kc, V): returns the new total offset K - K0.
std::vector<float> grkv_key_step(const GrkvProblem & p, const float * Kc, const float * V, const GrkvParams & prm);
// X0 + dX on mutable rows, each row stored and read back through `codec`,
// capped to cap*||X0_M|| after that storage; X0 if no step size gets there.
std::vector<float> grkv_cap_round(const std::vector<float> & X0, const std::vector<float> & dX,
                                  const std::vector<uint8_t> & mut, int d, float cap, const RowCodec & codec);
// Seconds spent per phase of the fit (summed over heads, and over threads when
// layers run in parallel): the benchmarks' breakdown of GRKV's cost.
struct GrkvTiming {
    double teacher_s = 0;   // full-cache attention on the surrogate queries (the driver's)
    double student_s = 0;   // student attention and the candidates' objectives
    double value_s = 0;     // value step: Gram matrix, R x R solve, caps and rounding
    double key_s = 0;       // key step: Gauss-Newton CG, caps and rounding
    long cg_steps = 0;      // CG iterations run
    GrkvTiming & operator+=(const GrkvTiming & o) {
        teacher_s += o.teacher_s;
        student_s += o.student_s;
        value_s += o.value_s;
        key_s += o.key_s;
        cg_steps += o.cg_steps;
        return *this;
    }
};

// Adds the time since the previous lap to one GrkvTiming field (no-op without one).
class Stopwatch {
public:
    explicit Stopwatch(GrkvTiming * t) : t_(t), last_(std::chrono::steady_clock::now()) {}
    void lap(double GrkvTiming::*field) {
        const auto now = std::chrono::steady_clock::now();
        if (t_) t_->*field += std::chrono::duration<double>(now - last_).count();
        last_ = now;
    }

private:
    GrkvTiming * t_;
    std::chrono::steady_clock::time_point last_;
};

// All candidates of one head (safeguard is decided per layer by the caller).
GrkvResult grkv_fit(const GrkvProblem & p, const GrkvParams & prm, GrkvTiming * timing = nullptr);

}  // namespace grkv
