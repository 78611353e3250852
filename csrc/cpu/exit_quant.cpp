// C++ CPU reference of the exit quantizer (docs/formats.md, "Exit quantizer"; lowbit_engine.reference
// exit_activation + quantize_act_static): a GEMM's 16-bit output h goes through the activation (none or
// GELU-tanh, fp32, rounded back to h's dtype), then becomes the next linear's 8-bit input with one static
// scale: xs = h / smooth, q = rint(clamp(xs / scale, +-127)) or e4m3(clamp(xs / scale, +-448)). A row holding
// a non-finite value gets a NaN token scale (its non-finite elements q = 0); lora_act = h @ lora_down^T
// (fp32) on the activated, unquantized h. lora_down is [R, K] with rows ld_stride >= K elements apart (a
// column slice of a wider lora_down is read in place).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "lowbit/cpu_ref.h"
#include "lowbit/numeric.h"

namespace lowbit::cpu {
namespace {

[[noreturn]] void bad(const std::string& msg) { throw std::invalid_argument("exit_quantize: " + msg); }

float round16(float v, DType dt) {
  return dt == DType::BF16 ? bf16_to_float(float_to_bf16(v)) : half_to_float(float_to_half(v));
}

// GELU, tanh approximation, with tanh(u) = 1 - 2 / (exp(2u) + 1): the formula every backend uses.
float gelu_tanh(float x) {
  const float u = 0.7978845608028654f * (x + 0.044715f * (x * x * x));
  const float t = 1.0f - 2.0f / (std::exp(2.0f * u) + 1.0f);
  return 0.5f * x * (1.0f + t);
}

}  // namespace

void exit_quantize(const void* h, DType h_dtype, int64_t M, int64_t K, int activation, float scale,
                   const float* smooth, const void* lora_down, int64_t R, int64_t ld_stride, ActQuant mode,
                   void* q_out, float* scales_out, void* h_out, float* lora_act_out) {
  if (h_dtype != DType::BF16 && h_dtype != DType::F16) bad("h must be bfloat16 or float16");
  if (mode != ActQuant::INT8_TOKEN && mode != ActQuant::FP8_TOKEN) bad("mode must be int8 or fp8");
  if (activation != 0 && activation != 1) bad("activation code must be 0 (none) or 1 (gelu_tanh)");
  if (!(scale > 0.0f) || !std::isfinite(scale)) bad("scale must be a finite float > 0");
  if (M < 1 || K < 1 || R < 0) bad("need M, K >= 1 and R >= 0");
  if (h == nullptr || q_out == nullptr || scales_out == nullptr) bad("null pointer");
  if (R > 0 && (lora_down == nullptr || lora_act_out == nullptr)) bad("R > 0 needs lora_down and lora_act_out");
  if (R > 1 && ld_stride < K) bad("lora_down's row stride must be >= K");
  const float qmax = mode == ActQuant::INT8_TOKEN ? 127.0f : 448.0f;
  std::vector<float> down(static_cast<size_t>(R * K));
  for (int64_t r = 0; r < R; ++r) load_floats(lora_down, h_dtype, r * ld_stride, K, down.data() + r * K);
  std::vector<float> row(static_cast<size_t>(K));
  for (int64_t m = 0; m < M; ++m) {
    load_floats(h, h_dtype, m * K, K, row.data());
    if (activation == 1) {
      for (int64_t k = 0; k < K; ++k) row[size_t(k)] = round16(gelu_tanh(row[size_t(k)]), h_dtype);
    }
    if (h_out != nullptr) store_floats(row.data(), K, h_out, h_dtype, m * K);
    bool finite_row = true;
    for (int64_t k = 0; k < K; ++k) {
      const float xs = smooth ? row[size_t(k)] / smooth[k] : row[size_t(k)];
      const bool finite = std::isfinite(xs);
      finite_row = finite_row && finite;
      const float y = std::clamp((finite ? xs : 0.0f) / scale, -qmax, qmax);
      if (mode == ActQuant::INT8_TOKEN) {
        static_cast<int8_t*>(q_out)[m * K + k] = int8_t(std::nearbyint(y));
      } else {
        static_cast<uint8_t*>(q_out)[m * K + k] = float_to_e4m3(y);
      }
    }
    scales_out[m] = finite_row ? scale : std::nanf("");
    for (int64_t r = 0; r < R; ++r) {
      const float* d = down.data() + r * K;
      float acc = 0.0f;
      for (int64_t k = 0; k < K; ++k) acc += row[size_t(k)] * d[k];
      lora_act_out[m * R + r] = acc;
    }
  }
}

}  // namespace lowbit::cpu
