// Shared types of the grkv native core. No Python, no llama.cpp headers.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>

namespace grkv {

// Every error the core raises; the bindings map it to a Python exception.
struct Error : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// ggml type codes the core can convert (ggml.h `enum ggml_type`).
enum class DType : int32_t { F32 = 0, F16 = 1, BF16 = 30 };

bool dtype_supported(int32_t ggml_type);
size_t dtype_size(int32_t ggml_type);        // element size in bytes; throws if unsupported
// A row's smallest unit: one element (f32/f16/bf16) or one 32-value block
// (q8_0/q4_0). False for types the core cannot read.
bool dtype_row_unit(int32_t ggml_type, size_t & unit_bytes, size_t & unit_values);
const char * ggml_type_name_of(int32_t ggml_type);  // for error messages
int32_t ggml_type_from_name(const std::string & name);  // "q8_0" -> 8; throws if the core cannot store it

// Conversions between a cache dtype and float32 (q8_0/q4_0: whole blocks,
// no rotation; codec.h adds it).
void to_f32(int32_t ggml_type, const uint8_t * src, float * dst, size_t n);
void from_f32(int32_t ggml_type, const float * src, uint8_t * dst, size_t n);
float f16_to_f32(uint16_t h);   // IEEE half, as ggml stores block scales
uint16_t f32_to_f16(float f);   // round to nearest even

}  // namespace grkv
