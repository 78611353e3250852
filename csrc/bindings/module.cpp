// The one pybind11 module, lowbit_engine._C. Each domain registers its functions; the CUDA half exists
// only when setup.py compiled the .cu sources (LOWBIT_WITH_CUDA). Pointers cross as integers, so this
// module never sees torch and one build serves any torch version.
#include <pybind11/pybind11.h>

namespace py = pybind11;

void register_cpu(py::module_& m);
#ifdef LOWBIT_WITH_CUDA
void register_cuda(py::module_& m);
#endif

#ifndef LOWBIT_CUDA_ARCHS
#define LOWBIT_CUDA_ARCHS ""
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "lowbit-engine native kernels: C++ CPU references and (when built) CUDA kernels";
  register_cpu(m);
#ifdef LOWBIT_WITH_CUDA
  register_cuda(m);
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.attr("cuda_archs") = LOWBIT_CUDA_ARCHS;
}
