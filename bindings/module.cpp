// Thin pybind11 layer over the grkv native core: argument conversion only.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstring>
#include <memory>

#include "grkv/apply.h"
#include "grkv/capture.h"
#include "grkv/common.h"
#include "grkv/compress.h"
#ifdef GRKV_HAVE_GRAPH
#include "grkv/graph.h"
#endif
#include "grkv/merge.h"
#include "grkv/quant.h"
#include "grkv/rope.h"
#include "grkv/select.h"
#include "grkv/state_blob.h"

namespace py = pybind11;
using namespace grkv;

namespace {

template <typename T>
using carray = py::array_t<T, py::array::c_style | py::array::forcecast>;

template <typename T>
py::array_t<T> to_numpy(std::vector<T> v, std::vector<py::ssize_t> shape) {
    auto * heap = new std::vector<T>(std::move(v));
    py::capsule owner(heap, [](void * p) { delete static_cast<std::vector<T> *>(p); });
    return py::array_t<T>(shape, heap->data(), owner);
}

const Stream & active(const SeqState & s, int part) {
    if (part < 0 || part >= (int) s.parts.size()) throw Error("no memory part " + std::to_string(part));
    const int a = s.parts[part].active_stream();
    if (a < 0) throw Error("memory part " + std::to_string(part) + " holds no cells of the sequence");
    return s.parts[part].streams[a];
}

Stream & active_mut(SeqState & s, int part) {
    return const_cast<Stream &>(active(s, part));
}

// One layer's keys and window queries from plain arrays: k [T, n_head_kv, d], q [w, n_head, d].
LayerInput array_layer(const carray<float> & k, const carray<int32_t> & pos, const carray<float> & q,
                       const carray<int32_t> & qpos, int n_head, float scale, float softcap) {
    if (k.ndim() != 3 || q.ndim() != 3) throw Error("k must be [T, n_head_kv, d] and q [w, n_head, d]");
    LayerInput in;
    in.k = k.data();
    in.pos = pos.data();
    in.T = (int) k.shape(0);
    in.n_head_kv = (int) k.shape(1);
    in.head_dim = (int) k.shape(2);
    in.q = q.data();
    in.qpos = qpos.data();
    in.w = (int) q.shape(0);
    in.n_head = n_head;
    in.scale = scale;
    in.softcap = softcap;
    return in;
}

std::vector<LayerQueries> to_queries(const py::list & qs) {
    std::vector<LayerQueries> out;
    for (auto item : qs) {
        auto tup = item.cast<py::tuple>();
        auto q = tup[0].cast<carray<float>>();
        auto qp = tup[1].cast<carray<int32_t>>();
        LayerQueries lq;
        lq.q.assign(q.data(), q.data() + q.size());
        lq.qpos.assign(qp.data(), qp.data() + qp.size());
        if (tup.size() >= 4) {  // reconstruct: (q, qpos, re-read keys, chunk of each query)
            auto rk = tup[2].cast<carray<float>>();
            auto qc = tup[3].cast<carray<int32_t>>();
            lq.rk.assign(rk.data(), rk.data() + rk.size());
            lq.qchunk.assign(qc.data(), qc.data() + qc.size());
        }
        out.push_back(std::move(lq));
    }
    return out;
}

// The context scorers' settings: ContextParams and RopeParams as bound
// objects, and the re-read chunks' token ranges [(lo, hi), ...].
void set_context(MethodParams & m, py::object ctx, py::object rope, py::object chunks) {
    if (!ctx.is_none()) m.ctx = ctx.cast<ContextParams>();
    if (!rope.is_none()) m.rope = rope.cast<RopeParams>();
    if (!chunks.is_none()) {
        for (auto item : chunks) {
            auto pr = item.cast<std::pair<int32_t, int32_t>>();
            m.chunk_lo.push_back(pr.first);
            m.chunk_hi.push_back(pr.second);
        }
    }
}

MethodParams method_params(const std::string & name, int kernel, int n_sink, float alpha = 0.8f,
                           float mix_lambda = 0.5f, float sim_threshold = 0.5f, int protect_divisor = 4) {
    MethodParams m;
    m.protect_divisor = protect_divisor;
    m.gkv = GkvParams{alpha, mix_lambda, sim_threshold};
    // "snapkv-max" = SnapKV with max pooling
    m.max_pool = name == "snapkv-max";
    m.name = m.max_pool ? "snapkv" : name;
    m.kernel = kernel;
    m.n_sink = n_sink;
    return m;
}

py::tuple scores_to_numpy(const std::vector<Scores> & sc) {
    const py::ssize_t L = (py::ssize_t) sc.size(), H = sc[0].n_head_kv, T = sc[0].T;
    std::vector<float> s;
    std::vector<uint8_t> p;
    for (const auto & x : sc) {
        s.insert(s.end(), x.s.begin(), x.s.end());
        p.insert(p.end(), x.protect.begin(), x.protect.end());
    }
    return py::make_tuple(to_numpy(std::move(s), {L, H, T}), to_numpy(std::move(p), {L, T}));
}

}  // namespace

PYBIND11_MODULE(_native, m) {
    m.doc() = "grkv-cpp native core: state-blob codec, eviction scores, selection, eval-callback capture";
    py::register_exception<Error>(m, "NativeError", PyExc_ValueError);
    // Single kernels on plain arrays, apart from the public module: the torch
    // reference tests and the kernel benchmarks call them, the library does not.
    py::module_ kernels = m.def_submodule("kernels", "single scoring, selection and merge kernels on plain arrays "
                                                     "(the reference tests and benchmarks)");

    // The patched llama.cpp's KV-cache extension: function addresses from the
    // loaded libllama (ctypes), keyed by their name without the prefix.
    py::class_<kvx::Api>(m, "KvExtApi")
        .def(py::init([](const py::dict & fns) {
            kvx::Api a;
            auto get = [&](const char * name) -> void * {
                if (!fns.contains(name)) throw Error(std::string("KvExtApi: no address for llama_kv_ext_") + name);
                return reinterpret_cast<void *>(fns[name].cast<uintptr_t>());
            };
            a.version = reinterpret_cast<decltype(a.version)>(get("version"));
            a.n_parts = reinterpret_cast<decltype(a.n_parts)>(get("n_parts"));
            a.get_part = reinterpret_cast<decltype(a.get_part)>(get("get_part"));
            a.get_layer = reinterpret_cast<decltype(a.get_layer)>(get("get_layer"));
            a.seq_cells = reinterpret_cast<decltype(a.seq_cells)>(get("seq_cells"));
            a.read = reinterpret_cast<decltype(a.read)>(get("read"));
            a.seq_apply = reinterpret_cast<decltype(a.seq_apply)>(get("seq_apply"));
            a.seq_gather = reinterpret_cast<decltype(a.seq_gather)>(get("seq_gather"));
            return a;
        }));
    m.def("inplace_read", [](const kvx::Api & api, uintptr_t ctx, int32_t seq, int rows_of) {
        py::gil_scoped_release nogil;
        return inplace_read(api, reinterpret_cast<void *>(ctx), seq, rows_of);
    }, py::arg("api"), py::arg("ctx"), py::arg("seq") = 0, py::arg("rows_of") = -1);
    m.def("inplace_apply", [](const kvx::Api & api, uintptr_t ctx, const SeqState & st, int part, int32_t seq) {
        py::gil_scoped_release nogil;
        inplace_apply(api, reinterpret_cast<void *>(ctx), seq, st, part);
    }, py::arg("api"), py::arg("ctx"), py::arg("state"), py::arg("part") = 0, py::arg("seq") = 0);
    m.def("inplace_gather", [](const kvx::Api & api, uintptr_t ctx, int part, carray<int32_t> keep,
                               carray<int32_t> pos, int32_t seq, bool graph) {
        if (keep.ndim() != 3 || pos.ndim() != 1 || keep.shape(2) != pos.shape(0)) {
            throw Error("inplace_gather: keep must be [n_layer, n_head_kv, n] and positions [n]");
        }
        const int hkv = (int) keep.shape(1);
        std::vector<int32_t> k(keep.data(), keep.data() + keep.size()), p(pos.data(), pos.data() + pos.size());
        py::gil_scoped_release nogil;
        return inplace_gather(api, reinterpret_cast<void *>(ctx), seq, part, k, hkv, p, graph);
    }, py::arg("api"), py::arg("ctx"), py::arg("part"), py::arg("keep"), py::arg("positions"), py::arg("seq") = 0,
       py::arg("graph") = false,
       "Gather the layout on the cache's backend; False (cache unchanged) where it cannot be gathered byte for byte");

    py::class_<GrkvParams>(m, "GrkvParams")
        .def(py::init<>())
        .def_readwrite("lam", &GrkvParams::lambda)
        .def_readwrite("cap_v", &GrkvParams::cap_v)
        .def_readwrite("cap_k", &GrkvParams::cap_k)
        .def_readwrite("steps", &GrkvParams::steps)
        .def_readwrite("cg_iters", &GrkvParams::cg_iters)
        .def_readwrite("cg_tol", &GrkvParams::cg_tol)
        .def_readwrite("key_active", &GrkvParams::key_active)
        .def_readwrite("update_k", &GrkvParams::update_k);
    py::class_<SeqState>(m, "SeqState")
        .def(py::init([](py::bytes b) {
                 std::string_view sv = b;
                 py::gil_scoped_release nogil;
                 return parse_state(reinterpret_cast<const uint8_t *>(sv.data()), sv.size());
             }),
             py::arg("blob"))
        .def_readonly("seq_id", &SeqState::seq_id)
        .def_property_readonly("n_parts", [](const SeqState & s) { return (int) s.parts.size(); })
        .def("copy", [](const SeqState & s) { return SeqState(s); })
        .def("set_rotation",
             [](SeqState & s, int part, int rot_k, int rot_v) {
                 if (part < 0 || part >= (int) s.parts.size()) throw Error("no memory part " + std::to_string(part));
                 for (auto & st : s.parts[part].streams) {
                     st.rot_k = rot_k;
                     st.rot_v = rot_v;
                 }
             },
             py::arg("part"), py::arg("rot_k"), py::arg("rot_v"),
             "The Walsh-Hadamard blocks llama.cpp rotated this part's quantised K/V with (0: none); "
             "keys()/values() then un-rotate.")
        .def("serialize",
             [](const SeqState & s) {
                 std::vector<uint8_t> out;
                 {
                     py::gil_scoped_release nogil;
                     out = serialize_state(s);
                 }
                 return py::bytes(reinterpret_cast<const char *>(out.data()), out.size());
             })
        .def("part_info",
             [](const SeqState & s, int part) {
                 if (part < 0 || part >= (int) s.parts.size()) throw Error("no memory part " + std::to_string(part));
                 const auto & mp = s.parts[part];
                 py::dict d;
                 d["n_stream"] = mp.streams.size();
                 const int a = mp.active_stream();
                 d["n_cells"] = a < 0 ? 0u : mp.streams[a].cell_count;
                 d["bytes_per_cell"] = mp.bytes_per_cell();
                 if (a >= 0) {
                     const auto & st = mp.streams[a];
                     d["v_trans"] = (bool) st.v_trans;
                     d["n_layer"] = st.k.size();
                     py::list kt, vt, kw, vw;
                     for (size_t l = 0; l < st.k.size(); ++l) {
                         kt.append(ggml_type_name_of(st.k[l].type));
                         vt.append(ggml_type_name_of(st.v[l].type));
                         kw.append(st.k[l].n_embd);
                         vw.append(st.v[l].n_embd);
                     }
                     d["k_types"] = kt; d["v_types"] = vt; d["k_width"] = kw; d["v_width"] = vw;
                 }
                 return d;
             }, py::arg("part"))
        .def("has_rows",
             [](const SeqState & s, int part) {
                 if (part < 0 || part >= (int) s.parts.size()) throw Error("no memory part " + std::to_string(part));
                 const int a = s.parts[part].active_stream();
                 if (a < 0) return false;
                 const Stream & st = s.parts[part].streams[a];
                 return st.cell_count == 0 || (!st.k.empty() && !st.k[0].bytes.empty());
             }, py::arg("part"), "Whether part `part` holds its K/V rows (not only cells and sizes)")
        .def("apply_keep",
             [](SeqState & s, int part, carray<int32_t> keep, int32_t label_end, py::object positions) {
                 if (keep.ndim() != 3) throw Error("keep must be [n_layer, n_head_kv, budget]");
                 Stream & st = active_mut(s, part);
                 if ((size_t) keep.shape(0) != st.k.size()) throw Error("keep has the wrong number of layers");
                 const int Hkv = (int) keep.shape(1), budget = (int) keep.shape(2);
                 StreamView view(st);
                 const std::vector<int32_t> k(keep.data(), keep.data() + keep.size());
                 for (int32_t t : k) {
                     if (t < 0 || t >= view.n_tokens()) throw Error("keep names a token the cache does not hold");
                 }
                 Stream ns = compact_per_head(view, k, Hkv, budget, label_end);
                 if (!positions.is_none()) {  // a shared plan keeps its tokens' own positions
                     auto p = positions.cast<carray<int32_t>>();
                     if (p.ndim() != 1 || p.shape(0) != budget) throw Error("positions must be [budget]");
                     ns.pos.assign(p.data(), p.data() + budget);
                 }
                 st = std::move(ns);
             },
             py::arg("part"), py::arg("keep"), py::arg("label_end"), py::arg("positions") = py::none(),
             "Rebuild part `part` keeping keep[l, h, :] (position-order token indices) per head, the layout compress() "
             "writes, at the positions label_end-budget+1 .. label_end or at `positions`")
        .def("positions", [](const SeqState & s, int part) {
                 StreamView v(active(s, part));
                 return to_numpy(v.positions(), {(py::ssize_t) v.n_tokens()});
             }, py::arg("part"))
        .def("keys", [](const SeqState & s, int part, int layer) {
                 StreamView v(active(s, part));
                 const py::ssize_t w = v.s->k.at(layer).n_embd;
                 return to_numpy(v.keys(layer), {(py::ssize_t) v.n_tokens(), w});
             }, py::arg("part"), py::arg("layer"))
        .def("values", [](const SeqState & s, int part, int layer) {
                 StreamView v(active(s, part));
                 const py::ssize_t w = v.s->v.at(layer).n_embd;
                 return to_numpy(v.values(layer), {(py::ssize_t) v.n_tokens(), w});
             }, py::arg("part"), py::arg("layer"))
        .def("compress",
             [](SeqState & s, int part, const CompressRequest & req) {
                 CompressOutcome out;
                 const int L = (int) active(s, part).k.size();
                 {
                     py::gil_scoped_release nogil;
                     out = compress_stream(active_mut(s, part), req);
                 }
                 const int Hkv = req.shape.n_head_kv;
                 py::dict rep;
                 rep["choice"] = out.report.choice;
                 rep["obj_none"] = out.report.obj_none;
                 rep["obj_v"] = out.report.obj_v;
                 rep["obj_kv"] = out.report.obj_kv;
                 rep["n_mutable"] = out.report.n_mutable;
                 if (req.merge.name == "grkv") {
                     const GrkvTiming & t = out.report.timing;
                     rep["timing"] = py::dict(py::arg("teacher_s") = t.teacher_s, py::arg("student_s") = t.student_s,
                                              py::arg("value_s") = t.value_s, py::arg("key_s") = t.key_s,
                                              py::arg("cg_steps") = t.cg_steps);
                 }
                 const int slots = out.slots;
                 rep["positions"] = to_numpy(std::move(out.positions), {slots});
                 rep["rebuilt"] = out.rebuilt;
                 if (!out.global.empty()) rep["global"] = to_numpy(std::move(out.global), {L, Hkv, slots});
                 if (!out.headwise_count.empty()) {
                     rep["headwise_count"] = to_numpy(std::move(out.headwise_count), {L, Hkv});
                 }
                 return py::make_tuple(to_numpy(std::move(out.keep), {L, Hkv, slots}), rep);
             },
             py::arg("part"), py::arg("request"),
             "score -> select -> (merge) over part `part`: (keep [L, n_head_kv, slots], report). The part is "
             "rebuilt in the compressed layout unless the request is plan_only (eviction only; report['rebuilt'])")
        ;

    // The compression's parameter structs (native/include/grkv/compress.h), bound as classes.
    py::class_<MethodParams>(m, "MethodParams")
        .def(py::init([](const std::string & method, int kernel, int n_sink, float alpha, float mix_lambda,
                         float sim_threshold, int protect_divisor) {
                 return method_params(method, kernel, n_sink, alpha, mix_lambda, sim_threshold, protect_divisor);
             }),
             py::arg("method"), py::arg("kernel") = 5, py::arg("n_sink") = 0, py::arg("alpha") = 0.8f,
             py::arg("mix_lambda") = 0.5f, py::arg("sim_threshold") = 0.5f, py::arg("protect_divisor") = 4,
             "A scorer: 'snapkv' (or 'snapkv-max': max pooling), 'knorm', 'streaming', 'gkv' (alpha, mix_lambda, "
             "sim_threshold), 'laser' (protect_divisor), 'expected', 'compactor', 'reconstruct' (ctx, rope, chunks)")
        .def_readonly("name", &MethodParams::name)
        .def_readonly("max_pool", &MethodParams::max_pool)
        .def_readwrite("kernel", &MethodParams::kernel)
        .def_readwrite("n_sink", &MethodParams::n_sink)
        .def_readwrite("protect_divisor", &MethodParams::protect_divisor)
        .def_readwrite("ctx", &MethodParams::ctx)
        .def_readwrite("rope", &MethodParams::rope)
        .def_property(
            "chunks",
            [](const MethodParams & mp) {
                py::list out;
                for (size_t i = 0; i < mp.chunk_lo.size(); ++i) out.append(py::make_tuple(mp.chunk_lo[i], mp.chunk_hi[i]));
                return out;
            },
            [](MethodParams & mp, py::object chunks) { set_context(mp, py::none(), py::none(), chunks); },
            "reconstruct: the re-read chunks' context token ranges [(lo, hi), ...]");
    py::class_<ModelShape>(m, "ModelShape")
        .def(py::init([](int n_head, int n_head_kv, float scale, float softcap) {
                 return ModelShape{n_head, n_head_kv, scale, softcap};
             }),
             py::arg("n_head"), py::arg("n_head_kv"), py::arg("scale"), py::arg("softcap") = 0.0f)
        .def_readonly("n_head", &ModelShape::n_head)
        .def_readonly("n_head_kv", &ModelShape::n_head_kv);
    py::class_<MergeParams>(m, "MergeParams")
        .def(py::init([](const std::string & merge, const GrkvParams & grkv, float guard) {
                 return MergeParams{merge, grkv, guard};
             }),
             py::arg("merge") = "none", py::arg("grkv") = GrkvParams{}, py::arg("guard") = 0.1f,
             "none | merge | pivot | weighted | grkv (with its GrkvParams and guard)")
        .def_readonly("name", &MergeParams::name);
    py::class_<CompressRequest>(m, "CompressRequest")
        .def(py::init<>())
        .def_readwrite("method", &CompressRequest::method)
        .def_readwrite("shape", &CompressRequest::shape)
        .def_readwrite("merge", &CompressRequest::merge)
        .def_readwrite("budget", &CompressRequest::budget)
        .def_readwrite("shared", &CompressRequest::shared)
        .def_readwrite("label_end", &CompressRequest::label_end)
        .def_readwrite("window_start", &CompressRequest::window_start)
        .def_readwrite("n_threads", &CompressRequest::n_threads)
        .def_readwrite("headwise", &CompressRequest::headwise)
        .def_readwrite("headwise_alpha", &CompressRequest::headwise_alpha)
        .def_readwrite("plan_only", &CompressRequest::plan_only)
        .def("set_queries",
             [](CompressRequest & r, const py::list & queries) { r.queries = to_queries(queries); },
             py::arg("queries"),
             "per cache layer (q [w, n_head, head_dim], qpos [w]), reconstruct adding (re-read keys, chunk of each query)")
        .def("set_key_pos",
             [](CompressRequest & r, carray<int32_t> kp) {  // [L][n_head_kv][n_cells]: compactor's true key positions
                 if (kp.ndim() != 3 || (size_t) kp.shape(0) != r.queries.size()) {
                     throw Error("key_pos must be [n_layer, n_head_kv, n_cells], one layer per query set (set the queries first)");
                 }
                 const size_t per = (size_t) kp.shape(1) * kp.shape(2);
                 for (py::ssize_t l = 0; l < kp.shape(0); ++l) {
                     r.queries[l].kpos.assign(kp.data() + l * per, kp.data() + (l + 1) * per);
                 }
             },
             py::arg("key_pos"))
        .def("set_history",
             [](CompressRequest & r, carray<float> h) {  // [L][n_head_kv][n_cells]
                 if (h.ndim() != 3) throw Error("history must be [n_layer, n_head_kv, n_cells]");
                 const size_t per = (size_t) h.shape(1) * h.shape(2);
                 r.history.clear();
                 for (py::ssize_t l = 0; l < h.shape(0); ++l) r.history.emplace_back(h.data() + l * per, h.data() + (l + 1) * per);
             },
             py::arg("history"), "G-KV, compactor@budget: the cells' carried scores")
        .def("set_surrogate",
             [](CompressRequest & r, const py::list & surrogate) {
                 r.surrogate.clear();
                 for (auto item : surrogate) {
                     auto tup = item.cast<py::tuple>();
                     auto q = tup[0].cast<carray<float>>();
                     auto qp = tup[1].cast<carray<int32_t>>();
                     LayerSurrogate ls;
                     ls.q.assign(q.data(), q.data() + q.size());
                     ls.qpos.assign(qp.data(), qp.data() + qp.size());
                     ls.causal = tup[2].cast<bool>();
                     ls.weight = tup[3].cast<float>();
                     r.surrogate.push_back(std::move(ls));
                 }
             },
             py::arg("surrogate"), "GRKV: per cache layer (q, qpos, causal, weight)");

    py::class_<ContextParams>(m, "ContextParams")
        .def(py::init<>())
        .def_readwrite("n_sink", &ContextParams::n_sink)
        .def_readwrite("n_recent", &ContextParams::n_recent)
        .def_readwrite("n_future", &ContextParams::n_future)
        .def_readwrite("next_pos", &ContextParams::next_pos)
        .def_readwrite("eps", &ContextParams::eps)
        .def_readwrite("use_cov", &ContextParams::use_cov)
        .def_readwrite("chunk", &ContextParams::chunk)
        .def_readwrite("beta", &ContextParams::beta)
        .def_readwrite("ridge", &ContextParams::ridge)
        .def_readwrite("chunk_scale", &ContextParams::chunk_scale);
    py::class_<RopeParams>(m, "RopeParams")
        .def(py::init([](int n_rot, float base, float scale, bool neox, std::vector<float> ff) {
                 return RopeParams{n_rot, base, scale, neox, std::move(ff)};
             }),
             py::arg("n_rot"), py::arg("freq_base"), py::arg("freq_scale") = 1.0f, py::arg("neox") = false,
             py::arg("freq_factors") = std::vector<float>{})
        .def_readwrite("freq_factors", &RopeParams::freq_factors)
        .def_readwrite("n_rot", &RopeParams::n_rot)
        .def_readwrite("freq_base", &RopeParams::freq_base)
        .def_readwrite("freq_scale", &RopeParams::freq_scale)
        .def_readwrite("neox", &RopeParams::neox);

    // One layer of a context scorer on plain arrays (the torch reference tests):
    // k, v [T, n_head_kv, d]; q [w, n_head, d]; reconstruct adds rk [w, n_head_kv, d],
    // qchunk [w] and chunks [(lo, hi)].
    kernels.def("score_context_layer",
          [](const std::string & method, carray<float> k, carray<int32_t> pos, carray<float> q, carray<int32_t> qpos,
             int n_head, float scale, const ContextParams & p, const RopeParams & rope, py::object v, py::object rk,
             py::object qchunk, py::object chunks, py::object hist, py::object kpos, bool carry, float softcap) {
              LayerInput in = array_layer(k, pos, q, qpos, n_head, scale, softcap);
              in.rope = rope;
              carray<float> va, rka;
              carray<int32_t> qc;
              if (!v.is_none()) in.v = (va = v.cast<carray<float>>()).data();
              if (!rk.is_none()) in.rk = (rka = rk.cast<carray<float>>()).data();
              if (!qchunk.is_none()) in.qchunk = (qc = qchunk.cast<carray<int32_t>>()).data();
              carray<float> ha;
              carray<int32_t> kpa;
              const float * h = nullptr;
              if (!hist.is_none()) {
                  ha = hist.cast<carray<float>>();
                  if (ha.size() != (py::ssize_t) in.n_head_kv * in.T) throw Error("hist must be [n_head_kv, T]");
                  h = ha.data();
              }
              if (!kpos.is_none()) {
                  kpa = kpos.cast<carray<int32_t>>();
                  if (kpa.size() != (py::ssize_t) in.n_head_kv * in.T) throw Error("kpos must be [n_head_kv, T]");
                  in.kpos = kpa.data();
              }
              std::vector<float> tile;
              MethodParams mp;
              set_context(mp, py::none(), py::none(), chunks);
              in.chunk_lo = mp.chunk_lo.data();
              in.chunk_hi = mp.chunk_hi.data();
              in.n_chunk = (int) mp.chunk_lo.size();
              Scores sc;
              {
                  py::gil_scoped_release nogil;
                  if (method == "expected") sc = score_expected(in, p);
                  else if (method == "compactor") sc = score_compactor(in, p, h, carry ? &tile : nullptr);
                  else if (method == "reconstruct") sc = score_reconstruct(in, p);
                  else throw Error("unknown context scorer " + method);
              }
              if (carry) {
                  if (method != "compactor") throw Error("only compactor carries its scores");
                  return py::object(py::make_tuple(to_numpy(sc.s, {in.n_head_kv, in.T}), to_numpy(sc.protect, {in.T}),
                                                   to_numpy(tile, {in.n_head_kv, in.T})));
              }
              return py::object(py::make_tuple(to_numpy(sc.s, {in.n_head_kv, in.T}), to_numpy(sc.protect, {in.T})));
          },
          py::arg("method"), py::arg("k"), py::arg("pos"), py::arg("q"), py::arg("qpos"), py::arg("n_head"),
          py::arg("scale"), py::arg("params"), py::arg("rope"), py::arg("v") = py::none(), py::arg("rk") = py::none(),
          py::arg("qchunk") = py::none(), py::arg("chunks") = py::none(), py::arg("hist") = py::none(),
          py::arg("kpos") = py::none(), py::arg("carry") = false, py::arg("softcap") = 0.0f);

    // Single-layer scoring on plain arrays: what the torch reference tests call.
    kernels.def("score_layer",
          [](const std::string & method, carray<float> k, carray<int32_t> pos, py::object q, py::object qpos,
             int n_head, float scale, int kernel, int n_sink, py::object hist, float alpha, float mix_lambda,
             float sim_threshold, float softcap) {
              if (k.ndim() != 3) throw Error("k must be [T, n_head_kv, head_dim]");
              LayerInput in;
              in.k = k.data();
              in.pos = pos.data();
              in.T = (int) k.shape(0);
              in.n_head_kv = (int) k.shape(1);
              in.head_dim = (int) k.shape(2);
              in.n_head = n_head;
              in.scale = scale;
              in.softcap = softcap;
              carray<float> qa;
              carray<int32_t> qp;
              if (!q.is_none()) {
                  qa = q.cast<carray<float>>();
                  qp = qpos.cast<carray<int32_t>>();
                  in.q = qa.data();
                  in.qpos = qp.data();
                  in.w = (int) qp.size();
              }
              Scores sc;
              if (method == "snapkv" || method == "snapkv-max") sc = score_snapkv(in, kernel, method == "snapkv-max");
              else if (method == "knorm") sc = score_knorm(in);
              else if (method == "streaming") sc = score_streaming(in, n_sink);
              else if (method == "laser") sc = score_laser(in, n_sink, kernel);  // kernel = n_local here
              else if (method == "gkv") {
                  carray<float> h;
                  if (!hist.is_none()) {
                      h = hist.cast<carray<float>>();
                      if (h.size() != (py::ssize_t) in.n_head_kv * in.T) throw Error("hist must be [n_head_kv, T]");
                  }
                  std::vector<float> g;
                  sc = score_gkv(in, hist.is_none() ? nullptr : h.data(), GkvParams{alpha, mix_lambda, sim_threshold},
                                 &g);
                  return py::tuple(py::make_tuple(to_numpy(sc.s, {in.n_head_kv, in.T}),
                                                  to_numpy(sc.protect, {in.T}),
                                                  to_numpy(std::move(g), {in.n_head_kv, in.T})));
              } else throw Error("unknown method " + method);
              return py::tuple(py::make_tuple(to_numpy(sc.s, {in.n_head_kv, in.T}), to_numpy(sc.protect, {in.T})));
          },
          py::arg("method"), py::arg("k"), py::arg("pos"), py::arg("q") = py::none(), py::arg("qpos") = py::none(),
          py::arg("n_head") = 0, py::arg("scale") = 1.0f, py::arg("kernel") = 5, py::arg("n_sink") = 4,
          py::arg("hist") = py::none(), py::arg("alpha") = 0.8f, py::arg("mix_lambda") = 0.5f,
          py::arg("sim_threshold") = 0.5f, py::arg("softcap") = 0.0f);
    // The graph path (native/src/graph): the same scores and selection as ggml graphs.
#ifdef GRKV_HAVE_GRAPH
    m.def("graph_available", []() { return graph::available(); });
    kernels.def("graph_select",
          [](const std::string & method, carray<float> k, carray<int32_t> pos, py::object q, py::object qpos, int n_head,
             float scale, int budget, int kernel, int n_sink, const std::string & backend, int n_threads,
             float softcap) {
              if (k.ndim() != 3) throw Error("k must be [T, n_head_kv, head_dim]");
              if (pos.size() != k.shape(0)) throw Error("graph_select: one position per token is needed");
              LayerInput in;
              carray<float> qa;
              carray<int32_t> qp;
              if (!q.is_none()) {
                  qa = q.cast<carray<float>>();
                  qp = qpos.cast<carray<int32_t>>();
                  in = array_layer(k, pos, qa, qp, n_head, scale, softcap);
                  if (qp.size() != qa.shape(0) || qa.shape(2) != k.shape(2) || qa.shape(1) != n_head) {
                      throw Error("graph_select: inconsistent shapes");
                  }
              } else {
                  in.k = k.data();
                  in.pos = pos.data();
                  in.T = (int) k.shape(0);
                  in.n_head_kv = (int) k.shape(1);
                  in.head_dim = (int) k.shape(2);
                  in.n_head = n_head;
              }
              graph::SelectResult r;
              {
                  py::gil_scoped_release nogil;
                  r = graph::select_layer(in, graph::GraphMethod{method, kernel, n_sink}, budget, backend, n_threads);
              }
              return py::make_tuple(to_numpy(std::move(r.scores), {in.n_head_kv, in.T}),
                                    to_numpy(std::move(r.keep), {in.n_head_kv, budget}), r.backend);
          },
          py::arg("method"), py::arg("k"), py::arg("pos"), py::arg("q") = py::none(), py::arg("qpos") = py::none(),
          py::arg("n_head") = 0, py::arg("scale") = 1.0f, py::arg("budget") = 0, py::arg("kernel") = 5,
          py::arg("n_sink") = 4, py::arg("backend") = "CPU", py::arg("n_threads") = 1, py::arg("softcap") = 0.0f,
          "One layer's scores [n_head_kv, T] and keep [n_head_kv, budget] computed as a ggml graph");
    m.def("graph_select_cache",
          [](const kvx::Api & api, uintptr_t ctx, int part, const std::string & method, const py::list & queries,
             int n_head, int n_head_kv, float scale, float softcap, int kernel, int n_sink, int budget, int n_threads,
             int n_layer) {
              const std::vector<LayerQueries> qs = to_queries(queries);
              std::string name;
              std::vector<int32_t> keep;
              {
                  py::gil_scoped_release nogil;
                  keep = graph::select_cache(api, reinterpret_cast<void *>(ctx), part, 0, qs,
                                             ModelShape{n_head, n_head_kv, scale, softcap},
                                             graph::GraphMethod{method, kernel, n_sink}, budget, n_threads, &name);
              }
              return py::make_tuple(to_numpy(std::move(keep), {n_layer, n_head_kv, budget}), name);
          },
          py::arg("api"), py::arg("ctx"), py::arg("part"), py::arg("method"), py::arg("queries"), py::arg("n_head"),
          py::arg("n_head_kv"), py::arg("scale"), py::arg("softcap"), py::arg("kernel"), py::arg("n_sink"),
          py::arg("budget"), py::arg("n_threads"), py::arg("n_layer"),
          "keep [n_layer, n_head_kv, budget] computed on the cache's own backend from its K tensors");
#else
    m.def("graph_available", []() { return false; });
#endif
    kernels.def("select_per_head",
          [](carray<float> s, carray<uint8_t> prot, int budget) {
              Scores sc;
              sc.n_head_kv = (int) s.shape(0);
              sc.T = (int) s.shape(1);
              sc.s.assign(s.data(), s.data() + s.size());
              sc.protect.assign(prot.data(), prot.data() + prot.size());
              auto k = select_per_head(sc, budget);
              return to_numpy(std::move(k), {(py::ssize_t) sc.n_head_kv, (py::ssize_t) budget});
          },
          py::arg("scores"), py::arg("protect"), py::arg("budget"));
    kernels.def("allocate_headwise",
          [](carray<float> s, carray<uint8_t> prot, int budget, float alpha, bool across_layers) {
              if (s.ndim() != 3 || prot.ndim() != 2) throw Error("scores must be [L, H, T] and protect [L, T]");
              const int L = (int) s.shape(0), H = (int) s.shape(1), T = (int) s.shape(2);
              std::vector<Scores> layers(L);
              for (int l = 0; l < L; ++l) {
                  layers[l].n_head_kv = H;
                  layers[l].T = T;
                  layers[l].s.assign(s.data() + (size_t) l * H * T, s.data() + (size_t) (l + 1) * H * T);
                  layers[l].protect.assign(prot.data() + (size_t) l * T, prot.data() + (size_t) (l + 1) * T);
              }
              HeadwiseAllocation a = allocate_headwise(layers, budget, alpha, across_layers);
              return py::make_tuple(a.slots, to_numpy(std::move(a.count), {L, H}));
          },
          py::arg("scores"), py::arg("protect"), py::arg("budget"), py::arg("alpha"), py::arg("across_layers"));
    // Quantised-cache codecs (q8_0 = 8, q4_0 = 2) and the Walsh-Hadamard rotation, for the tests.
    kernels.def("quant_dequantize", [](int32_t type, py::bytes data) {
        const std::string b = data;
        const size_t bb = quant_block_bytes(type);
        if (b.size() % bb) throw Error("quantised data is not a whole number of blocks");
        std::vector<float> out(b.size() / bb * QK);
        dequantize_row(type, (const uint8_t *) b.data(), out.data(), out.size());
        return to_numpy(std::move(out), {(py::ssize_t) (b.size() / bb * QK)});
    }, py::arg("type"), py::arg("data"));
    kernels.def("quant_quantize", [](int32_t type, carray<float> x) {
        std::string out(x.size() / QK * quant_block_bytes(type), '\0');
        quantize_row(type, x.data(), (uint8_t *) out.data(), (size_t) x.size());
        return py::bytes(out);
    }, py::arg("type"), py::arg("x"));
    kernels.def("hadamard", [](carray<float> x, int block) {
        std::vector<float> out(x.data(), x.data() + x.size());
        hadamard_blocks(out.data(), out.size(), block);
        std::vector<py::ssize_t> shape(x.shape(), x.shape() + x.ndim());
        return to_numpy(std::move(out), shape);
    }, py::arg("x"), py::arg("block"));
    m.def("hadamard_block_k", &hadamard_block_k, py::arg("type"), py::arg("head_dim"));
    m.def("hadamard_block_v", &hadamard_block_v, py::arg("type"), py::arg("head_dim"));
    kernels.def("f32_round_trip",
          [](carray<float> x, const std::string & dtype, int rot) {
              std::vector<float> out(x.data(), x.data() + x.size());
              const size_t n = x.ndim() ? (size_t) x.shape(x.ndim() - 1) : 1;  // row by row
              const RowCodec c{ggml_type_from_name(dtype), rot};
              for (size_t i = 0; n && i < out.size(); i += n) codec_round_trip(c, out.data() + i, n);
              std::vector<py::ssize_t> shape(x.shape(), x.shape() + x.ndim());
              return to_numpy(std::move(out), shape);
          },
          py::arg("x"), py::arg("dtype"), py::arg("rot") = 0,
          "x as the cache would hold it: stored as dtype (rotated by a Hadamard block of `rot` first) and read back");

    py::class_<GrkvProblem>(kernels, "GrkvProblem")
        .def(py::init([](carray<float> q, carray<float> w, carray<uint8_t> vis, carray<float> ostar, carray<float> k0,
                         carray<float> v0, carray<uint8_t> mut, float scale, float softcap) {
                 GrkvProblem p;
                 p.R = (int) q.shape(0);
                 p.d = (int) q.shape(1);
                 p.B = (int) k0.shape(0);
                 p.scale = scale;
                 p.softcap = softcap;
                 if (w.size() != p.R || vis.size() != (py::ssize_t) p.R * p.B || ostar.size() != (py::ssize_t) p.R * p.d ||
                     k0.size() != (py::ssize_t) p.B * p.d || v0.size() != k0.size() || mut.size() != p.B) {
                     throw Error("GrkvProblem: inconsistent shapes");
                 }
                 p.q.assign(q.data(), q.data() + q.size());
                 p.w.assign(w.data(), w.data() + w.size());
                 p.vis.assign(vis.data(), vis.data() + vis.size());
                 p.ostar.assign(ostar.data(), ostar.data() + ostar.size());
                 p.k0.assign(k0.data(), k0.data() + k0.size());
                 p.v0.assign(v0.data(), v0.data() + v0.size());
                 p.mut.assign(mut.data(), mut.data() + mut.size());
                 return p;
             }),
             py::arg("q"), py::arg("w"), py::arg("vis"), py::arg("ostar"), py::arg("k0"), py::arg("v0"), py::arg("mut"),
             py::arg("scale"), py::arg("softcap") = 0.0f);
    auto bd = [](const GrkvProblem & p) { return std::vector<py::ssize_t>{p.B, p.d}; };
    auto rd = [](const GrkvProblem & p) { return std::vector<py::ssize_t>{p.R, p.d}; };
    kernels.def("grkv_student", [](const GrkvProblem & p, carray<float> K, carray<float> V) {
        std::vector<float> A, O;
        grkv_student(p, K.data(), V.data(), A, O);
        return py::make_tuple(to_numpy(std::move(A), {p.R, p.B}), to_numpy(std::move(O), {p.R, p.d}));
    });
    kernels.def("grkv_objective", [](const GrkvProblem & p, carray<float> K, carray<float> V, float lam) {
        return grkv_objective(p, K.data(), V.data(), lam);
    });
    kernels.def("grkv_value_step", [bd](const GrkvProblem & p, carray<float> K, float lam) {
        return to_numpy(grkv_value_step(p, K.data(), lam), bd(p));
    });
    kernels.def("grkv_jvp", [rd](const GrkvProblem & p, carray<float> K, carray<float> V, carray<float> D) {
        std::vector<float> A, O, dA;
        grkv_student(p, K.data(), V.data(), A, O, &dA);
        return to_numpy(grkv_jvp(p, dA, O, V.data(), D.data()), rd(p));
    });
    kernels.def("grkv_vjp", [bd](const GrkvProblem & p, carray<float> K, carray<float> V, carray<float> U) {
        std::vector<float> A, O, dA;
        grkv_student(p, K.data(), V.data(), A, O, &dA);
        return to_numpy(grkv_vjp(p, dA, O, V.data(), U.data()), bd(p));
    });
    kernels.def("grkv_key_step", [bd](const GrkvProblem & p, carray<float> K, carray<float> V, float lam, int iters, float tol,
                                float key_active) {
        GrkvParams prm;
        prm.lambda = lam;
        prm.cg_iters = iters;
        prm.cg_tol = tol;
        prm.key_active = key_active;
        return to_numpy(grkv_key_step(p, K.data(), V.data(), prm), bd(p));
    }, py::arg("p"), py::arg("K"), py::arg("V"), py::arg("lam") = 0.01f, py::arg("iters") = 16, py::arg("tol") = 1e-6f,
       py::arg("key_active") = 0.0f);
    kernels.def("grkv_fit", [bd](const GrkvProblem & p, float lam, float cap_v, float cap_k, int steps, const std::string & dtype,
                           int rot) {
        GrkvParams prm;
        prm.lambda = lam;
        prm.cap_v = cap_v;
        prm.cap_k = cap_k;
        prm.steps = steps;
        prm.codec_k = prm.codec_v = RowCodec{ggml_type_from_name(dtype), rot};
        GrkvResult r = grkv_fit(p, prm);
        py::dict out;
        out["k"] = to_numpy(r.k, bd(p));
        out["v"] = to_numpy(r.v, bd(p));
        out["cand_obj"] = r.cand_obj;
        py::list ck, cv;
        for (auto & x : r.cand_k) ck.append(to_numpy(x, bd(p)));
        for (auto & x : r.cand_v) cv.append(to_numpy(x, bd(p)));
        out["cand_k"] = ck;
        out["cand_v"] = cv;
        return out;
    }, py::arg("p"), py::arg("lam") = 0.01f, py::arg("cap_v") = 0.1f, py::arg("cap_k") = 0.025f, py::arg("steps") = 1,
       py::arg("dtype") = "f32", py::arg("rot") = 0);
    kernels.def("merge_head", [](const std::string & name, carray<float> k, carray<float> v, carray<int32_t> pos,
                           carray<int32_t> keep) {
        HeadKV h;
        h.k = k.data();
        h.v = v.data();
        h.T = (int) k.shape(0);
        h.d = (int) k.shape(1);
        h.stride = h.d;
        h.pos = pos.data();
        h.keep = keep.data();
        h.B = (int) keep.size();
        std::vector<float> ok((size_t) h.B * h.d), ov((size_t) h.B * h.d);
        if (name == "merge") merge_values(h, ok.data(), ov.data());
        else if (name == "pivot" || name == "weighted") merge_nearest(h, name == "weighted", ok.data(), ov.data());
        else throw Error("unknown merge " + name);
        return py::make_tuple(to_numpy(std::move(ok), {h.B, h.d}), to_numpy(std::move(ov), {h.B, h.d}));
    });
    m.def("rope_rotate", [](carray<float> x, const RopeParams & p, carray<double> delta) {
        std::vector<float> out(x.data(), x.data() + x.size());
        const int d = (int) x.shape(x.ndim() - 1);
        const size_t n = out.size() / d;
        if ((size_t) delta.size() != n) throw Error("one delta per vector");
        for (size_t i = 0; i < n; ++i) rope_rotate(out.data() + i * d, p, delta.data()[i]);
        std::vector<py::ssize_t> shape(x.shape(), x.shape() + x.ndim());
        return to_numpy(std::move(out), shape);
    });

    py::class_<Capture>(m, "Capture")
        .def(py::init<uintptr_t, uintptr_t>(), py::arg("tensor_get_fn"), py::arg("op_name_fn"))
        .def("op_code", &Capture::op_code)
        .def("set_targets",
             [](Capture & c, const std::vector<std::tuple<std::string, int, int, std::vector<int32_t>>> & t) {
                 std::vector<CaptureTarget> ts;
                 for (auto & [p, op, td, pos] : t) {
                     std::vector<int32_t> sorted = pos;
                     std::sort(sorted.begin(), sorted.end());
                     ts.push_back(CaptureTarget{p, op, td, sorted});
                 }
                 c.set_targets(std::move(ts));
             })
        .def("enable", &Capture::enable)
        .def_property_readonly("enabled", &Capture::enabled)
        .def("clear", &Capture::clear)
        .def_property_readonly("error", &Capture::error)
        .def_property_readonly("callback_address", &Capture::callback_address)
        .def_property_readonly("user_data", &Capture::user_data)
        .def("layers",
             [](const Capture & c, int target) {
                 std::vector<int> ls;
                 for (auto & [key, v] : c.data()) if (key.first == target) ls.push_back(key.second);
                 return ls;
             })
        .def("positions", [](const Capture & c, int target, int layer) {
            auto it = c.data().find({target, layer});
            if (it == c.data().end()) throw Error("nothing captured for target " + std::to_string(target));
            return to_numpy(it->second.pos, {(py::ssize_t) it->second.pos.size()});
        })
        .def("get", [](const Capture & c, int target, int layer) {
            auto it = c.data().find({target, layer});
            if (it == c.data().end()) throw Error("nothing captured for target " + std::to_string(target) + " layer " + std::to_string(layer));
            return to_numpy(it->second.data, {(py::ssize_t) it->second.n_rows(), (py::ssize_t) it->second.row_len});
        });
}
