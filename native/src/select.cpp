#include "grkv/select.h"

#include <algorithm>
#include <numeric>
#include <string>

#include "grkv/common.h"

namespace grkv {
namespace {

int count_protected(const Scores & sc) {
    return (int) std::count(sc.protect.begin(), sc.protect.end(), 1);
}

void check_budget(int budget, int T, int n_prot) {
    if (budget < 1 || budget > T) {
        throw Error("budget " + std::to_string(budget) + " outside [1, " + std::to_string(T) + "] tokens");
    }
    if (n_prot > budget) {
        throw Error("budget of " + std::to_string(budget) + " tokens is smaller than the " + std::to_string(n_prot) +
                    " tokens the method must keep (window or sinks); raise the budget or shrink the window");
    }
}

// Protected first, then by score (desc), ties to the earlier token.
std::vector<int32_t> top_b(const float * s, const std::vector<uint8_t> & prot, int T, int budget) {
    std::vector<int32_t> idx(T);
    std::iota(idx.begin(), idx.end(), 0);
    auto better = [&](int32_t a, int32_t b) {
        if (prot[a] != prot[b]) return prot[a] > prot[b];
        if (s[a] != s[b]) return s[a] > s[b];
        return a < b;
    };
    std::nth_element(idx.begin(), idx.begin() + (budget - 1), idx.end(), better);
    idx.resize(budget);
    std::sort(idx.begin(), idx.end());
    return idx;
}

}  // namespace

std::vector<int32_t> select_per_head(const Scores & sc, int budget) {
    check_budget(budget, sc.T, count_protected(sc));
    std::vector<int32_t> out;
    out.reserve((size_t) sc.n_head_kv * budget);
    for (int h = 0; h < sc.n_head_kv; ++h) {
        auto k = top_b(sc.s.data() + (size_t) h * sc.T, sc.protect, sc.T, budget);
        out.insert(out.end(), k.begin(), k.end());
    }
    return out;
}

std::vector<int32_t> select_shared(const std::vector<Scores> & layers, int budget) {
    if (layers.empty()) throw Error("no layers to select from");
    const int T = layers[0].T;
    std::vector<uint8_t> prot(T, 0);
    std::vector<double> rank_sum(T, 0.0);
    int n = 0;
    std::vector<int32_t> idx(T);
    for (const auto & sc : layers) {
        if (sc.T != T) throw Error("layers disagree on the number of tokens");
        for (int t = 0; t < T; ++t) prot[t] |= sc.protect[t];
        for (int h = 0; h < sc.n_head_kv; ++h) {
            const float * s = sc.s.data() + (size_t) h * T;
            std::iota(idx.begin(), idx.end(), 0);
            std::stable_sort(idx.begin(), idx.end(), [&](int32_t a, int32_t b) { return s[a] < s[b]; });
            for (int r = 0; r < T; ++r) rank_sum[idx[r]] += r;  // higher rank = better
            ++n;
        }
    }
    std::vector<float> mean_rank(T);
    for (int t = 0; t < T; ++t) mean_rank[t] = (float) (rank_sum[t] / n);
    check_budget(budget, T, (int) std::count(prot.begin(), prot.end(), 1));
    return top_b(mean_rank.data(), prot, T, budget);
}

std::vector<int32_t> select_shared_sum(const std::vector<Scores> & layers, int budget) {
    if (layers.empty()) throw Error("no layers to select from");
    const int T = layers[0].T;
    std::vector<uint8_t> prot(T, 0);
    std::vector<double> sum(T, 0.0);
    for (const auto & sc : layers) {
        if (sc.T != T) throw Error("layers disagree on the number of tokens");
        for (int t = 0; t < T; ++t) prot[t] |= sc.protect[t];
        for (size_t i = 0; i < sc.s.size(); ++i) sum[i % T] += sc.s[i];
    }
    std::vector<float> s(sum.begin(), sum.end());
    check_budget(budget, T, (int) std::count(prot.begin(), prot.end(), 1));
    return top_b(s.data(), prot, T, budget);
}

}  // namespace grkv
