// W4A4 and W4A8 GEMMs with the SVDQuant epilogue (ops lowbit::gemm_w4a4 / lowbit::gemm_w4a8):
//   out[m, n] = sum_g P_g[m, n] * act_scale * w_scales[n, g]  + lora_act[m] . lora_up[n]  + bias[n]
// where P_g is the exact integer dot product of the int4 weights with the int4 (W4A4, per-token-per-group
// scales) or int8 (W4A8, per-token scale applied once at the end) activations over K group g (64 wide).
// Exact contract: docs/formats.md; design and measured rates: docs/kernels.md ("W4A4 / W4A8 GEMM").
//
// Hopper has no 4-bit tensor cores (int4 mma.sync runs at 49 TOP/s on an H100), so every 4-bit value is
// widened to int8 and multiplied on the int8 tensor cores (mma.sync.m16n8k32, 1286 TOP/s measured from
// registers). Three choices keep the widening and the per-group promotion cheap:
//
// 1. K order. Inside one MMA the order of k is free as long as A and B agree, and inside one 64-group
//    the scale is constant. Lane (g, t) takes for K group h the 8 bytes [h*32 + 8t, +8) of its row of
//    the natural packed layout (docs/formats.md: even k in the low nibble), i.e. the 16 logical k
//    16t..16t+15 of the group; word 0 feeds the first k32 MMA and word 1 the second, the low nibbles
//    (even k) go to the fragment's k slots 4t..4t+3 and the high nibbles (odd k) to slots 16+4t... Both
//    operands use the same map, so the packed layout the quantizer and the checkpoint already hold IS the
//    fragment order: no offline permutation, one 64-bit shared load per operand row per group.
// 2. Widening without sign extension. A nibble q moved to the high half of its byte is the int8 16*q
//    (exact, -128..112): `w & 0xF0F0F0F0` gives the odd k, `(w << 4) & 0xF0F0F0F0` the even k: three ALU
//    operations per 8 values. P is then 256*P (W4A4) or 16*P (W4A8); the 1/256 or 1/16 is folded into the
//    weight scale (a power of two: exact).
// 3. Promotion in two fp32 instructions. The first MMA of a group starts its int32 accumulator at
//    0x4B400000 (the bits of 1.5 * 2^23) instead of 0. |P| < 2^21, so the int32 result read as a float is
//    exactly 12582912 + P; fma(that, s, -12582912 * s) is P * s rounded once (-12582912 * s is exact:
//    s is a bf16 times a power of two). W4A4 then does acc = fma(t, act_scale, acc); W4A8 acc += t.
//    No int->float conversion (quarter rate on sm_90) and no zeroing.
//
// Tiles (TileConfig; chosen by M in gemm_w4): for M > 256 a CTA computes 128 x 128 outputs with 8 warps
// (2 along M x 4 along N, 64 x 32 each); fewer tokens use 128 x 64 or 32 x 64 tiles so the weight stream
// spreads over more SMs. K advances 128 at a time (two groups) through a 4-stage cp.async ring. Shared-
// memory rows are XOR-swizzled at 16-byte granularity so the fragment loads are conflict-free. Scales are
// fetched into registers at the top of an iteration and stored to the ring slot at the bottom (their latency
// hides behind the MMAs). Measured rates and what limits them (issue-bound: ~12 instructions per IMMA, the
// two-FFMA promotion being the largest share): docs/kernels.md.
// Epilogue: W4A8 multiplies by the token scale; the low-rank branch runs on the tf32 tensor cores into
// the same fp32 accumulators (lora_act split into a tf32 high and low part, lora_up exact in tf32:
// ~21-bit products, fp32 sums); then bias and the store. Out-of-range rows, columns and the odd last K
// group arrive as zeros (cp.async zero-fill) and are masked at the store.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "lowbit/cuda_api.h"
#include "lowbit/epilogue.cuh"
#include "lowbit/gemm_w4_sm90.h"
#include "lowbit/ptx.cuh"

namespace lowbit::cuda {
namespace {

using namespace lowbit::cuda::ptx;
using namespace lowbit::cuda::epi;

constexpr int kMagicBits = 0x4B400000;
constexpr float kMagic = 12582912.0f;
constexpr uint32_t kHighNibbles = 0xF0F0F0F0u;

// Tile configuration: kWarpsM x kWarpsN warps, each owning kMT m16 tiles x kNT n8 tiles; K in steps of
// 128 (two 64-groups) through a kStages-deep cp.async ring; kMinBlocks CTAs per SM for __launch_bounds__.
template <int WarpsM, int WarpsN, int MT, int NT, int Stages, int MinBlocks>
struct TileConfig {
  static constexpr int kWarpsM = WarpsM, kWarpsN = WarpsN, kMT = MT, kNT = NT, kStages = Stages;
  static constexpr int kMinBlocks = MinBlocks;
  static constexpr int kThreads = WarpsM * WarpsN * 32;
  static constexpr int kBM = WarpsM * MT * 16, kBN = WarpsN * NT * 8, kBK = 128;
};
using DefaultConfig = TileConfig<2, 4, 4, 4, 4, 1>;  // 128 x 128, 8 warps of 64 x 32
using MediumMConfig = TileConfig<2, 2, 4, 4, 4, 2>;   // 128 x 64, 4 warps, two CTAs per SM
using SmallMConfig = TileConfig<1, 2, 2, 4, 4, 4>;    // 32 x 64, 2 warps, four CTAs per SM

template <bool kA8, class C>
struct Layout {
  static constexpr int kA = kA8 ? C::kBM * C::kBK : C::kBM * C::kBK / 2;  // activation bytes per stage
  static constexpr int kB = C::kBN * C::kBK / 2;                           // packed weight bytes per stage
  static constexpr int kSa = kA8 ? 0 : 2 * C::kBM * 4;                     // fp32 act scales [2][kBM]
  static constexpr int kSw = 2 * C::kBN * 8;                               // (s, -magic s) [2][kBN]
  static constexpr int kStage = kA + kB + kSa + kSw;
  static constexpr int kSmem = kStage * C::kStages;
  // Scale entries fetched per thread and stage (2 groups x rows, spread over the threads).
  static constexpr int kScaleRows = C::kBM > C::kBN ? C::kBM : C::kBN;
  static constexpr int kScalesPerThread = (2 * kScaleRows + C::kThreads - 1) / C::kThreads;
};

using Params = GemmW4Problem;  // csrc/include/lowbit/gemm_w4_sm90.h

// Byte offset of 16-byte chunk `ch` of row `row` in a stage's packed-int4 tile (64 bytes per row).
// XOR with (row & 2): the 16 lanes of one 64-bit load phase (rows r..r+3, two chunks each) hit 32
// distinct banks.
__device__ __forceinline__ int int4_tile_offset(int row, int ch) { return row * 64 + ((ch ^ (row & 2)) << 4); }
// Same for the int8 activation tile (128 bytes per row): the 8 lanes of one 128-bit load phase cover
// rows r, r+1 x 4 chunks; XOR with (row & 1) << 2 puts the odd row in the other 64 bytes of the banks.
__device__ __forceinline__ int int8_tile_offset(int row, int ch) {
  return row * 128 + ((ch ^ ((row & 1) << 2)) << 4);
}

template <bool kA8, class C>
__global__ void __launch_bounds__(C::kThreads, C::kMinBlocks) gemm_w4_kernel(const Params p) {
  using L = Layout<kA8, C>;
  constexpr int kThreads = C::kThreads, kBM = C::kBM, kBN = C::kBN, kBK = C::kBK, kStages = C::kStages;
  constexpr int kMT = C::kMT, kNT = C::kNT, kWarpsN = C::kWarpsN;
  constexpr int kWarpRows = kMT * 16, kWarpCols = kNT * 8;
  static_assert((kBM * 4) % kThreads == 0 && (kBN * 4) % kThreads == 0, "tile rows must split over the threads");
  extern __shared__ __align__(128) uint8_t smem[];

  const int tid = threadIdx.x;
  const int lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int wm = warp / kWarpsN, wn = warp % kWarpsN;
  const int m0 = blockIdx.x * kBM, n0 = blockIdx.y * kBN;
  const int G = p.K / 64;
  const int KT = (G + 1) / 2;
  const int64_t act_row = kA8 ? p.K : p.K / 2;
  const int64_t w_row = p.K / 2;

  // ---- producers -------------------------------------------------------------------------------------
  auto load_tiles = [&](int kt, int s) {
    uint8_t* As = smem + s * L::kStage;
    uint8_t* Bs = As + L::kA;
    if constexpr (kA8) {
#pragma unroll
      for (int i = 0; i < kBM * 8 / kThreads; ++i) {  // kBM rows x 8 chunks of 16 int8
        const int c = tid + i * kThreads, row = c >> 3, ch = c & 7;
        const int m = m0 + row, k = kt * kBK + ch * 16;
        const bool ok = m < p.M && k < p.K;
        cp_async16(As + int8_tile_offset(row, ch), ok ? p.act + m * act_row + k : p.act, ok);
      }
    } else {
#pragma unroll
      for (int i = 0; i < kBM * 4 / kThreads; ++i) {  // kBM rows x 4 chunks of 32 packed int4
        const int c = tid + i * kThreads, row = c >> 2, ch = c & 3;
        const int m = m0 + row, k = kt * kBK + ch * 32;
        const bool ok = m < p.M && k < p.K;
        cp_async16(As + int4_tile_offset(row, ch), ok ? p.act + m * act_row + k / 2 : p.act, ok);
      }
    }
#pragma unroll
    for (int i = 0; i < kBN * 4 / kThreads; ++i) {  // kBN weight rows x 4 chunks
      const int c = tid + i * kThreads, row = c >> 2, ch = c & 3;
      const int n = n0 + row, k = kt * kBK + ch * 32;
      const bool ok = n < p.N && k < p.K;
      cp_async16(Bs + int4_tile_offset(row, ch), ok ? p.w + n * w_row + k / 2 : p.w, ok);
    }
  };

  // Scales of stage kt: entry e = tid + i * kThreads is row/column e / 2 of group kt * 2 + e % 2.
  constexpr int kSpt = L::kScalesPerThread;
  auto fetch_scales = [&](int kt, float (&sa)[kSpt], uint32_t (&sw)[kSpt]) {
#pragma unroll
    for (int i = 0; i < kSpt; ++i) {
      const int e = tid + i * kThreads, row = e >> 1, grp = kt * 2 + (e & 1);
      sa[i] = 0.f;
      sw[i] = 0;
      if (!kA8 && row < kBM && m0 + row < p.M && grp < G) sa[i] = __ldg(p.act_scales + int64_t(m0 + row) * G + grp);
      if (row < kBN && n0 + row < p.N && grp < G) sw[i] = __ldg(p.w_scales + int64_t(n0 + row) * G + grp);
    }
  };
  auto store_scales = [&](int s, const float (&sa)[kSpt], const uint32_t (&sw)[kSpt]) {
    uint8_t* base = smem + s * L::kStage + L::kA + L::kB;
#pragma unroll
    for (int i = 0; i < kSpt; ++i) {
      const int e = tid + i * kThreads, row = e >> 1, h = e & 1;
      if (!kA8 && row < kBM) reinterpret_cast<float*>(base)[h * kBM + row] = sa[i];
      // P carries 16 (W4A8) or 256 (W4A4) from the widening; fold it into the weight scale (exact).
      const float sc = bf16_bits_to_float(sw[i]) * (kA8 ? 0.0625f : 0.00390625f);
      if (row < kBN) reinterpret_cast<float2*>(base + L::kSa)[h * kBN + row] = make_float2(sc, -kMagic * sc);
    }
  };

  float acc[kMT][kNT][4];
#pragma unroll
  for (int i = 0; i < kMT; ++i)
#pragma unroll
    for (int j = 0; j < kNT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

  // ---- consumer: two K groups of one stage ----------------------------------------------------------
  auto compute = [&](int s) {
    const uint8_t* As = smem + s * L::kStage;
    const uint8_t* Bs = As + L::kA;
    const float* sa_s = reinterpret_cast<const float*>(Bs + L::kB);
    const float4* sw_s = reinterpret_cast<const float4*>(Bs + L::kB + L::kSa);
    const int magic[4] = {kMagicBits, kMagicBits, kMagicBits, kMagicBits};
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      uint32_t b[kNT][2][2];  // [n tile][k32 block][b0, b1]
      float4 sw[kNT];         // (s, -magic s) of columns 2t and 2t + 1
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
        const int row = wn * kWarpCols + nt * 8 + g;
        const uint2 v = *reinterpret_cast<const uint2*>(Bs + int4_tile_offset(row, h * 2 + (t >> 1)) + ((t & 1) << 3));
        b[nt][0][0] = (v.x << 4) & kHighNibbles;
        b[nt][0][1] = v.x & kHighNibbles;
        b[nt][1][0] = (v.y << 4) & kHighNibbles;
        b[nt][1][1] = v.y & kHighNibbles;
        sw[nt] = sw_s[(h * kBN + wn * kWarpCols + nt * 8 + 2 * t) >> 1];
      }
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        const int r0 = wm * kWarpRows + mt * 16 + g, r1 = r0 + 8;
        uint32_t a[2][4];  // [k32 block][a0..a3]
        if constexpr (kA8) {
          // Bytes 16t..16t+15 of the group: block 0 = bytes 0..7, block 1 = bytes 8..15; even bytes go to
          // k slots 4t.., odd bytes to 16 + 4t.. (the same map as the nibbles of the weights).
          const uint4 v0 = *reinterpret_cast<const uint4*>(As + int8_tile_offset(r0, h * 4 + t));
          const uint4 v1 = *reinterpret_cast<const uint4*>(As + int8_tile_offset(r1, h * 4 + t));
          a[0][0] = prmt(v0.x, v0.y, 0x6420);
          a[0][1] = prmt(v1.x, v1.y, 0x6420);
          a[0][2] = prmt(v0.x, v0.y, 0x7531);
          a[0][3] = prmt(v1.x, v1.y, 0x7531);
          a[1][0] = prmt(v0.z, v0.w, 0x6420);
          a[1][1] = prmt(v1.z, v1.w, 0x6420);
          a[1][2] = prmt(v0.z, v0.w, 0x7531);
          a[1][3] = prmt(v1.z, v1.w, 0x7531);
        } else {
          const int off = ((t & 1) << 3);
          const uint2 v0 = *reinterpret_cast<const uint2*>(As + int4_tile_offset(r0, h * 2 + (t >> 1)) + off);
          const uint2 v1 = *reinterpret_cast<const uint2*>(As + int4_tile_offset(r1, h * 2 + (t >> 1)) + off);
          a[0][0] = (v0.x << 4) & kHighNibbles;
          a[0][1] = (v1.x << 4) & kHighNibbles;
          a[0][2] = v0.x & kHighNibbles;
          a[0][3] = v1.x & kHighNibbles;
          a[1][0] = (v0.y << 4) & kHighNibbles;
          a[1][1] = (v1.y << 4) & kHighNibbles;
          a[1][2] = v0.y & kHighNibbles;
          a[1][3] = v1.y & kHighNibbles;
        }
        float sa0 = 1.f, sa1 = 1.f;
        if constexpr (!kA8) {
          sa0 = sa_s[h * kBM + r0];
          sa1 = sa_s[h * kBM + r1];
        }
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) {
          int d[4];
          mma_s8_16832(d, a[0], b[nt][0][0], b[nt][0][1], magic);
          mma_s8_16832(d, a[1], b[nt][1][0], b[nt][1][1], d);
          const float t0 = fmaf(__int_as_float(d[0]), sw[nt].x, sw[nt].y);
          const float t1 = fmaf(__int_as_float(d[1]), sw[nt].z, sw[nt].w);
          const float t2 = fmaf(__int_as_float(d[2]), sw[nt].x, sw[nt].y);
          const float t3 = fmaf(__int_as_float(d[3]), sw[nt].z, sw[nt].w);
          if constexpr (kA8) {
            acc[mt][nt][0] += t0;
            acc[mt][nt][1] += t1;
            acc[mt][nt][2] += t2;
            acc[mt][nt][3] += t3;
          } else {
            acc[mt][nt][0] = fmaf(t0, sa0, acc[mt][nt][0]);
            acc[mt][nt][1] = fmaf(t1, sa0, acc[mt][nt][1]);
            acc[mt][nt][2] = fmaf(t2, sa1, acc[mt][nt][2]);
            acc[mt][nt][3] = fmaf(t3, sa1, acc[mt][nt][3]);
          }
        }
      }
    }
  };

  // ---- main loop: cp.async ring, one barrier per stage -----------------------------------------------
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < KT) {
      load_tiles(s, s);
      float sa[kSpt];
      uint32_t sw[kSpt];
      fetch_scales(s, sa, sw);
      store_scales(s, sa, sw);
    }
    cp_async_commit();
  }
  for (int kt = 0; kt < KT; ++kt) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // stage kt landed for every thread; stage kt - 1 is no longer read
    const int nk = kt + kStages - 1;
    const bool more = nk < KT;
    float sa[kSpt];
    uint32_t sw[kSpt];
    if (more) {
      fetch_scales(nk, sa, sw);
      load_tiles(nk, nk % kStages);
    }
    cp_async_commit();
    compute(kt % kStages);
    if (more) store_scales(nk % kStages, sa, sw);  // read after the barrier of iteration nk
  }
  cp_async_wait<0>();

  // ---- epilogue --------------------------------------------------------------------------------------
  const int row_base = m0 + wm * kWarpRows + g;
  const int col_base = n0 + wn * kWarpCols + 2 * t;
  if constexpr (kA8) {
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
      const float s0 = __ldg(p.act_scales + min(row_base + mt * 16, p.M - 1));
      const float s1 = __ldg(p.act_scales + min(row_base + mt * 16 + 8, p.M - 1));
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
        acc[mt][nt][0] *= s0;
        acc[mt][nt][1] *= s0;
        acc[mt][nt][2] *= s1;
        acc[mt][nt][3] *= s1;
      }
    }
  }
  // Low-rank branch on the tf32 tensor cores. K order again free: lane t's k slots t and t + 4 take
  // ranks r + 2t and r + 2t + 1, so each operand is one 8-byte (lora_act) or 4-byte (lora_up) load.
  for (int r = 0; r < p.R; r += 8) {
    uint32_t bu[kNT][2];
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
      const int n = min(n0 + wn * kWarpCols + nt * 8 + g, p.N - 1);
      load_up_pair(p.lora_up, int64_t(n) * p.R + r + 2 * t, p.up_fp16 != 0, bu[nt][0], bu[nt][1]);
    }
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
      const int m_lo = min(row_base + mt * 16, p.M - 1), m_hi = min(row_base + mt * 16 + 8, p.M - 1);
      const float2 x0 = __ldg(reinterpret_cast<const float2*>(p.lora_act + int64_t(m_lo) * p.R + r + 2 * t));
      const float2 x1 = __ldg(reinterpret_cast<const float2*>(p.lora_act + int64_t(m_hi) * p.R + r + 2 * t));
      const float xs[4] = {x0.x, x1.x, x0.y, x1.y};
      uint32_t hi[4], lo[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        hi[e] = to_tf32(xs[e]);
        lo[e] = __float_as_uint(xs[e] - __uint_as_float(hi[e]));  // exact; the MMA keeps its top 11 bits
      }
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
        mma_tf32_1688(acc[mt][nt], lo, bu[nt][0], bu[nt][1]);
        mma_tf32_1688(acc[mt][nt], hi, bu[nt][0], bu[nt][1]);
      }
    }
  }
  const bool vec = (p.N & 1) == 0;
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt) {
    const int n = col_base + nt * 8;
    if (n >= p.N) continue;
    const bool both = n + 1 < p.N;
    float b0 = 0.f, b1 = 0.f;
    if (p.bias != nullptr) {
      b0 = load_as_float(p.bias, n, p.bias_dtype);
      if (both) b1 = load_as_float(p.bias, n + 1, p.bias_dtype);
    }
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int m = row_base + mt * 16 + half * 8;
        if (m >= p.M) continue;
        store_pair(p.out, int64_t(m) * p.N + n, acc[mt][nt][2 * half] + b0, acc[mt][nt][2 * half + 1] + b1,
                   both, vec, p.out_dtype);
      }
    }
  }
}

void check(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument("lowbit gemm (CUDA): " + what);
}

bool aligned(const void* p, uintptr_t n) { return (reinterpret_cast<uintptr_t>(p) % n) == 0; }

template <bool kA8, class C = DefaultConfig>
void launch(const Params& p, cudaStream_t stream) {
  const int smem = Layout<kA8, C>::kSmem;
  // The opt-in to more than 48 KB of dynamic shared memory is per device and function: once each, not per
  // call (this is on the per-layer hot path).
  static std::atomic<uint64_t> opted_in{0};
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  const uint64_t bit = device < 64 ? (uint64_t(1) << device) : 0;
  if (err == cudaSuccess && (bit == 0 || !(opted_in.load(std::memory_order_relaxed) & bit))) {
    err = cudaFuncSetAttribute(gemm_w4_kernel<kA8, C>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err == cudaSuccess) opted_in.fetch_or(bit, std::memory_order_relaxed);
  }
  if (err != cudaSuccess) throw std::runtime_error(std::string("lowbit gemm: ") + cudaGetErrorString(err));
  const dim3 grid((p.M + C::kBM - 1) / C::kBM, (p.N + C::kBN - 1) / C::kBN);
  gemm_w4_kernel<kA8, C><<<grid, C::kThreads, smem, stream>>>(p);
  err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string("lowbit gemm launch: ") + cudaGetErrorString(err));
}

// LOWBIT_GEMM_W4_KERNEL = auto (default) | wgmma | mma: which W4 kernel runs where both could. Read on
// every call (a getenv is far below a launch) so tests and benchmarks can measure both in one process.
enum class KernelChoice { kAuto, kWgmma, kMmaSync };
KernelChoice kernel_choice() {
  const char* v = std::getenv("LOWBIT_GEMM_W4_KERNEL");
  if (v == nullptr || v[0] == '\0' || std::string(v) == "auto") return KernelChoice::kAuto;
  if (std::string(v) == "wgmma") return KernelChoice::kWgmma;
  if (std::string(v) == "mma") return KernelChoice::kMmaSync;
  throw std::invalid_argument(std::string("LOWBIT_GEMM_W4_KERNEL must be auto, wgmma or mma, got ") + v);
}

}  // namespace

void gemm_w4(ActQuant act_kind, const void* act, const float* act_scales, const uint8_t* w,
             const void* w_scales, int64_t M, int64_t N, int64_t K, const float* lora_act,
             const void* lora_up, DType up_dtype, int64_t R, const void* bias, DType bias_dtype, void* out,
             DType out_dtype, void* stream) {
  check(M >= 1 && N >= 1, "M and N must be >= 1, got M=" + std::to_string(M) + " N=" + std::to_string(N));
  check(K >= 64 && K % 64 == 0, "K must be a positive multiple of 64, got " + std::to_string(K));
  check(M < (int64_t(1) << 31) && N <= 65535LL * 64 && K < (int64_t(1) << 30), "sizes out of range");
  check(R >= 0 && R % 8 == 0, "rank must be a multiple of 8 (tf32 MMA k8 steps), got " + std::to_string(R));
  check(R == 0 || (lora_act != nullptr && lora_up != nullptr), "rank > 0 needs lora_act and lora_up");
  check(R == 0 || up_dtype == DType::BF16 || up_dtype == DType::F16, "lora_up must be bf16 or fp16");
  check(out_dtype == DType::F32 || out_dtype == DType::F16 || out_dtype == DType::BF16,
        "out dtype must be fp32, fp16 or bf16");
  check(bias == nullptr || bias_dtype == DType::F32 || bias_dtype == DType::F16 || bias_dtype == DType::BF16,
        "bias dtype must be fp32, fp16 or bf16");
  check(aligned(act, 16) && aligned(w, 16), "act and w must be 16-byte aligned (cp.async)");
  check(aligned(w_scales, 2) && aligned(act_scales, 4), "scales must be aligned to their element size");
  check(R == 0 || (aligned(lora_act, 8) && aligned(lora_up, 4)), "lora_act / lora_up misaligned");
  check(act_kind == ActQuant::INT4_G64 || act_kind == ActQuant::INT8_TOKEN || act_kind == ActQuant::FP8_TOKEN,
        "unknown activation encoding " + std::to_string(static_cast<int>(act_kind)));
  Params p{};
  p.act = static_cast<const uint8_t*>(act);
  p.act_scales = act_scales;
  p.w = w;
  p.w_scales = static_cast<const uint16_t*>(w_scales);
  p.lora_act = lora_act;
  p.lora_up = lora_up;
  p.bias = bias;
  p.out = out;
  p.M = int(M);
  p.N = int(N);
  p.K = int(K);
  p.R = int(R);
  p.up_fp16 = up_dtype == DType::F16;
  p.bias_dtype = static_cast<int>(bias_dtype);
  p.out_dtype = static_cast<int>(out_dtype);
  auto s = static_cast<cudaStream_t>(stream);
  const KernelChoice choice = kernel_choice();
  if (act_kind == ActQuant::FP8_TOKEN) {
    // fp8 tokens only exist on the wgmma path (e4m3 tensor cores), whatever LOWBIT_GEMM_W4_KERNEL says;
    // the ops layer checks availability before it picks this backend.
    check(gemm_w4_sm90_available(), "fp8 tokens need the sm_90a wgmma kernel (a Hopper GPU and a build with "
                                    "LOWBIT_CUDA_ARCHS containing 90a)");
    gemm_w4_sm90(act_kind, p, s);
    return;
  }
  // W4A4: the mma.sync kernel below by default. The wgmma kernel computes the same (tests: exact integer
  // parts on both) but measured slower for int4 tokens on the H100 (its producer warps widen every token
  // to e4m3 and the promotion is FMUL + FFMA: issue-bound; docs/kernels.md). LOWBIT_GEMM_W4_KERNEL=wgmma
  // selects it.
  if (act_kind == ActQuant::INT4_G64 && choice == KernelChoice::kWgmma && gemm_w4_sm90_available()) {
    gemm_w4_sm90(act_kind, p, s);
    return;
  }
  const bool act_int8 = act_kind == ActQuant::INT8_TOKEN;
  // Few tokens: the 128 x 128 tile would leave most SMs idle (N = 3072 gives 24 CTAs), so smaller tiles
  // spread the weight stream over more SMs (the kernel is then bound by reading the weights).
  if (M <= 32) {
    act_int8 ? launch<true, SmallMConfig>(p, s) : launch<false, SmallMConfig>(p, s);
  } else if (M <= 256) {
    act_int8 ? launch<true, MediumMConfig>(p, s) : launch<false, MediumMConfig>(p, s);
  } else {
    act_int8 ? launch<true>(p, s) : launch<false>(p, s);
  }
}

bool gemm_w4_fp8_supported() { return gemm_w4_sm90_available(); }

}  // namespace lowbit::cuda
