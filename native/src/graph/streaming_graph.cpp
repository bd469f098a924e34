// StreamingLLM's scores as ggml ops: recency (the token index); the sinks
// come in as protected tokens.
#include "layer_graph.h"

namespace grkv::graph {

ggml_tensor * streaming_scores(LayerGraph & g, const LayerInput & in) {
    ggml_context * c = g.ctx.get();
    ggml_tensor * t = ggml_arange(c, 0.0f, (float) in.T, 1.0f);  // [T]
    return ggml_repeat_4d(c, t, in.T, in.n_head_kv, 1, 1);
}

}  // namespace grkv::graph
