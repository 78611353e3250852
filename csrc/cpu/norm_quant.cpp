// C++ CPU reference of the fused entry-linear op (lowbit::norm_modulate_quantize, docs/formats.md):
// adaLN y = LayerNorm(x) * (1 + scale) + shift in fp32 (statistics in double: order free), rounded to x's
// dtype once, then the activation quantizer of y (quantize_act.cpp), so q / scales / lora_act follow that
// reference bit for bit given y.
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "lowbit/cpu_ref.h"
#include "lowbit/numeric.h"

namespace lowbit::cpu {

void norm_modulate_quantize(const void* x, DType x_dtype, int64_t M, int64_t K, int64_t T, const void* shift,
                            const void* scale, float eps, const float* smooth, const void* lora_down, int64_t R,
                            ActQuant mode, void* q_out, float* scales_out, float* lora_act_out, void* y_out) {
  if (x_dtype != DType::BF16 && x_dtype != DType::F16) {
    throw std::invalid_argument("norm_modulate_quantize: x must be bfloat16 or float16");
  }
  if (M < 1 || K < 1 || T < 1 || M % T != 0) {
    throw std::invalid_argument("norm_modulate_quantize: need M, K >= 1 and M a multiple of T, got M=" +
                                std::to_string(M) + ", K=" + std::to_string(K) + ", T=" + std::to_string(T));
  }
  if (x == nullptr || shift == nullptr || scale == nullptr || y_out == nullptr) {
    throw std::invalid_argument("norm_modulate_quantize: null pointer");
  }
  std::vector<float> row(static_cast<size_t>(K)), sh(static_cast<size_t>(K)), sc(static_cast<size_t>(K));
  uint16_t* y16 = static_cast<uint16_t*>(y_out);  // y is written in place, then quantized from there
  for (int64_t m = 0; m < M; ++m) {
    load_floats(x, x_dtype, m * K, K, row.data());
    load_floats(shift, x_dtype, (m / T) * K, K, sh.data());
    load_floats(scale, x_dtype, (m / T) * K, K, sc.data());
    double sum = 0.0;
    for (int64_t k = 0; k < K; ++k) sum += row[size_t(k)];
    const double mean = sum / double(K);
    double m2 = 0.0;
    for (int64_t k = 0; k < K; ++k) m2 += (row[size_t(k)] - mean) * (row[size_t(k)] - mean);
    const float meanf = float(mean);
    const float rstd = 1.0f / std::sqrt(float(m2 / double(K)) + eps);
    for (int64_t k = 0; k < K; ++k) {
      const float v = ((row[size_t(k)] - meanf) * rstd) * (1.0f + sc[size_t(k)]) + sh[size_t(k)];
      y16[m * K + k] = x_dtype == DType::BF16 ? float_to_bf16(v) : float_to_half(v);
    }
  }
  quantize_act(y_out, x_dtype, M, K, smooth, lora_down, R, mode, q_out, scales_out, lora_act_out);
}

}  // namespace lowbit::cpu
