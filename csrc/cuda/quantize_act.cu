// Fused activation quantizer (op lowbit::quantize_act): one read of x [M, K] gives
//   * the quantized activation (packed int4 group 64, or int8 / fp8 e4m3 per token) with its fp32 scales,
//   * the low-rank branch input lora_act [M, R] = x_raw @ lora_down^T (fp32 accumulate).
// Exact math: docs/formats.md ("Fused activation quantizer"). Design notes and measurements: docs/kernels.md.
//
// ptxas (nvcc 13.0, -O3, -gencode=arch=compute_90a,code=sm_90a -gencode=arch=compute_80,code=sm_80),
// quantize_act_kernel<T, MODE> for T in {bf16, fp16}, MODE in {int4, int8, fp8}; no spills anywhere:
//   sm_90a: 126-128 registers, 0 bytes stack, 0 spill stores/loads, 24576 (int4) / 25216 (int8, fp8)
//           bytes static smem + 65536 bytes dynamic (the cp.async ring), 1 barrier
//           (int4: 128 regs; int8/fp8: 126 regs)
//   sm_80:  122-124 registers, 0 bytes stack, 0 spill stores/loads, same shared memory, 432 bytes cmem[0]
//           (int4: 122 regs; int8/fp8: 124 regs)
//   div_rn_outlined (the rare exact-division path, a real call): 0 bytes stack, no spills.
//   The SASS loads x with LDGSTS.E.BYPASS.128 (16-byte cp.async) and lora_down / smooth with
//   LDG.E.128.CONSTANT; lora uses HMMA.16816.F32(.BF16).
//
// Layout of the work (details in the doc):
//   * A CTA is 8 warps and owns a tile of 16 token rows (one m16 MMA tile) and a slice of the K groups
//     (64 columns each). A thread-block cluster of `cs` CTAs (sm_90) covers the whole row tile, so the
//     per-token amax and the lora partial sums are combined through distributed shared memory.
//   * Lane (g = lane/4, t = lane%4) of a warp owns, for each group, the 16-byte chunks t and t+4 (8
//     elements each) of rows g and g+8: one warp copy instruction covers 8 rows x 64 contiguous bytes,
//     a group amax is a max over the 4 lanes of a quad (2 shuffles), and the same registers are already
//     the A operand of mma.sync.m16n8k16 (see lora_mma: the K order inside an MMA is free, so each lane
//     uses its own 8 contiguous columns as its k slots, and loads the matching 16 bytes of the lora_down
//     row as its B fragment).
//   * x goes through a per-warp ring of 4 groups in shared memory filled by 16-byte cp.async (each lane
//     reads back exactly what it copied, so no barrier is needed); the next groups are in flight while
//     one is quantized. For the 8-bit per-token modes the launcher picks the cluster size so that the
//     CTA's slice fits the ring (2048 columns): the row amax is reduced (quad -> warps -> cluster) and
//     the ring is quantized, so x is read from memory once. Larger K (or no clusters: sm_80) reads x a
//     second time.
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "lowbit/cuda_api.h"
#include "lowbit/ptx.cuh"

namespace cg = cooperative_groups;

namespace lowbit::cuda {
namespace detail {

// Launch configuration, exposed for benchmarks and tests (not part of the public API).
struct QuantizeActConfig {
  int cluster = 1;  // CTAs per row tile (K split); > 1 needs sm_90 thread-block clusters
};

}  // namespace detail

namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kRows = 16;            // token rows per CTA: one m16 MMA tile
constexpr int kGroup = 64;           // columns per group (the int4 group; one warp step)
constexpr int kRankChunk = 32;       // lora ranks per accumulator chunk: 4 n8 MMA tiles
constexpr int kMaxRank = 256;
constexpr int kMaxCluster = 8;       // portable cluster size
constexpr int kRedStride = 40;       // row stride (floats) of the per-warp lora partials (bank spread)
constexpr int kChunkFloats = kRows * kRankChunk;  // 512 partial sums per rank chunk

// s_red holds either the per-warp partials [kWarps][kRows][kRedStride] or the CTA accumulators
// [kRows][kMaxRank] of the multi-pass, many-rank path; never both in one launch.
constexpr int kRedFloats = (kWarps * kRows * kRedStride > kRows * kMaxRank) ? kWarps * kRows * kRedStride
                                                                            : kRows * kMaxRank;

enum Mode : int { kInt4 = 0, kInt8 = 1, kFp8 = 2 };

struct Params {
  const void* x;          // [M, K] bf16 / fp16
  const float* smooth;    // [K] or nullptr
  const void* lora_down;  // [R, K] dtype of x, or nullptr when R == 0
  void* q;                // int4: uint8 [M, K/2]; 8-bit: [M, K]
  float* scales;          // int4: [M, K/64]; 8-bit: [M]
  float* lora_act;        // [M, R] or nullptr when R == 0
  int64_t M;
  int64_t tile0;          // first row tile of this launch (grids are split at 65535 tiles)
  int K;
  int R;
  int G;                  // ceil(K / 64)
};

// ---------------------------------------------------------------------------------------------------
// Small device helpers
// ---------------------------------------------------------------------------------------------------

__device__ __forceinline__ uint4 ld_cached(const void* p) {
  return __ldg(reinterpret_cast<const uint4*>(p));
}

// The scale of a row or group (docs/formats.md, "Non-finite values"): amax / qmax, NaN when amax is NaN or
// infinite (a NaN scale gives q = 0 below, and the GEMM writes NaN for the row), as the references do.
__device__ __forceinline__ float act_scale(float amax, float qmax) {
  return amax <= 3.402823466e38f ? __fdiv_rn(amax, qmax) : __int_as_float(0x7fc00000);
}

// max that propagates NaN (torch.amax semantics): a NaN in a group gives a NaN scale and q = 0.
__device__ __forceinline__ float max_nan(float a, float b) {
  float d;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(d) : "f"(a), "f"(b));
  return d;
}

template <typename T>
struct Elem;

template <>
struct Elem<__nv_bfloat16> {
  // Two bf16 packed in a 32-bit word (lower address in the low half) -> two floats, exact.
  static __device__ __forceinline__ void to_float(uint32_t u, float& lo, float& hi) {
    lo = __uint_as_float(u << 16);
    hi = __uint_as_float(u & 0xFFFF0000u);
  }
  static __device__ __forceinline__ void mma(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                             uint32_t a3, uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
};

template <>
struct Elem<__half> {
  static __device__ __forceinline__ void to_float(uint32_t u, float& lo, float& hi) {
    __half2 h = *reinterpret_cast<const __half2*>(&u);
    float2 f = __half22float2(h);
    lo = f.x;
    hi = f.y;
  }
  static __device__ __forceinline__ void mma(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                             uint32_t a3, uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
};

__device__ __forceinline__ uint32_t word(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// 8 consecutive elements (one 16-byte chunk) -> 8 floats, divided by smooth when given (IEEE fp32).
template <typename T>
__device__ __forceinline__ void chunk_to_float(const uint4& v, const float* sm, float (&f)[8]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) Elem<T>::to_float(word(v, i), f[2 * i], f[2 * i + 1]);
  if (sm != nullptr) {
#pragma unroll
    for (int i = 0; i < 8; ++i) f[i] = __fdiv_rn(f[i], sm[i]);
  }
}

// a / b, correctly rounded (bit-identical to __fdiv_rn), for a divisor used many times.
// With rb = RN(1/b), y0 = RN(a * rb) is within 2 ulp of a/b, one correction makes it faithful and the
// second is Markstein's theorem: RN(y1 + rb * (a - b*y1)) = RN(a/b), the remainder a - b*y1 being exact
// in an fma. It needs the intermediates away from underflow and overflow: the caller only takes this
// path for 2^-60 <= b <= 2^60 and |a| <= 448 b (a quantizer's value over its own scale), where either
// |a/b| >= 2^-20 (then every term is a normal number) or |a/b| < 2^-20 and the result, however
// inexact in its low bits, rounds to the same integer / e4m3 value (0) as the true quotient; the sign
// of a zero result is fixed by the caller (fp8 stores -0).
struct Divisor {
  float b;
  float rb;
  bool fast;
};

__device__ __forceinline__ Divisor make_divisor(float b) {
  Divisor d;
  d.b = b;
#ifdef LOWBIT_QA_IEEE_DIV
  d.fast = false;
#else
  d.fast = (b >= 0x1p-60f) && (b <= 0x1p60f);
#endif
  d.rb = d.fast ? __frcp_rn(b) : 1.0f;
  return d;
}

// The rare path (zero, non-finite or extreme scales) stays out of line to keep the kernels small.
__device__ __noinline__ float div_rn_outlined(float a, float b) { return __fdiv_rn(a, b); }

__device__ __forceinline__ float div_fast(float a, float b, float rb) {
  float y = __fmul_rn(a, rb);
  float e = __fmaf_rn(-b, y, a);
  y = __fmaf_rn(rb, e, y);
  e = __fmaf_rn(-b, y, a);
  return __fmaf_rn(rb, e, y);
}

// Quantize 8 values with one scale; returns the packed bits for the chunk:
//   int4: 8 nibbles in one word (element i in bits 4i..4i+3: the even k in the low nibble of a byte),
//   int8 / fp8: 8 bytes in two words.
// rint() is done by adding 1.5 * 2^23: for |v| < 2^22 the fp32 sum rounds to an integer with ties to
// even, and its low mantissa bits are the two's-complement integer.
template <int MODE>
__device__ __forceinline__ uint2 quantize_chunk(const float (&v)[8], float scale, const Divisor& d) {
  float q[8];
  if (d.fast) {
#pragma unroll
    for (int i = 0; i < 8; ++i) q[i] = div_fast(v[i], d.b, d.rb);
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) q[i] = div_rn_outlined(v[i], d.b);
  }
  uint2 out;
  if constexpr (MODE == kInt4) {
    uint32_t w = 0;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const float c = fminf(fmaxf(q[i], -8.0f), 7.0f);
      w |= (__float_as_uint(c + 12582912.0f) & 0xFu) << (4 * i);
    }
    out.x = w;
    out.y = 0;
  } else if constexpr (MODE == kInt8) {
    uint32_t b[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const float c = fminf(fmaxf(q[i], -127.0f), 127.0f);
      b[i] = __float_as_uint(c + 12582912.0f);
    }
    out.x = __byte_perm(__byte_perm(b[0], b[1], 0x0040), __byte_perm(b[2], b[3], 0x0040), 0x5410);
    out.y = __byte_perm(__byte_perm(b[4], b[5], 0x0040), __byte_perm(b[6], b[7], 0x0040), 0x5410);
  } else {
    uint32_t h[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      // clamp keeps the sign of zero; copysign restores it where the fast division lost it (a = -0).
      const float c0 = copysignf(fminf(fmaxf(q[2 * i], -448.0f), 448.0f), v[2 * i]);
      const float c1 = copysignf(fminf(fmaxf(q[2 * i + 1], -448.0f), 448.0f), v[2 * i + 1]);
      h[i] = __nv_cvt_float2_to_fp8x2(make_float2(c0, c1), __NV_SATFINITE, __NV_E4M3);
    }
    out.x = h[0] | (h[1] << 16);
    out.y = h[2] | (h[3] << 16);
  }
  if (!(scale > 0.0f)) out = make_uint2(0, 0);  // zero (or NaN) scale: q = 0
  return out;
}

// ---------------------------------------------------------------------------------------------------
// Cluster helpers: real clusters on sm_90; a cluster of one CTA elsewhere.
// ---------------------------------------------------------------------------------------------------

__device__ __forceinline__ void cluster_sync_all() {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900)
  cg::this_cluster().sync();
#else
  __syncthreads();
#endif
}

template <typename P>
__device__ __forceinline__ P* cluster_peer(P* local, int rank) {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900)
  return cg::this_cluster().map_shared_rank(local, rank);
#else
  (void)rank;
  return local;
#endif
}

// ---------------------------------------------------------------------------------------------------
// The kernel
// ---------------------------------------------------------------------------------------------------

constexpr int kStages = 4;                      // x ring depth per warp (groups in flight)
constexpr int kSlotChunks = 4;                  // 16-byte chunks per lane per group: rows g, g+8 x chunks t, t+4
constexpr int kRingBytes = kWarps * kStages * kSlotChunks * 32 * 16;  // 64 KB per CTA
constexpr int kSmemBytes = kRingBytes;

using ptx::cp_async16;  // csrc/include/lowbit/ptx.cuh (shared with the GEMM)
using ptx::cp_async_commit;
using ptx::cp_async_wait;

// LoRA down-projection for one group: acc[nt] += x[16 rows, 64 cols] . lora_down[chunk ranks, 64 cols]^T.
// mma.m16n8k16 A fragment (row-major 16x16): lane (g,t) holds A[g][2t..2t+1] (a0), A[g+8][2t..2t+1] (a1),
// A[g][2t+8..2t+9] (a2), A[g+8][2t+8..2t+9] (a3). B fragment (16x8, "col"): B[2t..2t+1][g] (b0),
// B[2t+8..2t+9][g] (b1), with B[k][n] = lora_down[n][k]. The K order is free as long as A and B use
// the same one, so for MMA u (0, 1) of chunk s the logical k 2t, 2t+1, 2t+8, 2t+9 of lane t are its own
// physical columns c+4u .. c+4u+3 (c = chunk start): a0/a1 = word 2u of rows g / g+8, a2/a3 = word 2u+1,
// and b0/b1 = words 2u, 2u+1 of the 16 bytes of lora_down row (n-tile base + g) at the same column c.
// The B fragments of the first kPrefetchTiles n8 tiles are loaded one step ahead (registers are the
// limit: 8 per tile); the others when used.
#ifndef LOWBIT_QA_PREFETCH_TILES
#define LOWBIT_QA_PREFETCH_TILES 3
#endif
constexpr int kPrefetchTiles = LOWBIT_QA_PREFETCH_TILES;

template <typename T>
__device__ __forceinline__ void load_b_tile(uint4 (&b)[2], const T* lora_down, int K, int R, int rank,
                                            int grp, int t) {
#pragma unroll
  for (int s = 0; s < 2; ++s) {
    const int col = grp * kGroup + (t + 4 * s) * 8;
    b[s] = make_uint4(0, 0, 0, 0);
    if (rank < R && col < K) b[s] = ld_cached(lora_down + int64_t(rank) * K + col);
  }
}

template <typename T>
__device__ __forceinline__ void load_lora_b(uint4 (&b)[kPrefetchTiles][2], const T* lora_down, int K,
                                            int R, int rank0, int grp, int t, int g) {
#pragma unroll
  for (int nt = 0; nt < kPrefetchTiles; ++nt) load_b_tile<T>(b[nt], lora_down, K, R, rank0 + nt * 8 + g, grp, t);
}

template <typename T>
__device__ __forceinline__ void lora_mma(float (&acc)[4][4], const uint4 (&xv)[2][2],
                                         const uint4 (&bq)[kPrefetchTiles][2], const T* lora_down, int K,
                                         int R, int rank0, int grp, int t, int g) {
#pragma unroll
  for (int nt = 0; nt < 4; ++nt) {
    if (rank0 + nt * 8 >= R) break;  // warp-uniform
    uint4 b[2];
    if (nt < kPrefetchTiles) {
      b[0] = bq[nt < kPrefetchTiles ? nt : 0][0];
      b[1] = bq[nt < kPrefetchTiles ? nt : 0][1];
    } else {
      load_b_tile<T>(b, lora_down, K, R, rank0 + nt * 8 + g, grp, t);
    }
#pragma unroll
    for (int s = 0; s < 2; ++s) {
#pragma unroll
      for (int u = 0; u < 2; ++u) {
        Elem<T>::mma(acc[nt], word(xv[0][s], 2 * u), word(xv[1][s], 2 * u), word(xv[0][s], 2 * u + 1),
                     word(xv[1][s], 2 * u + 1), word(b[s], 2 * u), word(b[s], 2 * u + 1));
      }
    }
  }
}

template <typename T, int MODE>
__global__ void __launch_bounds__(kThreads, 2) quantize_act_kernel(const Params p) {
  extern __shared__ uint4 s_ring[];  // [warp][stage][chunk (h, s)][lane]: each lane reads what it copied
  __shared__ __align__(16) float s_red[kRedFloats];
  __shared__ __align__(16) float s_part[2][kChunkFloats];  // cluster-visible lora partials
  __shared__ float s_amax_w[kWarps][kRows];
  __shared__ float s_amax_part[kRows];  // cluster-visible
  __shared__ float s_amax_fin[kRows];

  const int tid = threadIdx.x;
  const int lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int cs = gridDim.x, crank = blockIdx.x;  // cluster size and rank: the cluster spans grid x
  const int K = p.K, R = p.R, G = p.G;
  const int64_t M = p.M;
  const int64_t m0 = (p.tile0 + blockIdx.y) * int64_t(kRows);
  const int64_t row[2] = {m0 + g, m0 + g + 8};
  const bool row_ok[2] = {row[0] < M, row[1] < M};

  const T* x = static_cast<const T*>(p.x);
  const T* lora_down = static_cast<const T*>(p.lora_down);
  const float* smooth = p.smooth;
  uint8_t* q = static_cast<uint8_t*>(p.q);
  uint4* ring = s_ring + warp * (kStages * kSlotChunks * 32);

  // This CTA's slice of the groups; warp w takes groups gb + w, gb + w + 8, ... so that at any time
  // the CTA's copies cover adjacent 128-byte row segments.
  const int gb = int((int64_t(crank) * G) / cs);
  const int ge = int((int64_t(crank + 1) * G) / cs);
  const int n_w = (ge - gb - warp + kWarps - 1) / kWarps > 0 ? (ge - gb - warp + kWarps - 1) / kWarps : 0;
  const bool held = (ge - gb) <= kWarps * kStages;  // the whole slice fits the ring: x is read once
  const int nchunks = (R + kRankChunk - 1) / kRankChunk;
  // More than 32 ranks: a CTA whose slice stays in the ring computes rank chunk 0 while streaming and
  // replays the ring once per further chunk; otherwise (slice larger than the ring) every group's MMA
  // result goes into CTA accumulators in shared memory (fp32 atomics: their order is not fixed).
  const bool lora_in_smem = nchunks > 1 && !held;

  auto group_of = [&](int i) { return gb + i * kWarps + warp; };

  // Copy group i of this warp into its ring stage (zero-filled rows past M); one commit group per call.
  auto issue = [&](int i) {
    if (i < n_w) {
      const int grp = group_of(i);
      uint4* slot = ring + (i % kStages) * (kSlotChunks * 32);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
#pragma unroll
        for (int s = 0; s < 2; ++s) {
          const int col = grp * kGroup + (t + 4 * s) * 8;
          const bool ok = row_ok[h] && col < K;
          cp_async16(slot + (h * 2 + s) * 32 + lane, ok ? static_cast<const void*>(x + row[h] * K + col) : x, ok);
        }
      }
    }
    cp_async_commit();
  };
  auto read_slot = [&](int i, uint4 (&xv)[2][2]) {
    const uint4* slot = ring + (i % kStages) * (kSlotChunks * 32);
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int s = 0; s < 2; ++s) xv[h][s] = slot[(h * 2 + s) * 32 + lane];
  };

  float acc[4][4];
  float row_amax[2] = {0.0f, 0.0f};
  uint4 bq[kPrefetchTiles][2];  // lora_down B fragments of the next (group, rank chunk), loaded ahead

  auto zero_acc = [&]() {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int k = 0; k < 4; ++k) acc[i][k] = 0.0f;
  };
  zero_acc();

  if (lora_in_smem) {
    for (int i = tid; i < kRows * kMaxRank; i += kThreads) s_red[i] = 0.0f;
    __syncthreads();
  }

  // xs (fp32, smoothed: IEEE division) of chunk (h, s).
  auto chunk_values = [&](const uint4& v8, int col, float (&v)[8]) {
    if (smooth != nullptr) {
      float sm[8];
      if (col < K) {
        const float4 a = __ldg(reinterpret_cast<const float4*>(smooth + col));
        const float4 b = __ldg(reinterpret_cast<const float4*>(smooth + col + 4));
        sm[0] = a.x; sm[1] = a.y; sm[2] = a.z; sm[3] = a.w;
        sm[4] = b.x; sm[5] = b.y; sm[6] = b.z; sm[7] = b.w;
      } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) sm[i] = 1.0f;
      }
      chunk_to_float<T>(v8, sm, v);
    } else {
      chunk_to_float<T>(v8, nullptr, v);
    }
  };

  // int4: amax over the 64 columns of each row (quad of lanes), quantize, store q and the scale.
  auto quantize_group_int4 = [&](const uint4 (&xv)[2][2], int grp) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float v[2][8];
      float a = 0.0f;
#pragma unroll
      for (int s = 0; s < 2; ++s) {
        chunk_values(xv[h][s], grp * kGroup + (t + 4 * s) * 8, v[s]);
#pragma unroll
        for (int i = 0; i < 8; ++i) a = max_nan(a, fabsf(v[s][i]));
      }
      a = max_nan(a, __shfl_xor_sync(0xffffffffu, a, 1));
      a = max_nan(a, __shfl_xor_sync(0xffffffffu, a, 2));
      const float scale = act_scale(a, 7.0f);
      const Divisor d = make_divisor(scale);
      if (row_ok[h]) {
#pragma unroll
        for (int s = 0; s < 2; ++s) {
          const int col = grp * kGroup + (t + 4 * s) * 8;
          const uint2 w = quantize_chunk<kInt4>(v[s], scale, d);
          *reinterpret_cast<uint32_t*>(q + row[h] * (K / 2) + col / 2) = w.x;
        }
        if (t == h) p.scales[row[h] * (K / kGroup) + grp] = scale;
      }
    }
  };

  // 8-bit: running row amax.
  auto amax_group = [&](const uint4 (&xv)[2][2], int grp) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#pragma unroll
      for (int s = 0; s < 2; ++s) {
        float v[8];
        chunk_values(xv[h][s], grp * kGroup + (t + 4 * s) * 8, v);
#pragma unroll
        for (int i = 0; i < 8; ++i) row_amax[h] = max_nan(row_amax[h], fabsf(v[i]));
      }
    }
  };

  // (Every lane computes; only the stores are predicated.)
  auto quantize_group_8bit = [&](const uint4 (&xv)[2][2], int grp, const float (&scale)[2],
                                 const Divisor (&dv)[2]) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#pragma unroll
      for (int s = 0; s < 2; ++s) {
        const int col = grp * kGroup + (t + 4 * s) * 8;
        float v[8];
        chunk_values(xv[h][s], col, v);
        const uint2 w = quantize_chunk<MODE>(v, scale[h], dv[h]);
        if (row_ok[h] && col < K) *reinterpret_cast<uint2*>(q + row[h] * K + col) = w;
      }
    }
  };

  // acc (fragment layout: acc[nt][0..1] = row g, ranks nt*8+2t, +1; acc[nt][2..3] = row g+8) added into
  // the CTA accumulators s_red[kRows][kMaxRank].
  auto acc_to_smem = [&](int chunk) {
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
      const int c = chunk * kRankChunk + nt * 8 + 2 * t;
      if (c < R) {
        atomicAdd(&s_red[g * kMaxRank + c], acc[nt][0]);
        atomicAdd(&s_red[g * kMaxRank + c + 1], acc[nt][1]);
        atomicAdd(&s_red[(g + 8) * kMaxRank + c], acc[nt][2]);
        atomicAdd(&s_red[(g + 8) * kMaxRank + c + 1], acc[nt][3]);
      }
    }
  };

  // One cluster-wide reduction step; every thread of every CTA of the cluster makes the same calls.
  //   with_amax: the row amax (already reduced over the quad) -> warps -> cluster, into s_amax_fin
  //              (read it after a __syncthreads), and the per-token scales written by cluster rank 0;
  //   chunk >= 0: lora_act[:, chunk*32 .. +32) from acc (per-warp fragments) or from the CTA
  //              accumulators (from_smem), summed warps -> CTA -> cluster in a fixed order.
  auto exchange = [&](bool with_amax, int chunk, bool from_smem) {
    float* part = s_part[chunk & 1];
    if (with_amax && t == 0) {
      s_amax_w[warp][g] = row_amax[0];
      s_amax_w[warp][g + 8] = row_amax[1];
    }
    if (chunk >= 0 && !from_smem) {
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
        const int c = nt * 8 + 2 * t;
        *reinterpret_cast<float2*>(&s_red[(warp * kRows + g) * kRedStride + c]) =
            make_float2(acc[nt][0], acc[nt][1]);
        *reinterpret_cast<float2*>(&s_red[(warp * kRows + g + 8) * kRedStride + c]) =
            make_float2(acc[nt][2], acc[nt][3]);
      }
    }
    __syncthreads();
    if (with_amax && tid < kRows) {
      float a = 0.0f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) a = max_nan(a, s_amax_w[w][tid]);
      s_amax_part[tid] = a;
    }
    if (chunk >= 0) {
      for (int e = tid; e < kChunkFloats; e += kThreads) {
        const int r = e / kRankChunk, c = e % kRankChunk;
        float sum = 0.0f;
        if (from_smem) {
          sum = s_red[r * kMaxRank + chunk * kRankChunk + c];
        } else {
#pragma unroll
          for (int w = 0; w < kWarps; ++w) sum += s_red[(w * kRows + r) * kRedStride + c];
        }
        part[e] = sum;
      }
    }
    cluster_sync_all();  // the partials of every CTA of the cluster are visible
    if (with_amax && tid < kRows) {
      float a = 0.0f;
      for (int k = 0; k < cs; ++k) a = max_nan(a, cluster_peer(s_amax_part, k)[tid]);
      s_amax_fin[tid] = a;
      constexpr float kQmax = (MODE == kInt8) ? 127.0f : 448.0f;
      if (crank == 0 && m0 + tid < M) p.scales[m0 + tid] = act_scale(a, kQmax);
    }
    if (chunk >= 0) {
      const int lo = (crank * kChunkFloats) / cs, hi = ((crank + 1) * kChunkFloats) / cs;
      for (int e = lo + tid; e < hi; e += kThreads) {
        const int r = e / kRankChunk, c = e % kRankChunk;
        const int rr = chunk * kRankChunk + c;
        const int64_t m = m0 + r;
        if (rr < R && m < M) {
          float sum = 0.0f;
          for (int k = 0; k < cs; ++k) sum += cluster_peer(part, k)[e];
          p.lora_act[m * R + rr] = sum;
        }
      }
    }
  };

  // ---- pass 1: stream x through the ring; int4 quantize / 8-bit amax; lora MMAs -------------------
  // The lora B fragments of step (group i, chunk c) are loaded during step before it, so their L2
  // latency hides behind one group's quantization.
#pragma unroll 1
  for (int d = 0; d < kStages; ++d) issue(d);
  const int pass1_chunks = lora_in_smem ? nchunks : (nchunks > 0 ? 1 : 0);
  if (pass1_chunks > 0 && n_w > 0) load_lora_b<T>(bq, lora_down, K, R, 0, group_of(0), t, g);
#pragma unroll 1
  for (int i = 0; i < n_w; ++i) {
    const int grp = group_of(i);
    cp_async_wait<kStages - 1>();  // group i has landed (this lane's copies)
    uint4 xv[2][2];
    read_slot(i, xv);
    if constexpr (MODE == kInt4) {
      quantize_group_int4(xv, grp);
    } else {
      amax_group(xv, grp);
    }
#pragma unroll 1
    for (int c = 0; c < pass1_chunks; ++c) {
      if (pass1_chunks > 1) zero_acc();
      lora_mma<T>(acc, xv, bq, lora_down, K, R, c * kRankChunk, grp, t, g);
      if (pass1_chunks > 1) acc_to_smem(c);
      const int ni = (c + 1 < pass1_chunks) ? i : i + 1;
      const int nc = (c + 1 < pass1_chunks) ? c + 1 : 0;
      if (ni < n_w) load_lora_b<T>(bq, lora_down, K, R, nc * kRankChunk, group_of(ni), t, g);
    }
    issue(i + kStages);  // refills the stage just read (a no-op past the end: held slices stay)
  }

  // ---- reductions over the cluster: row amax (8-bit modes) and lora_act ---------------------------
  constexpr bool kAmax = MODE != kInt4;
  if constexpr (kAmax) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      row_amax[h] = max_nan(row_amax[h], __shfl_xor_sync(0xffffffffu, row_amax[h], 1));
      row_amax[h] = max_nan(row_amax[h], __shfl_xor_sync(0xffffffffu, row_amax[h], 2));
    }
  }
  if (nchunks == 0) {
    if (kAmax) exchange(true, -1, false);
  } else if (lora_in_smem) {
    __syncthreads();  // every warp's atomics are in
    for (int c = 0; c < nchunks; ++c) exchange(kAmax && c == 0, c, true);
  } else {
    exchange(kAmax, 0, false);
    // More ranks with the slice held in the ring: replay it once per further rank chunk.
    cp_async_wait<0>();
    for (int c = 1; c < nchunks; ++c) {
      zero_acc();
      if (n_w > 0) load_lora_b<T>(bq, lora_down, K, R, c * kRankChunk, group_of(0), t, g);
#pragma unroll 1
      for (int i = 0; i < n_w; ++i) {
        uint4 xv[2][2];
        read_slot(i, xv);
        lora_mma<T>(acc, xv, bq, lora_down, K, R, c * kRankChunk, group_of(i), t, g);
        if (i + 1 < n_w) load_lora_b<T>(bq, lora_down, K, R, c * kRankChunk, group_of(i + 1), t, g);
      }
      exchange(false, c, false);
    }
  }

  // ---- 8-bit per token: quantize from the ring (or stream x again when the slice did not fit) -----
  if constexpr (MODE != kInt4) {
    __syncthreads();  // s_amax_fin
    constexpr float kQmax = (MODE == kInt8) ? 127.0f : 448.0f;
    float scale[2];
    Divisor dv[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      scale[h] = act_scale(s_amax_fin[g + 8 * h], kQmax);
      dv[h] = make_divisor(scale[h]);
    }
    if (held) {
      cp_async_wait<0>();
#pragma unroll 1
      for (int i = 0; i < n_w; ++i) {
        uint4 xv[2][2];
        read_slot(i, xv);
        quantize_group_8bit(xv, group_of(i), scale, dv);
      }
    } else {
      cp_async_wait<0>();
#pragma unroll 1
      for (int d = 0; d < kStages; ++d) issue(d);
#pragma unroll 1
      for (int i = 0; i < n_w; ++i) {
        cp_async_wait<kStages - 1>();
        uint4 xv[2][2];
        read_slot(i, xv);
        quantize_group_8bit(xv, group_of(i), scale, dv);
        issue(i + kStages);
      }
    }
  }
  cp_async_wait<0>();
  cluster_sync_all();  // no CTA leaves while a peer may still read its shared memory
}

// ---------------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------------

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("lowbit::cuda::quantize_act: ") + what + ": " +
                             cudaGetErrorString(err));
  }
}

void check_call(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("lowbit::cuda::quantize_act: ") + what + ": " +
                             cudaGetErrorString(err));
  }
}

struct DeviceInfo {
  int cc_major = 0;
  int sms = 0;
  int max_cluster = 1;  // largest cluster (power of two <= 8) the device schedules for this kernel
};

// Opt a kernel in to kSmemBytes of dynamic shared memory, once per kernel and device (the setting is
// per context). Templated on the instantiation so that each kernel has its own record.
template <typename T, int MODE>
void allow_smem() {
  auto kernel = quantize_act_kernel<T, MODE>;
  static std::atomic<uint64_t> done_devices{0};
  int dev = 0;
  check_call(cudaGetDevice(&dev), "cudaGetDevice");
  const uint64_t bit = dev < 64 ? (uint64_t(1) << dev) : 0;
  if (bit != 0 && (done_devices.load() & bit) != 0) return;
  check_call(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes),
             "cudaFuncSetAttribute");
  done_devices.fetch_or(bit);
}

cudaLaunchConfig_t make_config(int cluster, int64_t tiles, cudaStream_t stream, cudaLaunchAttribute* attr) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(unsigned(cluster), unsigned(tiles), 1);
  cfg.blockDim = dim3(kThreads, 1, 1);
  cfg.dynamicSmemBytes = kSmemBytes;  // > 48 KB: the kernels opt in with cudaFuncSetAttribute
  cfg.stream = stream;
  cfg.attrs = nullptr;
  cfg.numAttrs = 0;
  if (cluster > 1) {
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = unsigned(cluster);
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
  }
  return cfg;
}

template <typename T, int MODE>
void launch_typed(const Params& base, int cluster, cudaStream_t stream) {
  auto kernel = quantize_act_kernel<T, MODE>;
  allow_smem<T, MODE>();
  const int64_t tiles = (base.M + kRows - 1) / kRows;
  constexpr int64_t kMaxTilesPerLaunch = 65535;  // gridDim.y limit
  for (int64_t t0 = 0; t0 < tiles; t0 += kMaxTilesPerLaunch) {
    Params prm = base;
    prm.tile0 = t0;
    const int64_t n = (tiles - t0 < kMaxTilesPerLaunch) ? tiles - t0 : kMaxTilesPerLaunch;
    cudaLaunchAttribute attr[1];
    const cudaLaunchConfig_t cfg = make_config(cluster, n, stream, attr);
    check_call(cudaLaunchKernelEx(&cfg, kernel, prm), "kernel launch");
    check_launch("kernel launch");
  }
}

template <typename T>
void launch_dtype(const Params& base, ActQuant mode, int cluster, cudaStream_t stream) {
  switch (mode) {
    case ActQuant::INT4_G64: launch_typed<T, kInt4>(base, cluster, stream); break;
    case ActQuant::INT8_TOKEN: launch_typed<T, kInt8>(base, cluster, stream); break;
    case ActQuant::FP8_TOKEN: launch_typed<T, kFp8>(base, cluster, stream); break;
  }
}

DeviceInfo device_info() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cached_major[kMaxDevices];
  static std::atomic<int> cached_sms[kMaxDevices];
  static std::atomic<int> cached_cluster[kMaxDevices];
  int dev = 0;
  check_call(cudaGetDevice(&dev), "cudaGetDevice");
  DeviceInfo info;
  if (dev >= 0 && dev < kMaxDevices && cached_sms[dev].load() > 0) {
    info.cc_major = cached_major[dev].load();
    info.sms = cached_sms[dev].load();
    info.max_cluster = cached_cluster[dev].load();
    return info;
  }
  check_call(cudaDeviceGetAttribute(&info.cc_major, cudaDevAttrComputeCapabilityMajor, dev),
             "cudaDeviceGetAttribute");
  check_call(cudaDeviceGetAttribute(&info.sms, cudaDevAttrMultiProcessorCount, dev),
             "cudaDeviceGetAttribute");
  info.max_cluster = 1;
  if (info.cc_major >= 9) {
    auto kernel = quantize_act_kernel<__nv_bfloat16, kInt4>;  // all instantiations use the same resources
    allow_smem<__nv_bfloat16, kInt4>();
    for (int c = kMaxCluster; c > 1; c /= 2) {
      cudaLaunchAttribute attr[1];
      const cudaLaunchConfig_t cfg = make_config(c, 1, nullptr, attr);
      int nclusters = 0;
      const cudaError_t err = cudaOccupancyMaxActiveClusters(&nclusters, kernel, &cfg);
      if (err == cudaSuccess && nclusters > 0) {
        info.max_cluster = c;
        break;
      }
      (void)cudaGetLastError();  // a refused query is not an error of ours
    }
  }
  if (dev >= 0 && dev < kMaxDevices) {
    cached_major[dev].store(info.cc_major);
    cached_cluster[dev].store(info.max_cluster);
    cached_sms[dev].store(info.sms);
  }
  return info;
}

}  // namespace

namespace detail {

// The launch heuristic (see docs/kernels.md). A row tile is split over a cluster of
// `cluster` CTAs along K:
//   * 8-bit modes or more than 32 ranks: at least enough CTAs that each CTA's slice fits its ring
//     (8 warps x 4 groups = 2048 columns): x is read once and further rank chunks replay the ring;
//   * then more, up to 8, until there are about 8 CTAs per SM (2 resident at a time) for balance, while
//     every warp keeps at least two groups.
QuantizeActConfig choose_quantize_act_config(int64_t M, int64_t K, int64_t R, bool smooth, ActQuant mode,
                                             int cc_major, int sms, int max_cluster) {
  QuantizeActConfig c;
  c.cluster = 1;
  if (cc_major < 9 || max_cluster <= 1) return c;
  const int64_t G = (K + kGroup - 1) / kGroup;
  const int64_t tiles = (M + kRows - 1) / kRows;
  int64_t cs = 1;
  (void)smooth;
  if (mode != ActQuant::INT4_G64 || R > kRankChunk) cs = (G + kWarps * kStages - 1) / (kWarps * kStages);
  const int64_t want = (8 * int64_t(sms) + tiles - 1) / tiles;
  int64_t useful = G / (2 * kWarps);
  if (useful < 1) useful = 1;
  if (want > cs) cs = want < useful ? want : (useful > cs ? useful : cs);
  if (cs > max_cluster) cs = max_cluster;
  if (cs < 1) cs = 1;
  c.cluster = int(cs);
  return c;
}

// quantize_act with an explicit configuration (benchmarks and tests).
void quantize_act_with_config(const void* x, DType x_dtype, int64_t M, int64_t K, const float* smooth,
                              const void* lora_down, int64_t R, ActQuant mode, void* q_out,
                              float* scales_out, float* lora_act_out, const QuantizeActConfig& cfg,
                              void* stream);

}  // namespace detail

namespace {

void validate(const void* x, DType x_dtype, int64_t M, int64_t K, const float* smooth,
              const void* lora_down, int64_t R, ActQuant mode, const void* q_out,
              const float* scales_out, const float* lora_act_out) {
  auto bad = [](const std::string& msg) {
    throw std::invalid_argument("lowbit::cuda::quantize_act: " + msg);
  };
  auto aligned = [](const void* ptr, uintptr_t a) { return reinterpret_cast<uintptr_t>(ptr) % a == 0; };
  if (x_dtype != DType::BF16 && x_dtype != DType::F16) bad("x_dtype must be F16 or BF16");
  if (mode != ActQuant::INT4_G64 && mode != ActQuant::INT8_TOKEN && mode != ActQuant::FP8_TOKEN) {
    bad("mode must be INT4_G64, INT8_TOKEN or FP8_TOKEN");
  }
  if (M < 1) bad("M must be >= 1, got " + std::to_string(M));
  if (K < 8 || K % 8 != 0) bad("K must be a positive multiple of 8, got " + std::to_string(K));
  if (mode == ActQuant::INT4_G64 && K % kGroup != 0) {
    bad("K must be a multiple of 64 for INT4_G64, got " + std::to_string(K));
  }
  if (K > (int64_t(1) << 30)) bad("K too large");
  if (M > (int64_t(1) << 40)) bad("M too large");
  if (R < 0 || R > kMaxRank) bad("R must be in [0, 256], got " + std::to_string(R));
  if (x == nullptr) bad("x is null");
  if (q_out == nullptr) bad("q_out is null");
  if (scales_out == nullptr) bad("scales_out is null");
  if (R > 0 && lora_down == nullptr) bad("lora_down is null with R > 0");
  if (R > 0 && lora_act_out == nullptr) bad("lora_act_out is null with R > 0");
  if (!aligned(x, 16)) bad("x must be 16-byte aligned");
  if (smooth != nullptr && !aligned(smooth, 16)) bad("smooth must be 16-byte aligned");
  if (R > 0 && !aligned(lora_down, 16)) bad("lora_down must be 16-byte aligned");
  if (!aligned(q_out, mode == ActQuant::INT4_G64 ? 4 : 8)) {
    bad(std::string("q_out must be ") + (mode == ActQuant::INT4_G64 ? "4" : "8") + "-byte aligned");
  }
  if (!aligned(scales_out, 4)) bad("scales_out must be 4-byte aligned");
  if (R > 0 && !aligned(lora_act_out, 4)) bad("lora_act_out must be 4-byte aligned");
}

}  // namespace

void detail::quantize_act_with_config(const void* x, DType x_dtype, int64_t M, int64_t K,
                                      const float* smooth, const void* lora_down, int64_t R,
                                      ActQuant mode, void* q_out, float* scales_out,
                                      float* lora_act_out, const QuantizeActConfig& cfg, void* stream) {
  validate(x, x_dtype, M, K, smooth, lora_down, R, mode, q_out, scales_out, lora_act_out);
  const int64_t G = (K + kGroup - 1) / kGroup;
  if (cfg.cluster < 1 || cfg.cluster > kMaxCluster || cfg.cluster > G) {
    throw std::invalid_argument("lowbit::cuda::quantize_act: cluster must be in [1, min(8, K/64)]");
  }
  Params p;
  p.x = x;
  p.smooth = smooth;
  p.lora_down = R > 0 ? lora_down : nullptr;
  p.q = q_out;
  p.scales = scales_out;
  p.lora_act = R > 0 ? lora_act_out : nullptr;
  p.M = M;
  p.tile0 = 0;
  p.K = int(K);
  p.R = int(R);
  p.G = int(G);
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (x_dtype == DType::BF16) {
    launch_dtype<__nv_bfloat16>(p, mode, cfg.cluster, st);
  } else {
    launch_dtype<__half>(p, mode, cfg.cluster, st);
  }
}

void quantize_act(const void* x, DType x_dtype, int64_t M, int64_t K, const float* smooth,
                  const void* lora_down, int64_t R, ActQuant mode, void* q_out, float* scales_out,
                  float* lora_act_out, void* stream) {
  validate(x, x_dtype, M, K, smooth, lora_down, R, mode, q_out, scales_out, lora_act_out);
  const DeviceInfo info = device_info();
  const detail::QuantizeActConfig cfg =
      detail::choose_quantize_act_config(M, K, R, smooth != nullptr, mode, info.cc_major, info.sms,
                                         info.max_cluster);
  detail::quantize_act_with_config(x, x_dtype, M, K, smooth, lora_down, R, mode, q_out, scales_out,
                                   lora_act_out, cfg, stream);
}

}  // namespace lowbit::cuda
