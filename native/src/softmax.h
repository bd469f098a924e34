// A float exp the compiler vectorises, and the row softmax built on it.
// glibc's expf is scalar unless built with -ffast-math (its SIMD variants are
// declared only then), and the softmaxes of the GRKV teacher/student and the
// window scorers took more time in expf than in their matrix products.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace grkv {

// exp(x) for x <= 0 (softmax arguments after the max is subtracted), relative
// error below 2e-7 on [-87, 0]; 0 below that. Range reduction x = n ln2 + r,
// |r| <= ln2/2, then a degree-6 Taylor-like polynomial in r.
#pragma omp declare simd
inline float exp_neg(float x) {
    if (x < -87.0f) return 0.0f;
    const float n = std::nearbyint(x * 1.44269504088896341f);
    const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;  // ln2 split in two
    float p = 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const int32_t bits = ((int32_t) n + 127) << 23;  // 2^n, n in [-126, 0]
    float s;
    std::memcpy(&s, &bits, sizeof s);
    return p * s;
}

// In place over a[0, n): softmax of a[i] * scale; returns the normaliser's
// reciprocal (0 and all zeros when n == 0).
inline float softmax_row(float * a, int n, float scale) {
    if (n <= 0) return 0.0f;
    float mx = -std::numeric_limits<float>::infinity();
    for (int i = 0; i < n; ++i) mx = std::max(mx, a[i]);
    const float m = mx * scale;
    float z = 0.0f;
#pragma omp simd reduction(+ : z)
    for (int i = 0; i < n; ++i) {
        const float e = exp_neg(a[i] * scale - m);
        a[i] = e;
        z += e;
    }
    const float inv = 1.0f / z;
#pragma omp simd
    for (int i = 0; i < n; ++i) a[i] *= inv;
    return inv;
}

}  // namespace grkv
