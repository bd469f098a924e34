#include "grkv/rope.h"

#include <cmath>

#include "grkv/common.h"

namespace grkv {

double RopeParams::theta(int i) const {
    const double t = freq_scale * std::pow((double) freq_base, -2.0 * i / n_rot);
    return freq_factors.empty() ? t : t / freq_factors[i];
}

void RopeParams::check() const {
    if (n_rot <= 0 || n_rot % 2) throw Error("RoPE n_rot must be even and positive");
    if (!freq_factors.empty() && (int) freq_factors.size() != n_rot / 2) {
        throw Error("RoPE freq_factors must hold n_rot/2 values");
    }
}

void rope_rotate(float * x, const RopeParams & p, double delta) {
    p.check();
    const int half = p.n_rot / 2;
    for (int i = 0; i < half; ++i) {
        const double theta = delta * p.theta(i);
        const double c = std::cos(theta), s = std::sin(theta);
        const int a = p.neox ? i : 2 * i, b = p.neox ? i + half : 2 * i + 1;
        const double x0 = x[a], x1 = x[b];
        x[a] = (float) (x0 * c - x1 * s);
        x[b] = (float) (x0 * s + x1 * c);
    }
}

}  // namespace grkv
