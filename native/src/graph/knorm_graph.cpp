// KNorm's scores as ggml ops: minus each head's key L2 norm.
#include "layer_graph.h"

namespace grkv::graph {

ggml_tensor * knorm_scores(LayerGraph & g, ggml_tensor * K, const LayerInput & in) {
    ggml_context * c = g.ctx.get();
    ggml_tensor * n2 = ggml_sum_rows(c, ggml_sqr(c, ggml_reshape_3d(c, K, in.head_dim, in.n_head_kv, in.T)));  // [1, Hkv, T]
    ggml_tensor * n = ggml_sqrt(c, ggml_reshape_2d(c, n2, in.n_head_kv, in.T));
    return ggml_scale(c, ggml_cont(c, ggml_transpose(c, n)), -1.0f);  // [T, Hkv]
}

}  // namespace grkv::graph
