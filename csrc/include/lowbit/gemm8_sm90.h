// Host entry of the persistent TMA / wgmma 8-bit GEMM for Hopper (csrc/cuda/gemm8_sm90.cu). No CUDA or torch
// types: the bindings include this whether or not CUDA was built.
//
//   out[m, n] = act( (acc[m, n] * act_scales[m]) * row_scale[n] + sum_r bf16(lora_act[m, r]) * lora_up[n, r]
//                    + bias[n] ),        acc[m, n] = sum_k act[m, k] * w8[n, k]   (e4m3 x e4m3, fp32)
//
// which is the contract of lowbit::gemm_w4a8_f8l (docs/formats.md, "8-bit GEMM with row scales") with an
// optional GELU-tanh. w8 is the F8L expansion of 4-bit codes (Weights::F8L) or e4m3 weights given as they are
// (Weights::FP8: the plain fp8 GEMM the skeleton is gated on; row_scale may be null = 1).
#pragma once
#include <cstdint>

#include "lowbit/dtype.h"

namespace lowbit::cuda {

enum class Gemm8Weights : int { FP8 = 0, F8L = 1 };

struct Gemm8Problem {
  Gemm8Weights weights;
  const void* act;          // e4m3 [M, K]
  const float* act_scales;  // [M]
  const void* w;            // FP8: e4m3 [N, K]; F8L: codes uint8 [N, K/2]
  const void* w_gscales;    // F8L: e4m3 [N, K/64]; FP8: null
  const float* row_scale;   // [N] or null (1)
  const float* lora_act;    // [M, R] or null
  const void* lora_up;      // bf16 [N, R] or null
  const void* bias;         // [N] in bias_dtype, or null
  int bias_dtype;           // DType code
  void* out;                // bf16 [M, N]
  float* workspace;         // fp32 [M, N] for the split-K path (gemm8_sm90_workspace_floats > 0), else null
  int64_t M, N, K, R;
  int gelu;                 // 1: GELU-tanh after the bias
};

// True when this build holds sm_90a code and the current device is Hopper (compute capability 9.0).
bool gemm8_sm90_available();

// Why the kernel cannot take this problem ("" when it can): K % 128, N % 8, alignment, R, dtypes.
const char* gemm8_sm90_unsupported(const Gemm8Problem& p);

// fp32 elements of workspace the problem needs (0: none; the split-K path for small M needs M * N).
int64_t gemm8_sm90_workspace_floats(int64_t M, int64_t N, int64_t K);

// Launch on `stream` (a cudaStream_t as void*). Throws std::invalid_argument for a problem the kernel does
// not take and std::runtime_error for CUDA errors. `config_out` (optional, 4 ints) receives the chosen
// token tile, K splits, clusters and stages: the benchmark records them.
void gemm8_sm90(const Gemm8Problem& p, void* stream, int* config_out = nullptr);

}  // namespace lowbit::cuda
