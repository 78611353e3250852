// C++ CPU reference of the weight-only W4A16 layer (docs/formats.md: "w4a16"): 16-bit (or fp32) tokens
// times asymmetric uint4 weights with a bf16 step and an integer zero point per group of 64 along K.
//
// Per (m, n): for each group g, gsum = sum_k x[m, k] * (q[n, k] - z[n, g]) in fp32 (the products are exact:
// x has at most 24 significant bits only for fp32 tokens, and q - z is an integer of 4 bits, so for 16-bit
// tokens each product is exact), then acc += gsum * s[n, g]; acc += bias[n]; out = round(acc). This is the
// order the Triton kernel uses (one scale multiply per group); the sum order itself is free per the contract.
#include <cstdint>
#include <string>
#include <vector>

#include "gemm_common.h"
#include "lowbit/cpu_ref.h"
#include "lowbit/numeric.h"

namespace lowbit::cpu {

void gemm_w4a16(const void* x, DType x_dtype, int64_t M, int64_t K, const uint8_t* w, const uint16_t* w_scales,
                const uint8_t* w_zeros, int64_t N, const void* bias, DType bias_dtype, void* out, DType out_dtype) {
  const char* op = "gemm_w4a16";
  using detail::bad;
  if (M < 0 || N < 0 || K <= 0 || K % kInt4Group != 0) {
    bad(op, "need M, N >= 0 and K a positive multiple of 64, got M=" + std::to_string(M) + ", N=" +
                std::to_string(N) + ", K=" + std::to_string(K));
  }
  if (!is_float_dtype(x_dtype) || !is_float_dtype(out_dtype)) bad(op, "x and out must be fp32, fp16 or bf16");
  if (bias != nullptr && !is_float_dtype(bias_dtype)) bad(op, "bias must be fp32, fp16 or bf16");
  if (M == 0 || N == 0) return;
  if (x == nullptr || w == nullptr || w_scales == nullptr || w_zeros == nullptr || out == nullptr) {
    bad(op, "null pointer");
  }
  const int64_t G = K / kInt4Group;
  std::vector<float> xf(size_t(M * K));
  load_floats(x, x_dtype, 0, M * K, xf.data());
  std::vector<float> bias_f;
  if (bias != nullptr) {
    bias_f.resize(size_t(N));
    load_floats(bias, bias_dtype, 0, N, bias_f.data());
  }
  std::vector<float> wq(static_cast<size_t>(K));  // one row's q - z, as exact small integers in fp32
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t g = 0; g < G; ++g) {
      const int z = w_zeros[n * G + g];
      if (z > 15) bad(op, "zero point above 15 at row " + std::to_string(n) + ", group " + std::to_string(g));
      for (int64_t i = 0; i < kInt4Group; ++i) {
        const int64_t k = g * kInt4Group + i;
        const uint8_t byte = w[n * (K / 2) + k / 2];
        const int q = (k % 2 == 0) ? (byte & 0xF) : (byte >> 4);
        wq[size_t(k)] = float(q - z);
      }
    }
    for (int64_t m = 0; m < M; ++m) {
      const float* xr = xf.data() + m * K;
      float acc = 0.0f;
      for (int64_t g = 0; g < G; ++g) {
        const float gsum = detail::dot_f32(xr + g * kInt4Group, wq.data() + g * kInt4Group, kInt4Group);
        acc += gsum * bf16_to_float(w_scales[n * G + g]);
      }
      if (!bias_f.empty()) acc += bias_f[size_t(n)];
      store_floats(&acc, 1, out, out_dtype, m * N + n);
    }
  }
}

}  // namespace lowbit::cpu
