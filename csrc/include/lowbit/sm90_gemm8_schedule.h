// Work decomposition of the persistent sm_90a 8-bit GEMM (csrc/cuda/gemm8_sm90.cu), shared by the kernel,
// its host launcher and the CPU tests (tests/test_sm90_gemm8_model.py calls it through lowbit_engine._C), so
// the schedule the tests check is the code the GPU runs, not a transliteration.
//
// Roles (the CTA computes out^T): the weights are wgmma's M side, the tokens its N side.
//   CTA tile     = kRowsPerCta (256) weight rows x kTok tokens (kTok 128, or 32 for small M);
//   cluster      = 2 CTAs along the weight rows: they share the token tile, which each loads half of and
//                  multicasts to both (TMA .multicast::cluster);
//   work unit    = (token block, weight pair = 2 x 256 rows, K split): one per cluster at a time;
//   persistence  = cluster c runs units c, c + clusters, c + 2 clusters, ... (both CTAs the same list);
//   rasterization: units are ordered in groups of `group` weight pairs; inside a group the weight pair
//                  varies fastest, so the clusters running at the same time share token tiles and a
//                  group's weights stay in L2 while every token block passes over them.
// K splits (small M): split s covers k blocks [s * kb / splits, (s + 1) * kb / splits) of kb = K / 128.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define LOWBIT_HD __host__ __device__ __forceinline__
#else
#define LOWBIT_HD inline
#endif

namespace lowbit::gemm8 {

constexpr int kGemm8RowsPerCta = 256;  // weight rows per CTA: 2 consumer warpgroups x 128
constexpr int kGemm8Cluster = 2;       // CTAs per cluster (token-tile multicast)
constexpr int kGemm8StageK = 128;      // K per pipeline stage

struct Gemm8Unit {
  int m_block;  // token block: tokens [m_block * kTok, + kTok)
  int n_pair;   // weight pair: rows [n_pair * 512, + 512); CTA rank r takes [.. + 256 r, + 256)
  int split;    // K split index
  int kb_begin, kb_end;  // k blocks of 128 this unit accumulates
};

struct Gemm8Schedule {
  int m_blocks = 0;   // ceil(M / kTok)
  int n_pairs = 0;    // ceil(N / 512)
  int splits = 1;     // K splits (1: each unit owns the whole K)
  int group = 1;      // weight pairs per rasterization group
  int k_blocks = 0;   // K / 128

  LOWBIT_HD int units() const { return m_blocks * n_pairs * splits; }

  // Unit u (0 <= u < units()). The split index varies fastest, so the splits of one tile run at the same
  // time on neighbouring clusters; then the grouped (token block, weight pair) order described above.
  LOWBIT_HD Gemm8Unit unit(int u) const {
    Gemm8Unit r;
    r.split = u % splits;
    const int tile = u / splits;
    const int per_group = group * m_blocks;
    const int g = tile / per_group;
    const int first = g * group;
    const int rest = n_pairs - first;
    const int width = rest < group ? rest : group;  // the last group may be narrower
    const int in_group = tile - g * per_group;
    r.n_pair = first + in_group % width;
    r.m_block = in_group / width;
    r.kb_begin = static_cast<int>(static_cast<int64_t>(r.split) * k_blocks / splits);
    r.kb_end = static_cast<int>(static_cast<int64_t>(r.split + 1) * k_blocks / splits);
    return r;
  }
};

// The launch configuration the host picks for one problem.
struct Gemm8Config {
  int tok = 128;       // token tile (wgmma N): 128, or 32 when M is small
  int splits = 1;      // K splits; > 1 only with tok = 32 (fp32 partial sums, then a finishing kernel)
  int clusters = 1;    // persistent clusters launched (grid = 2 x clusters CTAs)
  Gemm8Schedule sched;
};

// Pick the token tile, the K splits and the grid for M tokens, N weight rows, K (a multiple of 128) on a
// device with `sms` SMs:
//   - M <= 64: 32-token tiles (a 128-token wgmma would be 4x the tensor-core time of the useful work, and
//     at small M the weights must stream at memory speed from every SM). K is split against wave
//     quantization: the split count s (each split keeping at least 2 stages) minimises
//     ceil(tiles * s / clusters) / s -- the rounds of the busiest cluster times the size of a unit -- plus
//     a small cost per unit (its pipeline fill and its share of the fp32 partial sums), so every cluster
//     streams weights and none runs a last round alone;
//   - otherwise 128-token tiles and one split: the whole K accumulates in the wgmma accumulators.
// The grid never exceeds the units: a cluster with no unit would only add its launch and cluster barrier.
inline Gemm8Config choose_gemm8_config(int64_t M, int64_t N, int64_t K, int sms, int group = 8) {
  Gemm8Config c;
  const int max_clusters = sms / kGemm8Cluster > 0 ? sms / kGemm8Cluster : 1;
  c.tok = M <= 64 ? 32 : 128;
  c.sched.m_blocks = static_cast<int>((M + c.tok - 1) / c.tok);
  c.sched.n_pairs = static_cast<int>((N + 2 * kGemm8RowsPerCta - 1) / (2 * kGemm8RowsPerCta));
  c.sched.k_blocks = static_cast<int>(K / kGemm8StageK);
  c.sched.group = group < c.sched.n_pairs ? group : c.sched.n_pairs;
  if (c.sched.group < 1) c.sched.group = 1;
  c.splits = 1;
  if (c.tok == 32) {
    const int64_t tiles = static_cast<int64_t>(c.sched.m_blocks) * c.sched.n_pairs;
    const double per_unit = 0.02;  // fill + partial-sum cost of a unit, in units of one whole-K tile
    double best = 1e30;
    for (int s = 1; s <= c.sched.k_blocks / 2 || s == 1; ++s) {
      const int64_t rounds = (tiles * s + max_clusters - 1) / max_clusters;
      const double cost = static_cast<double>(rounds) / s + per_unit * static_cast<double>(rounds);
      if (cost < best - 1e-12) {
        best = cost;
        c.splits = s;
      }
    }
  }
  c.sched.splits = c.splits;
  const int units = c.sched.units();
  c.clusters = units < max_clusters ? units : max_clusters;
  if (c.clusters < 1) c.clusters = 1;
  return c;
}

// Ring position of the producer and the consumers: both walk the same (unit, k block) sequence, so a
// running count of stages gives the slot and the mbarrier phase parity to wait for.
template <int kStages>
struct PipeState {
  int slot = 0;
  uint32_t phase = 0;
  LOWBIT_HD void advance() {
    if (++slot == kStages) {
      slot = 0;
      phase ^= 1u;
    }
  }
};

}  // namespace lowbit::gemm8
