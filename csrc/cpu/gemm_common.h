// Shared by the C++ CPU GEMM references (gemm.cpp, gemm8.cpp): argument errors, integer and fp32 dot
// products, and the epilogue every GEMM contract ends with (low-rank up-projection, bias, rounding to the
// output dtype). Private to csrc/cpu.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "lowbit/numeric.h"

namespace lowbit::cpu::detail {

[[noreturn]] inline void bad(const char* op, const std::string& msg) {
  throw std::invalid_argument(std::string(op) + ": " + msg);
}

// Exact integer dot product; a plain loop the compiler vectorizes (widening multiply-add).
inline int32_t dot_i8(const int8_t* a, const int8_t* b, int64_t n) {
  int32_t s = 0;
  for (int64_t i = 0; i < n; ++i) s += int32_t(a[i]) * int32_t(b[i]);
  return s;
}

// Sequential fp32 dot product (fp8 operands): every product of the callers is exact in fp32 (e4m3 x int4
// or e4m3 x e4m3 has at most 8 significant bits); the sum order is free per docs/formats.md.
inline float dot_f32(const float* a, const float* b, int64_t n) {
  float s = 0.0f;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// The optional low-rank term and bias, converted to fp32 once, and the output.
struct Epilogue {
  const float* lora_act = nullptr;  // [M, R] fp32, used unless lora_act_16 holds its rounded copy
  std::vector<float> lora_act_16;   // lora_act rounded to lora_up's 16-bit dtype, when asked for
  std::vector<float> lora_up;       // [N, R] as fp32
  int64_t R = 0;
  std::vector<float> bias;  // [N] as fp32, empty when absent
  void* out = nullptr;
  DType out_dtype = DType::F32;
  int64_t N = 0;

  // acc += sum_r lora_act[m, r] * lora_up[n, r]; acc += bias[n]; out[m, n] = round(acc).
  void finish(int64_t m, int64_t n, float acc) const {
    if (R > 0) {
      const float* la = (lora_act_16.empty() ? lora_act : lora_act_16.data()) + m * R;
      const float* lu = lora_up.data() + n * R;
      float low_rank = 0.0f;
      for (int64_t r = 0; r < R; ++r) low_rank += la[r] * lu[r];
      acc += low_rank;
    }
    if (!bias.empty()) acc += bias[size_t(n)];
    store_floats(&acc, 1, out, out_dtype, m * N + n);
  }
};

// Checks shared by both GEMMs. Returns false when the output is empty (nothing to compute), after
// which the caller's pointers are not checked (empty torch tensors report address 0).
// K must be a positive multiple of k_multiple (64 for the grouped formats).
inline bool check_common(const char* op, int64_t M, int64_t N, int64_t K, const float* lora_act,
                         const void* lora_up, DType lora_dtype, int64_t R, const void* bias, DType bias_dtype,
                         const void* out, DType out_dtype, int64_t k_multiple = kInt4Group) {
  if (M < 0 || N < 0) bad(op, "M and N must be >= 0, got M=" + std::to_string(M) + ", N=" + std::to_string(N));
  if (K <= 0 || K % k_multiple != 0) {
    bad(op, "K must be a positive multiple of " + std::to_string(k_multiple) + ", got " + std::to_string(K));
  }
  if (!is_float_dtype(out_dtype)) {
    bad(op, "out dtype must be float32, float16 or bfloat16, got dtype code " + std::to_string(int(out_dtype)));
  }
  if (R < 0) bad(op, "R must be >= 0, got " + std::to_string(R));
  if ((lora_act == nullptr) != (lora_up == nullptr)) {
    bad(op, std::string("lora_act and lora_up come both or neither, got lora_act ") +
                (lora_act ? "set" : "null") + " and lora_up " + (lora_up ? "set" : "null"));
  }
  if (R > 0 && lora_act == nullptr) bad(op, "R = " + std::to_string(R) + " but lora_act and lora_up are null");
  if (R > 0 && lora_dtype != DType::F16 && lora_dtype != DType::BF16) {
    bad(op, "lora_up must be float16 or bfloat16, got dtype code " + std::to_string(int(lora_dtype)));
  }
  if (bias != nullptr && !is_float_dtype(bias_dtype)) {
    bad(op, "bias must be float32, float16 or bfloat16, got dtype code " + std::to_string(int(bias_dtype)));
  }
  if (M == 0 || N == 0) return false;
  if (out == nullptr) bad(op, "out is null");
  return true;
}

// round_lora_act_to (the promotion-free GEMMs): M and the 16-bit dtype lora_act is rounded to first,
// as their kernels feed it to 16-bit MMAs. M = 0 keeps lora_act as it is (fp32).
inline Epilogue make_epilogue(int64_t N, const float* lora_act, const void* lora_up, DType lora_dtype, int64_t R,
                              const void* bias, DType bias_dtype, void* out, DType out_dtype,
                              int64_t round_lora_act_rows = 0) {
  Epilogue e;
  e.N = N;
  e.out = out;
  e.out_dtype = out_dtype;
  if (R > 0) {
    e.R = R;
    e.lora_act = lora_act;
    e.lora_up.resize(size_t(N * R));
    load_floats(lora_up, lora_dtype, 0, N * R, e.lora_up.data());
    if (round_lora_act_rows > 0) {
      const int64_t n = round_lora_act_rows * R;
      std::vector<uint16_t> bits(static_cast<size_t>(n));
      for (int64_t i = 0; i < n; ++i) {
        bits[size_t(i)] = lora_dtype == DType::BF16 ? float_to_bf16(lora_act[i]) : float_to_half(lora_act[i]);
      }
      e.lora_act_16.resize(size_t(n));
      load_floats(bits.data(), lora_dtype, 0, n, e.lora_act_16.data());
    }
  }
  if (bias != nullptr) {
    e.bias.resize(size_t(N));
    load_floats(bias, bias_dtype, 0, N, e.bias.data());
  }
  return e;
}

}  // namespace lowbit::cpu::detail
