// Per-head selection on the graph path (graph.h): a method's score node,
// plus a bonus that lifts the protected tokens, then top_k; one graph per
// layer, on a backend given by name or the one holding the cache's tensors.
#include <algorithm>

#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"
#include "grkv/apply.h"
#include "grkv/common.h"
#include "grkv/graph.h"
#include "layer_graph.h"

namespace grkv::graph {

bool available() { return true; }

namespace {

void set_threads(ggml_backend_t b, int n_threads) {
    if (ggml_backend_is_cpu(b)) ggml_backend_cpu_set_n_threads(b, std::max(1, n_threads));
}

ggml_backend_ptr open_backend(const std::string & name, int n_threads) {
    ggml_backend_t b = name.empty() ? ggml_backend_init_best() : ggml_backend_init_by_name(name.c_str(), nullptr);
    if (!b) throw Error("no ggml backend named '" + name + "' in this build");
    set_threads(b, n_threads);
    return ggml_backend_ptr(b);
}

// The backend of the device whose buffer holds tensor `t` (host memory: the CPU's).
ggml_backend_ptr backend_of(const ggml_tensor * t, int n_threads) {
    ggml_backend_buffer_type_t buft = ggml_backend_buffer_get_type(t->buffer);
    ggml_backend_dev_t dev = ggml_backend_buft_get_device(buft);
    ggml_backend_t b = nullptr;
    if (dev) b = ggml_backend_dev_init(dev, nullptr);
    else if (ggml_backend_buft_is_host(buft)) b = ggml_backend_init_by_type(GGML_BACKEND_DEVICE_TYPE_CPU, nullptr);
    if (!b) throw Error("graph path: could not start the backend that holds the cache");
    set_threads(b, n_threads);
    return ggml_backend_ptr(b);
}

// The method's protected tokens (1) and, for SnapKV, the candidates before the window.
std::vector<float> protected_tokens(const LayerInput & in, const GraphMethod & m, int & prefix) {
    std::vector<float> prot(in.T, 0.0f);
    prefix = in.T;
    if (m.name == "snapkv") {
        if (!in.q || in.w <= 0) throw Error("SnapKV needs the observation window's queries (none were captured)");
        if (m.kernel < 1 || m.kernel % 2 == 0) throw Error("SnapKV pooling kernel must be odd and positive");
        const int32_t qmin = *std::min_element(in.qpos, in.qpos + in.w);
        prefix = (int) (std::lower_bound(in.pos, in.pos + in.T, qmin) - in.pos);
        std::fill(prot.begin() + prefix, prot.end(), 1.0f);
    } else if (m.name == "streaming") {
        if (m.n_sink < 0) throw Error("n_sink must be >= 0");
        std::fill(prot.begin(), prot.begin() + std::min(m.n_sink, in.T), 1.0f);
    } else if (m.name != "knorm") {
        throw Error("the graph path runs snapkv, knorm and streaming, not '" + m.name + "'");
    }
    return prot;
}

struct Built {
    LayerGraph g;
    ggml_cgraph * gf = nullptr;
    ggml_tensor *scores = nullptr, *idx = nullptr;
};

// K: [d * n_head_kv, T] f32 (an input, or get_rows over the cache's tensor).
template <class MakeKeys>
Built build(const LayerInput & in, const GraphMethod & m, int budget, MakeKeys make_keys) {
    if (in.n_head_kv < 1 || (m.name == "snapkv" && in.n_head % in.n_head_kv)) {
        throw Error("n_head must be a multiple of n_head_kv");
    }
    int prefix = 0;
    const std::vector<float> prot = protected_tokens(in, m, prefix);
    const int n_prot = (int) std::count(prot.begin(), prot.end(), 1.0f);
    if (budget < std::max(1, n_prot) || budget > in.T) {
        throw Error("budget " + std::to_string(budget) + " outside [" + std::to_string(std::max(1, n_prot)) + ", " +
                    std::to_string(in.T) + "] (the method's protected tokens are always kept)");
    }
    Built b;
    ggml_init_params ip{ggml_tensor_overhead() * 96 + ggml_graph_overhead(), nullptr, true};
    b.g.ctx.reset(ggml_init(ip));
    ggml_context * c = b.g.ctx.get();
    if (m.name == "streaming") b.scores = streaming_scores(b.g, in);
    else {
        ggml_tensor * K = make_keys(b.g);
        b.scores = m.name == "snapkv" ? snapkv_scores(b.g, K, in, m.kernel, prefix) : knorm_scores(b.g, K, in);
    }
    std::vector<float> bonus(in.T);
    for (int t = 0; t < in.T; ++t) bonus[t] = prot[t] * kProtectBonus;
    ggml_tensor * bt = b.g.input(ggml_new_tensor_1d(c, GGML_TYPE_F32, in.T), bonus.data());
    ggml_set_output(b.scores);
    b.idx = ggml_top_k(c, ggml_add(c, b.scores, bt), budget);  // [budget, n_head_kv]
    ggml_set_output(b.idx);
    b.gf = ggml_new_graph(c);
    ggml_build_forward_expand(b.gf, b.scores);
    ggml_build_forward_expand(b.gf, b.idx);
    return b;
}

// Allocates through `alloc` (one per compression: its buffer is reused from
// layer to layer instead of faulting in fresh pages), uploads the inputs,
// computes; appends each head's kept indices, ascending.
void run(ggml_backend_t be, ggml_gallocr_t alloc, Built & b, int n_head_kv, int budget, std::vector<int32_t> & keep,
         std::vector<float> * scores) {
    if (!ggml_gallocr_alloc_graph(alloc, b.gf)) throw Error("could not allocate the selection graph");
    for (auto & [t, bytes] : b.g.uploads) ggml_backend_tensor_set(t, bytes.data(), 0, bytes.size());
    if (ggml_backend_graph_compute(be, b.gf) != GGML_STATUS_SUCCESS) throw Error("the selection graph failed");
    const size_t off = keep.size();
    keep.resize(off + (size_t) n_head_kv * budget);
    ggml_backend_tensor_get(b.idx, keep.data() + off, 0, ggml_nbytes(b.idx));
    for (int h = 0; h < n_head_kv; ++h) {
        std::sort(keep.begin() + off + (size_t) h * budget, keep.begin() + off + (size_t) (h + 1) * budget);
    }
    if (scores) {
        scores->resize(ggml_nelements(b.scores));
        ggml_backend_tensor_get(b.scores, scores->data(), 0, ggml_nbytes(b.scores));
    }
}

}  // namespace

SelectResult select_layer(const LayerInput & in, const GraphMethod & m, int budget, const std::string & backend,
                          int n_threads) {
    ggml_backend_ptr be = open_backend(backend, n_threads);
    Built b = build(in, m, budget, [&](LayerGraph & g) {
        return g.input(ggml_new_tensor_2d(g.ctx.get(), GGML_TYPE_F32, (int64_t) in.head_dim * in.n_head_kv, in.T),
                       in.k);
    });
    SelectResult out;
    out.backend = ggml_backend_name(be.get());
    ggml_gallocr_ptr alloc(ggml_gallocr_new(ggml_backend_get_default_buffer_type(be.get())));
    run(be.get(), alloc.get(), b, in.n_head_kv, budget, out.keep, &out.scores);
    return out;
}

std::vector<int32_t> select_cache(const kvx::Api & api, void * lctx, int part, int32_t seq,
                                  const std::vector<LayerQueries> & queries, const ModelShape & shape,
                                  const GraphMethod & m, int budget, int n_threads, std::string * backend_name) {
    kvx::PartInfo pi{};
    if (api.get_part(lctx, part, &pi) != 0) throw Error("graph path: no cache part " + std::to_string(part));
    if (pi.rot_k) throw Error("graph path: this cache stores rotated (Hadamard) keys; use the core");
    if (m.name == "snapkv" && (int) queries.size() != pi.n_layer) {
        throw Error("graph path: SnapKV needs one query set per cache layer");
    }
    // the sequence's cells in position order: token t of every layer is cell_t[t]
    const SeqCells sc = seq_cells_by_position(api, lctx, part, seq);
    const std::vector<int32_t> & cell_t = sc.cells;
    const std::vector<int32_t> & pos_t = sc.pos;
    const int32_t n = (int32_t) cell_t.size();
    if (n <= 0) throw Error("graph path: the sequence holds no cells");
    std::vector<int32_t> keep;
    ggml_backend_ptr be;
    ggml_gallocr_ptr alloc;
    for (int l = 0; l < pi.n_layer; ++l) {
        kvx::LayerInfo li{};
        if (api.get_layer(lctx, part, l, seq, &li) != 0) throw Error("graph path: no layer " + std::to_string(l));
        auto * kt = static_cast<ggml_tensor *>(li.k);
        if (!be) {
            be = backend_of(kt, n_threads);
            alloc.reset(ggml_gallocr_new(ggml_backend_get_default_buffer_type(be.get())));
            if (backend_name) *backend_name = ggml_backend_name(be.get());
        }
        LayerInput in;
        in.pos = pos_t.data();
        in.T = n;
        in.n_head_kv = shape.n_head_kv;
        in.head_dim = li.n_embd_k / shape.n_head_kv;
        in.n_head = shape.n_head;
        in.scale = shape.scale;
        in.softcap = shape.softcap;
        if (m.name == "snapkv") {
            const LayerQueries & lq = queries[l];
            in.q = lq.q.data();
            in.qpos = lq.qpos.data();
            in.w = (int) lq.qpos.size();
            if (lq.q.size() != (size_t) in.w * in.n_head * in.head_dim) {
                throw Error("graph path: layer " + std::to_string(l) + "'s queries have the wrong size");
            }
        }
        Built b = build(in, m, budget, [&](LayerGraph & g) {
            ggml_tensor * cidx = g.input(ggml_new_tensor_1d(g.ctx.get(), GGML_TYPE_I32, n), cell_t.data());
            return ggml_get_rows(g.ctx.get(), kt, cidx);  // the cache's rows, as f32, on its device
        });
        run(be.get(), alloc.get(), b, in.n_head_kv, budget, keep, nullptr);
    }
    return keep;
}

}  // namespace grkv::graph
