// Capture of named graph tensors through llama.cpp's eval callback.
//
// The callback is plain C++: while capture is disabled it answers "not
// interested" for every node in a few nanoseconds, so it can stay installed
// for the whole life of a context without slowing decoding.
#pragma once
#include <atomic>
#include <map>
#include <string>
#include <vector>

#include "grkv/ggml_abi.h"

namespace grkv {

struct CaptureTarget {
    std::string prefix;   // node name without the "-<layer>" suffix, e.g. "Qcur"
    int32_t op = -1;      // ggml op code the node must have; -1 = any
    int token_dim = 2;    // tensor dim that indexes tokens (Qcur: 2, kqv_out: 1)
    // If not empty, keep only rows at these positions (sorted). Positions are
    // read from the node's src[1], which for a ROPE node is inp_pos.
    std::vector<int32_t> positions;
};

struct Captured {
    int64_t row_len = 0;          // floats per token
    std::vector<float> data;      // rows appended over ubatches, [n_rows][row_len]
    std::vector<int32_t> pos;     // position of each row (ROPE nodes), else empty
    int64_t n_rows() const { return row_len ? (int64_t) data.size() / row_len : 0; }
};

class Capture {
public:
    Capture(uintptr_t tensor_get_fn, uintptr_t op_name_fn);

    // Op code for an op name such as "ROPE" (-1 if unknown to this ggml).
    int32_t op_code(const std::string & name) const;

    void set_targets(std::vector<CaptureTarget> targets);
    void enable(bool on) { enabled_.store(on, std::memory_order_relaxed); }
    bool enabled() const { return enabled_.load(std::memory_order_relaxed); }
    void clear() { data_.clear(); error_.clear(); }

    // (target index, layer) -> rows captured so far.
    const std::map<std::pair<int, int>, Captured> & data() const { return data_; }
    const std::string & error() const { return error_; }

    // The C callback (ggml_backend_sched_eval_callback) and its user data.
    static bool callback(ggml::Tensor * t, bool ask, void * user_data);
    uintptr_t callback_address() const;
    uintptr_t user_data() const { return reinterpret_cast<uintptr_t>(this); }

private:
    int match(const ggml::Tensor * t, int * layer) const;
    bool observe(const ggml::Tensor * t);

    ggml::TensorGetFn tensor_get_;
    ggml::OpNameFn op_name_;
    std::atomic<bool> enabled_{false};
    std::vector<CaptureTarget> targets_;
    std::map<std::pair<int, int>, Captured> data_;
    std::string error_;
};

}  // namespace grkv
