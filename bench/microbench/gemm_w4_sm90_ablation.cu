// Timing of the sm_90a W4 GEMM (csrc/cuda/gemm_w4_sm90.cu) at M=4608, K=N=3072, rank 0, CUDA events,
// median of 50 after 10 warm-ups, for both consumer schedules (LOWBIT_GEMM_W4_SM90_SCHEDULE=group / split)
// and both token kinds (int4 groups, fp8). Inputs are random; each split run is compared element by element
// with the group run on the same inputs (fp32 out): the two schedules do the same arithmetic per output, so
// any difference is a bug (printed as "differ").
//
// Ablation: built with -DLOWBIT_SM90_ABLATE=<bits> (1 loads, 2 wgmma, 4 promotion, 8 A-fragment build,
// 16 accumulate all groups) the kernel skips that part of its work, so only the times mean anything (the
// bits 2, 4 and 16 act on the group schedule only). Build and run on the GPU machine, e.g.:
//   nvcc -std=c++17 -O3 -Icsrc/include -DLOWBIT_HAVE_SM90A -DLOWBIT_SM90_ABLATE=0 \
//     -gencode=arch=compute_90a,code=sm_90a bench/microbench/gemm_w4_sm90_ablation.cu -o /tmp/abl0 && /tmp/abl0
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cmath>
#include <cstring>
#include <vector>

#include "../../csrc/cuda/gemm_w4_sm90.cu"

namespace {

uint32_t lcg(uint64_t& s) {
  s = s * 6364136223846793005ull + 1442695040888963407ull;
  return uint32_t(s >> 33);
}

template <typename T>
T* upload(const std::vector<T>& h) {
  T* d = nullptr;
  cudaMalloc(&d, h.size() * sizeof(T));
  cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice);
  return d;
}

double time_ms(lowbit::ActQuant kind, const lowbit::cuda::GemmW4Problem& p) {
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  for (int i = 0; i < 10; ++i) lowbit::cuda::gemm_w4_sm90(kind, p, nullptr);
  std::vector<float> ms;
  for (int i = 0; i < 50; ++i) {
    cudaEventRecord(e0);
    lowbit::cuda::gemm_w4_sm90(kind, p, nullptr);
    cudaEventRecord(e1);
    cudaEventSynchronize(e1);
    float t = 0;
    cudaEventElapsedTime(&t, e0, e1);
    ms.push_back(t);
  }
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

}  // namespace

int main() {
  const int M = 4608, N = 3072, K = 3072, G = K / 64;
  using namespace lowbit;
  uint64_t seed = 12345;
  for (int fp8 = 0; fp8 < 2; ++fp8) {
    const size_t act_bytes = fp8 ? size_t(M) * K : size_t(M) * K / 2;
    std::vector<uint8_t> h_act(act_bytes), h_w(size_t(N) * K / 2);
    // fp8: clearing bit 3 of every byte keeps e4m3 away from its NaN codes (0x7F, 0xFF).
    for (auto& b : h_act) b = fp8 ? uint8_t(lcg(seed) & 0xF7u) : uint8_t(lcg(seed));
    for (auto& b : h_w) b = uint8_t(lcg(seed));
    std::vector<float> h_sa(fp8 ? size_t(M) : size_t(M) * G);
    for (auto& v : h_sa) v = 0.01f + float(lcg(seed) % 1000) * 1e-4f;
    std::vector<uint16_t> h_sw(size_t(N) * G);
    for (auto& v : h_sw) v = uint16_t(0x3C00u + (lcg(seed) & 0x7Fu));  // bf16 in [2^-7, 2^-6)
    uint8_t* act = upload(h_act);
    uint8_t* w = upload(h_w);
    float* sa = upload(h_sa);
    uint16_t* sw = upload(h_sw);
    float *out_group = nullptr, *out_split = nullptr;
    cudaMalloc(&out_group, size_t(M) * N * 4);
    cudaMalloc(&out_split, size_t(M) * N * 4);

    cuda::GemmW4Problem p{};
    p.act = act;
    p.act_scales = sa;
    p.w = w;
    p.w_scales = sw;
    p.M = M;
    p.N = N;
    p.K = K;
    p.R = 0;
    p.bias_dtype = static_cast<int>(DType::BF16);
    p.out_dtype = static_cast<int>(DType::F32);
    const ActQuant kind = fp8 ? ActQuant::FP8_TOKEN : ActQuant::INT4_G64;
    const char* name = fp8 ? "fp8 " : "int4";
    for (int split = 0; split < 2; ++split) {
      setenv("LOWBIT_GEMM_W4_SM90_SCHEDULE", split ? "split" : "group", 1);
      p.out = split ? out_split : out_group;
      cudaMemset(p.out, 0xFF, size_t(M) * N * 4);  // NaN: an element never written shows up below
      const double med = time_ms(kind, p);
      std::printf("ablate=%d %s %s: %.4f ms  %.1f TOP/s  (%s)\n", LOWBIT_SM90_ABLATE, name,
                  split ? "split" : "group", med, 2.0 * M * N * K / med / 1e9, cudaGetErrorString(cudaGetLastError()));
    }
    std::vector<float> a(size_t(M) * N), b(size_t(M) * N);
    cudaMemcpy(a.data(), out_group, a.size() * 4, cudaMemcpyDeviceToHost);
    cudaMemcpy(b.data(), out_split, b.size() * 4, cudaMemcpyDeviceToHost);
    size_t differ = 0, nan = 0;
    double worst = 0;
    for (size_t i = 0; i < a.size(); ++i) {
      if (a[i] != a[i] || b[i] != b[i]) {
        ++nan;
        continue;
      }
      if (std::memcmp(&a[i], &b[i], 4) != 0) ++differ;
      worst = std::max(worst, double(std::abs(a[i] - b[i])) / (std::abs(double(a[i])) + 1e-30));
    }
    std::printf("  %s split vs group: %zu of %zu elements differ (worst relative %.3g), %zu NaN\n", name, differ,
                a.size(), worst, nan);
    cudaFree(act);
    cudaFree(w);
    cudaFree(sa);
    cudaFree(sw);
    cudaFree(out_group);
    cudaFree(out_split);
  }
  return 0;
}
