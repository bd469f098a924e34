// q8_0 / q4_0 codecs and the Walsh-Hadamard rotation of quantised caches.
#include "grkv/quant.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>

#include "grkv/common.h"

namespace grkv {

bool quant_block_type(int32_t t) { return t == 2 || t == 8; }

size_t quant_block_bytes(int32_t t) {
    if (t == 8) return 2 + QK;      // f16 scale + 32 int8
    if (t == 2) return 2 + QK / 2;  // f16 scale + 32 nibbles
    throw Error(std::string("not a q4_0/q8_0 block type: ") + ggml_type_name_of(t));
}

static void check_n(size_t n) {
    if (n % QK) throw Error("a quantised row must hold a multiple of 32 values, got " + std::to_string(n));
}

void dequantize_row(int32_t t, const uint8_t * src, float * dst, size_t n) {
    check_n(n);
    const size_t bb = quant_block_bytes(t);
    for (size_t b = 0; b < n / QK; ++b, src += bb, dst += QK) {
        uint16_t h;
        std::memcpy(&h, src, 2);
        const float d = f16_to_f32(h);
        if (t == 8) {
            for (int j = 0; j < QK; ++j) dst[j] = (float) (int8_t) src[2 + j] * d;
        } else {  // low nibbles hold values 0..15, high nibbles 16..31, offset 8
            for (int j = 0; j < QK / 2; ++j) {
                dst[j] = (float) ((src[2 + j] & 0x0f) - 8) * d;
                dst[j + QK / 2] = (float) ((src[2 + j] >> 4) - 8) * d;
            }
        }
    }
}

void quantize_row(int32_t t, const float * src, uint8_t * dst, size_t n) {
    check_n(n);
    const size_t bb = quant_block_bytes(t);
    for (size_t b = 0; b < n / QK; ++b, src += QK, dst += bb) {
        if (t == 8) {
            float amax = 0.0f;
            for (int j = 0; j < QK; ++j) amax = std::max(amax, std::fabs(src[j]));
            const float d = amax / 127.0f, id = d ? 1.0f / d : 0.0f;
            const uint16_t h = f32_to_f16(d);
            std::memcpy(dst, &h, 2);
            for (int j = 0; j < QK; ++j) dst[2 + j] = (uint8_t) (int8_t) std::roundf(src[j] * id);
        } else {  // the value of largest magnitude, signed, maps to -8
            float amax = 0.0f, mx = 0.0f;
            for (int j = 0; j < QK; ++j) {
                if (std::fabs(src[j]) > amax) {
                    amax = std::fabs(src[j]);
                    mx = src[j];
                }
            }
            const float d = mx / -8.0f, id = d ? 1.0f / d : 0.0f;
            const uint16_t h = f32_to_f16(d);
            std::memcpy(dst, &h, 2);
            for (int j = 0; j < QK / 2; ++j) {
                const int lo = std::min(15, (int) (int8_t) (src[j] * id + 8.5f));
                const int hi = std::min(15, (int) (int8_t) (src[j + QK / 2] * id + 8.5f));
                dst[2 + j] = (uint8_t) (lo | (hi << 4));
            }
        }
    }
}

void hadamard_blocks(float * x, size_t n, int block) {
    if (block < 2 || (block & (block - 1)) || n % (size_t) block) {
        throw Error("hadamard_blocks: block must be a power of two dividing the row");
    }
    const float norm = 1.0f / std::sqrt((float) block);
    for (size_t b = 0; b < n; b += block) {
        float * v = x + b;
        for (int s = 1; s < block; s *= 2) {  // in-place fast transform, Sylvester (natural) order
            for (int i = 0; i < block; i += 2 * s) {
                for (int j = i; j < i + s; ++j) {
                    const float a = v[j], c = v[j + s];
                    v[j] = a + c;
                    v[j + s] = a - c;
                }
            }
        }
        for (int i = 0; i < block; ++i) v[i] *= norm;
    }
}

int hadamard_block_k(int32_t t, int head_dim) {
    if (!quant_block_type(t) || head_dim <= 0 || head_dim % 64) return 0;
    int nrot = 64;
    while (head_dim % (nrot * 2) == 0) nrot *= 2;
    return nrot;
}

int hadamard_block_v(int32_t t, int head_dim) {
    return quant_block_type(t) && head_dim > 0 && head_dim % 64 == 0 ? 64 : 0;
}

}  // namespace grkv
