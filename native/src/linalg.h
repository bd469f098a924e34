// Small dense linear algebra shared by the scorers and the merges.
#pragma once
#include <cmath>
#include <vector>

namespace grkv {

// In-place Cholesky of an SPD n x n row-major matrix (lower triangle = L);
// false if the matrix is not positive definite.
inline bool cholesky(std::vector<double> & A, int n) {
    for (int j = 0; j < n; ++j) {
        double s = A[(size_t) j * n + j];
        for (int k = 0; k < j; ++k) s -= A[(size_t) j * n + k] * A[(size_t) j * n + k];
        if (s <= 0) return false;
        const double l = std::sqrt(s);
        A[(size_t) j * n + j] = l;
        for (int i = j + 1; i < n; ++i) {
            double t = A[(size_t) i * n + j];
            for (int k = 0; k < j; ++k) t -= A[(size_t) i * n + k] * A[(size_t) j * n + k];
            A[(size_t) i * n + j] = t / l;
        }
    }
    return true;
}

}  // namespace grkv
