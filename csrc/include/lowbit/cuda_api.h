// Host-side entry points of the CUDA kernels. No CUDA or torch types here: the bindings include this
// header whether or not CUDA was built. `stream` is a cudaStream_t passed as void*. Each launcher checks
// its arguments (throws std::invalid_argument) and the launch (throws std::runtime_error with the CUDA
// error string).
#pragma once
#include <cstdint>

#include "lowbit/dtype.h"

namespace lowbit::cuda {

// Same contract as lowbit::cpu::quantize_act (csrc/include/lowbit/cpu_ref.h); pointers are device pointers.
void quantize_act(const void* x, DType x_dtype, int64_t M, int64_t K, const float* smooth,
                  const void* lora_down, int64_t R, ActQuant mode, void* q_out, float* scales_out,
                  float* lora_act_out, void* stream);

}  // namespace lowbit::cuda
