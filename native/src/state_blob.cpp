#include "grkv/state_blob.h"

#include "grkv/codec.h"
#include "grkv/quant.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <string>

namespace grkv {
namespace {

class Reader {
public:
    Reader(const uint8_t * d, size_t n) : d_(d), n_(n) {}
    template <typename T>
    T get(const char * what) {
        need(sizeof(T), what);
        T v;
        std::memcpy(&v, d_ + off_, sizeof(T));
        off_ += sizeof(T);
        return v;
    }
    void bytes(std::vector<uint8_t> & out, uint64_t n, const char * what) {
        need(n, what);
        out.assign(d_ + off_, d_ + off_ + n);
        off_ += n;
    }
    size_t offset() const { return off_; }
    size_t left() const { return n_ - off_; }
    bool done() const { return off_ == n_; }

private:
    void need(uint64_t k, const char * what) {
        if (k > n_ - off_) {
            throw Error("state blob truncated at byte " + std::to_string(off_) + " while reading " + what +
                        " (" + std::to_string(k) + " bytes needed, " + std::to_string(n_ - off_) + " left)");
        }
    }
    const uint8_t * d_;
    size_t n_;
    size_t off_ = 0;
};

class Writer {
public:
    template <typename T>
    void put(T v) {
        const size_t o = out.size();
        out.resize(o + sizeof(T));
        std::memcpy(out.data() + o, &v, sizeof(T));
    }
    void bytes(const std::vector<uint8_t> & b) { out.insert(out.end(), b.begin(), b.end()); }
    std::vector<uint8_t> out;
};

void check(bool ok, const std::string & msg, size_t off) {
    if (!ok) throw Error("corrupt state blob at byte " + std::to_string(off) + ": " + msg);
}

// Guards against absurd sizes from corrupted headers before allocating.
constexpr uint32_t kMaxCells = 1u << 26;
constexpr uint32_t kMaxLayers = 4096;
constexpr uint32_t kMaxStreams = 256;
constexpr uint32_t kMaxSeqPerCell = 256;

// Values per row from its byte size; left 0 for types the core cannot read.
void set_row_width(LayerRows & L, const char * what, const Reader & r) {
    size_t ub = 0, uv = 0;
    if (!dtype_row_unit(L.type, ub, uv)) return;
    check(L.row_bytes % ub == 0, std::string(what) + " row size not a multiple of the element or block size",
          r.offset());
    L.n_embd = (uint32_t) (L.row_bytes / ub * uv);
}

Stream parse_stream(Reader & r) {
    Stream s;
    s.cell_count = r.get<uint32_t>("cell_count");
    check(s.cell_count <= kMaxCells, "cell_count " + std::to_string(s.cell_count) + " is implausible", r.offset());
    if (s.cell_count == 0) return s;
    // each cell takes at least its position and sequence count: a corrupted count must
    // not allocate gigabytes for a blob a few bytes long
    check((uint64_t) s.cell_count * 8 <= r.left(),
          "truncated: cell_count " + std::to_string(s.cell_count) + " needs more bytes than the blob has left (" +
              std::to_string(r.left()) + ")", r.offset());
    s.pos.resize(s.cell_count);
    s.seq_ids.resize(s.cell_count);
    for (uint32_t c = 0; c < s.cell_count; ++c) {
        s.pos[c] = r.get<int32_t>("cell pos");
        const uint32_t n_seq = r.get<uint32_t>("cell n_seq_id");
        check(n_seq <= kMaxSeqPerCell, "cell has " + std::to_string(n_seq) + " sequence ids", r.offset());
        s.seq_ids[c].resize(n_seq);
        for (uint32_t i = 0; i < n_seq; ++i) s.seq_ids[c][i] = r.get<int32_t>("cell seq_id");
    }
    s.v_trans = r.get<uint32_t>("v_trans");
    check(s.v_trans <= 1, "v_trans is " + std::to_string(s.v_trans), r.offset());
    const uint32_t n_layer = r.get<uint32_t>("n_layer");
    check(n_layer > 0 && n_layer <= kMaxLayers, "n_layer " + std::to_string(n_layer) + " is implausible", r.offset());
    s.k.resize(n_layer);
    for (auto & L : s.k) {
        L.type = r.get<int32_t>("k_type");
        L.row_bytes = r.get<uint64_t>("k_row_bytes");
        check(L.row_bytes > 0 && L.row_bytes < (1u << 24), "k_row_bytes " + std::to_string(L.row_bytes), r.offset());
        set_row_width(L, "k", r);
        r.bytes(L.bytes, L.row_bytes * s.cell_count, "K rows");
    }
    s.v.resize(n_layer);
    for (auto & L : s.v) {
        L.type = r.get<int32_t>("v_type");
        if (!s.v_trans) {
            L.row_bytes = r.get<uint64_t>("v_row_bytes");
            check(L.row_bytes > 0 && L.row_bytes < (1u << 24), "v_row_bytes " + std::to_string(L.row_bytes), r.offset());
            set_row_width(L, "v", r);
            r.bytes(L.bytes, L.row_bytes * s.cell_count, "V rows");
        } else {
            L.el_bytes = r.get<uint32_t>("v_el_bytes");
            L.n_embd = r.get<uint32_t>("n_embd_v_gqa");
            check(L.el_bytes > 0 && L.el_bytes <= 8, "v_el_bytes " + std::to_string(L.el_bytes), r.offset());
            check(L.n_embd > 0 && L.n_embd < (1u << 20), "n_embd_v_gqa " + std::to_string(L.n_embd), r.offset());
            L.row_bytes = (uint64_t) L.el_bytes * L.n_embd;
            r.bytes(L.bytes, (uint64_t) L.n_embd * s.cell_count * L.el_bytes, "transposed V");
        }
    }
    return s;
}

void write_stream(Writer & w, const Stream & s) {
    w.put<uint32_t>(s.cell_count);
    if (s.cell_count == 0) return;
    for (uint32_t c = 0; c < s.cell_count; ++c) {
        w.put<int32_t>(s.pos[c]);
        w.put<uint32_t>((uint32_t) s.seq_ids[c].size());
        for (int32_t id : s.seq_ids[c]) w.put<int32_t>(id);
    }
    w.put<uint32_t>(s.v_trans);
    w.put<uint32_t>((uint32_t) s.k.size());
    for (const auto & L : s.k) {
        w.put<int32_t>(L.type);
        w.put<uint64_t>(L.row_bytes);
        w.bytes(L.bytes);
    }
    for (const auto & L : s.v) {
        w.put<int32_t>(L.type);
        if (!s.v_trans) {
            w.put<uint64_t>(L.row_bytes);
        } else {
            w.put<uint32_t>(L.el_bytes);
            w.put<uint32_t>(L.n_embd);
        }
        w.bytes(L.bytes);
    }
}

// Rows of every type the core reads can be edited too: replacement rows go
// through the layer's RowCodec (codec.h).
void require_readable(const Stream & s) {
    size_t ub, uv;
    for (size_t l = 0; l < s.k.size(); ++l) {
        if (!dtype_row_unit(s.k[l].type, ub, uv) || !dtype_row_unit(s.v[l].type, ub, uv)) {
            throw Error(std::string("cannot read a ") + ggml_type_name_of(s.k[l].type) + "/" +
                        ggml_type_name_of(s.v[l].type) + " KV cache: grkv-cpp reads f16, bf16, f32, q8_0 and q4_0");
        }
    }
}

}  // namespace

int MemoryPart::active_stream() const {
    int found = -1;
    for (size_t i = 0; i < streams.size(); ++i) {
        if (streams[i].cell_count == 0) continue;
        if (found >= 0) throw Error("the sequence spans several KV streams; use a single-stream context");
        found = (int) i;
    }
    return found;
}

uint64_t MemoryPart::bytes_per_cell() const {
    const int a = active_stream();
    if (a < 0) return 0;
    uint64_t b = 0;
    for (const auto & L : streams[a].k) b += L.row_bytes;
    for (const auto & L : streams[a].v) b += L.row_bytes;
    return b;
}

SeqState parse_state(const uint8_t * data, size_t size) {
    Reader r(data, size);
    const uint32_t magic = r.get<uint32_t>("magic");
    if (magic != kStateMagic) {
        throw Error("not a llama.cpp sequence state blob (magic 0x" + [&] {
            char b[16];
            std::snprintf(b, sizeof b, "%08x", magic);
            return std::string(b);
        }() + ", expected 0xaf143cd8)");
    }
    SeqState st;
    st.seq_id = r.get<int32_t>("seq_id");
    while (!r.done()) {
        MemoryPart p;
        const uint32_t n_stream = r.get<uint32_t>("n_stream");
        check(n_stream > 0 && n_stream <= kMaxStreams, "n_stream " + std::to_string(n_stream) + " is implausible",
              r.offset());
        for (uint32_t i = 0; i < n_stream; ++i) p.streams.push_back(parse_stream(r));
        st.parts.push_back(std::move(p));
        check(st.parts.size() <= 8, "more memory parts than any cache writes", r.offset());
    }
    if (st.parts.empty()) throw Error("state blob holds no memory part");
    return st;
}

std::vector<uint8_t> serialize_state(const SeqState & s) {
    Writer w;
    w.put<uint32_t>(kStateMagic);
    w.put<int32_t>(s.seq_id);
    for (const auto & p : s.parts) {
        w.put<uint32_t>((uint32_t) p.streams.size());
        for (const auto & st : p.streams) write_stream(w, st);
    }
    return std::move(w.out);
}

StreamView::StreamView(const Stream & st) : s(&st), order(st.cell_count) {
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return st.pos[a] < st.pos[b]; });
    for (size_t i = 1; i < order.size(); ++i) {
        if (st.pos[order[i]] == st.pos[order[i - 1]]) {
            throw Error("two cells of the sequence hold position " + std::to_string(st.pos[order[i]]));
        }
    }
}

std::vector<int32_t> StreamView::positions() const {
    std::vector<int32_t> p(order.size());
    for (size_t i = 0; i < order.size(); ++i) p[i] = s->pos[order[i]];
    return p;
}

std::vector<float> StreamView::keys(int layer) const {
    require_readable(*s);
    const LayerRows & L = s->k.at(layer);
    std::vector<float> out((size_t) n_tokens() * L.n_embd);
    for (int i = 0; i < n_tokens(); ++i) {
        to_f32(L.type, L.bytes.data() + (size_t) order[i] * L.row_bytes, out.data() + (size_t) i * L.n_embd, L.n_embd);
    }
    if (s->rot_k && quant_block_type(L.type)) hadamard_blocks(out.data(), out.size(), s->rot_k);
    return out;
}

std::vector<float> StreamView::values(int layer) const {
    require_readable(*s);
    const LayerRows & L = s->v.at(layer);
    const size_t T = (size_t) n_tokens();
    std::vector<float> out(T * L.n_embd);
    if (!s->v_trans) {
        for (size_t i = 0; i < T; ++i) {
            to_f32(L.type, L.bytes.data() + (size_t) order[i] * L.row_bytes, out.data() + i * L.n_embd, L.n_embd);
        }
    } else {
        const size_t es = L.el_bytes, cells = s->cell_count;
        std::vector<float> col(cells);
        for (size_t j = 0; j < L.n_embd; ++j) {
            to_f32(L.type, L.bytes.data() + j * cells * es, col.data(), cells);
            for (size_t i = 0; i < T; ++i) out[i * L.n_embd + j] = col[order[i]];
        }
    }
    if (s->rot_v && quant_block_type(L.type)) hadamard_blocks(out.data(), out.size(), s->rot_v);
    return out;
}

Stream compact_per_head(const StreamView & view, const std::vector<int32_t> & keep, int n_head_kv, int budget,
                        int32_t label_end, const float * new_k, const float * new_v) {
    const Stream & src = *view.s;
    require_readable(src);
    const int L = (int) src.k.size();
    const int T = view.n_tokens();
    if (budget <= 0 || budget > T) throw Error("budget " + std::to_string(budget) + " outside [1, " + std::to_string(T) + "]");
    if (keep.size() != (size_t) L * n_head_kv * budget) {
        throw Error("keep has " + std::to_string(keep.size()) + " entries, expected n_layer*n_head_kv*budget = " +
                    std::to_string((size_t) L * n_head_kv * budget));
    }
    for (int32_t t : keep) {
        if (t < 0 || t >= T) throw Error("keep index " + std::to_string(t) + " outside the sequence's " + std::to_string(T) + " tokens");
    }
    if (label_end - budget + 1 < 0) throw Error("label_end too small for the budget");

    Stream dst;
    dst.cell_count = (uint32_t) budget;
    dst.v_trans = src.v_trans;
    dst.rot_k = src.rot_k;
    dst.rot_v = src.rot_v;
    dst.pos.resize(budget);
    dst.seq_ids.assign(budget, src.seq_ids[view.order.back()]);
    for (int j = 0; j < budget; ++j) dst.pos[j] = label_end - budget + 1 + j;
    dst.k.resize(L);
    dst.v.resize(L);

    for (int l = 0; l < L; ++l) {
        const LayerRows & K = src.k[l];
        const LayerRows & V = src.v[l];
        if (K.n_embd % n_head_kv || V.n_embd % n_head_kv) {
            throw Error("layer " + std::to_string(l) + ": K/V width not divisible by n_head_kv");
        }
        const size_t dk = K.n_embd / n_head_kv, dv = V.n_embd / n_head_kv;
        // one head's slice is whole row units: elements, or a quantised row's 32-value blocks
        size_t kub, kuv, vub, vuv;
        dtype_row_unit(K.type, kub, kuv);  // readable: checked above
        dtype_row_unit(V.type, vub, vuv);
        if (vuv > 1 && src.v_trans) throw Error("a quantised V cache is never transposed (it needs flash attention)");
        if (dk % kuv || dv % vuv) {
            throw Error("layer " + std::to_string(l) + ": a quantised head slice is not whole 32-value blocks");
        }
        const size_t hk_bytes = dk / kuv * kub, hv_bytes = dv / vuv * vub;
        const size_t es_v = vub;  // transposed V: one element per (dim, cell)
        const int32_t * kl = keep.data() + (size_t) l * n_head_kv * budget;

        LayerRows & OK = dst.k[l];
        OK.type = K.type; OK.row_bytes = K.row_bytes; OK.n_embd = K.n_embd;
        OK.bytes.resize((size_t) budget * K.row_bytes);
        LayerRows & OV = dst.v[l];
        OV.type = V.type; OV.row_bytes = V.row_bytes; OV.el_bytes = V.el_bytes; OV.n_embd = V.n_embd;
        OV.bytes.resize((size_t) budget * (src.v_trans ? V.n_embd * es_v : V.row_bytes));

        const RowCodec ck = row_codec(src, l, true), cv = row_codec(src, l, false);
        std::vector<float> was(std::max(dk, dv));
        // a replacement row equal to what the cell already decodes to keeps the
        // cell's bytes: untouched slots stay bit-identical after requantisation
        auto put = [&](const RowCodec & c, const float * row, const uint8_t * orig, uint8_t * dst, size_t n,
                       size_t nbytes) {
            if (row) {
                codec_load(c, orig, was.data(), n);
                if (std::memcmp(was.data(), row, n * sizeof(float)) != 0) return codec_store(c, row, dst, n);
            }
            std::memcpy(dst, orig, nbytes);
        };
        for (int h = 0; h < n_head_kv; ++h) {
            for (int j = 0; j < budget; ++j) {
                const size_t cell = (size_t) view.order[kl[(size_t) h * budget + j]];
                const size_t slot = (size_t) l * budget + j;
                put(ck, new_k ? new_k + slot * K.n_embd + h * dk : nullptr,
                    K.bytes.data() + cell * K.row_bytes + h * hk_bytes,
                    OK.bytes.data() + (size_t) j * K.row_bytes + h * hk_bytes, dk, hk_bytes);
                if (!src.v_trans) {
                    put(cv, new_v ? new_v + slot * V.n_embd + h * dv : nullptr,
                        V.bytes.data() + cell * V.row_bytes + h * hv_bytes,
                        OV.bytes.data() + (size_t) j * V.row_bytes + h * hv_bytes, dv, hv_bytes);
                } else {
                    for (size_t e = h * dv; e < (h + 1) * dv; ++e) {
                        uint8_t * vd = OV.bytes.data() + (e * budget + j) * es_v;
                        if (new_v) {
                            from_f32(V.type, new_v + ((size_t) l * budget + j) * V.n_embd + e, vd, 1);
                        } else {
                            std::memcpy(vd, V.bytes.data() + (e * src.cell_count + cell) * es_v, es_v);
                        }
                    }
                }
            }
        }
    }
    return dst;
}

Stream compact_shared(const StreamView & view, const std::vector<int32_t> & keep) {
    const Stream & src = *view.s;
    const int T = view.n_tokens();
    const size_t B = keep.size();
    if (B == 0) throw Error("cannot keep zero tokens");
    for (size_t j = 0; j < B; ++j) {
        if (keep[j] < 0 || keep[j] >= T) throw Error("keep index out of range");
        if (j && keep[j] <= keep[j - 1]) throw Error("shared keep indices must be strictly ascending");
    }
    Stream dst;
    dst.cell_count = (uint32_t) B;
    dst.v_trans = src.v_trans;
    dst.rot_k = src.rot_k;
    dst.rot_v = src.rot_v;
    dst.k.resize(src.k.size());
    dst.v.resize(src.v.size());
    for (size_t j = 0; j < B; ++j) {
        const int32_t cell = view.order[keep[j]];
        dst.pos.push_back(src.pos[cell]);
        dst.seq_ids.push_back(src.seq_ids[cell]);
    }
    // Raw byte gathers: any cache type, quantised included, can be compacted.
    for (size_t l = 0; l < src.k.size(); ++l) {
        const LayerRows & K = src.k[l];
        LayerRows & OK = dst.k[l];
        OK = LayerRows{K.type, K.row_bytes, K.el_bytes, K.n_embd, {}};
        OK.bytes.resize(B * K.row_bytes);
        for (size_t j = 0; j < B; ++j) {
            std::memcpy(OK.bytes.data() + j * K.row_bytes, K.bytes.data() + (size_t) view.order[keep[j]] * K.row_bytes,
                        K.row_bytes);
        }
        const LayerRows & V = src.v[l];
        LayerRows & OV = dst.v[l];
        OV = LayerRows{V.type, V.row_bytes, V.el_bytes, V.n_embd, {}};
        if (!src.v_trans) {
            OV.bytes.resize(B * V.row_bytes);
            for (size_t j = 0; j < B; ++j) {
                std::memcpy(OV.bytes.data() + j * V.row_bytes,
                            V.bytes.data() + (size_t) view.order[keep[j]] * V.row_bytes, V.row_bytes);
            }
        } else {
            const size_t es = V.el_bytes;
            OV.bytes.resize((size_t) V.n_embd * B * es);
            for (size_t e = 0; e < V.n_embd; ++e) {
                for (size_t j = 0; j < B; ++j) {
                    std::memcpy(OV.bytes.data() + (e * B + j) * es,
                                V.bytes.data() + (e * src.cell_count + view.order[keep[j]]) * es, es);
                }
            }
        }
    }
    return dst;
}

}  // namespace grkv
