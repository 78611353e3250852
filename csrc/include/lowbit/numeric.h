// Host-only number conversions used by the C++ CPU references (csrc/cpu/).
//
// Every conversion to a narrower type rounds to nearest, ties to even, exactly like torch's
// `.to(dtype)` casts, so the CPU references agree with the torch references bit for bit:
//   - bf16: the upper half of the fp32 bits after RNE on the lower half (c10::BFloat16).
//   - fp16: GCC/Clang's _Float16 conversion, which is IEEE RNE with subnormals (c10::Half).
//   - e4m3 (float8_e4m3fn): 1 sign, 4 exponent (bias 7), 3 mantissa bits, subnormals, no infinities,
//     0x7F/0xFF is NaN, largest finite 448. Callers clamp to [-448, 448] first (docs/formats.md).
// No torch headers: this file is plain C++17 plus the _Float16 extension.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#include "lowbit/dtype.h"

namespace lowbit {

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// ---- bf16 -------------------------------------------------------------------------------------

inline float bf16_to_float(uint16_t h) { return bits_float(uint32_t(h) << 16); }

inline uint16_t float_to_bf16(float f) {
  uint32_t u = float_bits(f);
  if (std::isnan(f)) return 0x7FC0;  // canonical quiet NaN, as c10::BFloat16 produces
  // Adding 0x7FFF plus the lowest kept bit rounds the dropped 16 bits to nearest, ties to even;
  // a carry out of the mantissa correctly bumps the exponent (up to infinity).
  u += 0x7FFFu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

// ---- fp16 -------------------------------------------------------------------------------------

inline float half_to_float(uint16_t h) {
  _Float16 v;
  std::memcpy(&v, &h, sizeof(v));
  return float(v);
}

inline uint16_t float_to_half(float f) {
  _Float16 v = static_cast<_Float16>(f);  // IEEE round to nearest even, subnormals included
  uint16_t h;
  std::memcpy(&h, &v, sizeof(h));
  return h;
}

// ---- float8_e4m3fn ----------------------------------------------------------------------------

inline float e4m3_to_float(uint8_t b) {
  const float sign = (b & 0x80) ? -1.0f : 1.0f;
  const int exp = (b >> 3) & 0xF;
  const int man = b & 0x7;
  if (exp == 0xF && man == 0x7) return std::nanf("");
  if (exp == 0) return sign * std::ldexp(float(man), -9);  // subnormal: man * 2^-6 / 8
  return sign * std::ldexp(float(8 + man), exp - 10);     // (1 + man/8) * 2^(exp - 7)
}

// RNE encoding, as c10::Float8_e4m3fn: e4m3fn has no infinity, so NaN and anything that rounds past
// 448 (|f| > 464) become NaN. Callers clamp to [-448, 448] first, as docs/formats.md says.
inline uint8_t float_to_e4m3(float f) {
  const uint8_t sign = (float_bits(f) >> 24) & 0x80;
  const float a = std::fabs(f);
  if (std::isnan(a) || a >= 480.0f) return uint8_t(sign | 0x7F);  // 480 and up: no code
  if (a < 0.015625f) {
    // Below the smallest normal 2^-6 the grid is uniform with step 2^-9: the code is the rounded
    // multiple of that step (a * 512 is exact). A result of 8 is the code of 2^-6, the smallest
    // normal, so rounding up into the normal range needs no special case.
    return uint8_t(sign | uint8_t(std::nearbyint(a * 512.0f)));
  }
  // Normal: keep 3 of the 23 fp32 mantissa bits with RNE on the 20 dropped ones; a mantissa carry
  // moves into the exponent field. The e4m3 code is then the fp32 (exponent, top-3-mantissa) field
  // rebased from bias 127 to bias 7: subtract 120 << 3.
  uint32_t u = float_bits(a);
  u += 0x7FFFFu + ((u >> 20) & 1u);
  return uint8_t(sign | uint8_t((u >> 20) - (120u << 3)));
}

// ---- dtype-dispatched rows --------------------------------------------------------------------

inline const char* dtype_name(DType dt) {
  switch (dt) {
    case DType::F32: return "float32";
    case DType::F16: return "float16";
    case DType::BF16: return "bfloat16";
    case DType::I8: return "int8";
    case DType::U8: return "uint8";
    case DType::F8E4M3: return "float8_e4m3fn";
  }
  return "unknown";
}

inline bool is_float_dtype(DType dt) { return dt == DType::F32 || dt == DType::F16 || dt == DType::BF16; }

// Converts n elements of a F32/F16/BF16 array, starting at element `offset`, to fp32 (exact).
inline void load_floats(const void* base, DType dt, int64_t offset, int64_t n, float* dst) {
  switch (dt) {
    case DType::F32: {
      const float* p = static_cast<const float*>(base) + offset;
      for (int64_t i = 0; i < n; ++i) dst[i] = p[i];
      return;
    }
    case DType::F16: {
      const uint16_t* p = static_cast<const uint16_t*>(base) + offset;
      for (int64_t i = 0; i < n; ++i) dst[i] = half_to_float(p[i]);
      return;
    }
    case DType::BF16: {
      const uint16_t* p = static_cast<const uint16_t*>(base) + offset;
      for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_float(p[i]);
      return;
    }
    default:
      throw std::invalid_argument(std::string("load_floats: unsupported dtype ") + dtype_name(dt));
  }
}

// Rounds n fp32 values (RNE) into a F32/F16/BF16 array starting at element `offset`.
inline void store_floats(const float* src, int64_t n, void* base, DType dt, int64_t offset) {
  switch (dt) {
    case DType::F32: {
      float* p = static_cast<float*>(base) + offset;
      for (int64_t i = 0; i < n; ++i) p[i] = src[i];
      return;
    }
    case DType::F16: {
      uint16_t* p = static_cast<uint16_t*>(base) + offset;
      for (int64_t i = 0; i < n; ++i) p[i] = float_to_half(src[i]);
      return;
    }
    case DType::BF16: {
      uint16_t* p = static_cast<uint16_t*>(base) + offset;
      for (int64_t i = 0; i < n; ++i) p[i] = float_to_bf16(src[i]);
      return;
    }
    default:
      throw std::invalid_argument(std::string("store_floats: unsupported dtype ") + dtype_name(dt));
  }
}

}  // namespace lowbit
