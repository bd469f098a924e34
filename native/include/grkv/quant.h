// Quantised KV-cache rows (ggml's q8_0 and q4_0 blocks of 32 values) and the
// orthonormal Walsh-Hadamard rotation llama.cpp applies to K and V before
// storing them in a quantised cache (llama-kv-cache.cpp, attn_rot_k/v).
#pragma once
#include <cstddef>
#include <cstdint>

namespace grkv {

constexpr int QK = 32;  // values per block, both types

bool quant_block_type(int32_t ggml_type);        // q4_0 (2) or q8_0 (8)
size_t quant_block_bytes(int32_t ggml_type);     // 18 or 34; throws for other types

// n must be a multiple of QK. Quantisation follows ggml's reference kernels
// (quantize_row_q8_0_ref / _q4_0_ref), so requantising a dequantised row
// gives back its bytes.
void dequantize_row(int32_t ggml_type, const uint8_t * src, float * dst, size_t n);
void quantize_row(int32_t ggml_type, const float * src, uint8_t * dst, size_t n);

// x <- H x on each consecutive block of `block` values (a power of two >= 2),
// H the Sylvester Walsh-Hadamard matrix / sqrt(block): symmetric and its own
// inverse, so the same call rotates and un-rotates. n a multiple of block.
void hadamard_blocks(float * x, size_t n, int block);

// The rotation block llama.cpp uses for a head of `head_dim` values: K the
// largest power of two >= 64 dividing head_dim, V 64; 0 when it does not
// rotate (head_dim not a multiple of 64, or an unquantised cache).
int hadamard_block_k(int32_t ggml_type, int head_dim);
int hadamard_block_v(int32_t ggml_type, int head_dim);

}  // namespace grkv
