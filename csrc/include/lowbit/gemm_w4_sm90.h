// Host entry of the warp-specialized sm_90a W4A4 / W4A8(fp8) GEMM (csrc/cuda/gemm_w4_sm90.cu). Internal:
// lowbit::cuda::gemm_w4 (cuda_api.h) validates the arguments and picks this kernel or the mma.sync one.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "lowbit/dtype.h"

namespace lowbit::cuda {

// Problem description shared by the two GEMM implementations (device pointers, validated sizes).
struct GemmW4Problem {
  const uint8_t* act;        // INT4_G64: packed int4 [M, K/2]; INT8_TOKEN: int8 [M, K]; FP8_TOKEN: e4m3 [M, K]
  const float* act_scales;   // INT4_G64: [M, K/64]; otherwise [M]
  const uint8_t* w;          // packed int4 [N, K/2]
  const uint16_t* w_scales;  // bf16 bits [N, K/64]
  const float* lora_act;     // [M, R] or null
  const void* lora_up;       // [N, R] bf16 / fp16, or null
  const void* bias;          // [N] or null
  void* out;                 // [M, N]
  int M, N, K, R;
  int up_fp16;     // lora_up is fp16 (else bf16)
  int bias_dtype;  // DType code of bias
  int out_dtype;   // DType code of out
};

// True when this build holds sm_90a code and the current device is compute capability 9.0 (Hopper).
bool gemm_w4_sm90_available();

// Launches the wgmma kernel for INT4_G64 or FP8_TOKEN activations (INT8_TOKEN is not handled here).
void gemm_w4_sm90(ActQuant act, const GemmW4Problem& p, cudaStream_t stream);

}  // namespace lowbit::cuda
