// pybind11 registration of the C++ CPU reference kernels. Arguments are raw addresses (uintptr_t, 0 for
// "absent") and plain integers; lowbit_engine/ops.py validates tensors before any address crosses.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <utility>
#include <vector>

#include "lowbit/cpu_ref.h"
#include "lowbit/sm90_gemm8_schedule.h"

namespace py = pybind11;
using lowbit::ActQuant;
using lowbit::DType;

namespace {
template <typename T>
T* ptr(uintptr_t a) {
  return reinterpret_cast<T*>(a);
}
}  // namespace

void register_cpu(py::module_& m) {
  m.def(
      "cpu_quantize_act",
      [](uintptr_t x, int x_dtype, int64_t M, int64_t K, uintptr_t smooth, uintptr_t lora_down, int64_t R,
         int mode, uintptr_t q, uintptr_t scales, uintptr_t lora_act) {
        py::gil_scoped_release release;
        lowbit::cpu::quantize_act(ptr<const void>(x), DType(x_dtype), M, K, ptr<const float>(smooth),
                                  ptr<const void>(lora_down), R, ActQuant(mode), ptr<void>(q),
                                  ptr<float>(scales), ptr<float>(lora_act));
      },
      "Activation quantizer (int4 g64 / int8 / fp8 per token) with optional smoothing and X @ L_down^T");
  m.def(
      "cpu_gemm_w4a4",
      [](uintptr_t act, uintptr_t act_scales, uintptr_t w, uintptr_t w_scales, int64_t M, int64_t N,
         int64_t K, uintptr_t lora_act, uintptr_t lora_up, int lora_dtype, int64_t R, uintptr_t bias,
         int bias_dtype, uintptr_t out, int out_dtype) {
        py::gil_scoped_release release;
        lowbit::cpu::gemm_w4a4(ptr<const uint8_t>(act), ptr<const float>(act_scales), ptr<const uint8_t>(w),
                               ptr<const uint16_t>(w_scales), M, N, K, ptr<const float>(lora_act),
                               ptr<const void>(lora_up), DType(lora_dtype), R, ptr<const void>(bias),
                               DType(bias_dtype), ptr<void>(out), DType(out_dtype));
      },
      "W4A4 GEMM, group-64 scales, low-rank up-projection and bias in the epilogue");
  m.def(
      "cpu_gemm_w4a8",
      [](uintptr_t act, int act_dtype, uintptr_t act_scales, uintptr_t w, uintptr_t w_scales, int64_t M,
         int64_t N, int64_t K, uintptr_t lora_act, uintptr_t lora_up, int lora_dtype, int64_t R,
         uintptr_t bias, int bias_dtype, uintptr_t out, int out_dtype) {
        py::gil_scoped_release release;
        lowbit::cpu::gemm_w4a8(ptr<const void>(act), DType(act_dtype), ptr<const float>(act_scales),
                               ptr<const uint8_t>(w), ptr<const uint16_t>(w_scales), M, N, K,
                               ptr<const float>(lora_act), ptr<const void>(lora_up), DType(lora_dtype), R,
                               ptr<const void>(bias), DType(bias_dtype), ptr<void>(out), DType(out_dtype));
      },
      "W4A8 GEMM (int8 or fp8 per-token activations), same epilogue as W4A4");
  m.def(
      "cpu_vq_dequantize",
      [](uintptr_t codes, int index_bits, uintptr_t codebook, int cb_dtype, int64_t k, int64_t d,
         uintptr_t channel_scale, int64_t N, int64_t K, uintptr_t out, int out_dtype) {
        py::gil_scoped_release release;
        lowbit::cpu::vq_dequantize(ptr<const uint8_t>(codes), index_bits, ptr<const void>(codebook),
                                   DType(cb_dtype), k, d, ptr<const float>(channel_scale), N, K,
                                   ptr<void>(out), DType(out_dtype));
      },
      "Decode VQ indices through the codebook into a dense weight");
  m.def(
      "cpu_vq_gemm",
      [](uintptr_t x, int x_dtype, int64_t M, uintptr_t codes, int index_bits, uintptr_t codebook,
         int cb_dtype, int64_t k, int64_t d, uintptr_t channel_scale, int64_t N, int64_t K, uintptr_t bias,
         int bias_dtype, uintptr_t out) {
        py::gil_scoped_release release;
        lowbit::cpu::vq_gemm(ptr<const void>(x), DType(x_dtype), M, ptr<const uint8_t>(codes), index_bits,
                             ptr<const void>(codebook), DType(cb_dtype), k, d, ptr<const float>(channel_scale),
                             N, K, ptr<const void>(bias), DType(bias_dtype), ptr<void>(out));
      },
      "x @ W^T + bias with W decoded from a VQ codebook");
  m.def(
      "cpu_expand_f8l",
      [](uintptr_t codes, uintptr_t gscales, int64_t N, int64_t K, uintptr_t out) {
        py::gil_scoped_release release;
        lowbit::cpu::expand_f8l(ptr<const uint8_t>(codes), ptr<const uint8_t>(gscales), N, K, ptr<uint8_t>(out));
      },
      "F8L weights to the e4m3 GEMM operand");
  m.def(
      "cpu_expand_i8q",
      [](uintptr_t codes, uintptr_t steps, uintptr_t zeros, int64_t N, int64_t K, uintptr_t out) {
        py::gil_scoped_release release;
        lowbit::cpu::expand_i8q(ptr<const uint8_t>(codes), ptr<const uint8_t>(steps), ptr<const uint8_t>(zeros), N,
                                K, ptr<int8_t>(out));
      },
      "I8Q weights to the int8 GEMM operand");
  m.def(
      "cpu_gemm_w8",
      [](uintptr_t act, int act_dtype, uintptr_t act_scales, uintptr_t w8, uintptr_t w_row_scale, int64_t M,
         int64_t N, int64_t K, int64_t k_multiple, uintptr_t lora_act, uintptr_t lora_up, int lora_dtype, int64_t R,
         uintptr_t bias, int bias_dtype, uintptr_t out, int out_dtype) {
        py::gil_scoped_release release;
        lowbit::cpu::gemm_w8(ptr<const void>(act), DType(act_dtype), ptr<const float>(act_scales),
                             ptr<const void>(w8), ptr<const float>(w_row_scale), M, N, K, k_multiple,
                             ptr<const float>(lora_act), ptr<const void>(lora_up), DType(lora_dtype), R,
                             ptr<const void>(bias), DType(bias_dtype), ptr<void>(out), DType(out_dtype));
      },
      "8-bit GEMM (int8 x int8 or e4m3 x e4m3), per-token x per-row scales, low-rank and bias epilogue");
  m.def(
      "cpu_gemm_w4a8_f8l",
      [](uintptr_t act, uintptr_t act_scales, uintptr_t w, uintptr_t w_gscales, uintptr_t w_row_scale, int64_t M,
         int64_t N, int64_t K, uintptr_t lora_act, uintptr_t lora_up, int lora_dtype, int64_t R, uintptr_t bias,
         int bias_dtype, uintptr_t out, int out_dtype) {
        py::gil_scoped_release release;
        lowbit::cpu::gemm_w4a8_f8l(ptr<const uint8_t>(act), ptr<const float>(act_scales), ptr<const uint8_t>(w),
                                   ptr<const uint8_t>(w_gscales), ptr<const float>(w_row_scale), M, N, K,
                                   ptr<const float>(lora_act), ptr<const void>(lora_up), DType(lora_dtype), R,
                                   ptr<const void>(bias), DType(bias_dtype), ptr<void>(out), DType(out_dtype));
      },
      "W4A8 GEMM on F8L weights (e4m3 tokens)");
  m.def(
      "cpu_gemm_w4a8_i8q",
      [](uintptr_t act, uintptr_t act_scales, uintptr_t w, uintptr_t w_steps, uintptr_t w_zeros,
         uintptr_t w_row_scale, int64_t M, int64_t N, int64_t K, uintptr_t lora_act, uintptr_t lora_up,
         int lora_dtype, int64_t R, uintptr_t bias, int bias_dtype, uintptr_t out, int out_dtype) {
        py::gil_scoped_release release;
        lowbit::cpu::gemm_w4a8_i8q(ptr<const int8_t>(act), ptr<const float>(act_scales), ptr<const uint8_t>(w),
                                   ptr<const uint8_t>(w_steps), ptr<const uint8_t>(w_zeros),
                                   ptr<const float>(w_row_scale), M, N, K, ptr<const float>(lora_act),
                                   ptr<const void>(lora_up), DType(lora_dtype), R, ptr<const void>(bias),
                                   DType(bias_dtype), ptr<void>(out), DType(out_dtype));
      },
      "W4A8 GEMM on I8Q weights (int8 tokens)");
  m.def(
      "cpu_norm_modulate_quantize",
      [](uintptr_t x, int x_dtype, int64_t M, int64_t K, int64_t T, uintptr_t shift, uintptr_t scale, float eps,
         uintptr_t smooth, uintptr_t lora_down, int64_t R, int mode, uintptr_t q, uintptr_t scales,
         uintptr_t lora_act, uintptr_t y) {
        py::gil_scoped_release release;
        lowbit::cpu::norm_modulate_quantize(ptr<const void>(x), DType(x_dtype), M, K, T, ptr<const void>(shift),
                                            ptr<const void>(scale), eps, ptr<const float>(smooth),
                                            ptr<const void>(lora_down), R, ActQuant(mode), ptr<void>(q),
                                            ptr<float>(scales), ptr<float>(lora_act), ptr<void>(y));
      },
      "LayerNorm + adaLN modulate, rounded to x's dtype, then the activation quantizer");
  m.def(
      "cpu_exit_quantize",
      [](uintptr_t h, int h_dtype, int64_t M, int64_t K, int activation, float scale, uintptr_t smooth,
         uintptr_t lora_down, int64_t R, int64_t ld_stride, int mode, uintptr_t q, uintptr_t scales,
         uintptr_t h_out, uintptr_t lora_act) {
        py::gil_scoped_release release;
        lowbit::cpu::exit_quantize(ptr<const void>(h), DType(h_dtype), M, K, activation, scale,
                                   ptr<const float>(smooth), ptr<const void>(lora_down), R, ld_stride, ActQuant(mode),
                                   ptr<void>(q), ptr<float>(scales), ptr<void>(h_out), ptr<float>(lora_act));
      },
      "an exit linear's activation, then the next linear's 8-bit input with a static scale");
  m.def(
      "cpu_gemm_w4a16",
      [](uintptr_t x, int x_dtype, int64_t M, int64_t K, uintptr_t w, uintptr_t w_scales, uintptr_t w_zeros,
         int64_t N, uintptr_t bias, int bias_dtype, uintptr_t out, int out_dtype) {
        py::gil_scoped_release release;
        lowbit::cpu::gemm_w4a16(ptr<const void>(x), DType(x_dtype), M, K, ptr<const uint8_t>(w),
                                ptr<const uint16_t>(w_scales), ptr<const uint8_t>(w_zeros), N, ptr<const void>(bias),
                                DType(bias_dtype), ptr<void>(out), DType(out_dtype));
      },
      "Weight-only W4A16 GEMM (uint4, bf16 step and integer zero per 64), bias epilogue");

  // The work decomposition of the sm_90a 8-bit GEMM (lowbit/sm90_gemm8_schedule.h): the same code the kernel
  // and its launcher run, here for the CPU tests of coverage and of the pipeline protocol.
  m.def(
      "gemm8_sm90_schedule",
      [](int64_t M, int64_t N, int64_t K, int sms, int group) {
        const lowbit::gemm8::Gemm8Config c = lowbit::gemm8::choose_gemm8_config(M, N, K, sms, group);
        py::list units;
        for (int u = 0; u < c.sched.units(); ++u) {
          const lowbit::gemm8::Gemm8Unit un = c.sched.unit(u);
          units.append(py::make_tuple(un.m_block, un.n_pair, un.split, un.kb_begin, un.kb_end));
        }
        py::dict d;
        d["tok"] = c.tok;
        d["splits"] = c.splits;
        d["clusters"] = c.clusters;
        d["m_blocks"] = c.sched.m_blocks;
        d["n_pairs"] = c.sched.n_pairs;
        d["k_blocks"] = c.sched.k_blocks;
        d["group"] = c.sched.group;
        d["rows_per_cta"] = lowbit::gemm8::kGemm8RowsPerCta;
        d["cluster"] = lowbit::gemm8::kGemm8Cluster;
        d["units"] = units;
        return d;
      },
      py::arg("M"), py::arg("N"), py::arg("K"), py::arg("sms"), py::arg("group") = 8,
      "Launch configuration and unit list (m_block, n_pair, split, kb_begin, kb_end) of the sm_90a 8-bit GEMM");
  m.def(
      "gemm8_pipe_states",
      [](int stages, int n) {
        std::vector<std::pair<int, int>> out;
        auto run = [&](auto ps) {
          for (int i = 0; i < n; ++i) {
            out.emplace_back(ps.slot, static_cast<int>(ps.phase));
            ps.advance();
          }
        };
        switch (stages) {
          case 3: run(lowbit::gemm8::PipeState<3>{}); break;
          case 5: run(lowbit::gemm8::PipeState<5>{}); break;
          case 8: run(lowbit::gemm8::PipeState<8>{}); break;
          default: throw std::invalid_argument("gemm8_pipe_states: stages must be 3, 5 or 8 (the kernel's rings)");
        }
        return out;
      },
      "The (slot, phase) sequence of the kernel's ring position for the first n stages");
}
