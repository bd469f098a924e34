// Row codec: type conversion plus the quantised cache's Hadamard rotation.
#include "grkv/codec.h"

#include <string>
#include <vector>

#include "grkv/common.h"
#include "grkv/quant.h"
#include "grkv/state_blob.h"

namespace grkv {

RowCodec row_codec(const Stream & s, int layer, bool is_k) {
    const LayerRows & L = is_k ? s.k.at(layer) : s.v.at(layer);
    const int rot = is_k ? s.rot_k : s.rot_v;
    return RowCodec{L.type, quant_block_type(L.type) ? rot : 0};
}

static void check(const RowCodec & c, size_t n) {
    size_t ub, uv;
    if (!dtype_row_unit(c.type, ub, uv)) throw Error(std::string("cannot store a ") + ggml_type_name_of(c.type) + " row");
    if (n % uv || (c.rot && n % (size_t) c.rot)) {
        throw Error("a " + std::string(ggml_type_name_of(c.type)) + " row slice of " + std::to_string(n) +
                    " values is not whole blocks");
    }
}

size_t codec_bytes(const RowCodec & c, size_t n) {
    check(c, n);
    size_t ub, uv;
    dtype_row_unit(c.type, ub, uv);
    return n / uv * ub;
}

void codec_store(const RowCodec & c, const float * src, uint8_t * dst, size_t n) {
    check(c, n);
    if (!c.rot) {
        from_f32(c.type, src, dst, n);
        return;
    }
    std::vector<float> r(src, src + n);
    hadamard_blocks(r.data(), n, c.rot);
    from_f32(c.type, r.data(), dst, n);
}

void codec_load(const RowCodec & c, const uint8_t * src, float * dst, size_t n) {
    check(c, n);
    to_f32(c.type, src, dst, n);
    if (c.rot) hadamard_blocks(dst, n, c.rot);
}

void codec_round_trip(const RowCodec & c, float * x, size_t n) {
    std::vector<uint8_t> buf(codec_bytes(c, n));
    codec_store(c, x, buf.data(), n);
    codec_load(c, buf.data(), x, n);
}

}  // namespace grkv
