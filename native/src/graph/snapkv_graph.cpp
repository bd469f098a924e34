// SnapKV's scores as ggml ops: the ones llama.cpp's own attention uses
// (mul_mat with the GQA broadcast, soft_max_ext with a causal mask), then
// sums over the window and the group and a zero-padded average pool.
#include <limits>

#include "layer_graph.h"

namespace grkv::graph {

ggml_tensor * snapkv_scores(LayerGraph & g, ggml_tensor * K, const LayerInput & in, int kernel, int prefix) {
    const int T = in.T, d = in.head_dim, Hkv = in.n_head_kv, H = in.n_head, w = in.w, G = H / Hkv;
    ggml_context * c = g.ctx.get();
    ggml_tensor * Q = g.input(ggml_new_tensor_2d(c, GGML_TYPE_F32, (int64_t) d * H, w), in.q);
    std::vector<float> m((size_t) T * w);  // 0 or -inf: causal by position
    for (int j = 0; j < w; ++j)
        for (int t = 0; t < T; ++t)
            m[(size_t) j * T + t] = in.pos[t] <= in.qpos[j] ? 0.0f : -std::numeric_limits<float>::infinity();
    ggml_tensor * mask = g.input(ggml_new_tensor_2d(c, GGML_TYPE_F32, T, w), m.data());

    // attention of every window query: [T, w, H]
    ggml_tensor * Kp = ggml_cont(c, ggml_permute(c, ggml_reshape_3d(c, K, d, Hkv, T), 0, 2, 1, 3));  // [d, T, Hkv]
    ggml_tensor * Qp = ggml_cont(c, ggml_permute(c, ggml_reshape_3d(c, Q, d, H, w), 0, 2, 1, 3));    // [d, w, H]
    ggml_tensor * S = ggml_mul_mat(c, Kp, Qp);  // query head h reads KV head h / G
    float sm_scale = in.scale;
    if (in.softcap > 0) {
        S = ggml_scale(c, ggml_tanh(c, ggml_scale(c, S, in.scale / in.softcap)), in.softcap);
        sm_scale = 1.0f;
    }
    ggml_tensor * P = ggml_soft_max_ext(c, S, mask, sm_scale, 0.0f);
    // sum over the window's queries, then over the group's query heads: [T, Hkv]
    ggml_tensor * s = ggml_sum_rows(c, ggml_cont(c, ggml_permute(c, P, 1, 0, 2, 3)));  // [1, T, H]
    s = ggml_reshape_3d(c, s, T, G, Hkv);
    s = ggml_reshape_2d(c, ggml_sum_rows(c, ggml_cont(c, ggml_permute(c, s, 1, 0, 2, 3))), T, Hkv);
    if (prefix == 0) return ggml_scale(c, s, 0.0f);
    // average pool over the prefix, zero padded (count_include_pad, as kvpress)
    const int r = kernel / 2;
    ggml_tensor * pre = ggml_cont(c, ggml_view_2d(c, s, prefix, Hkv, s->nb[1], 0));
    ggml_tensor * pad = ggml_pad_ext(c, pre, r, r, 0, 0, 0, 0, 0, 0);
    ggml_tensor * pool = nullptr;
    for (int i = 0; i < kernel; ++i) {
        ggml_tensor * v = ggml_view_2d(c, pad, prefix, Hkv, pad->nb[1], (size_t) i * sizeof(float));
        pool = pool ? ggml_add(c, pool, v) : ggml_cont(c, v);
    }
    pool = ggml_scale(c, pool, 1.0f / (float) ((size_t) kernel * w * G));
    return prefix < T ? ggml_pad_ext(c, pool, 0, T - prefix, 0, 0, 0, 0, 0, 0) : pool;  // window: 0
}

}  // namespace grkv::graph
