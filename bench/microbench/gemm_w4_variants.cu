// Tile-configuration sweep of the W4A4 / W4A8 CUDA GEMM (csrc/cuda/gemm_w4.cu) on FLUX.1 shapes: a
// standalone program (no Python) so one device call can compare configurations before one is made the
// default. Every variant's output is compared bit for bit with the default configuration's (the per-element
// arithmetic does not depend on the tiling), and timed with CUDA events (median of 20 after warm-up).
//   nvcc -std=c++17 -O3 -Icsrc/include -gencode=arch=compute_90a,code=sm_90a \
//        bench/microbench/gemm_w4_variants.cu -o /tmp/variants && /tmp/variants
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "../../csrc/cuda/gemm_w4.cu"

using namespace lowbit;
using namespace lowbit::cuda;

#define CK(x)                                                                      \
  do {                                                                             \
    cudaError_t e = (x);                                                           \
    if (e != cudaSuccess) {                                                        \
      std::printf("CUDA error %s at %s:%d\n", cudaGetErrorString(e), __FILE__, __LINE__); \
      std::exit(1);                                                                \
    }                                                                              \
  } while (0)

template <class T>
T* upload(const std::vector<T>& h) {
  T* d;
  CK(cudaMalloc(&d, h.size() * sizeof(T)));
  CK(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}

struct Problem {
  Params p{};
  std::vector<float> out;
};

Problem make(bool a8, int M, int N, int K, int R, std::mt19937& rng) {
  std::uniform_int_distribution<int> byte(0, 255);
  std::uniform_real_distribution<float> uni(0.01f, 1.f);
  const int G = K / 64;
  std::vector<uint8_t> act(size_t(M) * (a8 ? K : K / 2)), w(size_t(N) * K / 2);
  for (auto& v : act) v = uint8_t(byte(rng));
  for (auto& v : w) v = uint8_t(byte(rng));
  std::vector<float> sa(a8 ? M : size_t(M) * G), la(size_t(M) * R);
  for (auto& v : sa) v = uni(rng);
  for (auto& v : la) v = uni(rng) - 0.5f;
  std::vector<uint16_t> sw(size_t(N) * G), up(size_t(N) * R), bias(N);
  for (auto& v : sw) v = 0x3C00 + (byte(rng) & 0x7F);  // bf16 around 0.008
  for (auto& v : up) v = 0x3C00 + (byte(rng) & 0x7F);
  for (auto& v : bias) v = 0x3F80;
  Problem pr;
  Params& p = pr.p;
  p.act = upload(act);
  p.act_scales = upload(sa);
  p.w = upload(w);
  p.w_scales = upload(sw);
  p.lora_act = R ? upload(la) : nullptr;
  p.lora_up = R ? static_cast<const void*>(upload(up)) : nullptr;
  p.bias = upload(bias);
  void* out;
  CK(cudaMalloc(&out, size_t(M) * N * 2));
  p.out = out;
  p.M = M, p.N = N, p.K = K, p.R = R;
  p.up_fp16 = 0;
  p.bias_dtype = int(DType::BF16);
  p.out_dtype = int(DType::BF16);
  return pr;
}

template <bool kA8, class C>
void run(const char* name, Problem& pr, const std::vector<uint16_t>& ref, double flops) {
  CK(cudaMemset(pr.p.out, 0xFF, size_t(pr.p.M) * pr.p.N * 2));
  launch<kA8, C>(pr.p, nullptr);
  CK(cudaDeviceSynchronize());
  std::vector<uint16_t> got(size_t(pr.p.M) * pr.p.N);
  CK(cudaMemcpy(got.data(), pr.p.out, got.size() * 2, cudaMemcpyDeviceToHost));
  const bool same = ref.empty() || std::memcmp(got.data(), ref.data(), got.size() * 2) == 0;
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  for (int i = 0; i < 5; ++i) launch<kA8, C>(pr.p, nullptr);
  std::vector<float> ms;
  for (int i = 0; i < 20; ++i) {
    CK(cudaEventRecord(a));
    launch<kA8, C>(pr.p, nullptr);
    CK(cudaEventRecord(b));
    CK(cudaEventSynchronize(b));
    float t;
    CK(cudaEventElapsedTime(&t, a, b));
    ms.push_back(t);
  }
  std::sort(ms.begin(), ms.end());
  const float med = ms[ms.size() / 2];
  cudaFuncAttributes attr;
  CK(cudaFuncGetAttributes(&attr, gemm_w4_kernel<kA8, C>));
  std::printf("%-5s %-34s M=%5d N=%6d K=%6d  %8.4f ms  %7.1f TOP/s  regs %3d  %s\n", kA8 ? "w4a8" : "w4a4", name,
              pr.p.M, pr.p.N, pr.p.K, med, flops / med / 1e9, attr.numRegs, same ? "same" : "DIFFERENT OUTPUT");
}

template <bool kA8>
void sweep(int M, int N, int K, std::mt19937& rng) {
  Problem pr = make(kA8, M, N, K, 32, rng);
  const double flops = 2.0 * M * N * K;
  launch<kA8, DefaultConfig>(pr.p, nullptr);
  CK(cudaDeviceSynchronize());
  std::vector<uint16_t> ref(size_t(M) * N);
  CK(cudaMemcpy(ref.data(), pr.p.out, ref.size() * 2, cudaMemcpyDeviceToHost));
  run<kA8, DefaultConfig>("2x4 warps 64x32, 4 stages (default)", pr, ref, flops);
  run<kA8, TileConfig<2, 4, 4, 4, 3, 1>>("2x4 warps 64x32, 3 stages", pr, ref, flops);
  run<kA8, TileConfig<4, 2, 2, 8, 4, 1>>("4x2 warps 32x64, 4 stages", pr, ref, flops);
  run<kA8, TileConfig<2, 2, 4, 4, 4, 2>>("2x2 warps 64x32 (128x64), 2/SM", pr, ref, flops);
  run<kA8, TileConfig<2, 4, 2, 4, 4, 2>>("2x4 warps 32x32 (64x128), 2/SM", pr, ref, flops);
  run<kA8, TileConfig<4, 4, 2, 4, 3, 1>>("4x4 warps 32x32 (128x128)", pr, ref, flops);
  run<kA8, TileConfig<2, 4, 4, 8, 3, 1>>("2x4 warps 64x64 (128x256)", pr, ref, flops);
  run<kA8, MediumMConfig>("MediumM 2x2 warps 64x32 (128x64)", pr, ref, flops);
  run<kA8, SmallMConfig>("SmallM 1x2 warps 32x32 (32x64)", pr, ref, flops);
}

int main() {
  std::mt19937 rng(0);
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  std::printf("%s, %d SMs\n", prop.name, prop.multiProcessorCount);
  const int shapes[][3] = {{4608, 3072, 3072}, {4608, 12288, 3072}, {4608, 3072, 15360}};
  for (auto& s : shapes) {
    sweep<false>(s[0], s[1], s[2], rng);
    sweep<true>(s[0], s[1], s[2], rng);
  }
  return 0;
}
