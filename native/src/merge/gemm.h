// Small dense products for GRKV's Jacobian products (internal to merge/).
// The key step's conjugate gradient spends almost all its time in four
// [R x d] x [d x B]-shaped products per iteration; a register-tiled kernel
// runs them near the FMA units' rate instead of at L1's load/store rate.
#pragma once

#include <cstddef>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace grkv {

// C[i][j] = sum_k A(i, k) * B[k][j] for i < M, j < N (C row-major, N wide; B row-major, N wide).
// A(i, k) = A[i * sai + k * sak]: (sai, sak) = (K, 1) for a row-major [M][K] matrix, (1, M)
// for the transpose of a row-major [K][M] one.
inline void gemm(int M, int N, int K, const float * A, size_t sai, size_t sak, const float * B, float * C) {
    constexpr int MR = 4, NR = 16;
    int i0 = 0;
#if defined(__AVX2__) && defined(__FMA__)
    for (; i0 + MR <= M; i0 += MR) {
        int j0 = 0;
        for (; j0 + NR <= N; j0 += NR) {
            __m256 c[MR][2];
            for (int r = 0; r < MR; ++r) c[r][0] = c[r][1] = _mm256_setzero_ps();
            const float * a = A + (size_t) i0 * sai;
            for (int k = 0; k < K; ++k) {
                const float * b = B + (size_t) k * N + j0;
                const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
                const float * ak = a + (size_t) k * sak;
                for (int r = 0; r < MR; ++r) {
                    const __m256 x = _mm256_broadcast_ss(ak + (size_t) r * sai);
                    c[r][0] = _mm256_fmadd_ps(x, b0, c[r][0]);
                    c[r][1] = _mm256_fmadd_ps(x, b1, c[r][1]);
                }
            }
            for (int r = 0; r < MR; ++r) {
                float * out = C + (size_t) (i0 + r) * N + j0;
                _mm256_storeu_ps(out, c[r][0]);
                _mm256_storeu_ps(out + 8, c[r][1]);
            }
        }
        // leftover columns of this row block
        for (int r = 0; r < MR; ++r) {
            float * out = C + (size_t) (i0 + r) * N;
            for (int j = j0; j < N; ++j) out[j] = 0.0f;
            for (int k = 0; k < K; ++k) {
                const float x = A[(size_t) (i0 + r) * sai + (size_t) k * sak];
                const float * b = B + (size_t) k * N;
                for (int j = j0; j < N; ++j) out[j] += x * b[j];
            }
        }
    }
#endif
    // leftover rows (all rows without AVX2/FMA)
    for (int i = i0; i < M; ++i) {
        float * out = C + (size_t) i * N;
        for (int j = 0; j < N; ++j) out[j] = 0.0f;
        for (int k = 0; k < K; ++k) {
            const float x = A[(size_t) i * sai + (size_t) k * sak];
            if (x == 0.0f) continue;
            const float * b = B + (size_t) k * N;
#pragma omp simd
            for (int j = 0; j < N; ++j) out[j] += x * b[j];
        }
    }
}

}  // namespace grkv
