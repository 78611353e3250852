// Element types that cross the pybind11 boundary as small integers (no torch headers in csrc/).
// The numbering is mirrored in lowbit_engine/_dtypes.py; change both together.
#pragma once
#include <cstdint>

namespace lowbit {

enum class DType : int {
  F32 = 0,
  F16 = 1,
  BF16 = 2,
  I8 = 3,
  U8 = 4,
  F8E4M3 = 5,
};

// How the activation quantizer encodes its output (docs/formats.md).
enum class ActQuant : int {
  INT4_G64 = 0,    // packed int4, group 64 along K, fp32 scales [M, K/64]
  INT8_TOKEN = 1,  // int8 [M, K], fp32 scales [M]
  FP8_TOKEN = 2,   // float8_e4m3fn [M, K], fp32 scales [M]
};

constexpr int64_t kInt4Group = 64;

}  // namespace lowbit
