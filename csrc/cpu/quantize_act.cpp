// C++ CPU reference of the fused activation quantizer (op lowbit::quantize_act, docs/formats.md):
// optional smoothing, then int4 group-64 / int8 per-token / fp8 per-token quantization, plus the
// low-rank down-projection of the raw input. Bit-exact with lowbit_engine.reference.quantize_act.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "lowbit/cpu_ref.h"
#include "lowbit/numeric.h"

namespace lowbit::cpu {
namespace {

[[noreturn]] void bad(const std::string& msg) { throw std::invalid_argument("quantize_act: " + msg); }

// max |v| over n values (fp32; exact, max needs no rounding). A NaN anywhere gives NaN, as torch.amax does
// (std::max(amax, NaN) would silently keep amax: a NaN row then got finite codes and scales).
float abs_max(const float* v, int64_t n) {
  float amax = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    const float a = std::fabs(v[i]);
    if (a > amax || a != a) amax = a;  // once amax is NaN, no comparison is true: it stays NaN
  }
  return amax;
}

// The scale of a row or group (docs/formats.md, "Non-finite values"): amax / qmax, or NaN when amax is
// NaN or infinite; a NaN scale fails the "scale > 0" test, so q = 0 and the GEMM writes NaN (0 * NaN).
float act_scale(float amax, float qmax) {
  return amax <= std::numeric_limits<float>::max() ? amax / qmax : std::numeric_limits<float>::quiet_NaN();
}

// One row of int4 group-64: fp32 scale = amax / 7, q = clamp(rint(x / scale), -8, 7), packed two per
// byte with the even k in the low nibble.
void quantize_row_int4(const float* xs, int64_t K, uint8_t* q_row, float* scale_row) {
  for (int64_t g = 0; g < K / kInt4Group; ++g) {
    const float* v = xs + g * kInt4Group;
    const float scale = act_scale(abs_max(v, kInt4Group), 7.0f);
    scale_row[g] = scale;
    int8_t q[kInt4Group];
    for (int64_t i = 0; i < kInt4Group; ++i) {
      // True division, then round half to even: the contract every backend follows bit for bit.
      const float r = scale > 0.0f ? std::nearbyint(v[i] / scale) : 0.0f;
      q[i] = int8_t(std::clamp(r, -8.0f, 7.0f));
    }
    uint8_t* out = q_row + g * (kInt4Group / 2);
    for (int64_t j = 0; j < kInt4Group / 2; ++j) {
      out[j] = uint8_t((q[2 * j] & 0xF) | ((q[2 * j + 1] & 0xF) << 4));
    }
  }
}

// One row of int8 per token: scale = amax / 127, q = clamp(rint(x / scale), -127, 127).
void quantize_row_int8(const float* xs, int64_t K, int8_t* q_row, float* scale) {
  const float s = act_scale(abs_max(xs, K), 127.0f);
  *scale = s;
  for (int64_t k = 0; k < K; ++k) {
    const float r = s > 0.0f ? std::nearbyint(xs[k] / s) : 0.0f;
    q_row[k] = int8_t(std::clamp(r, -127.0f, 127.0f));
  }
}

// One row of fp8 per token: scale = amax / 448, q = e4m3(clamp(x / scale, -448, 448)) (RNE).
// A zero row keeps scale 0 and q 0, like the int paths (docs/formats.md, 8-bit activations).
void quantize_row_fp8(const float* xs, int64_t K, uint8_t* q_row, float* scale) {
  const float s = act_scale(abs_max(xs, K), 448.0f);
  *scale = s;
  for (int64_t k = 0; k < K; ++k) {
    q_row[k] = s > 0.0f ? float_to_e4m3(std::clamp(xs[k] / s, -448.0f, 448.0f)) : uint8_t(0);
  }
}

}  // namespace

void quantize_act(const void* x, DType x_dtype, int64_t M, int64_t K, const float* smooth,
                  const void* lora_down, int64_t R, ActQuant mode, void* q_out, float* scales_out,
                  float* lora_act_out) {
  if (x_dtype != DType::F16 && x_dtype != DType::BF16) {
    bad("x must be float16 or bfloat16, got dtype code " + std::to_string(int(x_dtype)));
  }
  if (mode != ActQuant::INT4_G64 && mode != ActQuant::INT8_TOKEN && mode != ActQuant::FP8_TOKEN) {
    bad("unknown mode code " + std::to_string(int(mode)) + " (0 int4 g64, 1 int8, 2 fp8)");
  }
  if (M < 0) bad("M must be >= 0, got " + std::to_string(M));
  if (K <= 0) bad("K must be > 0, got " + std::to_string(K));
  if (mode == ActQuant::INT4_G64 && K % kInt4Group != 0) {
    bad("K must be a multiple of 64 for int4, got " + std::to_string(K));
  }
  if (R < 0) bad("R must be >= 0, got " + std::to_string(R));
  if (R > 0 && lora_down == nullptr) bad("R = " + std::to_string(R) + " but lora_down is null");
  if (R > 0 && lora_act_out == nullptr) bad("R = " + std::to_string(R) + " but lora_act_out is null");
  if (M == 0) return;
  if (x == nullptr) bad("x is null");
  if (q_out == nullptr) bad("q_out is null");
  if (scales_out == nullptr) bad("scales_out is null");

  // The low-rank weight is read once per token; convert it to fp32 up front.
  std::vector<float> down(static_cast<size_t>(R * K));
  if (R > 0) load_floats(lora_down, x_dtype, 0, R * K, down.data());

  std::vector<float> raw(static_cast<size_t>(K)), xs(static_cast<size_t>(K));
  for (int64_t m = 0; m < M; ++m) {
    load_floats(x, x_dtype, m * K, K, raw.data());
    for (int64_t k = 0; k < K; ++k) xs[k] = smooth ? raw[k] / smooth[k] : raw[k];

    switch (mode) {
      case ActQuant::INT4_G64:
        quantize_row_int4(xs.data(), K, static_cast<uint8_t*>(q_out) + m * (K / 2),
                          scales_out + m * (K / kInt4Group));
        break;
      case ActQuant::INT8_TOKEN:
        quantize_row_int8(xs.data(), K, static_cast<int8_t*>(q_out) + m * K, scales_out + m);
        break;
      case ActQuant::FP8_TOKEN:
        quantize_row_fp8(xs.data(), K, static_cast<uint8_t*>(q_out) + m * K, scales_out + m);
        break;
    }

    // The low-rank branch sees the raw input: SVDQuant folds the smoothing into lora_down.
    for (int64_t r = 0; r < R; ++r) {
      const float* d = down.data() + r * K;
      float acc = 0.0f;
      for (int64_t k = 0; k < K; ++k) acc += raw[k] * d[k];
      lora_act_out[m * R + r] = acc;
    }
  }
}

}  // namespace lowbit::cpu
