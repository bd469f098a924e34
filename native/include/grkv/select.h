// Budgeted selection from scores.
#pragma once
#include <cstdint>
#include <vector>

#include "grkv/score.h"

namespace grkv {

// Top-`budget` tokens per KV head, protected tokens first; the result is
// [n_head_kv][budget] token indices, ascending within each head.
std::vector<int32_t> select_per_head(const Scores & sc, int budget);

// One token set for every layer and head: tokens ranked by their mean
// per-(layer, head) rank, protected tokens first. Returns `budget` ascending indices.
std::vector<int32_t> select_shared(const std::vector<Scores> & layers, int budget);

// One token set ranked by the scores summed over layers and heads (LASER-KV's
// exact ranking), protected tokens first. `budget` ascending indices.
std::vector<int32_t> select_shared_sum(const std::vector<Scores> & layers, int budget);

// Head-wise budgets: each (layer, KV head) keeps its protected tokens and
// its top floor(alpha * budget), then the remaining slots (n_head_kv * budget
// per layer) go to the best remaining scores of the layer (AdaKV) or, with
// across_layers, of every layer at once (KVzip's one threshold). `count`
// [L][n_head_kv] holds each head's allocation and `slots` the largest one:
// the cells llama.cpp's shared layout must hold for it.
struct HeadwiseAllocation {
    int slots = 0;
    std::vector<int32_t> count;
};
HeadwiseAllocation allocate_headwise(const std::vector<Scores> & layers, int budget, float alpha, bool across_layers);

}  // namespace grkv
