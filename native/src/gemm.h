// Small dense products: GRKV's Jacobian products and teacher, and the scorers' attention.
// The key step's conjugate gradient spends almost all its time in four
// [R x d] x [d x B]-shaped products per iteration; a register-tiled kernel
// over packed panels runs them near the FMA units' rate. Packing matters:
// the operands' rows are 1-4 KB apart, so walking a column of them unpacked
// keeps hitting the same few L1 sets.
#pragma once

#include <algorithm>
#include <cstddef>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace grkv {

// C[i][j] = sum_k A(i, k) * B[k][j] for i < M, j < N (C row-major, N wide; B row-major, N wide).
// A(i, k) = A[i * sai + k * sak]: (sai, sak) = (K, 1) for a row-major [M][K] matrix, (1, M)
// for the transpose of a row-major [K][M] one.
inline void gemm(int M, int N, int K, const float * A, size_t sai, size_t sak, const float * B, float * C) {
    auto a_at = [&](int i, int k) { return A[(size_t) i * sai + (size_t) k * sak]; };
    int j_done = 0, i_blocks = 0;
#if defined(__AVX2__) && defined(__FMA__)
    constexpr int MR = 6, NR = 16;  // 12 accumulators + 2 B vectors + 1 broadcast: 15 of 16 ymm registers
    i_blocks = M / MR;
    // A packed once: for each block of MR rows, K groups of MR values
    std::vector<float> Ap((size_t) i_blocks * K * MR);
    for (int ib = 0; ib < i_blocks; ++ib)
        for (int k = 0; k < K; ++k)
            for (int r = 0; r < MR; ++r) Ap[((size_t) ib * K + k) * MR + r] = a_at(ib * MR + r, k);
    std::vector<float> Bp((size_t) K * NR);
    for (; j_done + NR <= N; j_done += NR) {
        const int j0 = j_done;
        for (int k = 0; k < K; ++k) std::copy_n(B + (size_t) k * N + j0, NR, Bp.data() + (size_t) k * NR);
        for (int ib = 0; ib < i_blocks; ++ib) {
            __m256 c[MR][2];
            for (int r = 0; r < MR; ++r) c[r][0] = c[r][1] = _mm256_setzero_ps();
            const float * a = Ap.data() + (size_t) ib * K * MR;
            const float * b = Bp.data();
            for (int k = 0; k < K; ++k, a += MR, b += NR) {
                const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
                for (int r = 0; r < MR; ++r) {
                    const __m256 x = _mm256_broadcast_ss(a + r);
                    c[r][0] = _mm256_fmadd_ps(x, b0, c[r][0]);
                    c[r][1] = _mm256_fmadd_ps(x, b1, c[r][1]);
                }
            }
            for (int r = 0; r < MR; ++r) {
                float * out = C + (size_t) (ib * MR + r) * N + j0;
                _mm256_storeu_ps(out, c[r][0]);
                _mm256_storeu_ps(out + 8, c[r][1]);
            }
        }
    }
    i_blocks *= MR;  // rows done in every full column tile
#endif
    // what the tiles left: all columns of the last M % MR rows, and the last N % 16 columns
    for (int i = 0; i < M; ++i) {
        const int j_from = i < i_blocks ? j_done : 0;
        if (j_from >= N) continue;
        float * out = C + (size_t) i * N;
        std::fill(out + j_from, out + N, 0.0f);
        for (int k = 0; k < K; ++k) {
            const float x = a_at(i, k);
            if (x == 0.0f) continue;
            const float * b = B + (size_t) k * N;
#pragma omp simd
            for (int j = j_from; j < N; ++j) out[j] += x * b[j];
        }
    }
}

}  // namespace grkv
