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
}
