// Epilogue helpers shared by the GEMM kernels: scale / bias loads in any of the output dtypes, lora_up
// pairs as tf32 bit patterns, and 16-bit or fp32 stores. Device code only.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "lowbit/dtype.h"

namespace lowbit::cuda::epi {

__device__ __forceinline__ float bf16_bits_to_float(uint32_t bits) { return __uint_as_float(bits << 16); }

__device__ __forceinline__ float load_as_float(const void* p, int64_t i, int dtype) {
  if (dtype == static_cast<int>(DType::F32)) return static_cast<const float*>(p)[i];
  if (dtype == static_cast<int>(DType::F16)) return __half2float(static_cast<const __half*>(p)[i]);
  return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
}

// Two consecutive 16-bit values of lora_up as fp32 bit patterns (exact in tf32).
__device__ __forceinline__ void load_up_pair(const void* up, int64_t i, bool fp16, uint32_t& lo,
                                             uint32_t& hi) {
  const uint32_t v = __ldg(reinterpret_cast<const unsigned int*>(static_cast<const uint16_t*>(up) + i));
  if (fp16) {
    const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&v));
    lo = __float_as_uint(f.x);
    hi = __float_as_uint(f.y);
  } else {
    lo = v << 16;
    hi = v & 0xFFFF0000u;
  }
}

__device__ __forceinline__ void store_pair(void* out, int64_t i, float v0, float v1, bool both, bool vec,
                                           int dtype) {
  if (dtype == static_cast<int>(DType::F32)) {
    float* o = static_cast<float*>(out) + i;
    if (both && vec) {
      *reinterpret_cast<float2*>(o) = make_float2(v0, v1);
    } else {
      o[0] = v0;
      if (both) o[1] = v1;
    }
  } else if (dtype == static_cast<int>(DType::F16)) {
    __half* o = static_cast<__half*>(out) + i;
    if (both && vec) {
      *reinterpret_cast<__half2*>(o) = __floats2half2_rn(v0, v1);
    } else {
      o[0] = __float2half_rn(v0);
      if (both) o[1] = __float2half_rn(v1);
    }
  } else {
    __nv_bfloat16* o = static_cast<__nv_bfloat16*>(out) + i;
    if (both && vec) {
      *reinterpret_cast<__nv_bfloat162*>(o) = __floats2bfloat162_rn(v0, v1);
    } else {
      o[0] = __float2bfloat16_rn(v0);
      if (both) o[1] = __float2bfloat16_rn(v1);
    }
  }
}

// One output element in out_dtype.
__device__ __forceinline__ void store_one(void* out, int64_t i, float v, int dtype) {
  if (dtype == static_cast<int>(DType::F32)) {
    static_cast<float*>(out)[i] = v;
  } else if (dtype == static_cast<int>(DType::F16)) {
    static_cast<__half*>(out)[i] = __float2half_rn(v);
  } else {
    static_cast<__nv_bfloat16*>(out)[i] = __float2bfloat16_rn(v);
  }
}

}  // namespace lowbit::cuda::epi
