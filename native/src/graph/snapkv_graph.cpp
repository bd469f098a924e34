// SnapKV scoring and per-head top-k as one ggml graph (graph.h). The ops are
// the ones llama.cpp's own attention uses (mul_mat with GQA broadcast,
// soft_max_ext with a causal mask), plus sum_rows, pad_ext, add and top_k,
// so every backend that runs llama.cpp's attention runs this graph.
#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>

#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpp.h"
#include "ggml-cpu.h"
#include "ggml.h"
#include "grkv/common.h"
#include "grkv/graph.h"
#include "grkv/kv_ext_abi.h"

namespace grkv::graph {

bool available() { return true; }

namespace {

ggml_backend_ptr open_backend(const std::string & name, int n_threads) {
    ggml_backend_t b = name.empty() ? ggml_backend_init_best() : ggml_backend_init_by_name(name.c_str(), nullptr);
    if (!b) throw Error("no ggml backend named '" + name + "' in this build");
    if (ggml_backend_is_cpu(b)) ggml_backend_cpu_set_n_threads(b, std::max(1, n_threads));
    return ggml_backend_ptr(b);
}

// Protected tokens (the window) rank above every score: attention averages are <= 1.
constexpr float kProtectBonus = 1e4f;

}  // namespace

namespace {

void check_inputs(const LayerInput & in, int kernel) {
    if (!in.q || in.w <= 0) throw Error("SnapKV needs the observation window's queries (none were captured)");
    if (in.n_head % in.n_head_kv) throw Error("n_head must be a multiple of n_head_kv");
    if (kernel < 1 || kernel % 2 == 0) throw Error("SnapKV pooling kernel must be odd and positive");
}

int window_prefix(const LayerInput & in, int budget) {
    const int32_t qmin = *std::min_element(in.qpos, in.qpos + in.w);
    const int prefix = (int) (std::lower_bound(in.pos, in.pos + in.T, qmin) - in.pos);
    if (budget < in.T - prefix || budget > in.T) {
        throw Error("budget " + std::to_string(budget) + " outside [" + std::to_string(in.T - prefix) + ", " +
                    std::to_string(in.T) + "] (the window is always kept)");
    }
    return prefix;
}

// One layer's graph over keys K [d * n_head_kv, T] (f32), and its inputs.
struct LayerGraph {
    ggml_context_ptr ctx;
    ggml_cgraph * gf = nullptr;
    ggml_tensor *Q = nullptr, *mask = nullptr, *bonus = nullptr, *scores = nullptr, *idx = nullptr;
};

template <class MakeKeys>
LayerGraph build(const LayerInput & in, int kernel, int budget, int prefix, MakeKeys make_keys) {
    const int T = in.T, d = in.head_dim, Hkv = in.n_head_kv, H = in.n_head, w = in.w, G = H / Hkv;
    LayerGraph lg;
    ggml_init_params ip{ggml_tensor_overhead() * 64 + ggml_graph_overhead(), nullptr, true};
    lg.ctx.reset(ggml_init(ip));
    ggml_context * c = lg.ctx.get();
    ggml_tensor * K = make_keys(c);
    lg.Q = ggml_new_tensor_2d(c, GGML_TYPE_F32, (int64_t) d * H, w);
    lg.mask = ggml_new_tensor_2d(c, GGML_TYPE_F32, T, w);  // 0 or -inf: causal by position
    lg.bonus = ggml_new_tensor_1d(c, GGML_TYPE_F32, T);    // protected tokens
    for (ggml_tensor * t : {lg.Q, lg.mask, lg.bonus}) ggml_set_input(t);

    // attention of every window query: [T, w, H]
    ggml_tensor * Kp = ggml_cont(c, ggml_permute(c, ggml_reshape_3d(c, K, d, Hkv, T), 0, 2, 1, 3));  // [d, T, Hkv]
    ggml_tensor * Qp = ggml_cont(c, ggml_permute(c, ggml_reshape_3d(c, lg.Q, d, H, w), 0, 2, 1, 3));  // [d, w, H]
    ggml_tensor * S = ggml_mul_mat(c, Kp, Qp);  // query head h reads KV head h / G
    float sm_scale = in.scale;
    if (in.softcap > 0) {
        S = ggml_scale(c, ggml_tanh(c, ggml_scale(c, S, in.scale / in.softcap)), in.softcap);
        sm_scale = 1.0f;
    }
    ggml_tensor * P = ggml_soft_max_ext(c, S, lg.mask, sm_scale, 0.0f);
    // sum over the window's queries, then over the group's query heads: [T, Hkv]
    ggml_tensor * s = ggml_sum_rows(c, ggml_cont(c, ggml_permute(c, P, 1, 0, 2, 3)));  // [1, T, H]
    s = ggml_reshape_3d(c, s, T, G, Hkv);
    s = ggml_reshape_2d(c, ggml_sum_rows(c, ggml_cont(c, ggml_permute(c, s, 1, 0, 2, 3))), T, Hkv);
    // average pool over the prefix, zero padded (count_include_pad)
    if (prefix > 0) {
        const int r = kernel / 2;
        ggml_tensor * pre = ggml_cont(c, ggml_view_2d(c, s, prefix, Hkv, s->nb[1], 0));
        ggml_tensor * pad = ggml_pad_ext(c, pre, r, r, 0, 0, 0, 0, 0, 0);
        ggml_tensor * pool = nullptr;
        for (int i = 0; i < kernel; ++i) {
            ggml_tensor * v = ggml_view_2d(c, pad, prefix, Hkv, pad->nb[1], (size_t) i * sizeof(float));
            pool = pool ? ggml_add(c, pool, v) : ggml_cont(c, v);
        }
        pool = ggml_scale(c, pool, 1.0f / (float) ((size_t) kernel * w * G));
        lg.scores = prefix < T ? ggml_pad_ext(c, pool, 0, T - prefix, 0, 0, 0, 0, 0, 0) : pool;  // window: 0
    } else {
        lg.scores = ggml_scale(c, s, 0.0f);
    }
    ggml_set_output(lg.scores);
    lg.idx = ggml_top_k(c, ggml_add(c, lg.scores, lg.bonus), budget);  // [budget, Hkv]
    ggml_set_output(lg.idx);
    lg.gf = ggml_new_graph(c);
    ggml_build_forward_expand(lg.gf, lg.scores);
    ggml_build_forward_expand(lg.gf, lg.idx);
    return lg;
}

void set_inputs(const LayerGraph & lg, const LayerInput & in, int prefix) {
    const int T = in.T, w = in.w;
    ggml_backend_tensor_set(lg.Q, in.q, 0, ggml_nbytes(lg.Q));
    std::vector<float> m((size_t) T * w), b(T, 0.0f);
    for (int j = 0; j < w; ++j)
        for (int t = 0; t < T; ++t)
            m[(size_t) j * T + t] = in.pos[t] <= in.qpos[j] ? 0.0f : -std::numeric_limits<float>::infinity();
    for (int t = prefix; t < T; ++t) b[t] = kProtectBonus;
    ggml_backend_tensor_set(lg.mask, m.data(), 0, ggml_nbytes(lg.mask));
    ggml_backend_tensor_set(lg.bonus, b.data(), 0, ggml_nbytes(lg.bonus));
}

// Runs the allocated graph; each head's kept indices come back ascending.
void run(ggml_backend_t be, const LayerGraph & lg, int n_head_kv, int budget, std::vector<int32_t> & keep,
         std::vector<float> * scores) {
    if (ggml_backend_graph_compute(be, lg.gf) != GGML_STATUS_SUCCESS) throw Error("the SnapKV graph failed");
    const size_t off = keep.size();
    keep.resize(off + (size_t) n_head_kv * budget);
    ggml_backend_tensor_get(lg.idx, keep.data() + off, 0, ggml_nbytes(lg.idx));
    for (int h = 0; h < n_head_kv; ++h) {
        std::sort(keep.begin() + off + (size_t) h * budget, keep.begin() + off + (size_t) (h + 1) * budget);
    }
    if (scores) {
        scores->resize(ggml_nelements(lg.scores));
        ggml_backend_tensor_get(lg.scores, scores->data(), 0, ggml_nbytes(lg.scores));
    }
}

}  // namespace

SnapkvGraphResult snapkv_select(const LayerInput & in, int kernel, int budget, const std::string & backend,
                                int n_threads) {
    check_inputs(in, kernel);
    const int prefix = window_prefix(in, budget);
    ggml_backend_ptr be = open_backend(backend, n_threads);
    ggml_tensor * K = nullptr;
    LayerGraph lg = build(in, kernel, budget, prefix, [&](ggml_context * c) {
        K = ggml_new_tensor_2d(c, GGML_TYPE_F32, (int64_t) in.head_dim * in.n_head_kv, in.T);
        ggml_set_input(K);
        return K;
    });
    ggml_gallocr_ptr alloc(ggml_gallocr_new(ggml_backend_get_default_buffer_type(be.get())));
    if (!ggml_gallocr_alloc_graph(alloc.get(), lg.gf)) throw Error("could not allocate the SnapKV graph");
    ggml_backend_tensor_set(K, in.k, 0, ggml_nbytes(K));
    set_inputs(lg, in, prefix);
    SnapkvGraphResult out;
    out.backend = ggml_backend_name(be.get());
    run(be.get(), lg, in.n_head_kv, budget, out.keep, &out.scores);
    return out;
}

std::vector<int32_t> snapkv_select_cache(const kvx::Api & api, void * lctx, int part, int32_t seq,
                                         const std::vector<LayerQueries> & queries, const ModelShape & shape,
                                         int kernel, int budget, int n_threads, std::string * backend_name) {
    kvx::PartInfo pi{};
    if (api.get_part(lctx, part, &pi) != 0) throw Error("graph path: no cache part " + std::to_string(part));
    if (pi.rot_k) throw Error("graph path: this cache stores rotated (Hadamard) keys; use the core");
    if ((int) queries.size() != pi.n_layer) throw Error("graph path: one query set per cache layer is needed");
    // the sequence's cells in position order: token t of every layer is cells[order[t]]
    const int32_t n = api.seq_cells(lctx, part, seq, nullptr, nullptr, 0);
    if (n <= 0) throw Error("graph path: the sequence holds no cells");
    std::vector<int32_t> cells(n), pos(n), order(n);
    api.seq_cells(lctx, part, seq, cells.data(), pos.data(), n);
    for (int i = 0; i < n; ++i) order[i] = i;
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return pos[a] < pos[b]; });
    std::vector<int32_t> cell_t(n), pos_t(n);
    for (int i = 0; i < n; ++i) {
        cell_t[i] = cells[order[i]];
        pos_t[i] = pos[order[i]];
    }
    std::vector<int32_t> keep;
    ggml_backend_ptr be;
    for (int l = 0; l < pi.n_layer; ++l) {
        kvx::LayerInfo li{};
        if (api.get_layer(lctx, part, l, seq, &li) != 0) throw Error("graph path: no layer " + std::to_string(l));
        auto * kt = static_cast<ggml_tensor *>(li.k);
        if (!be) {  // the backend of the device that holds the cache
            ggml_backend_buffer_type_t buft = ggml_backend_buffer_get_type(kt->buffer);
            ggml_backend_dev_t dev = ggml_backend_buft_get_device(buft);
            if (dev) be.reset(ggml_backend_dev_init(dev, nullptr));
            else if (ggml_backend_buft_is_host(buft)) be.reset(ggml_backend_init_by_type(GGML_BACKEND_DEVICE_TYPE_CPU, nullptr));  // host memory: the CPU backend
            else throw Error("graph path: the cache's buffer has no device");
            if (!be) throw Error("graph path: could not start the cache's backend");
            if (ggml_backend_is_cpu(be.get())) ggml_backend_cpu_set_n_threads(be.get(), std::max(1, n_threads));
            if (backend_name) *backend_name = ggml_backend_name(be.get());
        }
        const LayerQueries & lq = queries[l];
        LayerInput in;
        in.pos = pos_t.data();
        in.T = n;
        in.n_head_kv = shape.n_head_kv;
        in.head_dim = li.n_embd_k / shape.n_head_kv;
        in.q = lq.q.data();
        in.qpos = lq.qpos.data();
        in.w = (int) lq.qpos.size();
        in.n_head = shape.n_head;
        in.scale = shape.scale;
        in.softcap = shape.softcap;
        check_inputs(in, kernel);
        if (lq.q.size() != (size_t) in.w * in.n_head * in.head_dim) throw Error("graph path: queries of the wrong size");
        const int prefix = window_prefix(in, budget);
        ggml_tensor * cidx = nullptr;
        LayerGraph lg = build(in, kernel, budget, prefix, [&](ggml_context * c) {
            cidx = ggml_new_tensor_1d(c, GGML_TYPE_I32, n);
            ggml_set_input(cidx);
            return ggml_get_rows(c, kt, cidx);  // the cache's rows, converted to f32 on its device
        });
        ggml_gallocr_ptr alloc(ggml_gallocr_new(ggml_backend_get_default_buffer_type(be.get())));
        if (!ggml_gallocr_alloc_graph(alloc.get(), lg.gf)) throw Error("could not allocate the SnapKV graph");
        ggml_backend_tensor_set(cidx, cell_t.data(), 0, ggml_nbytes(cidx));
        set_inputs(lg, in, prefix);
        run(be.get(), lg, in.n_head_kv, budget, keep, nullptr);
    }
    return keep;
}

}  // namespace grkv::graph
