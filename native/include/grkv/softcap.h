// Attention-logit soft-capping (Gemma-2): llama.cpp replaces each scaled logit
// z = scale * q.k by cap * tanh(z / cap) before the softmax. cap <= 0: off.
#pragma once
#include <cmath>

namespace grkv {

inline float soft_cap(float z, float cap) { return cap > 0.0f ? cap * std::tanh(z / cap) : z; }
inline double soft_cap(double z, double cap) { return cap > 0.0 ? cap * std::tanh(z / cap) : z; }

// d soft_cap(z) / dz, written in the capped logit c = soft_cap(z): 1 - (c / cap)^2.
inline float soft_cap_slope(float capped, float cap) {
    if (cap <= 0.0f) return 1.0f;
    const float t = capped / cap;
    return 1.0f - t * t;
}

}  // namespace grkv
