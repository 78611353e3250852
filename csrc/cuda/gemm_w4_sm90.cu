// Warp-specialized W4A4 / W4A8(fp8 tokens) GEMM for Hopper (sm_90a) on the fp8 wgmma tensor cores, with
// the SVDQuant epilogue. Same contract as gemm_w4.cu (docs/formats.md):
//   out[m, n] = sum_g P_g[m, n] * act_scale * w_scales[n, g] + lora_act[m] . lora_up[n] + bias[n].
// Design, measured rates and what limits them: docs/kernels.md ("CUDA wgmma W4 GEMM").
//
// Why fp8 e4m3 operands: every int4 value is exact in e4m3, the tensor cores accumulate in fp32, and
// wgmma's scale-d = 0 starts each 64-group's partial sum from zero for free, so the promotion of a group
// is one FFMA per output (W4A8: the weight scale) or FMUL + FFMA (W4A4: weight x token scale). The int8
// path (gemm_w4.cu) needs a preset and two more instructions per output and group.
//
// Operand roles are swapped (the CTA computes out^T): the weights are wgmma's A operand (M side, 64 rows
// per warpgroup) built in registers, the tokens are B (N side) read from shared memory. This gives
//   - per-row weight scales: a thread holds 2 weight rows, so W4A8 promotion loads 2 scales per group;
//   - no 8-bit copy of the weights anywhere: lane (g, t) loads, for rows g and g + 8 of its warp, the 16-bit
//     piece t of each 8-byte chunk of the natural packed row (k 4t..4t+3 of each 16 k) and turns its 4
//     nibbles into 4 e4m3 bytes with byte permutes (int4x8_to_e4m3): that IS the A fragment order.
//
// CTA = 3 warpgroups, 128 weight rows x kTok tokens:
//   warpgroup 0 (producer, 80 registers): coalesced cp.async of each K stage (128 k = two groups; 4
//     threads per 64-byte packed row, 8 per 128-byte fp8 row) into a kStages ring, kLookahead stages
//     ahead; for W4A4 each thread then widens the int4 token chunks it copied (-> e4m3) into the
//     128-byte-swizzled B tile. It waits for its own copies only (cp.async.wait_group), so no barrier is
//     needed inside the producer; it publishes a stage with fence.proxy.async + mbarrier arrive (full[s])
//     and waits on empty[s] before reusing a slot.
//   warpgroups 1-2 (consumers, 208 registers): 64 weight rows each, all kTok tokens. Per group: two wgmma
//     k32 steps (scale-d 0 then 1), the next group's A fragments built while they run, wait, promote into
//     the fp32 totals. The two consumer warpgroups are not in lockstep (no CTA barrier in the main loop),
//     so one promotes while the other's wgmma runs.
// Epilogue (per consumer thread, in registers): W4A8 token scale, the low-rank branch on the tf32 tensor
// cores (mma.sync m16n8k8, lora_act split hi/lo as in gemm_w4.cu), bias, store.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "lowbit/epilogue.cuh"
#include "lowbit/gemm_w4_sm90.h"
#include "lowbit/ptx.cuh"
#include "lowbit/wgmma.cuh"

namespace lowbit::cuda {
namespace {

using namespace lowbit::cuda::ptx;
using namespace lowbit::cuda::epi;

constexpr int kRowsPerCta = 128;  // weight rows: 2 consumer warpgroups x 64
constexpr int kStageK = 128;      // K per pipeline stage (two 64-groups)
constexpr int kStages = 6;        // ring depth
constexpr int kLookahead = 4;     // stages the producer's copies run ahead of its widening
constexpr int kThreads = 384;

// Ablation switches for bench/microbench/gemm_w4_sm90_ablation.cu (all off in the library build): each
// removes one part of the work so its cost can be read off the timings. Results are wrong when one is on.
#ifndef LOWBIT_SM90_ABLATE
#define LOWBIT_SM90_ABLATE 0
#endif
constexpr int kAblate = LOWBIT_SM90_ABLATE;
constexpr int kAblateLoads = 1, kAblateMma = 2, kAblatePromote = 4, kAblateBuild = 8;
// 16: no per-group promotion and no per-group wait: every group accumulates into the same wgmma
// accumulator (the loop a format with the group scales folded into the operands would run).
constexpr int kAblateAccumulate = 16;

// Shared memory of one stage: the e4m3 token tile first (1024-byte aligned for the swizzle), then the raw
// packed weights, then (W4A4) the token scales of both groups as [2][kTok] fp32.
template <bool kFp8, int kTok>
struct Smem {
  static constexpr int kB = kTok * kStageK;                 // e4m3 tokens, 128 bytes per token row
  static constexpr int kW = kRowsPerCta * kStageK / 2;      // packed int4 weights, 64 bytes per row
  static constexpr int kSa = kFp8 ? 0 : 2 * kTok * 4;
  static constexpr int kStage = (kB + kW + kSa + 1023) / 1024 * 1024;
  static constexpr int kRaw = kFp8 ? 0 : (kLookahead + 1) * kTok * 64;  // producer-private int4 tokens
  static constexpr int kBarriers = 2 * kStages * 8;
  static constexpr int kTotal = 1024 /* alignment slack */ + kStages * kStage + kRaw + kBarriers;
};

// Byte offset of 16-byte chunk c (0..3) of row r in a 64-byte-per-row packed-int4 tile. XOR with bits 1-2
// of the row: the 8 rows one warp load touches spread over all 32 banks.
__device__ __forceinline__ int packed_offset(int r, int c) { return r * 64 + ((c ^ ((r >> 1) & 3)) << 4); }

// 8 int4 values (two's complement nibbles, nibble i = k i) -> 8 e4m3 bytes in k order: lo holds nibbles
// 0-3, hi nibbles 4-7. prmt looks up 8-entry tables with a 3-bit index, so the magnitude bits index a
// table of e4m3(0..7) and one of e4m3(-8..-1) and a third prmt picks per byte by the sign bit:
// 11 integer instructions per 8 values.
__device__ __forceinline__ void int4x8_to_e4m3(uint32_t w, uint32_t& lo, uint32_t& hi) {
  constexpr uint32_t kPosLo = 0x44403800u, kPosHi = 0x4E4C4A48u;  // e4m3 of 0, 1, ..., 7
  constexpr uint32_t kNegLo = 0xCACCCED0u, kNegHi = 0xB8C0C4C8u;  // e4m3 of -8, -7, ..., -1
  const uint32_t idx = w & 0x77777777u;
  const uint32_t sel = ((w >> 1) & 0x44444444u) | 0x32103210u;  // byte i from pos (i) or neg (i + 4)
  lo = prmt(prmt(kPosLo, kPosHi, idx), prmt(kNegLo, kNegHi, idx), sel);
  const uint32_t idx_hi = idx >> 16, sel_hi = sel >> 16;
  hi = prmt(prmt(kPosLo, kPosHi, idx_hi), prmt(kNegLo, kNegHi, idx_hi), sel_hi);
}

template <int kTok>
__device__ __forceinline__ void wgmma_tile(float (&d)[kTok / 2], const uint32_t (&a)[4], uint64_t desc,
                                           int accumulate) {
#ifdef LOWBIT_SM90A_DEVICE
  if constexpr (kTok == 128) {
    sm90::wgmma_e4m3_m64n128k32_rs(d, a, desc, accumulate);
  } else {
    static_assert(kTok == 32, "token tile must be 128 or 32");
    sm90::wgmma_e4m3_m64n32k32_rs(d, a, desc, accumulate);
  }
#endif
}

// Promotion of one group's partial sums into the fp32 totals: element 4j + i of a consumer thread is weight
// row r0 + 8 (i >> 1) and token 8j + 2t + (i & 1) of the accumulator's token range. W4A8: times the row's
// group weight scale (s0, s1). W4A4: also times the token's group scale, read from the stage's token scales
// `sa` (already offset to this thread's tokens 2t, 2t + 1 of the range).
template <bool kFp8, int kN>
__device__ __forceinline__ void promote(float* total, const float (&acc)[kN], float s0, float s1, const float* sa) {
#pragma unroll
  for (int j = 0; j < kN / 4; ++j) {
    if constexpr (kFp8) {
      total[4 * j + 0] = fmaf(acc[4 * j + 0], s0, total[4 * j + 0]);
      total[4 * j + 1] = fmaf(acc[4 * j + 1], s0, total[4 * j + 1]);
      total[4 * j + 2] = fmaf(acc[4 * j + 2], s1, total[4 * j + 2]);
      total[4 * j + 3] = fmaf(acc[4 * j + 3], s1, total[4 * j + 3]);
    } else {
      const float2 ts = *reinterpret_cast<const float2*>(sa + 8 * j);
      total[4 * j + 0] = fmaf(acc[4 * j + 0], s0 * ts.x, total[4 * j + 0]);
      total[4 * j + 1] = fmaf(acc[4 * j + 1], s0 * ts.y, total[4 * j + 1]);
      total[4 * j + 2] = fmaf(acc[4 * j + 2], s1 * ts.x, total[4 * j + 2]);
      total[4 * j + 3] = fmaf(acc[4 * j + 3], s1 * ts.y, total[4 * j + 3]);
    }
  }
}

template <bool kFp8, int kTok, bool kSplit>
__global__ void __launch_bounds__(kThreads, 1) gemm_w4_sm90_kernel(const GemmW4Problem p) {
  static_assert(!kSplit || kTok == 128, "the split schedule halves a 128-token tile");
#ifdef LOWBIT_SM90A_DEVICE
  using S = Smem<kFp8, kTok>;
  extern __shared__ uint8_t smem_raw[];
  // Align by adding an offset to the shared array itself: a pointer rebuilt from an integer loses its state
  // space and every access through it becomes a generic LD/ST (long scoreboard) instead of LDS/STS.
  uint8_t* smem = smem_raw + ((1024u - (sm90::smem_addr(smem_raw) & 1023u)) & 1023u);
  uint8_t* raw_tokens = smem + kStages * S::kStage;
  uint64_t* full = reinterpret_cast<uint64_t*>(raw_tokens + S::kRaw);
  uint64_t* empty = full + kStages;

  const int tid = threadIdx.x;
  const int G = p.K / 64;
  const int num_stages = (G + 1) / 2;
  const int n0 = blockIdx.y * kRowsPerCta;
  const int m0 = blockIdx.x * kTok;

  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) {
      sm90::mbar_init(&full[s], 128);   // every producer thread arrives
      sm90::mbar_init(&empty[s], 256);  // every consumer thread arrives
    }
  }
  __syncthreads();

  if (tid < 128) {
    // ================================ producer warpgroup =================================================
    sm90::regs_dealloc<80>();
    // Coalesced copies: 4 consecutive threads take the 4 16-byte chunks of one 64-byte packed row (8 rows
    // per warp instruction), 8 consecutive threads the 8 chunks of one 128-byte fp8 token row. A thread
    // widens exactly the chunks it copied, so it only waits for its own copies.
    const int c4 = tid & 3, r4 = tid >> 2;  // packed rows r4 + 32 i
    const int c8 = tid & 7, r8 = tid >> 3;  // fp8 token rows r8 + 16 i
    const int64_t w_row_bytes = p.K / 2, t_row_bytes = kFp8 ? p.K : p.K / 2;

    auto issue = [&](int s) {
      if constexpr ((kAblate & kAblateLoads) != 0) return;
      uint8_t* st = smem + (s % kStages) * S::kStage;
      const bool second = 2 * s + 1 < G;  // the last stage of an odd group count holds one group
      const int kb = s * (kStageK / 2);   // packed byte offset of the stage in a row
#pragma unroll
      for (int i = 0; i < kRowsPerCta / 32; ++i) {
        const int r = r4 + 32 * i;
        const bool ok = n0 + r < p.N && (c4 < 2 || second);
        cp_async16(st + S::kB + packed_offset(r, c4), ok ? p.w + (n0 + r) * w_row_bytes + kb + 16 * c4 : p.w, ok);
      }
      if constexpr (kFp8) {
#pragma unroll
        for (int i = 0; i < kTok / 16; ++i) {
          const int r = r8 + 16 * i;
          const bool ok = m0 + r < p.M && (c8 < 4 || second);
          cp_async16(st + r * 128 + ((c8 ^ (r & 7)) << 4),
                     ok ? p.act + (m0 + r) * t_row_bytes + s * kStageK + 16 * c8 : p.act, ok);
        }
      } else {
        uint8_t* raw = raw_tokens + (s % (kLookahead + 1)) * (kTok * 64);
#pragma unroll
        for (int i = 0; i < kTok / 32; ++i) {
          const int r = r4 + 32 * i;
          const bool ok = m0 + r < p.M && (c4 < 2 || second);
          cp_async16(raw + packed_offset(r, c4), ok ? p.act + (m0 + r) * t_row_bytes + kb + 16 * c4 : p.act, ok);
        }
        if (tid < kTok) {
          float* sa = reinterpret_cast<float*>(st + S::kB + S::kW);
          const bool row_ok = m0 + tid < p.M;
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const bool ok = row_ok && (h == 0 || second);
            sm90::cp_async4(sa + h * kTok + tid, ok ? p.act_scales + int64_t(m0 + tid) * G + 2 * s + h : p.act_scales,
                            ok);
          }
        }
      }
    };

    for (int s = 0; s < kLookahead; ++s) {
      if (s < num_stages) issue(s);
      cp_async_commit();
    }
    for (int s = 0; s < num_stages; ++s) {
      const int ns = s + kLookahead;
      if (ns < num_stages) {
        if (ns >= kStages) sm90::mbar_wait(&empty[ns % kStages], ((ns / kStages) - 1) & 1);
        issue(ns);
      }
      cp_async_commit();
      cp_async_wait<kLookahead>();  // this thread's copies of stage s have landed
      if constexpr (!kFp8) {
        // Widen the token chunks this thread copied: 16 packed bytes -> 32 e4m3 bytes (chunks 2c, 2c + 1
        // of the 128-byte swizzled row).
        const uint8_t* raw = raw_tokens + (s % (kLookahead + 1)) * (kTok * 64);
        uint8_t* b = smem + (s % kStages) * S::kStage;
#pragma unroll
        for (int i = 0; i < kTok / 32; ++i) {
          const int r = r4 + 32 * i;
          const uint4 v = *reinterpret_cast<const uint4*>(raw + packed_offset(r, c4));
          uint4 e0, e1;
          int4x8_to_e4m3(v.x, e0.x, e0.y);
          int4x8_to_e4m3(v.y, e0.z, e0.w);
          int4x8_to_e4m3(v.z, e1.x, e1.y);
          int4x8_to_e4m3(v.w, e1.z, e1.w);
          *reinterpret_cast<uint4*>(b + r * 128 + (((2 * c4) ^ (r & 7)) << 4)) = e0;
          *reinterpret_cast<uint4*>(b + r * 128 + (((2 * c4 + 1) ^ (r & 7)) << 4)) = e1;
        }
      }
      sm90::fence_proxy_async();
      sm90::mbar_arrive(&full[s % kStages]);
    }
    cp_async_wait<0>();
  } else {
    // ================================ consumer warpgroups ================================================
    sm90::regs_alloc<208>();
    const int ctid = tid - 128;
    const int wg = ctid >> 7;          // consumer warpgroup: weight rows 64 wg ..
    const int warp = (ctid >> 5) & 3;  // warp within the warpgroup: 16 rows each
    const int lane = ctid & 31, g = lane >> 2, t = lane & 3;
    const int r0 = 64 * wg + 16 * warp + g;  // this thread's rows r0 and r0 + 8 (CTA-local)
    const uint32_t half_sel = (t & 1) ? 0x7632u : 0x5410u;
    const int n_r0 = min(n0 + r0, p.N - 1), n_r1 = min(n0 + r0 + 8, p.N - 1);
    const uint16_t* sw_r0 = p.w_scales + int64_t(n_r0) * G;
    const uint16_t* sw_r1 = p.w_scales + int64_t(n_r1) * G;

    float total[kTok / 2];
#pragma unroll
    for (int i = 0; i < kTok / 2; ++i) total[i] = 0.f;
    float acc[kTok / 2];

    // Weight scales run one group ahead (two loads per group, latency hidden behind the previous group).
    float s_next0 = bf16_bits_to_float(__ldg(sw_r0)), s_next1 = bf16_bits_to_float(__ldg(sw_r1));

    // A fragments of group grp (stage grp / 2, half grp % 2) for both k32 steps: rows r0 (a[.][0], a[.][2])
    // and r0 + 8 (a[.][1], a[.][3]).
    // build_at: from the packed weight tile `wt` of a stage and its half h (the group's position in it).
    auto build_at = [&](const uint8_t* wt, int h, uint32_t (&a)[2][4]) {
#pragma unroll
      for (int rr = 0; rr < 2; ++rr) {
        const int r = r0 + 8 * rr;
        uint32_t x[4];
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          // 8-byte chunk c of the group = 16-byte chunk 2h + c/2, bytes 8 (c & 1) + 4 (t >> 1).
          x[c] = *reinterpret_cast<const uint32_t*>(wt + packed_offset(r, 2 * h + (c >> 1)) + 8 * (c & 1) +
                                                    4 * (t >> 1));
        }
        int4x8_to_e4m3(prmt(x[0], x[1], half_sel), a[0][rr], a[0][rr + 2]);
        int4x8_to_e4m3(prmt(x[2], x[3], half_sel), a[1][rr], a[1][rr + 2]);
      }
    };
    auto build = [&](int grp, uint32_t (&a)[2][4]) {
      if constexpr ((kAblate & kAblateBuild) != 0) {
        a[0][0] = a[0][1] = a[0][2] = a[0][3] = a[1][0] = a[1][1] = a[1][2] = a[1][3] = 0x38383838u + grp;
        return;
      }
      build_at(smem + ((grp >> 1) % kStages) * S::kStage + S::kB, grp & 1, a);
    };

    // Software pipeline over the groups: the fragments of group grp + 1 are built (and its stage waited
    // for) while the tensor cores run group grp.
    uint32_t a_cur[2][4], a_nxt[2][4];
    sm90::mbar_wait(&full[0], 0);
    build(0, a_cur);
    if constexpr ((kAblate & kAblateAccumulate) != 0) {
      // MMA g reads one fragment set while g + 1's is built into the other; wait_group 1 frees a set.
      auto step = [&](int grp, uint32_t (&a)[2][4], uint32_t (&b)[2][4]) {
        const int s = grp >> 1, h = grp & 1;
        const uint32_t b_addr = sm90::smem_addr(smem + (s % kStages) * S::kStage) + 64 * h;
        sm90::wgmma_fence();
        wgmma_tile<kTok>(acc, a[0], sm90::desc_kmajor_sw128(b_addr), grp == 0 ? 0 : 1);
        wgmma_tile<kTok>(acc, a[1], sm90::desc_kmajor_sw128(b_addr + 32), 1);
        sm90::wgmma_commit();
        sm90::wgmma_wait<1>();  // group grp - 1 is done: its fragments (b) and its stage are free
#pragma unroll
        for (int k = 0; k < 2; ++k)
#pragma unroll
          for (int i = 0; i < 4; ++i) sm90::fence_operand(b[k][i]);
        if (grp >= 1 && ((grp - 1) & 1) == 1) sm90::mbar_arrive(&empty[((grp - 1) >> 1) % kStages]);
        if (grp + 1 < G) {
          if (h == 1) sm90::mbar_wait(&full[(s + 1) % kStages], ((s + 1) / kStages) & 1);
          build(grp + 1, b);
        }
      };
      for (int grp = 0; grp < G; grp += 2) {
        step(grp, a_cur, a_nxt);
        if (grp + 1 < G) step(grp + 1, a_nxt, a_cur);
      }
      sm90::wgmma_wait<0>();
#pragma unroll
      for (int i = 0; i < kTok / 2; ++i) sm90::fence_operand(acc[i]);
      if ((G & 1) == 0) sm90::mbar_arrive(&empty[((G - 1) >> 1) % kStages]);
#pragma unroll
      for (int i = 0; i < kTok / 2; ++i) total[i] = acc[i] * s_next0;
    } else if constexpr (kSplit) {
      // Split schedule: the 128 tokens are two 64-token halves with their own accumulators, issued as two
      // wgmma commit groups per 64-group. While one half is promoted the other half (or the next group's
      // first half) is on the tensor cores, so the tensor cores always have queued work and the promotion
      // overlaps this warpgroup's own MMAs instead of waiting for them. Same registers as the group
      // schedule (2 x 32 accumulators instead of 64), twice the wgmma instructions (m64n64k32).
      //
      // The loop runs one stage (two groups) per iteration, so a group's half h in its stage is a
      // compile-time constant, and the ring slot and barrier phase advance by increment: the per-group
      // address work of the group schedule (slot = stage % 6, descriptors, offsets) mostly folds away.
      float acc_h[2][kTok / 4];
      constexpr std::integral_constant<int, 0> k0{};
      constexpr std::integral_constant<int, 1> k1{};
      const uint64_t desc0 = sm90::desc_kmajor_sw128(sm90::smem_addr(smem));
      // `half`, `h` are std::integral_constant<int, 0 or 1>: register arrays are indexed by constants only.
      auto issue_half = [&](int slot, auto h_c, auto half_c, const uint32_t (&a)[2][4]) {
        constexpr int h = decltype(h_c)::value, half = decltype(half_c)::value;
        // Descriptor addresses are in 16-byte units: + (slot base + k offset of the group + token half).
        const uint64_t d = desc0 + uint32_t((slot * S::kStage + 64 * h + half * (kTok / 2) * 128) >> 4);
#pragma unroll
        for (int i = 0; i < kTok / 4; ++i) sm90::fence_operand(acc_h[half][i]);
        sm90::wgmma_fence();
        sm90::wgmma_e4m3_m64n64k32_rs(acc_h[half], a[0], d, 0);
        sm90::wgmma_e4m3_m64n64k32_rs(acc_h[half], a[1], d + 2, 1);  // + 32 bytes: the second k32 step
        sm90::wgmma_commit();
      };
      // Half element 4j + i is token 64 half + 8j + 2t + (i & 1): total element 32 half + 4j + i.
      auto promote_half = [&](int slot, auto h_c, auto half_c, float s0, float s1) {
        constexpr int h = decltype(h_c)::value, half = decltype(half_c)::value;
#pragma unroll
        for (int i = 0; i < kTok / 4; ++i) sm90::fence_operand(acc_h[half][i]);
        promote<kFp8>(total + half * (kTok / 4), acc_h[half], s0, s1,
                      reinterpret_cast<const float*>(smem + slot * S::kStage + S::kB + S::kW) + h * kTok +
                          half * (kTok / 2) + 2 * t);
      };
      auto fence_fragments = [&](uint32_t (&a)[2][4]) {
#pragma unroll
        for (int k = 0; k < 2; ++k)
#pragma unroll
          for (int i = 0; i < 4; ++i) sm90::fence_operand(a[k][i]);  // a stays untouched until here
      };
      // Entry to a step for group grp (half h of the stage in `slot`): both halves of grp are in flight with
      // fragments a; b is free. The fragment sets alternate by parity (never copied: an in-flight wgmma may
      // still read the set it was issued with). The last group is peeled so that every path issues and
      // waits in straight-line code: ptxas serializes all wgmmas of a kernel when it cannot prove an
      // accumulator untouched in flight (C7514/C7515, which the compile check rejects).
      const uint16_t* sw0 = sw_r0 + 1;  // scales of the next group
      const uint16_t* sw1 = sw_r1 + 1;
      float c0 = s_next0, c1 = s_next1;  // scales of the current group
      int slot = 0;
      uint32_t phase = 0;  // full-barrier parity of the stage in `slot` (flips when the ring wraps)
      auto step = [&](auto h_c, uint32_t (&a)[2][4], uint32_t (&b)[2][4]) {  // a group that is not the last
        constexpr int h = decltype(h_c)::value;
        const float n0 = bf16_bits_to_float(__ldg(sw0++)), n1 = bf16_bits_to_float(__ldg(sw1++));
        int nslot = slot;  // the next group's stage
        if constexpr (h == 1) {
          nslot = slot + 1 == kStages ? 0 : slot + 1;
          phase ^= nslot == 0 ? 1u : 0u;
          sm90::mbar_wait(&full[nslot], phase);
        }
        if constexpr ((kAblate & kAblateBuild) == 0) {
          build_at(smem + nslot * S::kStage + S::kB, 1 - h, b);
        } else {
          build(0, b);
        }
        sm90::wgmma_wait<1>();  // first half of this group done (the second may still run)
        promote_half(slot, h_c, k0, c0, c1);
        issue_half(nslot, std::integral_constant<int, 1 - h>{}, k0, b);
        sm90::wgmma_wait<1>();  // second half done; the next group's first half queued behind it
        fence_fragments(a);
        promote_half(slot, h_c, k1, c0, c1);
        if constexpr (h == 1) sm90::mbar_arrive(&empty[slot]);  // this stage is no longer read
        issue_half(nslot, std::integral_constant<int, 1 - h>{}, k1, b);
        c0 = n0;
        c1 = n1;
        slot = nslot;
      };
      auto last = [&](auto h_c, uint32_t (&a)[2][4]) {
        sm90::wgmma_wait<1>();
        promote_half(slot, h_c, k0, c0, c1);
        sm90::wgmma_wait<0>();
        fence_fragments(a);
        promote_half(slot, h_c, k1, c0, c1);
        sm90::mbar_arrive(&empty[slot]);
      };
      // The prologue above waited for stage 0 and built group 0's fragments into a_cur.
      issue_half(0, k0, k0, a_cur);
      issue_half(0, k0, k1, a_cur);
      int grp = 0;
      for (; grp + 2 < G; grp += 2) {
        step(k0, a_cur, a_nxt);
        step(k1, a_nxt, a_cur);
      }
      if (grp + 2 == G) {
        step(k0, a_cur, a_nxt);
        last(k1, a_nxt);
      } else {
        last(k0, a_cur);
      }
    } else {
    for (int grp = 0; grp < G; ++grp) {
      const int s = grp >> 1, h = grp & 1, slot = s % kStages;
      const uint8_t* st = smem + slot * S::kStage;
      const uint32_t b_addr = sm90::smem_addr(st) + 64 * h;
      const float s0 = s_next0, s1 = s_next1;
#pragma unroll
      for (int i = 0; i < kTok / 2; ++i) sm90::fence_operand(acc[i]);
      sm90::wgmma_fence();
      if constexpr ((kAblate & kAblateMma) == 0) {
        wgmma_tile<kTok>(acc, a_cur[0], sm90::desc_kmajor_sw128(b_addr), 0);
        wgmma_tile<kTok>(acc, a_cur[1], sm90::desc_kmajor_sw128(b_addr + 32), 1);
      } else if (grp == 0) {
#pragma unroll
        for (int i = 0; i < kTok / 2; ++i) acc[i] = float(a_cur[0][i & 3]);
      }
      sm90::wgmma_commit();
      if (grp + 1 < G) {
        s_next0 = bf16_bits_to_float(__ldg(sw_r0 + grp + 1));
        s_next1 = bf16_bits_to_float(__ldg(sw_r1 + grp + 1));
        if (h == 1) sm90::mbar_wait(&full[(s + 1) % kStages], ((s + 1) / kStages) & 1);
        build(grp + 1, a_nxt);
      }
      sm90::wgmma_wait<0>();
#pragma unroll
      for (int i = 0; i < kTok / 2; ++i) sm90::fence_operand(acc[i]);
#pragma unroll
      for (int k = 0; k < 2; ++k)
#pragma unroll
        for (int i = 0; i < 4; ++i) sm90::fence_operand(a_cur[k][i]);
      if constexpr ((kAblate & kAblatePromote) != 0) {
        if (grp + 1 == G) {
#pragma unroll
          for (int i = 0; i < kTok / 2; ++i) total[i] = acc[i] * s0;
        }
      } else {
        promote<kFp8>(total, acc, s0, s1, reinterpret_cast<const float*>(st + S::kB + S::kW) + h * kTok + 2 * t);
      }
      if (h == 1 || grp + 1 == G) sm90::mbar_arrive(&empty[slot]);  // this stage is no longer read
#pragma unroll
      for (int k = 0; k < 2; ++k)
#pragma unroll
        for (int i = 0; i < 4; ++i) a_cur[k][i] = a_nxt[k][i];
    }
    }  // group schedule

    // ---- epilogue: element 4j + i is weight row r0 + 8 (i >> 1), token 8j + 2t + (i & 1) ---------------
    if constexpr (kFp8) {
#pragma unroll
      for (int j = 0; j < kTok / 8; ++j) {
        const int m = m0 + 8 * j + 2 * t;
        const float ts0 = __ldg(p.act_scales + min(m, p.M - 1)), ts1 = __ldg(p.act_scales + min(m + 1, p.M - 1));
        total[4 * j + 0] *= ts0;
        total[4 * j + 1] *= ts1;
        total[4 * j + 2] *= ts0;
        total[4 * j + 3] *= ts1;
      }
    }
    // Low-rank branch, out^T += lora_up . lora_act^T on tf32 MMAs: A = lora_up rows (k slots t, t + 4 take
    // ranks r + 2t, r + 2t + 1), B = lora_act of token 8j + g split into exact tf32 hi + lo parts.
    for (int r = 0; r < p.R; r += 8) {
      uint32_t up[4];
      load_up_pair(p.lora_up, int64_t(n_r0) * p.R + r + 2 * t, p.up_fp16 != 0, up[0], up[2]);
      load_up_pair(p.lora_up, int64_t(n_r1) * p.R + r + 2 * t, p.up_fp16 != 0, up[1], up[3]);
#pragma unroll
      for (int j = 0; j < kTok / 8; ++j) {
        const int m = min(m0 + 8 * j + g, p.M - 1);
        const float2 x = __ldg(reinterpret_cast<const float2*>(p.lora_act + int64_t(m) * p.R + r + 2 * t));
        const uint32_t hi0 = to_tf32(x.x), hi1 = to_tf32(x.y);
        const uint32_t lo0 = __float_as_uint(x.x - __uint_as_float(hi0));
        const uint32_t lo1 = __float_as_uint(x.y - __uint_as_float(hi1));
        float c[4] = {total[4 * j], total[4 * j + 1], total[4 * j + 2], total[4 * j + 3]};
        mma_tf32_1688(c, up, lo0, lo1);
        mma_tf32_1688(c, up, hi0, hi1);
#pragma unroll
        for (int i = 0; i < 4; ++i) total[4 * j + i] = c[i];
      }
    }
    float b0 = 0.f, b1 = 0.f;
    if (p.bias != nullptr) {
      b0 = load_as_float(p.bias, n_r0, p.bias_dtype);
      b1 = load_as_float(p.bias, n_r1, p.bias_dtype);
    }
    const bool row0_ok = n0 + r0 < p.N, row1_ok = n0 + r0 + 8 < p.N;
#pragma unroll
    for (int j = 0; j < kTok / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int m = m0 + 8 * j + 2 * t + e;
        if (m >= p.M) continue;
        if (row0_ok) store_one(p.out, int64_t(m) * p.N + n0 + r0, total[4 * j + e] + b0, p.out_dtype);
        if (row1_ok) store_one(p.out, int64_t(m) * p.N + n0 + r0 + 8, total[4 * j + 2 + e] + b1, p.out_dtype);
      }
    }
  }
#else
  __trap();  // launched only on sm_90a builds (gemm_w4_sm90_available)
#endif
}

template <bool kFp8, int kTok, bool kSplit>
void launch(const GemmW4Problem& p, cudaStream_t stream) {
  constexpr int smem = Smem<kFp8, kTok>::kTotal;
  static std::atomic<uint64_t> opted_in{0};
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  const uint64_t bit = device < 64 ? (uint64_t(1) << device) : 0;
  if (err == cudaSuccess && (bit == 0 || !(opted_in.load(std::memory_order_relaxed) & bit))) {
    err = cudaFuncSetAttribute(gemm_w4_sm90_kernel<kFp8, kTok, kSplit>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               smem);
    if (err == cudaSuccess) opted_in.fetch_or(bit, std::memory_order_relaxed);
  }
  if (err != cudaSuccess) throw std::runtime_error(std::string("lowbit gemm (sm90): ") + cudaGetErrorString(err));
  const dim3 grid((p.M + kTok - 1) / kTok, (p.N + kRowsPerCta - 1) / kRowsPerCta);
  gemm_w4_sm90_kernel<kFp8, kTok, kSplit><<<grid, kThreads, smem, stream>>>(p);
  err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string("lowbit gemm (sm90) launch: ") + cudaGetErrorString(err));
}

// LOWBIT_GEMM_W4_SM90_SCHEDULE = group (default) | split: the consumer schedule of the 128-token tiles (see
// the kernel). Read on every call so tests and benchmarks can run both in one process.
bool split_schedule() {
  const char* v = std::getenv("LOWBIT_GEMM_W4_SM90_SCHEDULE");
  if (v == nullptr || v[0] == '\0' || std::string(v) == "group") return false;
  if (std::string(v) == "split") return true;
  throw std::invalid_argument(std::string("LOWBIT_GEMM_W4_SM90_SCHEDULE must be group or split, got ") + v);
}

}  // namespace

bool gemm_w4_sm90_available() {
#ifdef LOWBIT_HAVE_SM90A
  // Per device, answered once (this is asked on every GEMM call): bit 2d set = known, bit 2d+1 = Hopper.
  static std::atomic<uint64_t> known{0};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return false;
  if (device < 32) {
    const uint64_t bits = known.load(std::memory_order_relaxed) >> (2 * device);
    if (bits & 1) return (bits & 2) != 0;
  }
  int major = 0, minor = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) return false;
  const bool hopper = major == 9 && minor == 0;
  if (device < 32) known.fetch_or(uint64_t(hopper ? 3 : 1) << (2 * device), std::memory_order_relaxed);
  return hopper;
#else
  return false;
#endif
}

void gemm_w4_sm90(ActQuant act, const GemmW4Problem& p, cudaStream_t stream) {
  if (act == ActQuant::INT8_TOKEN) throw std::invalid_argument("lowbit gemm (sm90): int8 tokens are not handled here");
  const bool fp8 = act == ActQuant::FP8_TOKEN;
  // Few tokens: 32-token tiles spread the weight stream over 4x more CTAs.
  const bool split = split_schedule();  // asked (and checked) on every call, also where it does not apply
  if (p.M <= 256) {
    fp8 ? launch<true, 32, false>(p, stream) : launch<false, 32, false>(p, stream);
  } else if (split) {
    fp8 ? launch<true, 128, true>(p, stream) : launch<false, 128, true>(p, stream);
  } else {
    fp8 ? launch<true, 128, false>(p, stream) : launch<false, 128, false>(p, stream);
  }
}

}  // namespace lowbit::cuda
