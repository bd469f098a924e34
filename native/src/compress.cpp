#include "grkv/compress.h"

#include <exception>
#include <mutex>

#include "grkv/common.h"
#include "grkv/select.h"

namespace grkv {
namespace {

// Runs f(i) for i in [0, n) on n_threads threads, rethrowing the first error.
template <typename F>
void parallel_for(int n, int n_threads, F f) {
    std::exception_ptr err;
    std::mutex mu;
#pragma omp parallel for schedule(dynamic) num_threads(n_threads > 0 ? n_threads : 1)
    for (int i = 0; i < n; ++i) {
        try {
            f(i);
        } catch (...) {
            std::lock_guard<std::mutex> lk(mu);
            if (!err) err = std::current_exception();
        }
    }
    if (err) std::rethrow_exception(err);
}

}  // namespace

bool method_needs_queries(const std::string & name) {
    return name == "snapkv" || name == "gkv" || name == "laser" || name == "expected" || name == "compactor" ||
           name == "reconstruct";
}

namespace {

bool is_context_scorer(const std::string & name) {
    return name == "expected" || name == "compactor" || name == "reconstruct";
}

}  // namespace

std::vector<Scores> score_layers(const StreamView & view, const MethodParams & m, const ModelShape & shape,
                                 const std::vector<LayerQueries> & queries, int n_threads,
                                 const std::vector<std::vector<float>> * history,
                                 std::vector<std::vector<float>> * global) {
    const int L = (int) view.s->k.size();
    if (m.name != "snapkv" && m.name != "knorm" && m.name != "streaming" && m.name != "gkv" && m.name != "laser" &&
        !is_context_scorer(m.name)) {
        throw Error("unknown eviction method '" + m.name +
                    "' (snapkv, knorm, streaming, gkv, laser, expected, compactor, reconstruct)");
    }
    if (m.name == "reconstruct" && (m.chunk_lo.empty() || m.chunk_lo.size() != m.chunk_hi.size())) {
        throw Error("reconstruct needs the re-read chunks' token ranges");
    }
    const int T = view.n_tokens();
    if (history && !history->empty()) {
        if ((int) history->size() != L) throw Error("the carried history must hold every cache layer");
        for (const auto & h : *history) {
            if (h.size() != (size_t) shape.n_head_kv * T) {
                throw Error("the carried history must be [n_head_kv][n_cells] per layer (" + std::to_string(T) + " cells)");
            }
        }
    }
    if (global) global->assign(L, {});
    if (method_needs_queries(m.name) && (int) queries.size() != L) {
        throw Error(m.name + " needs window queries for all " + std::to_string(L) + " cache layers, got " +
                    std::to_string(queries.size()));
    }
    if (shape.n_head_kv <= 0 || shape.n_head <= 0) throw Error("model shape not set");
    const std::vector<int32_t> pos = view.positions();
    std::vector<Scores> out(L);
    parallel_for(L, n_threads, [&](int l) {
        const std::vector<float> k = view.keys(l);
        const bool ctx = is_context_scorer(m.name);
        const std::vector<float> v = ctx && m.name != "reconstruct" ? view.values(l) : std::vector<float>();
        LayerInput in;
        in.k = k.data();
        in.pos = pos.data();
        in.T = view.n_tokens();
        in.n_head_kv = shape.n_head_kv;
        in.head_dim = (int) view.s->k[l].n_embd / shape.n_head_kv;
        in.n_head = shape.n_head;
        in.scale = shape.scale;
        in.softcap = shape.softcap;
        if (method_needs_queries(m.name)) {
            const auto & lq = queries[l];
            in.w = (int) lq.qpos.size();
            if ((size_t) in.w * shape.n_head * in.head_dim != lq.q.size()) {
                throw Error("layer " + std::to_string(l) + ": query array does not match w*n_head*head_dim");
            }
            in.q = lq.q.data();
            in.qpos = lq.qpos.data();
            if (!lq.kpos.empty()) {
                if (lq.kpos.size() != (size_t) shape.n_head_kv * in.T) {
                    throw Error("layer " + std::to_string(l) + ": key positions must be [n_head_kv][n_cells]");
                }
                in.kpos = lq.kpos.data();
            }
            if (m.name == "reconstruct") {
                if (lq.rk.size() != (size_t) in.w * shape.n_head_kv * in.head_dim || lq.qchunk.size() != (size_t) in.w) {
                    throw Error("layer " + std::to_string(l) + ": re-read keys or chunks do not match the queries");
                }
                in.rk = lq.rk.data();
                in.qchunk = lq.qchunk.data();
                in.chunk_lo = m.chunk_lo.data();
                in.chunk_hi = m.chunk_hi.data();
                in.n_chunk = (int) m.chunk_lo.size();
            }
        }
        if (ctx) {
            if (!v.empty() && v.size() != k.size()) throw Error("context scorers need V as wide as K");
            in.v = v.empty() ? nullptr : v.data();
            in.rope = m.rope;
        }
        if (m.name == "snapkv") out[l] = score_snapkv(in, m.kernel, m.max_pool);
        else if (m.name == "gkv") {
            const float * h = history && !history->empty() ? (*history)[l].data() : nullptr;
            out[l] = score_gkv(in, h, m.gkv, global ? &(*global)[l] : nullptr);
        } else if (m.name == "laser") out[l] = score_laser(in, m.n_sink, m.n_local);
        else if (m.name == "knorm") out[l] = score_knorm(in);
        else if (m.name == "expected") out[l] = score_expected(in, m.ctx);
        else if (m.name == "compactor") {
            const float * h = history && !history->empty() ? (*history)[l].data() : nullptr;
            out[l] = score_compactor(in, m.ctx, h, global ? &(*global)[l] : nullptr);
        }
        else if (m.name == "reconstruct") out[l] = score_reconstruct(in, m.ctx);
        else out[l] = score_streaming(in, m.n_sink);
    });
    return out;
}

std::vector<int32_t> select_layers_per_head(const std::vector<Scores> & scores, int budget, int n_threads) {
    const int L = (int) scores.size();
    std::vector<std::vector<int32_t>> per(L);
    parallel_for(L, n_threads, [&](int l) { per[l] = select_per_head(scores[l], budget); });
    std::vector<int32_t> out;
    for (auto & p : per) out.insert(out.end(), p.begin(), p.end());
    return out;
}

}  // namespace grkv
