// grkv-cpp's KV-cache extension (llama-kv-ext.h): views of the cache's parts,
// layers and cells, in-place rewrite of a sequence, the after-decode hook and
// the runtime eval-callback switch. Members of llama_kv_cache and
// llama_context are defined here so the diff to llama.cpp stays declarations.
#include "llama-kv-ext.h"

#include "llama-batch.h"
#include "llama-context.h"
#include "llama-kv-cache-iswa.h"
#include "llama-kv-cache.h"

#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpp.h"

#include <cstring>
#include <map>
#include <set>
#include <tuple>
#include <utility>
#include <vector>

namespace {

llama_kv_cache * part_of(llama_context * ctx, int32_t part, int32_t * err) {
    llama_memory_i * mem = ctx ? ctx->get_memory() : nullptr;
    if (auto * kv = dynamic_cast<llama_kv_cache *>(mem)) {
        if (part == 0) return kv;
        *err = LLAMA_KV_EXT_E_PART;
        return nullptr;
    }
    if (auto * iswa = dynamic_cast<llama_kv_cache_iswa *>(mem)) {
        if (part == 0) return iswa->get_base();
        if (part == 1) return iswa->get_swa();
        *err = LLAMA_KV_EXT_E_PART;
        return nullptr;
    }
    *err = LLAMA_KV_EXT_E_NOT_KV;
    return nullptr;
}

// Runs of consecutive cell indices: (first index in `idx`, cell, length).
struct run { size_t i; uint32_t cell; uint32_t n; };

std::vector<run> runs_of(const uint32_t * idx, size_t n) {
    std::vector<run> out;
    for (size_t i = 0; i < n;) {
        size_t j = i + 1;
        while (j < n && idx[j] == idx[j - 1] + 1) ++j;
        out.push_back({i, idx[i], (uint32_t) (j - i)});
        i = j;
    }
    return out;
}

// Copy the rows of runs `rr` between host buffers in the state blob's layouts
// (K [n][row]; V [n][row], or [n_embd_v][n] when transposed) and one layer's
// storage: into the cache when `to_cache`, out of it otherwise.
void copy_runs(const llama_kv_ext_layer & L, bool v_trans, uint32_t kv_size, size_t n, const std::vector<run> & rr,
               uint8_t * kb, uint8_t * vb, bool to_cache) {
    auto io = [to_cache](ggml_tensor * t, uint8_t * host, size_t off, size_t size) {
        if (to_cache) ggml_backend_tensor_set(t, host, off, size);
        else ggml_backend_tensor_get(t, host, off, size);
    };
    const size_t el = L.v ? ggml_type_size(L.v->type) : 0;
    for (const run & r : rr) {
        io(L.k, kb + r.i * L.k_row_bytes, r.cell * L.k_row_bytes, r.n * L.k_row_bytes);
        if (!L.v) continue;
        if (!v_trans) {
            io(L.v, vb + r.i * L.v_row_bytes, r.cell * L.v_row_bytes, r.n * L.v_row_bytes);
        } else {
            for (int32_t j = 0; j < L.n_embd_v; ++j) {
                io(L.v, vb + ((size_t) j * n + r.i) * el, ((size_t) j * kv_size + r.cell) * el, r.n * el);
            }
        }
    }
}

// Whether one KV head's slice of tensor t's rows (`n_embd` elements over
// `n_head_kv` heads) is whole blocks and whole 4-byte words, so that it can
// move as raw words.
bool words_per_head(const ggml_tensor * t, int64_t n_embd, int64_t n_head_kv) {
    if (n_embd % n_head_kv) return false;
    const int64_t per = n_embd / n_head_kv;
    if (per % ggml_blck_size(t->type)) return false;
    return ggml_row_size(t->type, per) % 4 == 0;
}

// A tensor of type `type` over the bytes of cache tensor `t` (no copy).
ggml_tensor * alias_of(ggml_context * c, ggml_tensor * t, ggml_type type, int64_t ne0, int64_t ne1) {
    ggml_tensor * a = ggml_new_tensor_2d(c, type, ne0, ne1);
    GGML_ASSERT(ggml_nbytes(a) <= ggml_nbytes(t));
    a->op = GGML_OP_VIEW;
    a->src[0] = t;
    a->view_src = t->view_src ? t->view_src : t;
    a->view_offs = t->view_src ? t->view_offs : 0;
    a->data = t->data;
    a->buffer = t->buffer;
    return a;
}

}  // namespace

// One layer's gather: its cache tensors, the word rows to take, and the graph.
struct gather_layer {
    llama_kv_ext_layer L{};
    std::vector<int32_t> rows;     // [n * n_head_kv], slot-major word rows (K, untransposed V)
    std::vector<int32_t> cells;    // [n_head_kv][n] source cells
    std::vector<int32_t> head_of;  // [n_embd_v] each V channel's KV head (transposed V)
    ggml_context_ptr ctx;
    ggml_cgraph * gf = nullptr;
    ggml_tensor * idx = nullptr;
    ggml_tensor * cells_in = nullptr;
    ggml_tensor * head_of_in = nullptr;
};

namespace {

// get_rows of the kept head slices into the work buffer, then copies into the
// new cells' runs `rr`. Every gather comes before the first copy in the graph,
// and the backends compute a graph's nodes in order, so no source is
// overwritten before it is read.
void build_gather(gather_layer & g, int64_t Hkv, int32_t n, uint32_t kv_size, bool v_trans, const std::vector<run> & rr) {
    const size_t n_nodes = 16 + 8 * rr.size();
    ggml_init_params ip{ggml_tensor_overhead() * n_nodes + ggml_graph_overhead_custom(n_nodes, false), nullptr, true};
    g.ctx.reset(ggml_init(ip));
    ggml_context * c = g.ctx.get();
    g.gf = ggml_new_graph_custom(c, n_nodes, false);
    g.idx = ggml_new_tensor_1d(c, GGML_TYPE_I32, (int64_t) n * Hkv);
    ggml_set_input(g.idx);

    // raw words: [words per head, kv_size * Hkv] over the cache, gathered slot-major = the new rows' bytes
    auto words = [&](ggml_tensor * t, uint64_t row_bytes) {
        const int64_t w = (int64_t) (row_bytes / Hkv / 4);
        ggml_tensor * a = alias_of(c, t, GGML_TYPE_I32, w, (int64_t) kv_size * Hkv);
        return std::make_pair(a, ggml_get_rows(c, a, g.idx));  // [w, n * Hkv]
    };
    auto [ka, kg] = words(g.L.k, g.L.k_row_bytes);
    ggml_build_forward_expand(g.gf, kg);
    ggml_tensor *va = nullptr, *vg = nullptr;
    if (g.L.v && !v_trans) {
        std::tie(va, vg) = words(g.L.v, g.L.v_row_bytes);
        ggml_build_forward_expand(g.gf, vg);
    } else if (g.L.v) {
        // transposed V [n_embd_v][kv_size]: channel c of new cell i is element src[head(c)][i]
        // of row c. The per-channel cell lists are made from the per-head ones on the device
        // (get_rows of I32 rows by the channel -> head map): only [n_head_kv][n] indices cross.
        const int64_t E = g.L.n_embd_v;
        const size_t el = ggml_type_size(g.L.v->type);
        g.cells_in = ggml_new_tensor_2d(c, GGML_TYPE_I32, n, Hkv);  // row h: head h's source cells
        ggml_set_input(g.cells_in);
        g.head_of_in = ggml_new_tensor_1d(c, GGML_TYPE_I32, E);
        ggml_set_input(g.head_of_in);
        ggml_tensor * per_channel = ggml_get_rows(c, g.cells_in, g.head_of_in);      // I32 [n, E]
        ggml_tensor * elems = ggml_view_3d(c, g.L.v, 1, kv_size, E, el, kv_size * el, 0);
        vg = ggml_get_rows(c, elems, per_channel);                                  // f32 [1, n, E]
        ggml_build_forward_expand(g.gf, vg);
    }
    for (const run & r : rr) {
        const int64_t h0 = (int64_t) r.i * Hkv, hn = (int64_t) r.n * Hkv;
        ggml_tensor * kd = ggml_view_2d(c, ka, ka->ne[0], hn, ka->nb[1], (size_t) r.cell * Hkv * ka->nb[1]);
        ggml_tensor * ks = ggml_view_2d(c, kg, kg->ne[0], hn, kg->nb[1], (size_t) h0 * kg->nb[1]);
        ggml_build_forward_expand(g.gf, ggml_cpy(c, ks, kd));
        if (!vg) continue;
        if (!v_trans) {
            ggml_tensor * vd = ggml_view_2d(c, va, va->ne[0], hn, va->nb[1], (size_t) r.cell * Hkv * va->nb[1]);
            ggml_tensor * vs = ggml_view_2d(c, vg, vg->ne[0], hn, vg->nb[1], (size_t) h0 * vg->nb[1]);
            ggml_build_forward_expand(g.gf, ggml_cpy(c, vs, vd));
        } else {
            const int64_t E = g.L.n_embd_v;
            const size_t el = ggml_type_size(g.L.v->type);
            ggml_tensor * vs = ggml_view_2d(c, vg, r.n, E, vg->nb[2], (size_t) r.i * vg->nb[1]);
            ggml_tensor * vd = ggml_view_2d(c, g.L.v, r.n, E, kv_size * el, r.cell * el);
            ggml_build_forward_expand(g.gf, ggml_cpy(c, vs, vd));
        }
    }
}

// The same gather by plain copies, for a layer in host memory (measured faster
// on the CPU than the graph, whose transposed-V gather moves one element per
// row): each layer's kept slices into a scratch copy, then into the new cells.
void host_gather(const gather_layer & g, int64_t Hkv, int32_t n, uint32_t kv_size, bool v_trans,
                 const std::vector<run> & rr) {
    const llama_kv_ext_layer & L = g.L;
    const int32_t * src = g.cells.data();
    auto slices = [&](const ggml_tensor * t, uint64_t row, std::vector<uint8_t> & out) {
        const size_t hb = row / Hkv;
        const auto * base = static_cast<const uint8_t *>(t->data);
        out.resize((size_t) n * row);
        for (int32_t i = 0; i < n; ++i)
            for (int64_t h = 0; h < Hkv; ++h)
                std::memcpy(out.data() + i * row + h * hb, base + (size_t) src[h * n + i] * row + h * hb, hb);
    };
    std::vector<uint8_t> kb, vb;
    slices(L.k, L.k_row_bytes, kb);
    if (L.v && !v_trans) slices(L.v, L.v_row_bytes, vb);
    if (L.v && v_trans) {  // [n_embd_v][n] elements: element src[head(e)][i] of row e
        const size_t el = ggml_type_size(L.v->type);
        const int64_t E = L.n_embd_v, dv = E / Hkv;
        const auto * base = static_cast<const uint8_t *>(L.v->data);
        vb.resize((size_t) E * n * el);
        for (int64_t e = 0; e < E; ++e) {
            const uint8_t * row = base + (size_t) e * kv_size * el;
            const int32_t * cells = src + (e / dv) * n;
            uint8_t * out = vb.data() + (size_t) e * n * el;
            if (el == 2) for (int32_t i = 0; i < n; ++i) std::memcpy(out + 2 * i, row + 2 * (size_t) cells[i], 2);
            else for (int32_t i = 0; i < n; ++i) std::memcpy(out + el * i, row + el * (size_t) cells[i], el);
        }
    }
    copy_runs(L, v_trans, kv_size, n, rr, kb.data(), vb.data(), true);
}

}  // namespace

//
// llama_kv_cache members
//

int32_t llama_kv_cache::ext_n_layer() const { return (int32_t) layers.size(); }
bool llama_kv_cache::ext_v_trans() const { return v_trans; }
bool llama_kv_cache::ext_rot_k() const { return attn_rot_k; }
bool llama_kv_cache::ext_rot_v() const { return attn_rot_v; }

int32_t llama_kv_cache::ext_layer(int32_t ikv, llama_seq_id seq_id, llama_kv_ext_layer * out) const {
    if (ikv < 0 || ikv >= (int32_t) layers.size()) return LLAMA_KV_EXT_E_LAYER;
    if (seq_id < 0 || (size_t) seq_id >= seq_to_stream.size() || !out) return LLAMA_KV_EXT_E_SEQ;
    const auto & L = layers[ikv];
    const uint32_t strm = seq_to_stream[seq_id];
    out->il = (int32_t) L.il;
    out->n_embd_k = (int32_t) hparams.n_embd_k_gqa(L.il);
    out->n_embd_v = (int32_t) hparams.n_embd_v_gqa(L.il);
    out->k = L.k_stream[strm];
    out->v = L.v_stream.empty() ? nullptr : L.v_stream[strm];
    out->k_row_bytes = ggml_row_size(out->k->type, out->n_embd_k);
    out->v_row_bytes = out->v ? ggml_row_size(out->v->type, out->n_embd_v) : 0;
    return 0;
}

int32_t llama_kv_cache::ext_seq_cells(llama_seq_id seq_id, int32_t * cells_out, llama_pos * pos_out,
                                      int32_t cap) const {
    if (seq_id < 0 || (size_t) seq_id >= seq_to_stream.size()) return LLAMA_KV_EXT_E_SEQ;
    if (cap > 0 && (!cells_out || !pos_out)) return LLAMA_KV_EXT_E_ARG;
    const auto & cells = v_cells[seq_to_stream[seq_id]];
    int32_t n = 0;
    for (uint32_t i = 0; i < cells.size(); ++i) {
        if (!cells.seq_has(i, seq_id)) continue;
        // a cell outside the sliding window is free for reuse (find_slot takes it) and the
        // state blob leaves it out; so do we, so that both backends see the same cells
        if (llama_hparams::is_masked_swa(n_swa, swa_type, cells.pos_get(i), cells.seq_pos_max(seq_id))) continue;
        if (cells.seq_count(i) != 1) return LLAMA_KV_EXT_E_SEQ;
        if (n < cap) {
            cells_out[n] = (int32_t) i;
            pos_out[n] = cells.pos_get(i);
        }
        ++n;
    }
    return n;
}

int32_t llama_kv_cache::ext_read(llama_seq_id seq_id, int32_t ikv, const int32_t * cell, int32_t n, void * k_out,
                                 void * v_out) const {
    struct llama_kv_ext_layer L;
    if (const int32_t e = ext_layer(ikv, seq_id, &L)) return e;
    if (n < 0 || (n > 0 && (!cell || !k_out || (L.v && !v_out)))) return LLAMA_KV_EXT_E_ARG;
    const uint32_t kv_size = v_cells[seq_to_stream[seq_id]].size();
    std::vector<uint32_t> idx(n);
    for (int32_t i = 0; i < n; ++i) {
        if (cell[i] < 0 || (uint32_t) cell[i] >= kv_size) return LLAMA_KV_EXT_E_ARG;
        idx[i] = (uint32_t) cell[i];
    }
    copy_runs(L, v_trans, kv_size, n, runs_of(idx.data(), idx.size()), static_cast<uint8_t *>(k_out),
              static_cast<uint8_t *>(v_out), false);
    return 0;
}

int32_t llama_kv_cache::ext_check_layout(llama_seq_id seq_id, int32_t n, const llama_pos * pos) const {
    if (seq_id < 0 || (size_t) seq_id >= seq_to_stream.size()) return LLAMA_KV_EXT_E_SEQ;
    if (has_cell_ext()) return LLAMA_KV_EXT_E_UNSUPPORTED;
    const auto & cells = v_cells[seq_to_stream[seq_id]];
    if (n < 1 || (uint32_t) n > cells.size() || !pos) return LLAMA_KV_EXT_E_ARG;
    for (int32_t i = 1; i < n; ++i)
        if (pos[i] <= pos[i - 1]) return LLAMA_KV_EXT_E_ARG;
    uint32_t room = 0;
    for (uint32_t i = 0; i < cells.size(); ++i) {
        if (cells.is_empty(i)) ++room;
        else if (cells.seq_has(i, seq_id)) {
            if (cells.seq_count(i) != 1) return LLAMA_KV_EXT_E_SEQ;
            ++room;
        }
    }
    return (uint32_t) n > room ? LLAMA_KV_EXT_E_ROOM : 0;
}

std::vector<uint32_t> llama_kv_cache::ext_place(llama_seq_id seq_id, int32_t n, const llama_pos * pos) {
    // as a single-sequence state restore places its cells (state_read_meta)
    seq_rm(seq_id, -1, -1);
    llama_batch_allocr balloc(hparams.n_pos_per_embd());
    llama_ubatch ubatch = balloc.ubatch_reserve(n, 1);
    ubatch.seq_id_unq[0] = seq_id;
    for (int32_t i = 0; i < n; ++i) {
        ubatch.pos[i] = pos[i];
        ubatch.n_seq_id[i] = 1;
        ubatch.seq_id[i] = &seq_id;
    }
    slot_info sinfo = find_slot(ubatch, false);
    GGML_ASSERT(!sinfo.empty() && sinfo.idxs[0].size() == (size_t) n);  // guaranteed by ext_check_layout
    apply_ubatch(sinfo, ubatch);
    return sinfo.idxs[0];
}

int32_t llama_kv_cache::ext_seq_apply(llama_seq_id seq_id, int32_t n, const llama_pos * pos,
                                      const void * const * k_rows, const void * const * v_data) {
    // every check before the first write
    if (const int32_t e = ext_check_layout(seq_id, n, pos)) return e;
    if (!k_rows || !v_data) return LLAMA_KV_EXT_E_ARG;
    for (size_t l = 0; l < layers.size(); ++l)
        if (!k_rows[l] || (!layers[l].v_stream.empty() && !v_data[l])) return LLAMA_KV_EXT_E_ARG;

    const std::vector<uint32_t> dst = ext_place(seq_id, n, pos);
    const std::vector<run> rr = runs_of(dst.data(), dst.size());
    const uint32_t kv_size = v_cells[seq_to_stream[seq_id]].size();
    for (size_t l = 0; l < layers.size(); ++l) {
        struct llama_kv_ext_layer L;
        ext_layer((int32_t) l, seq_id, &L);
        // written, never modified: the casts only share copy_runs with the read
        copy_runs(L, v_trans, kv_size, n, rr, static_cast<uint8_t *>(const_cast<void *>(k_rows[l])),
                  static_cast<uint8_t *>(const_cast<void *>(v_data[l])), true);
    }
    return n;
}

int32_t llama_kv_cache::ext_seq_gather(llama_seq_id seq_id, int32_t n, const llama_pos * pos, int32_t n_head_kv,
                                       const int32_t * const * src, const ggml_backend_t * backends) {
    // backends[l]: the backend whose graph gathers layer l, or null where the
    // layer lives in host memory and is copied there
    // every check, and the work buffer, before the first write
    if (const int32_t e = ext_check_layout(seq_id, n, pos)) return e;
    if (!src || !backends || n_head_kv < 1) return LLAMA_KV_EXT_E_ARG;
    const uint32_t strm = seq_to_stream[seq_id];
    const uint32_t kv_size = v_cells[strm].size();
    // the cells a source may name: the sequence's, as llama_kv_ext_seq_cells lists them
    std::vector<char> held(kv_size, 0);
    {
        const int32_t m = ext_seq_cells(seq_id, nullptr, nullptr, 0);
        if (m < 0) return m;
        std::vector<int32_t> c(m);
        std::vector<llama_pos> p(m);
        ext_seq_cells(seq_id, c.data(), p.data(), m);
        for (int32_t x : c) held[x] = 1;
    }
    const int64_t Hkv = n_head_kv;
    std::vector<gather_layer> gl(layers.size());
    for (size_t l = 0; l < layers.size(); ++l) {
        if (!src[l]) return LLAMA_KV_EXT_E_ARG;
        for (int64_t i = 0; i < Hkv * n; ++i)
            if (src[l][i] < 0 || (uint32_t) src[l][i] >= kv_size || !held[src[l][i]]) return LLAMA_KV_EXT_E_ARG;
        ext_layer((int32_t) l, seq_id, &gl[l].L);
        if (!words_per_head(gl[l].L.k, gl[l].L.n_embd_k, Hkv)) return LLAMA_KV_EXT_E_UNSUPPORTED;
        if (gl[l].L.v) {
            const ggml_type vt = gl[l].L.v->type;
            const bool float_v = vt == GGML_TYPE_F16 || vt == GGML_TYPE_BF16 || vt == GGML_TYPE_F32;
            if (v_trans ? !float_v || gl[l].L.n_embd_v % Hkv : !words_per_head(gl[l].L.v, gl[l].L.n_embd_v, Hkv)) {
                return LLAMA_KV_EXT_E_UNSUPPORTED;
            }
        }
        gl[l].cells.assign(src[l], src[l] + Hkv * n);
        if (!backends[l]) continue;  // copied on the host: the graph's indices are not needed
        // slot-major head rows: word row (cell * Hkv + h) of the [words, kv_size * Hkv] view
        gl[l].rows.resize((size_t) n * Hkv);
        for (int32_t i = 0; i < n; ++i)
            for (int64_t h = 0; h < Hkv; ++h) gl[l].rows[(size_t) i * Hkv + h] = src[l][h * n + i] * (int32_t) Hkv + (int32_t) h;
        if (gl[l].L.v && v_trans) {
            const int32_t E = gl[l].L.n_embd_v, dv = E / (int32_t) Hkv;
            gl[l].head_of.resize(E);
            for (int32_t e = 0; e < E; ++e) gl[l].head_of[e] = e / dv;
        }
    }

    // reserve the work buffer for every layer's graph (laid out as if the new
    // cells were 0..n-1: the intermediate sizes do not depend on where they go)
    // (one allocator per backend: with a partial offload the layers live on several devices)
    std::map<ggml_backend_t, ggml_gallocr_ptr> galloc;
    const std::vector<run> one{{0, 0, (uint32_t) n}};
    for (size_t l = 0; l < gl.size(); ++l) {
        if (!backends[l]) continue;  // copied on the host
        auto & ga = galloc[backends[l]];
        if (!ga) ga.reset(ggml_gallocr_new(ggml_backend_get_default_buffer_type(backends[l])));
        build_gather(gl[l], Hkv, n, kv_size, v_trans, one);
        if (!ggml_gallocr_reserve(ga.get(), gl[l].gf)) return LLAMA_KV_EXT_E_ALLOC;
    }

    const std::vector<uint32_t> dst = ext_place(seq_id, n, pos);
    const std::vector<run> rr = runs_of(dst.data(), dst.size());
    for (size_t l = 0; l < gl.size(); ++l) {
        gather_layer & g = gl[l];
        if (!backends[l]) {
            host_gather(g, Hkv, n, kv_size, v_trans, rr);
            continue;
        }
        build_gather(g, Hkv, n, kv_size, v_trans, rr);
        // reserved above for the same intermediate tensors: no new allocation here
        GGML_ASSERT(ggml_gallocr_alloc_graph(galloc[backends[l]].get(), g.gf));
        ggml_backend_tensor_set(g.idx, g.rows.data(), 0, ggml_nbytes(g.idx));
        if (g.cells_in) {
            ggml_backend_tensor_set(g.cells_in, g.cells.data(), 0, ggml_nbytes(g.cells_in));
            ggml_backend_tensor_set(g.head_of_in, g.head_of.data(), 0, ggml_nbytes(g.head_of_in));
        }
        GGML_ASSERT(ggml_backend_graph_compute(backends[l], g.gf) == GGML_STATUS_SUCCESS);
    }
    return n;
}

//
// llama_context member
//

void llama_context::ext_set_eval_callback(ggml_backend_sched_eval_callback cb, void * user_data) {
    cparams.cb_eval = cb;
    cparams.cb_eval_user_data = user_data;
    // a reused graph keeps the scheduler's callback: set it there too
    ggml_backend_sched_set_eval_callback(sched.get(), cb, user_data);
}

// The gather's graphs run on the context's own backend objects (its CPU
// backend's threads and threadpool, its GPU backend's stream).
ggml_backend_t llama_context::ext_backend_for(ggml_backend_buffer_t buf) {
    // threads as graph_compute sets them for a batch
    for (const auto & [be, set_n_threads] : set_n_threads_fns) set_n_threads(be, cparams.n_threads_batch);
    if (ggml_backend_buffer_is_host(buf) && backend_cpu) return backend_cpu;
    ggml_backend_buffer_type_t buft = ggml_backend_buffer_get_type(buf);
    for (const auto & be : backends) {
        if (ggml_backend_supports_buft(be.get(), buft)) return be.get();
    }
    return nullptr;
}

//
// C API
//

int32_t llama_kv_ext_version(void) { return LLAMA_KV_EXT_VERSION; }

int32_t llama_kv_ext_n_parts(llama_context * ctx) {
    llama_memory_i * mem = ctx ? ctx->get_memory() : nullptr;
    if (dynamic_cast<llama_kv_cache *>(mem)) return 1;
    if (dynamic_cast<llama_kv_cache_iswa *>(mem)) return 2;
    return LLAMA_KV_EXT_E_NOT_KV;
}

int32_t llama_kv_ext_get_part(llama_context * ctx, int32_t part, llama_kv_ext_part_info * out) {
    int32_t err = 0;
    llama_kv_cache * kv = part_of(ctx, part, &err);
    if (!kv) return err;
    if (!out) return LLAMA_KV_EXT_E_ARG;
    out->n_layer = kv->ext_n_layer();
    out->kv_size = kv->get_size();
    out->type_k = (int32_t) kv->type_k();
    out->type_v = (int32_t) kv->type_v();
    out->v_trans = kv->ext_v_trans();
    out->rot_k = kv->ext_rot_k();
    out->rot_v = kv->ext_rot_v();
    return 0;
}

int32_t llama_kv_ext_get_layer(llama_context * ctx, int32_t part, int32_t layer, llama_seq_id seq,
                           llama_kv_ext_layer * out) {
    int32_t err = 0;
    llama_kv_cache * kv = part_of(ctx, part, &err);
    return kv ? kv->ext_layer(layer, seq, out) : err;
}

int32_t llama_kv_ext_seq_cells(llama_context * ctx, int32_t part, llama_seq_id seq, int32_t * cells, llama_pos * pos,
                               int32_t cap) {
    int32_t err = 0;
    llama_kv_cache * kv = part_of(ctx, part, &err);
    return kv ? kv->ext_seq_cells(seq, cells, pos, cap) : err;
}

int32_t llama_kv_ext_read(llama_context * ctx, int32_t part, llama_seq_id seq, int32_t layer, const int32_t * cells,
                          int32_t n, void * k_out, void * v_out) {
    int32_t err = 0;
    llama_kv_cache * kv = part_of(ctx, part, &err);
    if (!kv) return err;
    llama_synchronize(ctx);
    return kv->ext_read(seq, layer, cells, n, k_out, v_out);
}

int32_t llama_kv_ext_seq_apply(llama_context * ctx, int32_t part, llama_seq_id seq, int32_t n, const llama_pos * pos,
                               const void * const * k_rows, const void * const * v_data) {
    int32_t err = 0;
    llama_kv_cache * kv = part_of(ctx, part, &err);
    if (!kv) return err;
    llama_synchronize(ctx);
    return kv->ext_seq_apply(seq, n, pos, k_rows, v_data);
}

int32_t llama_kv_ext_seq_gather(llama_context * ctx, int32_t part, llama_seq_id seq, int32_t n, const llama_pos * pos,
                                int32_t n_head_kv, const int32_t * const * src, int32_t flags) {
    int32_t err = 0;
    llama_kv_cache * kv = part_of(ctx, part, &err);
    if (!kv) return err;
    // each layer's graph runs on the backend of the device that holds it
    std::vector<ggml_backend_t> be(kv->ext_n_layer());
    for (int32_t l = 0; l < kv->ext_n_layer(); ++l) {
        llama_kv_ext_layer L;
        if (const int32_t e = kv->ext_layer(l, seq, &L)) return e;
        const bool host = ggml_backend_buffer_is_host(L.k->buffer) && (!L.v || ggml_backend_buffer_is_host(L.v->buffer));
        if (host && !(flags & LLAMA_KV_EXT_GATHER_GRAPH)) continue;  // null: copied on the host
        be[l] = ctx->ext_backend_for(L.k->buffer);
        if (!be[l] || (L.v && be[l] != ctx->ext_backend_for(L.v->buffer))) return LLAMA_KV_EXT_E_UNSUPPORTED;
    }
    llama_synchronize(ctx);
    return kv->ext_seq_gather(seq, n, pos, n_head_kv, src, be.data());
}

void llama_kv_ext_set_hook(llama_context * ctx, llama_kv_ext_hook hook, void * user_data) {
    ctx->ext_hook = hook;
    ctx->ext_hook_user_data = user_data;
}

void llama_kv_ext_set_eval_callback(llama_context * ctx, ggml_backend_sched_eval_callback cb, void * user_data) {
    ctx->ext_set_eval_callback(cb, user_data);
}

void llama_kv_ext_after_decode(llama_context * ctx, const llama_batch & batch, int32_t ret) {
    if (ret != 0 || !ctx->ext_hook) return;
    std::set<llama_seq_id> seqs;
    for (int32_t i = 0; i < batch.n_tokens; ++i) {
        if (!batch.seq_id || !batch.n_seq_id) {
            seqs.insert(0);
            break;
        }
        for (int32_t s = 0; s < batch.n_seq_id[i]; ++s) seqs.insert(batch.seq_id[i][s]);
    }
    llama_memory_t mem = llama_get_memory(ctx);
    for (llama_seq_id s : seqs) {
        ctx->ext_hook(ctx, s, llama_memory_seq_pos_min(mem, s), llama_memory_seq_pos_max(mem, s),
                      ctx->ext_hook_user_data);
    }
}
