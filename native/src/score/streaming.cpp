// StreamingLLM: attention sinks plus the most recent tokens.
#include <algorithm>

#include "grkv/common.h"
#include "grkv/score.h"

namespace grkv {

Scores score_streaming(const LayerInput & in, int n_sink) {
    if (n_sink < 0) throw Error("n_sink must be >= 0");
    Scores sc;
    sc.n_head_kv = in.n_head_kv;
    sc.T = in.T;
    sc.s.resize((size_t) in.n_head_kv * in.T);
    sc.protect.assign(in.T, 0);
    for (int t = 0; t < std::min(n_sink, in.T); ++t) sc.protect[t] = 1;
    for (int h = 0; h < in.n_head_kv; ++h) {
        for (int t = 0; t < in.T; ++t) sc.s[(size_t) h * in.T + t] = (float) t;  // recency
    }
    return sc;
}

}  // namespace grkv
