// Cache dtype <-> float32. f16 goes through F16C where the compiler targets it
// (reading and writing a compressed layer's rows took as long as GRKV's value
// step with the scalar code); the scalar code is the portable fallback and
// rounds the same way (to nearest even).
#include <cstring>

#if defined(__F16C__) && defined(__AVX__)
#include <immintrin.h>
#endif

#include "grkv/common.h"
#include "grkv/quant.h"

namespace grkv {
namespace {

float half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t) (h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1f;
    uint32_t mant = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0) {
        if (mant == 0) {
            bits = sign;
        } else {  // subnormal: normalise
            exp = 127 - 15 + 1;
            while (!(mant & 0x400u)) { mant <<= 1; --exp; }
            mant &= 0x3ffu;
            bits = sign | (exp << 23) | (mant << 13);
        }
    } else if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (mant << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
    }
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

// Round to nearest even, as F16C and ggml do.
uint16_t float_to_half(float f) {
    uint32_t x;
    std::memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000u;
    const uint32_t absx = x & 0x7fffffffu;
    if (absx >= 0x7f800000u) {  // inf / nan
        return (uint16_t) (sign | 0x7c00u | (absx > 0x7f800000u ? 0x200u : 0));
    }
    if (absx >= 0x477ff000u) return (uint16_t) (sign | 0x7c00u);  // overflow -> inf
    if (absx < 0x38800000u) {  // subnormal or zero in half
        if (absx < 0x33000000u) return (uint16_t) sign;
        const uint32_t e = absx >> 23;
        uint32_t m = (absx & 0x7fffffu) | 0x800000u;
        const int shift = 126 - (int) e;  // 14 + (113 - e) ... so that result has 10 mantissa bits
        const uint32_t sh = (uint32_t) shift;
        uint32_t r = m >> sh;
        const uint32_t rem = m & ((1u << sh) - 1);
        const uint32_t half = 1u << (sh - 1);
        if (rem > half || (rem == half && (r & 1u))) ++r;
        return (uint16_t) (sign | r);
    }
    uint32_t r = ((absx >> 13) - (112u << 10));
    const uint32_t rem = absx & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;
    return (uint16_t) (sign | r);
}

float bf16_to_float(uint16_t h) {
    const uint32_t bits = (uint32_t) h << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

uint16_t float_to_bf16(float f) {
    uint32_t x;
    std::memcpy(&x, &f, 4);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t) ((x >> 16) | 64);  // quiet nan
    return (uint16_t) ((x + (0x7fffu + ((x >> 16) & 1u))) >> 16);
}

}  // namespace

float f16_to_f32(uint16_t h) { return half_to_float(h); }
uint16_t f32_to_f16(float f) { return float_to_half(f); }

bool dtype_supported(int32_t t) {
    return t == (int32_t) DType::F32 || t == (int32_t) DType::F16 || t == (int32_t) DType::BF16;
}

bool dtype_row_unit(int32_t t, size_t & unit_bytes, size_t & unit_values) {
    if (dtype_supported(t)) {
        unit_bytes = dtype_size(t);
        unit_values = 1;
    } else if (quant_block_type(t)) {
        unit_bytes = quant_block_bytes(t);
        unit_values = QK;
    } else {
        return false;
    }
    return true;
}

const char * ggml_type_name_of(int32_t t) {
    switch (t) {
        case 0: return "f32";
        case 1: return "f16";
        case 2: return "q4_0";
        case 3: return "q4_1";
        case 6: return "q5_0";
        case 7: return "q5_1";
        case 8: return "q8_0";
        case 20: return "iq4_nl";
        case 30: return "bf16";
        default: return "unknown";
    }
}

size_t dtype_size(int32_t t) {
    switch (t) {
        case 0: return 4;
        case 1: return 2;
        case 30: return 2;
        default:
            throw Error(std::string("KV cache type ") + ggml_type_name_of(t) + " (ggml type " +
                        std::to_string(t) + ") is not supported: use an f16, bf16 or f32 cache");
    }
}

int32_t ggml_type_from_name(const std::string & name) {
    for (int32_t t : {0, 1, 30, 8, 2}) {
        if (name == ggml_type_name_of(t)) return t;
    }
    throw Error("unknown cache type '" + name + "' (f32, f16, bf16, q8_0, q4_0)");
}

void to_f32(int32_t t, const uint8_t * src, float * dst, size_t n) {
    if (t == 0) {
        std::memcpy(dst, src, n * 4);
    } else if (t == 1 || t == 30) {
        const bool bf = t == 30;
        size_t i = 0;
#if defined(__F16C__) && defined(__AVX__)
        if (!bf) {
            for (; i + 8 <= n; i += 8) {
                const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i *>(src + 2 * i));
                _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
            }
        }
#endif
        for (; i < n; ++i) {
            uint16_t h;
            std::memcpy(&h, src + 2 * i, 2);
            dst[i] = bf ? bf16_to_float(h) : half_to_float(h);
        }
    } else if (quant_block_type(t)) {
        dequantize_row(t, src, dst, n);
    } else {
        dtype_size(t);  // throws
    }
}

void from_f32(int32_t t, const float * src, uint8_t * dst, size_t n) {
    if (t == 0) {
        std::memcpy(dst, src, n * 4);
    } else if (t == 1 || t == 30) {
        const bool bf = t == 30;
        size_t i = 0;
#if defined(__F16C__) && defined(__AVX__)
        if (!bf) {
            for (; i + 8 <= n; i += 8) {
                const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT);
                _mm_storeu_si128(reinterpret_cast<__m128i *>(dst + 2 * i), h);
            }
        }
#endif
        for (; i < n; ++i) {
            const uint16_t h = bf ? float_to_bf16(src[i]) : float_to_half(src[i]);
            std::memcpy(dst + 2 * i, &h, 2);
        }
    } else if (quant_block_type(t)) {
        quantize_row(t, src, dst, n);
    } else {
        dtype_size(t);
    }
}

}  // namespace grkv
