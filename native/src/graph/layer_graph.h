// One layer's selection graph: a method's score node over the keys, the
// protected tokens' bonus, and top_k. Internal to graph/.
#pragma once
#include <cstring>
#include <utility>
#include <vector>

#include "ggml-cpp.h"
#include "ggml.h"
#include "grkv/score.h"

namespace grkv::graph {

// Protected tokens rank above every score (SnapKV's are attention averages
// <= 1, KNorm's minus key norms, StreamingLLM's token indices).
constexpr float kProtectBonus = 1e9f;

struct LayerGraph {
    ggml_context_ptr ctx;
    std::vector<std::pair<ggml_tensor *, std::vector<char>>> uploads;  // inputs and their bytes, set after allocation

    // A new input tensor whose data is `bytes` (copied now, uploaded once allocated).
    ggml_tensor * input(ggml_tensor * t, const void * bytes) {
        ggml_set_input(t);
        std::vector<char> b(ggml_nbytes(t));
        std::memcpy(b.data(), bytes, b.size());
        uploads.emplace_back(t, std::move(b));
        return t;
    }
};

// Score nodes [T, n_head_kv] (f32) from keys K [d * n_head_kv, T] (f32).
// `prefix`: SnapKV's candidates, the tokens before the window.
ggml_tensor * snapkv_scores(LayerGraph & g, ggml_tensor * K, const LayerInput & in, int kernel, int prefix);
ggml_tensor * knorm_scores(LayerGraph & g, ggml_tensor * K, const LayerInput & in);
ggml_tensor * streaming_scores(LayerGraph & g, const LayerInput & in);

}  // namespace grkv::graph
