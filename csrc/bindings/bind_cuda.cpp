// pybind11 registration of the CUDA kernels (compiled only when setup.py built CUDA). The stream is the
// caller's current cudaStream_t as an integer, so kernels queue behind torch's work without a sync.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "lowbit/cuda_api.h"
#include "lowbit/gemm8_sm90.h"

namespace py = pybind11;
using lowbit::ActQuant;
using lowbit::DType;

namespace {
template <typename T>
T* ptr(uintptr_t a) {
  return reinterpret_cast<T*>(a);
}
}  // namespace

void register_cuda(py::module_& m) {
  m.def(
      "cuda_quantize_act",
      [](uintptr_t x, int x_dtype, int64_t M, int64_t K, uintptr_t smooth, uintptr_t lora_down, int64_t R,
         int mode, uintptr_t q, uintptr_t scales, uintptr_t lora_act, uintptr_t stream) {
        lowbit::cuda::quantize_act(ptr<const void>(x), DType(x_dtype), M, K, ptr<const float>(smooth),
                                   ptr<const void>(lora_down), R, ActQuant(mode), ptr<void>(q),
                                   ptr<float>(scales), ptr<float>(lora_act), ptr<void>(stream));
      },
      "Fused activation quantizer on the GPU (same contract as cpu_quantize_act)");
  m.def(
      "cuda_gemm_w4",
      [](int act_kind, uintptr_t act, uintptr_t act_scales, uintptr_t w, uintptr_t w_scales, int64_t M,
         int64_t N, int64_t K, uintptr_t lora_act, uintptr_t lora_up, int up_dtype, int64_t R, uintptr_t bias,
         int bias_dtype, uintptr_t out, int out_dtype, uintptr_t stream) {
        lowbit::cuda::gemm_w4(ActQuant(act_kind), ptr<const void>(act), ptr<const float>(act_scales), ptr<const uint8_t>(w),
                              ptr<const void>(w_scales), M, N, K, ptr<const float>(lora_act),
                              ptr<const void>(lora_up), DType(up_dtype), R, ptr<const void>(bias),
                              DType(bias_dtype), ptr<void>(out), DType(out_dtype), ptr<void>(stream));
      },
      "W4A4 / W4A8 GEMM with the low-rank + bias epilogue on the GPU (same contract as cpu_gemm_w4a4/w4a8);\n"
      "act_kind is the ActQuant code of the activations (0 int4 group 64, 1 int8, 2 fp8 e4m3)");
  m.def("cuda_gemm_w4_fp8_supported", &lowbit::cuda::gemm_w4_fp8_supported,
        "True when the sm_90a wgmma GEMM runs on the current device (fp8 tokens; W4A4 with LOWBIT_GEMM_W4_KERNEL=wgmma)");
  m.def(
      "cuda_gemm8_sm90",
      [](int weights, uintptr_t act, uintptr_t act_scales, uintptr_t w, uintptr_t w_gscales, uintptr_t row_scale,
         uintptr_t lora_act, uintptr_t lora_up, int64_t R, uintptr_t bias, int bias_dtype, uintptr_t out,
         uintptr_t workspace, int64_t M, int64_t N, int64_t K, int gelu, uintptr_t stream) {
        lowbit::cuda::Gemm8Problem p{};
        p.weights = lowbit::cuda::Gemm8Weights(weights);
        p.act = ptr<const void>(act);
        p.act_scales = ptr<const float>(act_scales);
        p.w = ptr<const void>(w);
        p.w_gscales = ptr<const void>(w_gscales);
        p.row_scale = ptr<const float>(row_scale);
        p.lora_act = ptr<const float>(lora_act);
        p.lora_up = ptr<const void>(lora_up);
        p.R = R;
        p.bias = ptr<const void>(bias);
        p.bias_dtype = bias_dtype;
        p.out = ptr<void>(out);
        p.workspace = ptr<float>(workspace);
        p.M = M;
        p.N = N;
        p.K = K;
        p.gelu = gelu;
        int cfg[4] = {0, 0, 0, 0};
        lowbit::cuda::gemm8_sm90(p, ptr<void>(stream), cfg);
        return py::make_tuple(cfg[0], cfg[1], cfg[2], cfg[3]);
      },
      "Persistent TMA / wgmma 8-bit GEMM (sm_90a): weights 0 = e4m3 [N, K], 1 = F8L codes; returns the\n"
      "launch configuration (token tile, K splits, clusters, stages)");
  m.def("cuda_gemm8_sm90_available", &lowbit::cuda::gemm8_sm90_available,
        "True when the persistent sm_90a 8-bit GEMM can run on the current device");
  m.def("cuda_gemm8_sm90_workspace_floats", &lowbit::cuda::gemm8_sm90_workspace_floats,
        "fp32 workspace elements the 8-bit GEMM needs for M, N, K (0: none)");
}
