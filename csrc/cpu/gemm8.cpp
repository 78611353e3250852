// C++ CPU references of the promotion-free W4A8 path (docs/formats.md: "F8L", "I8Q", "8-bit GEMM with
// row scales"): the expansion of 4-bit weights to the 8-bit GEMM operand, and the GEMM itself with the
// whole of K in one accumulator, per-token x per-row scales applied once, the low-rank branch on 16-bit
// operands and the bias.
#include <cstdint>
#include <string>
#include <vector>

#include "gemm_common.h"
#include "lowbit/cpu_ref.h"
#include "lowbit/numeric.h"

namespace lowbit::cpu {
namespace {

using detail::bad;

constexpr int kF8LMaxMag = 7;

void check_expand(const char* op, int64_t N, int64_t K) {
  if (N < 0 || K <= 0 || K % kInt4Group != 0) {
    bad(op, "need N >= 0 and K a positive multiple of 64, got N=" + std::to_string(N) + ", K=" + std::to_string(K));
  }
}

}  // namespace

void expand_f8l(const uint8_t* codes, const uint8_t* gscales, int64_t N, int64_t K, uint8_t* out) {
  const char* op = "expand_f8l";
  check_expand(op, N, K);
  if (N == 0) return;
  if (codes == nullptr || gscales == nullptr || out == nullptr) bad(op, "null pointer");
  const int64_t G = K / kInt4Group;
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t g = 0; g < G; ++g) {
      // The group's 8 table bytes: e4m3(clamp(gs * m, -448, 448)), m = 0..7 (the product is exact).
      const float gs = e4m3_to_float(gscales[n * G + g]);
      uint8_t lut[kF8LMaxMag + 1];
      for (int m = 0; m <= kF8LMaxMag; ++m) {
        float v = gs * float(m);
        if (!std::isnan(v)) v = std::fmin(std::fmax(v, -448.0f), 448.0f);
        lut[m] = float_to_e4m3(v);
      }
      for (int64_t i = 0; i < kInt4Group; ++i) {
        const int64_t k = g * kInt4Group + i;
        const uint8_t byte = codes[n * (K / 2) + k / 2];
        const int code = (k % 2 == 0) ? (byte & 0xF) : (byte >> 4);
        out[n * K + k] = uint8_t(lut[code & 7] ^ ((code >> 3) << 7));  // the sign bit flips the sign
      }
    }
  }
}

void expand_i8q(const uint8_t* codes, const uint8_t* steps, const uint8_t* zeros, int64_t N, int64_t K,
                int8_t* out) {
  const char* op = "expand_i8q";
  check_expand(op, N, K);
  if (N == 0) return;
  if (codes == nullptr || steps == nullptr || zeros == nullptr || out == nullptr) bad(op, "null pointer");
  const int64_t G = K / kInt4Group;
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t g = 0; g < G; ++g) {
      const int s = steps[n * G + g], z = zeros[n * G + g];
      for (int64_t i = 0; i < kInt4Group; ++i) {
        const int64_t k = g * kInt4Group + i;
        const uint8_t byte = codes[n * (K / 2) + k / 2];
        const int q = (k % 2 == 0) ? (byte & 0xF) : (byte >> 4);
        // A valid layout keeps (q - z) * s in int8 (i8q.check); the cast is then exact.
        out[n * K + k] = int8_t((q - z) * s);
      }
    }
  }
}

void gemm_w8(const void* act, DType act_dtype, const float* act_scales, const void* w8, const float* w_row_scale,
             int64_t M, int64_t N, int64_t K, int64_t k_multiple, const float* lora_act, const void* lora_up,
             DType lora_dtype, int64_t R, const void* bias, DType bias_dtype, void* out, DType out_dtype) {
  const char* op = "gemm_w8";
  if (act_dtype != DType::I8 && act_dtype != DType::F8E4M3) {
    bad(op, "act and w8 must be int8 or float8_e4m3fn, got dtype code " + std::to_string(int(act_dtype)));
  }
  if (k_multiple < 1) bad(op, "k_multiple must be >= 1");
  if (!detail::check_common(op, M, N, K, lora_act, lora_up, lora_dtype, R, bias, bias_dtype, out, out_dtype,
                            k_multiple)) {
    return;
  }
  if (act == nullptr || act_scales == nullptr || w8 == nullptr || w_row_scale == nullptr) bad(op, "null pointer");
  const detail::Epilogue epi = detail::make_epilogue(N, lora_act, lora_up, lora_dtype, R, bias, bias_dtype, out,
                                                     out_dtype, /*round_lora_act_rows=*/M);
  if (act_dtype == DType::I8) {
    const int8_t* a = static_cast<const int8_t*>(act);
    const int8_t* w = static_cast<const int8_t*>(w8);
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t m = 0; m < M; ++m) {
        // int32 is exact: |sum| <= 128 * 128 * K, below 2^31 for K < 131072
        const float acc = float(detail::dot_i8(a + m * K, w + n * K, K));
        epi.finish(m, n, (acc * act_scales[m]) * w_row_scale[n]);
      }
    }
    return;
  }
  float table[256];
  for (int b = 0; b < 256; ++b) table[b] = e4m3_to_float(uint8_t(b));
  const uint8_t* a8 = static_cast<const uint8_t*>(act);
  const uint8_t* w = static_cast<const uint8_t*>(w8);
  std::vector<float> af(static_cast<size_t>(M * K)), wf(static_cast<size_t>(K));
  for (int64_t i = 0; i < M * K; ++i) af[size_t(i)] = table[a8[i]];
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t k = 0; k < K; ++k) wf[size_t(k)] = table[w[n * K + k]];
    for (int64_t m = 0; m < M; ++m) {
      const float acc = detail::dot_f32(af.data() + m * K, wf.data(), K);
      epi.finish(m, n, (acc * act_scales[m]) * w_row_scale[n]);
    }
  }
}

void gemm_w4a8_f8l(const uint8_t* act, const float* act_scales, const uint8_t* w, const uint8_t* w_gscales,
                   const float* w_row_scale, int64_t M, int64_t N, int64_t K, const float* lora_act,
                   const void* lora_up, DType lora_dtype, int64_t R, const void* bias, DType bias_dtype, void* out,
                   DType out_dtype) {
  check_expand("gemm_w4a8_f8l", N, K);
  std::vector<uint8_t> w8(static_cast<size_t>(N * K));
  if (N > 0) expand_f8l(w, w_gscales, N, K, w8.data());
  gemm_w8(act, DType::F8E4M3, act_scales, w8.data(), w_row_scale, M, N, K, kInt4Group, lora_act, lora_up,
          lora_dtype, R, bias, bias_dtype, out, out_dtype);
}

void gemm_w4a8_i8q(const int8_t* act, const float* act_scales, const uint8_t* w, const uint8_t* w_steps,
                   const uint8_t* w_zeros, const float* w_row_scale, int64_t M, int64_t N, int64_t K,
                   const float* lora_act, const void* lora_up, DType lora_dtype, int64_t R, const void* bias,
                   DType bias_dtype, void* out, DType out_dtype) {
  check_expand("gemm_w4a8_i8q", N, K);
  std::vector<int8_t> w8(static_cast<size_t>(N * K));
  if (N > 0) expand_i8q(w, w_steps, w_zeros, N, K, w8.data());
  gemm_w8(act, DType::I8, act_scales, w8.data(), w_row_scale, M, N, K, kInt4Group, lora_act, lora_up, lora_dtype,
          R, bias, bias_dtype, out, out_dtype);
}

}  // namespace lowbit::cpu
