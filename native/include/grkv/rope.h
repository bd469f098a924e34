// Re-rotation of post-RoPE vectors by a position offset (ggml's NORM and NEOX
// RoPE without YaRN: the angle is linear in the position, so rotations compose).
#pragma once

namespace grkv {

struct RopeParams {
    int n_rot = 0;            // rotated dims (<= head_dim)
    float freq_base = 10000.0f;
    float freq_scale = 1.0f;  // linear position scaling
    bool neox = false;        // NEOX pairs (i, i + n_rot/2); NORM pairs (2i, 2i+1)
};

void rope_rotate(float * x, const RopeParams & p, double delta);

}  // namespace grkv
