// How a cache stores one row (or one head's slice of it): the ggml type and,
// for a quantised cache, the Walsh-Hadamard block llama.cpp rotates it by.
// Everything that writes new K/V (merges) or judges them after storage (GRKV's
// caps and safeguard) goes through this, so f16 rounding and q8_0/q4_0
// requantisation in the rotated basis are one code path.
#pragma once
#include <cstddef>
#include <cstdint>

namespace grkv {

struct LayerRows;
struct Stream;

struct RowCodec {
    int32_t type = 0;  // ggml type
    int rot = 0;       // Hadamard block (0: stored as given)
};

// The codec of layer `l`'s K or V rows in `s` (the rotation only applies to
// a quantised type, as in StreamView::keys/values).
RowCodec row_codec(const Stream & s, int layer, bool is_k);

// Un-rotated float values -> stored bytes, and back. n: whole row units of
// the type and, if rotated, whole rotation blocks.
void codec_store(const RowCodec & c, const float * src, uint8_t * dst, size_t n);
void codec_load(const RowCodec & c, const uint8_t * src, float * dst, size_t n);
size_t codec_bytes(const RowCodec & c, size_t n);
// x <- load(store(x)): the value the cache will hold.
void codec_round_trip(const RowCodec & c, float * x, size_t n);

}  // namespace grkv
