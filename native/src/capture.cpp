#include "grkv/capture.h"

#include "grkv/common.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>

namespace grkv {

Capture::Capture(uintptr_t tensor_get_fn, uintptr_t op_name_fn)
    : tensor_get_(reinterpret_cast<ggml::TensorGetFn>(tensor_get_fn)),
      op_name_(reinterpret_cast<ggml::OpNameFn>(op_name_fn)) {
    if (!tensor_get_ || !op_name_) throw Error("Capture needs ggml_backend_tensor_get and ggml_op_name");
}

int32_t Capture::op_code(const std::string & name) const {
    // GGML_OP_COUNT is below 128 in every ggml of this generation.
    for (int32_t op = 0; op < 128; ++op) {
        const char * n = op_name_(op);
        if (n && name == n) return op;
    }
    return -1;
}

void Capture::set_targets(std::vector<CaptureTarget> targets) {
    targets_ = std::move(targets);
    data_.clear();
}

uintptr_t Capture::callback_address() const {
    return reinterpret_cast<uintptr_t>(&Capture::callback);
}

int Capture::match(const ggml::Tensor * t, int * layer) const {
    const char * dash = std::strrchr(t->name, '-');
    if (!dash || dash == t->name || dash[1] < '0' || dash[1] > '9') return -1;
    // "<name>-<il>" exactly: ggml names views of a node "<name>-<il> (reshaped)"
    for (const char * c = dash + 1; *c; ++c) {
        if (*c < '0' || *c > '9') return -1;
    }
    const size_t plen = (size_t) (dash - t->name);
    for (size_t i = 0; i < targets_.size(); ++i) {
        const auto & tg = targets_[i];
        if (tg.prefix.size() != plen || std::strncmp(tg.prefix.data(), t->name, plen) != 0) continue;
        if (tg.op >= 0 && tg.op != t->op) continue;
        *layer = std::atoi(dash + 1);
        return (int) i;
    }
    return -1;
}

bool Capture::observe(const ggml::Tensor * t) {
    int layer = 0;
    const int ti = match(t, &layer);
    if (ti < 0) return true;
    const auto & tg = targets_[ti];
    if (t->type != 0) {  // GGML_TYPE_F32
        error_ = std::string("capture: ") + t->name + " is not f32";
        return true;
    }
    // Contiguity check: rows of the captured tensor must be dense.
    int64_t expect = 4;
    for (int d = 0; d < ggml::kMaxDims; ++d) {
        if (t->ne[d] > 1 && (int64_t) t->nb[d] != expect) {
            error_ = std::string("capture: ") + t->name + " is not contiguous";
            return true;
        }
        expect *= t->ne[d];
    }
    int64_t row_len = 1;
    for (int d = 0; d < tg.token_dim; ++d) row_len *= t->ne[d];
    int64_t n_tok = 1;
    for (int d = tg.token_dim; d < ggml::kMaxDims; ++d) n_tok *= t->ne[d];
    auto & c = data_[{ti, layer}];
    if (c.row_len && c.row_len != row_len) {
        error_ = std::string("capture: row length of ") + t->name + " changed";
        return true;
    }
    c.row_len = row_len;
    // Row positions: a ROPE node's src[1] is the I32 position vector of the ubatch.
    std::vector<int32_t> pos;
    const ggml::Tensor * p = t->src[1];
    if (p && p->type == 26 /* GGML_TYPE_I32 */ && p->ne[0] >= n_tok) {
        pos.resize((size_t) n_tok);
        tensor_get_(p, pos.data(), 0, (size_t) n_tok * 4);
    }
    if (tg.positions.empty()) {
        const size_t old = c.data.size();
        c.data.resize(old + (size_t) (row_len * n_tok));
        tensor_get_(t, c.data.data() + old, 0, (size_t) (row_len * n_tok) * 4);
        if (!pos.empty()) c.pos.insert(c.pos.end(), pos.begin(), pos.end());
        return true;
    }
    if (pos.empty()) {
        error_ = std::string("capture: ") + t->name + " has no position input to filter on";
        return true;
    }
    for (int64_t i = 0; i < n_tok; ++i) {
        if (!std::binary_search(tg.positions.begin(), tg.positions.end(), pos[i])) continue;
        const size_t old = c.data.size();
        c.data.resize(old + (size_t) row_len);
        tensor_get_(t, c.data.data() + old, (size_t) (i * row_len) * 4, (size_t) row_len * 4);
        c.pos.push_back(pos[i]);
    }
    return true;
}

bool Capture::callback(ggml::Tensor * t, bool ask, void * user_data) {
    auto * self = static_cast<Capture *>(user_data);
    if (ask) {
        if (!self->enabled()) return false;  // the hot path while decoding
        int layer;
        return self->match(t, &layer) >= 0;
    }
    if (self->enabled()) self->observe(t);
    return true;  // false would abort the graph
}

}  // namespace grkv
