// Re-rotation of post-RoPE vectors by a position offset (ggml's NORM and NEOX
// RoPE without YaRN: the angle is linear in the position, so rotations compose).
#pragma once

#include <vector>

namespace grkv {

struct RopeParams {
    int n_rot = 0;            // rotated dims (<= head_dim)
    float freq_base = 10000.0f;
    float freq_scale = 1.0f;  // linear position scaling
    bool neox = false;        // NEOX pairs (i, i + n_rot/2); NORM pairs (2i, 2i+1)
    // Per-pair frequency divisors (Llama-3.1's rope_freqs tensor, n_rot/2 of
    // them); empty means none. ggml divides pair i's angle by freq_factors[i].
    std::vector<float> freq_factors;

    // Angle per unit position of pair i.
    double theta(int i) const;
    // Throws unless n_rot is even and positive and freq_factors is empty or n_rot/2 long.
    void check() const;
};

void rope_rotate(float * x, const RopeParams & p, double delta);

}  // namespace grkv
