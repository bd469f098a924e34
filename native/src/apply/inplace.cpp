// The in-place apply backend: reads and rewrites the sequence's cells through
// the patched llama.cpp, with no state blob in between.
#include "grkv/apply.h"

#include <algorithm>
#include <numeric>
#include <string>
#include <vector>

#include "grkv/common.h"

namespace grkv {
namespace {

constexpr int32_t kUnsupported = -7;  // LLAMA_KV_EXT_E_UNSUPPORTED
constexpr int32_t kGatherGraph = 1;   // LLAMA_KV_EXT_GATHER_GRAPH

void check(int32_t rc, const char * what) {
    if (rc < 0) throw Error(std::string("llama_kv_ext_") + what + " failed with code " + std::to_string(rc));
}

void need(const kvx::Api & api) {
    if (!api.version || !api.n_parts || !api.get_part || !api.get_layer || !api.seq_cells || !api.read ||
        !api.seq_apply || !api.seq_gather) {
        throw Error("the loaded libllama has no KV-cache extension (not the patched build)");
    }
    if (api.version() != kvx::kVersion) {
        throw Error("llama_kv_ext version " + std::to_string(api.version()) + ", the core expects " +
                    std::to_string(kvx::kVersion));
    }
}

}  // namespace

SeqState inplace_read(const kvx::Api & api, void * ctx, int32_t seq, int rows_of) {
    need(api);
    const int32_t n_parts = api.n_parts(ctx);
    check(n_parts, "n_parts");
    SeqState st;
    st.seq_id = seq;
    st.parts.resize(n_parts);
    for (int32_t p = 0; p < n_parts; ++p) {
        kvx::PartInfo info{};
        check(api.get_part(ctx, p, &info), "get_part");
        Stream s;
        const int32_t n = api.seq_cells(ctx, p, seq, nullptr, nullptr, 0);
        check(n, "seq_cells");
        std::vector<int32_t> cells(n);
        s.pos.resize(n);
        if (n) check(api.seq_cells(ctx, p, seq, cells.data(), s.pos.data(), n), "seq_cells");
        s.cell_count = (uint32_t) n;
        s.seq_ids.assign(n, std::vector<int32_t>{seq});
        s.v_trans = info.v_trans ? 1 : 0;
        if (n) {
            for (int32_t l = 0; l < info.n_layer; ++l) {
                kvx::LayerInfo li{};
                check(api.get_layer(ctx, p, l, seq, &li), "get_layer");
                LayerRows k, v;
                k.type = info.type_k;
                k.row_bytes = li.k_row_bytes;
                k.n_embd = (uint32_t) li.n_embd_k;

                v.type = info.type_v;
                v.n_embd = (uint32_t) li.n_embd_v;

                v.row_bytes = li.v_row_bytes;
                if (info.v_trans) v.el_bytes = (uint32_t) (li.v_row_bytes / li.n_embd_v);
                if (rows_of == -1 || rows_of == p) {  // else shape only: this part is not compressed
                    k.bytes.resize((size_t) n * li.k_row_bytes);
                    v.bytes.resize((size_t) n * li.v_row_bytes);
                    check(api.read(ctx, p, seq, l, cells.data(), n, k.bytes.data(), v.bytes.data()), "read");
                }
                s.k.push_back(std::move(k));
                s.v.push_back(std::move(v));
            }
        }
        // one stream per part, as a single-sequence blob of a unified cache has
        st.parts[p].streams.push_back(std::move(s));
    }
    return st;
}

void inplace_apply(const kvx::Api & api, void * ctx, int32_t seq, const SeqState & st, int part) {
    need(api);
    if (part < 0 || part >= (int) st.parts.size()) throw Error("no such cache part in the state");
    const int a = st.parts[part].active_stream();
    if (a < 0) throw Error("the compressed state holds no cells");
    const Stream & s = st.parts[part].streams[a];
    std::vector<const void *> k, v;
    for (size_t l = 0; l < s.k.size(); ++l) {
        k.push_back(s.k[l].bytes.data());
        v.push_back(s.v[l].bytes.data());
    }
    check(api.seq_apply(ctx, part, seq, (int32_t) s.cell_count, s.pos.data(), k.data(), v.data()), "seq_apply");
}

SeqCells seq_cells_by_position(const kvx::Api & api, void * ctx, int part, int32_t seq) {
    const int32_t m = api.seq_cells(ctx, part, seq, nullptr, nullptr, 0);
    check(m, "seq_cells");
    std::vector<int32_t> cells(m), pos(m), order(m);
    if (m) check(api.seq_cells(ctx, part, seq, cells.data(), pos.data(), m), "seq_cells");
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return pos[a] < pos[b]; });
    SeqCells out;
    out.cells.resize(m);
    out.pos.resize(m);
    for (int32_t i = 0; i < m; ++i) {
        out.cells[i] = cells[order[i]];
        out.pos[i] = pos[order[i]];
    }
    return out;
}

bool inplace_gather(const kvx::Api & api, void * ctx, int32_t seq, int part, const std::vector<int32_t> & keep,
                    int n_head_kv, const std::vector<int32_t> & pos, bool graph) {
    need(api);
    const int32_t n = (int32_t) pos.size();
    if (n < 1 || n_head_kv < 1 || keep.size() % ((size_t) n_head_kv * n)) {
        throw Error("gather: keep must be [n_layer][n_head_kv][n] for n = " + std::to_string(n) + " new cells");
    }
    const size_t L = keep.size() / ((size_t) n_head_kv * n);
    const SeqCells sc = seq_cells_by_position(api, ctx, part, seq);
    const int32_t m = (int32_t) sc.cells.size();
    std::vector<int32_t> src(keep.size());
    for (size_t i = 0; i < keep.size(); ++i) {
        if (keep[i] < 0 || keep[i] >= m) throw Error("gather: keep names a token the sequence does not hold");
        src[i] = sc.cells[keep[i]];
    }
    std::vector<const int32_t *> per(L);
    for (size_t l = 0; l < L; ++l) per[l] = src.data() + l * n_head_kv * n;
    const int32_t rc = api.seq_gather(ctx, part, seq, n, pos.data(), n_head_kv, per.data(), graph ? kGatherGraph : 0);
    if (rc == kUnsupported) return false;
    check(rc, "seq_gather");
    return true;
}

}  // namespace grkv
