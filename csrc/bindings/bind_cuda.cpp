// pybind11 registration of the CUDA kernels (compiled only when setup.py built CUDA). The stream is the
// caller's current cudaStream_t as an integer, so kernels queue behind torch's work without a sync.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "lowbit/cuda_api.h"

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
}
