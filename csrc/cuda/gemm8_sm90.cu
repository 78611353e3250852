// Persistent, warp-specialized 8-bit GEMM for Hopper (sm_90a): TMA loads with 2-CTA multicast of the token
// tile, two consumer warpgroups on the fp8 wgmma tensor cores, the whole K in the wgmma accumulators (no
// per-group promotion: the F8L layout folds the group scale into the e4m3 weight), and the SVDQuant epilogue
// (row x token scales, the low-rank up-projection as a bf16 wgmma into the same accumulators, bias, optional
// GELU, bf16 out through a TMA store). Contract: lowbit/gemm8_sm90.h. Design: docs/kernels.md ("Persistent
// TMA 8-bit GEMM"). Off by default (LOWBIT_GEMM8_CUDA=1 registers it as the `cuda` backend of
// lowbit::gemm_w4a8_f8l) until a GPU run shows it beats the Triton path.
//
// Roles: the CTA computes out^T. The weights are wgmma's A operand (M side: 256 rows per CTA, 128 per
// consumer warpgroup = two m64 sub-tiles), the tokens are B (N side: kTok per CTA) in shared memory.
//   FP8 weights (the skeleton's gate): A is read from shared memory too (wgmma SS).
//   F8L weights: TMA brings the packed 4-bit codes; each consumer thread reads, for its rows g and g + 8 of
//     each sub-tile, the 16-bit piece of codes that is its A fragment (k 4t..4t+3 and 16 + 4t.. of each k32
//     step) and widens it to e4m3 through the row's (row, group) lookup table with three byte permutes
//     (lut_convert4). The table (8 e4m3 magnitudes gs * m, m = 0..7, and the same with the sign bit) is
//     built once per (row, group) from the e4m3 group scale with f16x2 multiplies, which are exact here.
// CTA = 3 warpgroups (384 threads):
//   warpgroup 0: the producer. One thread waits for a free ring slot (empty barrier: released by the 8
//     consumer warps of BOTH CTAs of the cluster, since the peer's multicast writes into this CTA too), arms
//     the full barrier with the stage's byte count and issues two TMA loads: its 256 weight rows, and its
//     half of the token tile multicast to both CTAs. setmaxnreg gives its registers to the consumers.
//   warpgroups 1-2: the consumers (232 registers each thread). Per stage: wait for the full barrier, 4 k32
//     steps of 2 wgmmas (one per sub-tile), keep one step in flight (wait_group 1), release the previous
//     slot. After the last stage of a unit: the epilogue, while the producer already loads the next unit.
// Persistence: grid = 2 x (resident clusters); cluster c runs units c, c + clusters, ... of the schedule in
// lowbit/sm90_gemm8_schedule.h (grouped rasterization, K splits for small M), which the CPU tests check.
// Small M (kTok = 32): K is split so at least two waves of units stream the weights; each unit adds its
// scaled partial sums into an fp32 workspace and a finishing kernel applies the low-rank term, bias, GELU.
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <mutex>
#include <stdexcept>
#include <string>

#include "lowbit/epilogue.cuh"
#include "lowbit/gemm8_sm90.h"
#include "lowbit/ptx.cuh"
#include "lowbit/sm90_gemm8_schedule.h"
#include "lowbit/tma.cuh"
#include "lowbit/wgmma.cuh"

namespace lowbit::cuda {
namespace {

using gemm8::Gemm8Schedule;
using gemm8::Gemm8Unit;
using gemm8::PipeState;

constexpr int kThreads = 384;
constexpr int kRows = gemm8::kGemm8RowsPerCta;  // 256 weight rows per CTA
constexpr int kCluster = gemm8::kGemm8Cluster;  // 2
constexpr int kStageK = gemm8::kGemm8StageK;    // 128
constexpr int kMaxR = 64;                       // low-rank width the epilogue tile holds (128-byte rows)
constexpr int kSmemBudget = 232448;             // opt-in dynamic shared memory per block on sm_90
[[maybe_unused]] constexpr int kConsumerWarps = 8;  // both consumer warpgroups release every slot

template <Gemm8Weights kW, int kTok>
struct Cfg {
  static constexpr bool kF8L = kW == Gemm8Weights::F8L;
  static constexpr bool kSplit = kTok == 32;           // small M: fp32 partial sums, finishing kernel
  static constexpr int kB = kTok * kStageK;            // e4m3 token tile of a stage (128-byte rows)
  static constexpr int kHalfB = kB / kCluster;         // the half each CTA loads and multicasts
  static constexpr int kA = kF8L ? kRows * kStageK / 2 : kRows * kStageK;  // codes (64 B/row) or e4m3
  static constexpr int kStage = kB + kA;               // multiples of 1024 (swizzle atoms stay aligned)
  static constexpr int kDPerWg = kSplit ? 0 : 2 * kTok * 128;  // two [kTok][64 bf16] output tiles
  static constexpr int kD = 2 * kDPerWg;
  static constexpr int kFixed = 1024 /* alignment slack */ + 2 * 8 * 8 /* barriers */;
  static constexpr int kFit = (kSmemBudget - kFixed - kD) / kStage;
  static constexpr int kStages = kFit > 8 ? 8 : kFit;
  static constexpr int kBarOff = kStages * kStage + kD;
  static constexpr int kTotal = 1024 + kBarOff + 2 * kStages * 8;
  static_assert(kStages >= 3, "shared memory too small for a 3-stage ring");
  static_assert(kB % 1024 == 0 && kA % 1024 == 0 && kHalfB % 1024 == 0, "tiles must keep 1024-byte alignment");
  static_assert(kTotal <= kSmemBudget, "shared memory over budget");
};

struct Params {
  CUtensorMap tm_act;  // e4m3 tokens [M, K]: box 128 k x kTok/2 rows, 128-byte swizzle
  CUtensorMap tm_w;    // FP8: e4m3 [N, K], box 128 x 256, 128-byte swizzle; F8L: codes [N, K/2], 64 x 256, 64B
  CUtensorMap tm_out;  // bf16 [M, N]: box 64 n x kTok tokens, 128-byte swizzle (not used when split)
  const float* act_scales;
  const uint8_t* gscales;  // F8L e4m3 [N, K/64]
  const float* row_scale;  // [N] or null
  const float* lora_act;
  const __nv_bfloat16* lora_up;
  const void* bias;
  float* ws;
  int bias_dtype, M, N, K, R, gelu;
  Gemm8Schedule sched;
};

#ifdef LOWBIT_SM90A_DEVICE
__device__ __forceinline__ float gelu_tanh(float x) {
  const float k0 = 0.7978845608028654f, k1 = 0.044715f;
  return 0.5f * x * (1.f + tanhf(k0 * (x + k1 * x * x * x)));
}

__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// The (row, group) lookup table of F8L: pos bytes j = e4m3(gs * j), neg = pos with the sign bit.
struct Lut {
  uint32_t pl, ph, nl, nh;
};
__device__ __forceinline__ Lut lut_build(uint32_t gs_byte) {
  const uint32_t f = sm90::e4m3x2_to_f16x2(static_cast<uint16_t>(gs_byte * 0x0101u));  // {gs, gs}
  // f16 products of an e4m3 scale (4 significant bits, <= 64) and m <= 7 are exact, so the RNE cast to
  // e4m3 is the contract's e4m3(float(gs) * m).
  const uint32_t e01 = sm90::f16x2_to_e4m3x2(sm90::hmul2(f, 0x3C000000u));  // {0, 1}
  const uint32_t e23 = sm90::f16x2_to_e4m3x2(sm90::hmul2(f, 0x42004000u));  // {2, 3}
  const uint32_t e45 = sm90::f16x2_to_e4m3x2(sm90::hmul2(f, 0x45004400u));  // {4, 5}
  const uint32_t e67 = sm90::f16x2_to_e4m3x2(sm90::hmul2(f, 0x47004600u));  // {6, 7}
  Lut l;
  l.pl = e01 | (e23 << 16);
  l.ph = e45 | (e67 << 16);
  l.nl = l.pl | 0x80808080u;
  l.nh = l.ph | 0x80808080u;
  return l;
}
// Four codes (code i in bits 4i..4i+3: sign bit 3, magnitude bits 0-2) -> four e4m3 bytes.
__device__ __forceinline__ uint32_t lut_convert4(uint32_t c, const Lut& l) {
  const uint32_t idx = c & 0x7777u;
  const uint32_t sel = ((c >> 1) & 0x4444u) | 0x3210u;  // byte i: pos (i) or, for a set sign bit, neg (i + 4)
  return ptx::prmt(ptx::prmt(l.pl, l.ph, idx), ptx::prmt(l.nl, l.nh, idx), sel);
}

template <int kTok>
__device__ __forceinline__ void wgmma_rs(float (&d)[kTok / 2], const uint32_t (&a)[4], uint64_t desc, int acc) {
  if constexpr (kTok == 128) {
    sm90::wgmma_e4m3_m64n128k32_rs(d, a, desc, acc);
  } else {
    static_assert(kTok == 32, "token tile must be 128 or 32");
    sm90::wgmma_e4m3_m64n32k32_rs(d, a, desc, acc);
  }
}

// One consumer warp's release of ring slot `slot`: lane r arrives on the empty barrier of cluster rank r.
__device__ __forceinline__ void release_slot(uint64_t* empty, int slot, int lane) {
  __syncwarp();
  if (lane < kCluster) sm90::mbar_arrive_cluster(&empty[slot], static_cast<uint32_t>(lane));
}

// The low-rank up-projection of one consumer thread: kSteps k16 steps of lora_up rows (bf16 A fragments:
// a0 row g k 2t, a1 row g + 8, a2 / a3 k + 8; rows from global, 0 past N) against the bf16 lora_act tile at
// l_addr, accumulated into acc (which the caller scaled: hence the fence before the first wgmma).
template <int kSteps>
__device__ __forceinline__ void lora_mma(float (&acc)[2][64], const Params& p, int row0, int t, uint32_t l_addr) {
  uint32_t up[kSteps][2][4];
#pragma unroll
  for (int ks = 0; ks < kSteps; ++ks)
#pragma unroll
    for (int a = 0; a < 2; ++a)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int n = row0 + 64 * a + 8 * (r & 1);
        const int k = 16 * ks + 2 * t + 8 * (r >> 1);
        up[ks][a][r] = n < p.N ? __ldg(reinterpret_cast<const unsigned int*>(p.lora_up + int64_t(n) * p.R + k)) : 0u;
      }
#pragma unroll
  for (int a = 0; a < 2; ++a)
#pragma unroll
    for (int e = 0; e < 64; ++e) sm90::fence_operand(acc[a][e]);
  sm90::wgmma_fence();
#pragma unroll
  for (int ks = 0; ks < kSteps; ++ks)
#pragma unroll
    for (int a = 0; a < 2; ++a) sm90::wgmma_bf16_m64n128k16_rs(acc[a], up[ks][a], sm90::desc_kmajor_sw128(l_addr + 32 * ks), 1);
  sm90::wgmma_commit();
  sm90::wgmma_wait<0>();
#pragma unroll
  for (int a = 0; a < 2; ++a)
#pragma unroll
    for (int e = 0; e < 64; ++e) sm90::fence_operand(acc[a][e]);
}
#endif  // LOWBIT_SM90A_DEVICE

template <Gemm8Weights kW, int kTok>
__global__ void __launch_bounds__(kThreads, 1) gemm8_sm90_kernel(const __grid_constant__ Params p) {
#ifdef LOWBIT_SM90A_DEVICE
  using C = Cfg<kW, kTok>;
  constexpr int S = C::kStages;
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + C::kBarOff);
  uint64_t* empty = full + S;
  const int wg = threadIdx.x / 128, tid = threadIdx.x % 128;
  const uint32_t rank = sm90::cluster_ctarank();
  const int cluster = static_cast<int>(sm90::cluster_id_x());
  const int clusters = static_cast<int>(sm90::nclusters_x());
  const int units = p.sched.units();

  if (threadIdx.x == 0) {
    for (int s = 0; s < S; ++s) {
      sm90::mbar_init(&full[s], 1);                            // the producer's arrive.expect_tx
      sm90::mbar_init(&empty[s], kConsumerWarps * kCluster);  // every consumer warp of both CTAs
    }
    sm90::fence_barrier_init();
  } else if (threadIdx.x == 32) {
    sm90::tma_prefetch_desc(&p.tm_act);
    sm90::tma_prefetch_desc(&p.tm_w);
    if constexpr (!C::kSplit) sm90::tma_prefetch_desc(&p.tm_out);
  }
  sm90::cluster_sync();  // both CTAs' barriers exist before any multicast or remote arrive reaches them

  if (wg == 0) {
    // ------------------------------------------------ producer ------------------------------------------------
    sm90::regs_dealloc<40>();
    if (tid == 0) {
      PipeState<S> ps;
      for (int u = cluster; u < units; u += clusters) {
        const Gemm8Unit un = p.sched.unit(u);
        const int n0 = (un.n_pair * kCluster + static_cast<int>(rank)) * kRows;
        const int m0 = un.m_block * kTok;
        for (int kb = un.kb_begin; kb < un.kb_end; ++kb) {
          sm90::mbar_wait_cluster(&empty[ps.slot], ps.phase ^ 1u);  // first pass: returns at once
          uint8_t* st = smem + ps.slot * C::kStage;
          sm90::mbar_arrive_expect_tx(&full[ps.slot], C::kStage);  // both token halves + own weights
          sm90::tma_load_2d_multicast(st + rank * C::kHalfB, &p.tm_act, &full[ps.slot], kb * kStageK,
                                      m0 + static_cast<int>(rank) * (kTok / kCluster), uint16_t((1u << kCluster) - 1));
          sm90::tma_load_2d(st + C::kB, &p.tm_w, &full[ps.slot], C::kF8L ? kb * (kStageK / 2) : kb * kStageK, n0);
          ps.advance();
        }
      }
    }
  } else {
    // ------------------------------------------------ consumers -----------------------------------------------
    sm90::regs_alloc<232>();
    const int cw = wg - 1;  // consumer warpgroup: weight rows [128 cw, 128 cw + 128) of the CTA tile
    const int warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
    const int kg = p.K / 64;  // groups per weight row
    // CTA-relative weight row of (sub-tile a, half h): 128 cw + 64 a + 16 warp + g + 8 h.
    const int row_base = 128 * cw + 16 * warp + g;
    float acc[2][kTok / 2];
    PipeState<S> ps;
    for (int u = cluster; u < units; u += clusters) {
      const Gemm8Unit un = p.sched.unit(u);
      const int n0 = (un.n_pair * kCluster + static_cast<int>(rank)) * kRows;
      const int m0 = un.m_block * kTok;
      const int nk = un.kb_end - un.kb_begin;
      int prev_slot = -1;

      if constexpr (C::kF8L) {
        // F8L: the two group scales of this stage for each of the thread's 4 rows, prefetched a stage ahead.
        uint32_t gs_cur[2][2], gs_nxt[2][2];
        const uint8_t* gs_row[2][2];
        bool row_ok[2][2];
#pragma unroll
        for (int a = 0; a < 2; ++a)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int n = n0 + row_base + 64 * a + 8 * h;
            row_ok[a][h] = n < p.N;
            gs_row[a][h] = p.gscales + int64_t(row_ok[a][h] ? n : 0) * kg;
            gs_nxt[a][h] = row_ok[a][h] ? __ldg(reinterpret_cast<const uint16_t*>(gs_row[a][h] + 2 * un.kb_begin)) : 0u;
          }
        // The 64-byte swizzle of the code tile: 16-byte chunk c of row r sits at c ^ ((r >> 1) & 3); for the
        // thread's rows that is (g >> 1) & 3 (the other terms of the row are multiples of 8).
        const int swz = (g >> 1) & 3;
        uint32_t A[2][2][4];  // [buffer: k32 step parity][sub-tile][fragment register]
        for (int i = 0; i < nk; ++i) {
          const int kb = un.kb_begin + i;
#pragma unroll
          for (int a = 0; a < 2; ++a)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              gs_cur[a][h] = gs_nxt[a][h];
              if (i + 1 < nk && row_ok[a][h])
                gs_nxt[a][h] = __ldg(reinterpret_cast<const uint16_t*>(gs_row[a][h] + 2 * (kb + 1)));
            }
          sm90::mbar_wait(&full[ps.slot], ps.phase);
          const uint8_t* st = smem + ps.slot * C::kStage;
          const uint32_t b_addr = sm90::smem_addr(st);
          const uint8_t* codes = st + C::kB;
#pragma unroll
          for (int grp = 0; grp < 2; ++grp) {
            Lut lut[2][2];
#pragma unroll
            for (int a = 0; a < 2; ++a)
#pragma unroll
              for (int h = 0; h < 2; ++h) lut[a][h] = lut_build((gs_cur[a][h] >> (8 * grp)) & 0xFFu);
#pragma unroll
            for (int kk = 0; kk < 2; ++kk) {
              const int j = 2 * grp + kk;  // k32 step of the stage
              const int buf = j & 1;
#pragma unroll
              for (int a = 0; a < 2; ++a)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                  const uint8_t* row = codes + (row_base + 64 * a + 8 * h) * 64 + ((j ^ swz) << 4) + 2 * t;
                  const uint32_t lo = *reinterpret_cast<const uint16_t*>(row);      // k 4t..4t+3
                  const uint32_t hi = *reinterpret_cast<const uint16_t*>(row + 8);  // k 16+4t..
                  A[buf][a][h] = lut_convert4(lo, lut[a][h]);
                  A[buf][a][2 + h] = lut_convert4(hi, lut[a][h]);
                }
              sm90::wgmma_fence();
              const int accumulate = (i > 0 || j > 0) ? 1 : 0;
#pragma unroll
              for (int a = 0; a < 2; ++a)
                wgmma_rs<kTok>(acc[a], A[buf][a], sm90::desc_kmajor_sw128(b_addr + 32 * j), accumulate);
              sm90::wgmma_commit();
              // The previous step's MMAs are done: its slot may be released. No fence on the fragments:
              // each step's are fresh values, and ptxas keeps a register an in-flight wgmma reads until the
              // wait (an operand carried across the stage loop would make it serialize: C7513).
              // kTok = 32 waits for its own step (wait_group 0): with one step in flight ptxas serializes
              // the short m64n32 wgmmas anyway (C7513); the other consumer warpgroup fills the gap.
              sm90::wgmma_wait<(kTok == 32 ? 0 : 1)>();
              if (j == 0 && prev_slot >= 0) release_slot(empty, prev_slot, lane);
            }
          }
          prev_slot = ps.slot;
          ps.advance();
        }
        sm90::wgmma_wait<0>();
      } else {
        // FP8: both operands in shared memory.
        for (int i = 0; i < nk; ++i) {
          sm90::mbar_wait(&full[ps.slot], ps.phase);
          const uint32_t b_addr = sm90::smem_addr(smem + ps.slot * C::kStage);
          const uint32_t a_addr = b_addr + C::kB + 128 * cw * 128;
          sm90::wgmma_fence();
#pragma unroll
          for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int a = 0; a < 2; ++a) {
              if constexpr (kTok == 128) {
                sm90::wgmma_e4m3_m64n128k32_ss(acc[a], sm90::desc_kmajor_sw128(a_addr + a * 64 * 128 + 32 * j),
                                               sm90::desc_kmajor_sw128(b_addr + 32 * j), (i > 0 || j > 0) ? 1 : 0);
              }
            }
          sm90::wgmma_commit();
          sm90::wgmma_wait<1>();
          if (prev_slot >= 0) release_slot(empty, prev_slot, lane);
          prev_slot = ps.slot;
          ps.advance();
        }
        sm90::wgmma_wait<0>();
      }
#pragma unroll
      for (int a = 0; a < 2; ++a)
#pragma unroll
        for (int e = 0; e < kTok / 2; ++e) sm90::fence_operand(acc[a][e]);
      if (prev_slot >= 0) release_slot(empty, prev_slot, lane);

      // ---- epilogue. acc[a][4j + i]: weight row n0 + row_base + 64 a + 8 (i >> 1), token m0 + 8j + 2t + (i & 1)
      float rs[2][2];
#pragma unroll
      for (int a = 0; a < 2; ++a)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int n = n0 + row_base + 64 * a + 8 * h;
          rs[a][h] = n < p.N ? (p.row_scale != nullptr ? __ldg(p.row_scale + n) : 1.f) : 0.f;
        }
      if constexpr (C::kSplit) {
        // This K split's scaled partial sums into the fp32 workspace (zeroed by the launcher); the
        // accumulators themselves stay untouched until the next unit's first wgmma overwrites them.
#pragma unroll
        for (int j = 0; j < kTok / 8; ++j) {
          const int m = m0 + 8 * j + 2 * t;
          const float s[2] = {m < p.M ? __ldg(p.act_scales + m) : 0.f, m + 1 < p.M ? __ldg(p.act_scales + m + 1) : 0.f};
#pragma unroll
          for (int a = 0; a < 2; ++a)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
              const int n = n0 + row_base + 64 * a + 8 * (i >> 1);
              if (n < p.N && m + (i & 1) < p.M)
                atomicAdd(p.ws + int64_t(m + (i & 1)) * p.N + n, (acc[a][4 * j + i] * s[i & 1]) * rs[a][i >> 1]);
            }
        }
      } else {
#pragma unroll
        for (int j = 0; j < kTok / 8; ++j) {
          const int m = m0 + 8 * j + 2 * t;
          const float s0 = m < p.M ? __ldg(p.act_scales + m) : 0.f;
          const float s1 = m + 1 < p.M ? __ldg(p.act_scales + m + 1) : 0.f;
#pragma unroll
          for (int a = 0; a < 2; ++a) {  // (acc * act_scale) * row_scale, in the contract's order
            acc[a][4 * j + 0] = (acc[a][4 * j + 0] * s0) * rs[a][0];
            acc[a][4 * j + 1] = (acc[a][4 * j + 1] * s1) * rs[a][0];
            acc[a][4 * j + 2] = (acc[a][4 * j + 2] * s0) * rs[a][1];
            acc[a][4 * j + 3] = (acc[a][4 * j + 3] * s1) * rs[a][1];
          }
        }
        uint8_t* dtile = smem + S * C::kStage + cw * C::kDPerWg;  // this warpgroup's two output tiles
        const int bar_id = 1 + cw;
        if (tid == 0) sm90::bulk_wait_read<0>();  // the previous unit's TMA store has read the tiles
        sm90::named_barrier(bar_id, 128);
        if (p.R > 0) {
          // lora_act (fp32) -> bf16 B tile [kTok tokens][128 B], 128-byte swizzle, in the first output tile.
          {
            const int tr = tid;  // one token row per thread (kTok == 128)
            const int m = m0 + tr;
            for (int c = 0; c < p.R / 8; ++c) {
              uint4 v = make_uint4(0u, 0u, 0u, 0u);
              if (m < p.M) {
                const float4 x0 = __ldg(reinterpret_cast<const float4*>(p.lora_act + int64_t(m) * p.R + 8 * c));
                const float4 x1 = __ldg(reinterpret_cast<const float4*>(p.lora_act + int64_t(m) * p.R + 8 * c + 4));
                v = make_uint4(pack_bf16x2(x0.x, x0.y), pack_bf16x2(x0.z, x0.w), pack_bf16x2(x1.x, x1.y),
                               pack_bf16x2(x1.z, x1.w));
              }
              *reinterpret_cast<uint4*>(dtile + tr * 128 + ((c ^ (tr & 7)) << 4)) = v;
            }
          }
          sm90::fence_proxy_async();
          sm90::named_barrier(bar_id, 128);
          // out^T += lora_up . bf16(lora_act)^T on the bf16 tensor cores, into the scaled accumulators.
          switch (p.R / 16) {
            case 1: lora_mma<1>(acc, p, n0 + row_base, t, sm90::smem_addr(dtile)); break;
            case 2: lora_mma<2>(acc, p, n0 + row_base, t, sm90::smem_addr(dtile)); break;
            case 3: lora_mma<3>(acc, p, n0 + row_base, t, sm90::smem_addr(dtile)); break;
            default: lora_mma<4>(acc, p, n0 + row_base, t, sm90::smem_addr(dtile)); break;
          }
          sm90::named_barrier(bar_id, 128);  // every warp's MMAs have read the tile before it is overwritten
        }
        float bias[2][2];
#pragma unroll
        for (int a = 0; a < 2; ++a)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int n = n0 + row_base + 64 * a + 8 * h;
            bias[a][h] = (p.bias != nullptr && n < p.N) ? epi::load_as_float(p.bias, n, p.bias_dtype) : 0.f;
          }
        // Results -> bf16 -> the two [kTok][64] tiles, transposed by stmatrix (token rows, 128-byte swizzle).
        const int q = lane >> 3, rr = lane & 7;
#pragma unroll
        for (int a = 0; a < 2; ++a) {
          uint8_t* tile = dtile + a * kTok * 128;
#pragma unroll
          for (int j = 0; j < kTok / 8; j += 2) {
            uint32_t r4[4];
#pragma unroll
            for (int m2 = 0; m2 < 4; ++m2) {  // matrix m2: token group j + (m2 >> 1), row half m2 & 1
              const int e = 4 * (j + (m2 >> 1)) + 2 * (m2 & 1);
              float v0 = acc[a][e] + bias[a][m2 & 1], v1 = acc[a][e + 1] + bias[a][m2 & 1];
              if (p.gelu) {
                v0 = gelu_tanh(v0);
                v1 = gelu_tanh(v1);
              }
              r4[m2] = pack_bf16x2(v0, v1);
            }
            const int tok = 8 * (j + (q >> 1)) + rr;
            const int chunk = 2 * warp + (q & 1);  // 8 weight rows = 16 bytes of the token row
            sm90::stmatrix_x4_trans(tile + tok * 128 + ((chunk ^ rr) << 4), r4[0], r4[1], r4[2], r4[3]);
          }
        }
        sm90::fence_proxy_async();
        sm90::named_barrier(bar_id, 128);
        if (tid == 0) {
#pragma unroll
          for (int a = 0; a < 2; ++a) sm90::tma_store_2d(&p.tm_out, dtile + a * kTok * 128, n0 + 128 * cw + 64 * a, m0);
          sm90::bulk_commit();
        }
      }
    }
    if constexpr (!C::kSplit) {
      if (tid == 0) sm90::bulk_wait<0>();  // the last stores are complete before the CTA's memory goes
    }
  }
  sm90::cluster_sync();  // no CTA leaves while its peer may still multicast into it or arrive on its barriers
#else
  __trap();  // launched only on sm_90a builds (gemm8_sm90_available)
#endif
}

// Split-K finish: out = act(ws + bf16(lora_act) . lora_up + bias) in bf16.
__global__ void gemm8_finish_kernel(const float* __restrict__ ws, const float* __restrict__ lora_act,
                                    const __nv_bfloat16* __restrict__ lora_up, const void* bias, int bias_dtype,
                                    __nv_bfloat16* __restrict__ out, int M, int N, int R, int gelu) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= int64_t(M) * N) return;
  const int m = static_cast<int>(idx / N), n = static_cast<int>(idx % N);
  float v = ws[idx];
  if (R > 0) {
    float l = 0.f;
    for (int r = 0; r < R; ++r)
      l += __bfloat162float(__float2bfloat16_rn(lora_act[int64_t(m) * R + r])) *
           __bfloat162float(lora_up[int64_t(n) * R + r]);
    v += l;
  }
  if (bias != nullptr) v += epi::load_as_float(bias, n, bias_dtype);
  if (gelu) {
    const float k0 = 0.7978845608028654f, k1 = 0.044715f;
    v = 0.5f * v * (1.f + tanhf(k0 * (v + k1 * v * v * v)));
  }
  out[idx] = __float2bfloat16_rn(v);
}

// ---------------------------------------------------------------- host ---------------------------------------

PFN_cuTensorMapEncodeTiled_v12000 encode_fn() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = nullptr;
  static std::once_flag once;
  std::call_once(once, [] {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult status{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault, &status) ==
            cudaSuccess &&
        status == cudaDriverEntryPointSuccess)
      fn = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(ptr);
  });
  if (fn == nullptr) throw std::runtime_error("lowbit gemm8 (sm90): the driver has no cuTensorMapEncodeTiled");
  return fn;
}

// A 2-D tensor map: `cols` elements per row (innermost), `rows` rows `pitch` bytes apart.
CUtensorMap make_map(const void* base, CUtensorMapDataType type, uint64_t cols, uint64_t rows, uint64_t pitch,
                     uint32_t box_cols, uint32_t box_rows, CUtensorMapSwizzle swizzle, const char* what) {
  CUtensorMap map;
  const cuuint64_t dims[2] = {cols, rows};
  const cuuint64_t strides[1] = {pitch};
  const cuuint32_t box[2] = {box_cols, box_rows};
  const cuuint32_t elem[2] = {1, 1};
  const CUresult r = encode_fn()(&map, type, 2, const_cast<void*>(base), dims, strides, box, elem,
                                 CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                                 CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS)
    throw std::runtime_error(std::string("lowbit gemm8 (sm90): cuTensorMapEncodeTiled failed for ") + what +
                             " (CUresult " + std::to_string(static_cast<int>(r)) + ")");
  return map;
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string("lowbit gemm8 (sm90) ") + what + ": " + cudaGetErrorString(err));
}

template <Gemm8Weights kW, int kTok>
void launch(const Gemm8Problem& pr, const gemm8::Gemm8Config& cfg, cudaStream_t stream, int* config_out) {
  using C = Cfg<kW, kTok>;
  auto kernel = gemm8_sm90_kernel<kW, kTok>;
  static std::atomic<uint64_t> opted_in{0};
  int device = 0;
  check(cudaGetDevice(&device), "cudaGetDevice");
  const uint64_t bit = device < 64 ? (uint64_t(1) << device) : 0;
  if (bit == 0 || !(opted_in.load(std::memory_order_relaxed) & bit)) {
    check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kTotal), "smem opt-in");
    if (bit) opted_in.fetch_or(bit, std::memory_order_relaxed);
  }
  Params p{};
  const bool f8l = kW == Gemm8Weights::F8L;
  p.tm_act = make_map(pr.act, CU_TENSOR_MAP_DATA_TYPE_UINT8, pr.K, pr.M, pr.K, kStageK, kTok / kCluster,
                      CU_TENSOR_MAP_SWIZZLE_128B, "act");
  p.tm_w = f8l ? make_map(pr.w, CU_TENSOR_MAP_DATA_TYPE_UINT8, pr.K / 2, pr.N, pr.K / 2, kStageK / 2, kRows,
                          CU_TENSOR_MAP_SWIZZLE_64B, "codes")
               : make_map(pr.w, CU_TENSOR_MAP_DATA_TYPE_UINT8, pr.K, pr.N, pr.K, kStageK, kRows,
                          CU_TENSOR_MAP_SWIZZLE_128B, "weights");
  if (!C::kSplit)
    p.tm_out = make_map(pr.out, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, pr.N, pr.M, pr.N * 2, 64, kTok,
                        CU_TENSOR_MAP_SWIZZLE_128B, "out");
  p.act_scales = pr.act_scales;
  p.gscales = static_cast<const uint8_t*>(pr.w_gscales);
  p.row_scale = pr.row_scale;
  p.lora_act = pr.lora_act;
  p.lora_up = static_cast<const __nv_bfloat16*>(pr.lora_up);
  p.bias = pr.bias;
  p.bias_dtype = pr.bias_dtype;
  p.ws = pr.workspace;
  p.M = static_cast<int>(pr.M);
  p.N = static_cast<int>(pr.N);
  p.K = static_cast<int>(pr.K);
  p.R = (pr.lora_act != nullptr && pr.lora_up != nullptr) ? static_cast<int>(pr.R) : 0;
  p.gelu = pr.gelu;
  p.sched = cfg.sched;

  cudaLaunchConfig_t lc{};
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = kCluster;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  lc.blockDim = dim3(kThreads);
  lc.dynamicSmemBytes = C::kTotal;
  lc.stream = stream;
  lc.attrs = attr;
  lc.numAttrs = 1;
  // Persistent: no more clusters than can be resident at once (GPC shapes can hold fewer than sms / 2).
  int clusters = cfg.clusters;
  lc.gridDim = dim3(kCluster * clusters);
  int resident = 0;
  if (cudaOccupancyMaxActiveClusters(&resident, kernel, &lc) == cudaSuccess && resident > 0 && resident < clusters)
    clusters = resident;
  (void)cudaGetLastError();
  lc.gridDim = dim3(kCluster * clusters);
  if (C::kSplit) check(cudaMemsetAsync(pr.workspace, 0, sizeof(float) * pr.M * pr.N, stream), "workspace memset");
  check(cudaLaunchKernelEx(&lc, kernel, p), "launch");
  if (C::kSplit) {
    const int64_t total = pr.M * pr.N;
    const int threads = 256;
    gemm8_finish_kernel<<<static_cast<unsigned>((total + threads - 1) / threads), threads, 0, stream>>>(
        pr.workspace, p.R ? pr.lora_act : nullptr, p.lora_up, pr.bias, pr.bias_dtype,
        static_cast<__nv_bfloat16*>(pr.out), p.M, p.N, p.R, pr.gelu);
    check(cudaGetLastError(), "finish launch");
  }
  if (config_out != nullptr) {
    config_out[0] = kTok;
    config_out[1] = cfg.splits;
    config_out[2] = clusters;
    config_out[3] = C::kStages;
  }
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

}  // namespace

bool gemm8_sm90_available() {
#ifdef LOWBIT_HAVE_SM90A
  int device = 0, major = 0, minor = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) return false;
  return major == 9 && minor == 0;
#else
  return false;
#endif
}

int64_t gemm8_sm90_workspace_floats(int64_t M, int64_t N, int64_t K) {
  (void)K;
  return M <= 64 ? M * N : 0;  // the 32-token path (choose_gemm8_config) accumulates K splits in fp32
}

const char* gemm8_sm90_unsupported(const Gemm8Problem& p) {
  if (p.M < 1 || p.N < 1 || p.K < kStageK) return "M, N >= 1 and K >= 128 are needed";
  if (p.M > (int64_t(1) << 30) || p.N > (int64_t(1) << 30) || p.K > (int64_t(1) << 30)) return "sizes over 2^30";
  if (p.K % kStageK != 0) return "K must be a multiple of 128";
  if (p.N % 8 != 0) return "N must be a multiple of 8 (16-byte output rows for the TMA store)";
  if (!aligned16(p.act) || !aligned16(p.w) || !aligned16(p.out)) return "act, w and out must be 16-byte aligned";
  if (p.act_scales == nullptr) return "act_scales is required";
  if (p.weights == Gemm8Weights::F8L && (p.w_gscales == nullptr || p.row_scale == nullptr))
    return "F8L needs w_gscales and row_scale";
  if ((p.lora_act == nullptr) != (p.lora_up == nullptr)) return "lora_act and lora_up come together";
  if (p.lora_act != nullptr && (p.R < 16 || p.R > kMaxR || p.R % 16 != 0))
    return "the low-rank width R must be 16, 32, 48 or 64";
  if (p.lora_act != nullptr && (!aligned16(p.lora_act) || (reinterpret_cast<uintptr_t>(p.lora_up) & 3u) != 0))
    return "lora_act must be 16-byte and lora_up 4-byte aligned";
  if (p.bias != nullptr && p.bias_dtype != static_cast<int>(DType::F32) &&
      p.bias_dtype != static_cast<int>(DType::F16) && p.bias_dtype != static_cast<int>(DType::BF16))
    return "bias must be fp32, fp16 or bf16";
  if (gemm8_sm90_workspace_floats(p.M, p.N, p.K) > 0 && p.workspace == nullptr)
    return "this size needs the fp32 workspace";
  if (p.weights == Gemm8Weights::FP8 && p.M <= 64) return "the plain fp8 gate runs 128-token tiles only (M > 64)";
  return "";
}

void gemm8_sm90(const Gemm8Problem& p, void* stream, int* config_out) {
  const char* why = gemm8_sm90_unsupported(p);
  if (why[0] != '\0') throw std::invalid_argument(std::string("lowbit gemm8 (sm90): ") + why);
  if (!gemm8_sm90_available()) throw std::runtime_error("lowbit gemm8 (sm90): needs an sm_90a build on a Hopper GPU");
  int device = 0, sms = 0;
  check(cudaGetDevice(&device), "cudaGetDevice");
  check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "SM count");
  const gemm8::Gemm8Config cfg = gemm8::choose_gemm8_config(p.M, p.N, p.K, sms);
  auto s = static_cast<cudaStream_t>(stream);
  if (p.weights == Gemm8Weights::FP8) {
    launch<Gemm8Weights::FP8, 128>(p, cfg, s, config_out);
  } else if (cfg.tok == 32) {
    launch<Gemm8Weights::F8L, 32>(p, cfg, s, config_out);
  } else {
    launch<Gemm8Weights::F8L, 128>(p, cfg, s, config_out);
  }
}

}  // namespace lowbit::cuda
