// Ablation timing of the sm_90a W4 GEMM (csrc/cuda/gemm_w4_sm90.cu): the same kernel built with one part
// of its work removed (LOWBIT_SM90_ABLATE bits: 1 loads, 2 wgmma, 4 promotion, 8 A-fragment build), timed
// with CUDA events at M=4608, K=N=3072 (median of 50 after 10 warm-ups). Outputs are wrong in the ablated
// builds; only the times matter. Build and run (on the GPU machine), e.g. for "no promotion":
//   nvcc -std=c++17 -O3 -Icsrc/include -DLOWBIT_HAVE_SM90A -DLOWBIT_SM90_ABLATE=4 \
//     -gencode=arch=compute_90a,code=sm_90a bench/microbench/gemm_w4_sm90_ablation.cu -o /tmp/abl4 && /tmp/abl4
#include <algorithm>
#include <cstdio>
#include <vector>

#include "../../csrc/cuda/gemm_w4_sm90.cu"

int main(int argc, char** argv) {
  const int M = 4608, N = 3072, K = 3072, G = K / 64;
  using namespace lowbit;
  for (int fp8 = 0; fp8 < 2; ++fp8) {
    uint8_t *act, *w;
    float *sa;
    uint16_t* sw;
    void* out;
    cudaMalloc(&act, size_t(M) * K);
    cudaMalloc(&w, size_t(N) * K / 2);
    cudaMalloc(&sa, size_t(M) * G * 4);
    cudaMalloc(&sw, size_t(N) * G * 2);
    cudaMalloc(&out, size_t(M) * N * 2);
    cudaMemset(act, 0x11, size_t(M) * K);
    cudaMemset(w, 0x21, size_t(N) * K / 2);
    cudaMemset(sa, 0, size_t(M) * G * 4);
    cudaMemset(sw, 0x3f, size_t(N) * G * 2);
    cuda::GemmW4Problem p{};
    p.act = act;
    p.act_scales = sa;
    p.w = w;
    p.w_scales = sw;
    p.out = out;
    p.M = M;
    p.N = N;
    p.K = K;
    p.R = 0;
    p.bias_dtype = static_cast<int>(DType::BF16);
    p.out_dtype = static_cast<int>(DType::BF16);
    const ActQuant kind = fp8 ? ActQuant::FP8_TOKEN : ActQuant::INT4_G64;
    cudaEvent_t e0, e1;
    cudaEventCreate(&e0);
    cudaEventCreate(&e1);
    for (int i = 0; i < 10; ++i) cuda::gemm_w4_sm90(kind, p, nullptr);
    std::vector<float> ms;
    for (int i = 0; i < 50; ++i) {
      cudaEventRecord(e0);
      cuda::gemm_w4_sm90(kind, p, nullptr);
      cudaEventRecord(e1);
      cudaEventSynchronize(e1);
      float t = 0;
      cudaEventElapsedTime(&t, e0, e1);
      ms.push_back(t);
    }
    std::sort(ms.begin(), ms.end());
    const double med = ms[ms.size() / 2];
    std::printf("ablate=%d %s: %.4f ms  %.1f TOP/s  (%s)\n", LOWBIT_SM90_ABLATE, fp8 ? "fp8 " : "int4", med,
                2.0 * M * N * K / med / 1e9, cudaGetErrorString(cudaGetLastError()));
    cudaFree(act);
    cudaFree(w);
    cudaFree(sa);
    cudaFree(sw);
    cudaFree(out);
  }
  return 0;
}
