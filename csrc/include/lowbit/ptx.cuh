// PTX wrappers shared by the CUDA kernels (cp.async ring helpers and mma.sync shapes). Device code only:
// include from .cu files. Each wrapper names the PTX instruction it emits so the SASS census in
// bench/gpu_check.sh can be read against the source.
#pragma once
#include <cstdint>

namespace lowbit::cuda::ptx {

// 16-byte global -> shared copy that bypasses L1 (cp.async.cg). pred = false zero-fills the 16 bytes
// and reads nothing, so out-of-range rows and K groups arrive as zeros without a branch.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool pred) {
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const int src_size = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(gmem), "r"(src_size)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

// d = a . b + c on the int8 tensor cores: mma.sync.m16n8k32, s8 x s8 -> s32 (IMMA.16832.S8.S8).
// Fragments (lane = 4 * g + t): a0/a2 row g, a1/a3 row g + 8; a0/a1 hold k = 4t..4t+3, a2/a3 hold
// k = 16 + 4t..; b0 holds k = 4t.. of column g, b1 k = 16 + 4t..; c0/c1 row g columns 2t, 2t+1, c2/c3 row
// g + 8.
__device__ __forceinline__ void mma_s8_16832(int (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1,
                                             const int (&c)[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%10, %11, %12, %13};"
      : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "r"(c[0]), "r"(c[1]), "r"(c[2]),
        "r"(c[3]));
}

// d += a . b with tf32 inputs and fp32 accumulate: mma.sync.m16n8k8 (HMMA.1688.F32.TF32). Fragments:
// a0 (row g, k t), a1 (row g + 8, k t), a2 (row g, k t + 4), a3 (row g + 8, k t + 4); b0 (k t, column g),
// b1 (k t + 4, column g); c as for the int8 shape.
__device__ __forceinline__ void mma_tf32_1688(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                              uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// fp32 -> tf32 with round-to-nearest (ties away), result kept in a 32-bit register.
__device__ __forceinline__ uint32_t to_tf32(float x) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return r;
}

// Byte permute: result byte i = byte sel[i] of the 8-byte value {hi:lo}.
__device__ __forceinline__ uint32_t prmt(uint32_t lo, uint32_t hi, uint32_t sel) {
  uint32_t r;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(lo), "r"(hi), "r"(sel));
  return r;
}

}  // namespace lowbit::cuda::ptx
