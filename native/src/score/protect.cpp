// Protected ends for any scorer: the sinks (or template prefix) and a recent
// window are kept whatever their scores, and rank above every other token.
#include <algorithm>

#include "grkv/common.h"
#include "grkv/score.h"

namespace grkv {

void protect_ends(Scores & sc, int n_sink, int n_recent) {
    if (n_sink < 0 || n_recent < 0) throw Error("protected sink and recent counts must be >= 0");
    const int T = sc.T;
    for (int t = 0; t < std::min(n_sink, T); ++t) sc.protect[t] = 1;
    for (int t = std::max(0, T - n_recent); t < T; ++t) sc.protect[t] = 1;
    for (int h = 0; h < sc.n_head_kv; ++h) {
        float * s = sc.s.data() + (size_t) h * T;
        float top = 0.0f;
        bool any = false;
        for (int t = 0; t < T; ++t) {
            if (sc.protect[t]) continue;
            top = any ? std::max(top, s[t]) : s[t];
            any = true;
        }
        for (int t = 0; t < T; ++t)
            if (sc.protect[t]) s[t] = top + 1.0f;
    }
}

}  // namespace grkv
