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

// W4A4 (INT4_G64: packed int4 act [M, K/2], fp32 scales [M, K/64]) or W4A8 (INT8_TOKEN: int8 act [M, K];
// FP8_TOKEN: e4m3 act [M, K]; fp32 scales [M]) times packed int4 weights w [N, K/2] with bf16 scales
// [N, K/64], plus lora_act [M, R] (fp32) . lora_up [N, R]^T (bf16/fp16) and bias [N]; out [M, N] in
// out_dtype. Same contract as lowbit::cpu::gemm_w4a4 / gemm_w4a8. R must be a multiple of 8. FP8_TOKEN
// needs gemm_w4_fp8_supported().
void gemm_w4(ActQuant act_kind, const void* act, const float* act_scales, const uint8_t* w,
             const void* w_scales, int64_t M, int64_t N, int64_t K, const float* lora_act,
             const void* lora_up, DType up_dtype, int64_t R, const void* bias, DType bias_dtype, void* out,
             DType out_dtype, void* stream);

// True when the sm_90a wgmma GEMM can run on the current device (built for 90a, device is Hopper): fp8
// tokens are accepted (W4A4 uses it only with LOWBIT_GEMM_W4_KERNEL=wgmma).
bool gemm_w4_fp8_supported();

}  // namespace lowbit::cuda
