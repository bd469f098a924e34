// Head-wise budgets (AdaKV; KVzip's global threshold) in llama.cpp's cell
// layout. Every head of every layer shares the cells, so a head given fewer
// tokens than the busiest one would leave allocated slots idle; they are
// filled with that head's next-best tokens instead, which makes the result a
// per-head top-C selection with C = the busiest head's allocation. What this
// file decides is C: the cells a head-wise allocation really costs.
#include <algorithm>
#include <numeric>
#include <string>

#include "grkv/common.h"
#include "grkv/select.h"

namespace grkv {
namespace {

struct Entry {
    float s;
    int32_t lh;  // layer * n_head_kv + head
};

}  // namespace

HeadwiseAllocation allocate_headwise(const std::vector<Scores> & layers, int budget, float alpha, bool across_layers) {
    if (layers.empty()) throw Error("no layers to allocate");
    if (!(alpha >= 0.0f && alpha <= 1.0f)) throw Error("head-wise floor alpha must lie in [0, 1]");
    const int L = (int) layers.size(), H = layers[0].n_head_kv, T = layers[0].T;
    if (budget < 1 || budget > T) throw Error("budget " + std::to_string(budget) + " outside [1, " + std::to_string(T) + "]");
    HeadwiseAllocation out;
    out.count.assign((size_t) L * H, 0);
    const int floor_n = (int) (alpha * budget);
    std::vector<Entry> pool;
    auto flush = [&](int64_t slots) {  // the pool's top `slots` entries go to their heads
        slots = std::min<int64_t>(slots, (int64_t) pool.size());
        if (slots <= 0) return;
        std::nth_element(pool.begin(), pool.begin() + (slots - 1), pool.end(),
                         [](const Entry & a, const Entry & b) { return a.s > b.s; });
        for (int64_t i = 0; i < slots; ++i) ++out.count[pool[i].lh];
        pool.clear();
    };
    int64_t left = 0;
    for (int l = 0; l < L; ++l) {
        const Scores & sc = layers[l];
        if (sc.T != T || sc.n_head_kv != H) throw Error("layers disagree on tokens or heads");
        const int n_prot = (int) std::count(sc.protect.begin(), sc.protect.end(), 1);
        if (n_prot > budget) throw Error("budget of " + std::to_string(budget) + " tokens is smaller than the " +
                                         std::to_string(n_prot) + " protected tokens");
        std::vector<int32_t> idx(T);
        for (int h = 0; h < H; ++h) {
            const float * s = sc.s.data() + (size_t) h * T;
            // protected tokens and the floor first, by rank within the head
            std::iota(idx.begin(), idx.end(), 0);
            std::stable_sort(idx.begin(), idx.end(), [&](int32_t a, int32_t b) {
                if (sc.protect[a] != sc.protect[b]) return sc.protect[a] > sc.protect[b];
                return s[a] > s[b];
            });
            const int fixed = std::max(n_prot, floor_n);
            out.count[(size_t) l * H + h] = fixed;
            for (int r = fixed; r < T; ++r) pool.push_back({s[idx[r]], l * H + h});
            left += budget - fixed;
        }
        if (!across_layers) {
            flush(left);
            left = 0;
        }
    }
    if (across_layers) flush(left);
    out.slots = *std::max_element(out.count.begin(), out.count.end());
    return out;
}

}  // namespace grkv
