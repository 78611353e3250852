// C++ CPU references of the W4A4 and W4A8 GEMMs (ops lowbit::gemm_w4a4 / gemm_w4a8, docs/formats.md).
//
// Both walk the same shape: for each output channel n, unpack its int4 weight row once into int8, then
// for each token m take group-64 dot products (exact int32 for int4/int8 activations), apply the
// scales in fp32 in the order the contract gives, and finish with the shared epilogue (low-rank
// up-projection, bias, rounding to the output dtype).
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "lowbit/cpu_ref.h"
#include "lowbit/numeric.h"
#include "gemm_common.h"

namespace lowbit::cpu {
namespace {

using detail::bad;
using detail::check_common;
using detail::dot_f32;
using detail::dot_i8;
using detail::Epilogue;
using detail::make_epilogue;


// Unpacks `bytes` packed int4 bytes (even k in the low nibble, two's complement) into 2*bytes int8.
void unpack_int4(const uint8_t* packed, int64_t bytes, int8_t* out) {
  for (int64_t j = 0; j < bytes; ++j) {
    const int lo = packed[j] & 0xF, hi = packed[j] >> 4;
    out[2 * j] = int8_t(lo >= 8 ? lo - 16 : lo);  // two's-complement nibble
    out[2 * j + 1] = int8_t(hi >= 8 ? hi - 16 : hi);
  }
}

// Weight row n: int4 values as int8 [K] and its bf16 group scales as fp32 [K/64].
void load_weight_row(const uint8_t* w, const uint16_t* w_scales, int64_t n, int64_t K, int8_t* q,
                     float* scales) {
  unpack_int4(w + n * (K / 2), K / 2, q);
  for (int64_t g = 0; g < K / kInt4Group; ++g) scales[g] = bf16_to_float(w_scales[n * (K / kInt4Group) + g]);
}

}  // namespace

void gemm_w4a4(const uint8_t* act, const float* act_scales, const uint8_t* w, const uint16_t* w_scales,
               int64_t M, int64_t N, int64_t K, const float* lora_act, const void* lora_up,
               DType lora_dtype, int64_t R, const void* bias, DType bias_dtype, void* out,
               DType out_dtype) {
  const char* op = "gemm_w4a4";
  if (!check_common(op, M, N, K, lora_act, lora_up, lora_dtype, R, bias, bias_dtype, out, out_dtype)) return;
  if (act == nullptr || act_scales == nullptr) bad(op, "act and act_scales must not be null");
  if (w == nullptr || w_scales == nullptr) bad(op, "w and w_scales must not be null");
  const Epilogue epi = make_epilogue(N, lora_act, lora_up, lora_dtype, R, bias, bias_dtype, out, out_dtype);

  const int64_t G = K / kInt4Group;
  std::vector<int8_t> qa(static_cast<size_t>(M * K));
  unpack_int4(act, M * K / 2, qa.data());
  std::vector<int8_t> qw(static_cast<size_t>(K));
  std::vector<float> sw(static_cast<size_t>(G));

  for (int64_t n = 0; n < N; ++n) {
    load_weight_row(w, w_scales, n, K, qw.data(), sw.data());
    for (int64_t m = 0; m < M; ++m) {
      const int8_t* a = qa.data() + m * K;
      const float* sa = act_scales + m * G;
      float acc = 0.0f;
      for (int64_t g = 0; g < G; ++g) {
        const int32_t isum = dot_i8(a + g * kInt4Group, qw.data() + g * kInt4Group, kInt4Group);
        acc += float(isum) * (sa[g] * sw[size_t(g)]);  // scale product first, as the contract says
      }
      epi.finish(m, n, acc);
    }
  }
}

void gemm_w4a8(const void* act, DType act_dtype, const float* act_scales, const uint8_t* w,
               const uint16_t* w_scales, int64_t M, int64_t N, int64_t K, const float* lora_act,
               const void* lora_up, DType lora_dtype, int64_t R, const void* bias, DType bias_dtype,
               void* out, DType out_dtype) {
  const char* op = "gemm_w4a8";
  if (act_dtype != DType::I8 && act_dtype != DType::F8E4M3) {
    bad(op, "act must be int8 or float8_e4m3fn, got dtype code " + std::to_string(int(act_dtype)));
  }
  if (!check_common(op, M, N, K, lora_act, lora_up, lora_dtype, R, bias, bias_dtype, out, out_dtype)) return;
  if (act == nullptr || act_scales == nullptr) bad(op, "act and act_scales must not be null");
  if (w == nullptr || w_scales == nullptr) bad(op, "w and w_scales must not be null");
  const Epilogue epi = make_epilogue(N, lora_act, lora_up, lora_dtype, R, bias, bias_dtype, out, out_dtype);

  const int64_t G = K / kInt4Group;
  const bool fp8 = act_dtype == DType::F8E4M3;
  // fp8 activations are decoded to fp32 once (a 256-entry table); int8 ones are used in place.
  std::vector<float> af;
  if (fp8) {
    float table[256];
    for (int b = 0; b < 256; ++b) table[b] = e4m3_to_float(uint8_t(b));
    const uint8_t* a8 = static_cast<const uint8_t*>(act);
    af.resize(size_t(M * K));
    for (int64_t i = 0; i < M * K; ++i) af[size_t(i)] = table[a8[i]];
  }
  const int8_t* ai = static_cast<const int8_t*>(act);
  std::vector<int8_t> qw(static_cast<size_t>(K));
  std::vector<float> qwf(static_cast<size_t>(K));
  std::vector<float> sw(static_cast<size_t>(G));

  for (int64_t n = 0; n < N; ++n) {
    load_weight_row(w, w_scales, n, K, qw.data(), sw.data());
    if (fp8) {
      for (int64_t k = 0; k < K; ++k) qwf[size_t(k)] = float(qw[size_t(k)]);
    }
    for (int64_t m = 0; m < M; ++m) {
      float acc = 0.0f;
      for (int64_t g = 0; g < G; ++g) {
        const int64_t off = g * kInt4Group;
        const float gsum = fp8 ? dot_f32(af.data() + m * K + off, qwf.data() + off, kInt4Group)
                               : float(dot_i8(ai + m * K + off, qw.data() + off, kInt4Group));
        acc += gsum * sw[size_t(g)];
      }
      acc = acc * act_scales[m];  // one per-token scale, applied after the group sum
      epi.finish(m, n, acc);
    }
  }
}

}  // namespace lowbit::cpu
