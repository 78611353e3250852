// C++ CPU reference kernels. Plain loops, written to be read and trusted, not to be fast.
// Every function follows docs/formats.md exactly; integer parts agree bit for bit with the torch
// references and with the GPU kernels. Pointers are raw; nullptr means "absent" for optional inputs.
// Bad arguments throw std::invalid_argument (pybind11 turns it into ValueError).
#pragma once
#include <cstdint>

#include "lowbit/dtype.h"

namespace lowbit::cpu {

// x [M, K] (F16 or BF16); smooth fp32 [K] or nullptr; lora_down [R, K] (dtype of x) or nullptr (R = 0).
// mode INT4_G64: q_out uint8 [M, K/2], scales_out fp32 [M, K/64].
// mode INT8_TOKEN / FP8_TOKEN: q_out int8 / e4m3 [M, K], scales_out fp32 [M].
// lora_act_out fp32 [M, R] = x @ lora_down^T on the RAW x (nullptr when R == 0).
void quantize_act(const void* x, DType x_dtype, int64_t M, int64_t K, const float* smooth,
                  const void* lora_down, int64_t R, ActQuant mode, void* q_out, float* scales_out,
                  float* lora_act_out);

// act uint8 [M, K/2] packed int4, act_scales fp32 [M, K/64], w uint8 [N, K/2], w_scales bf16 [N, K/64]
// (passed as raw uint16 bits). lora_act fp32 [M, R] with lora_up [N, R] (F16/BF16), or both nullptr.
// bias [N] (F32/F16/BF16) or nullptr. out [M, N] in out_dtype (F32/F16/BF16).
void gemm_w4a4(const uint8_t* act, const float* act_scales, const uint8_t* w, const uint16_t* w_scales,
               int64_t M, int64_t N, int64_t K, const float* lora_act, const void* lora_up,
               DType lora_dtype, int64_t R, const void* bias, DType bias_dtype, void* out,
               DType out_dtype);

// act int8 or e4m3 [M, K] (act_dtype I8 / F8E4M3), act_scales fp32 [M]; the rest as gemm_w4a4.
void gemm_w4a8(const void* act, DType act_dtype, const float* act_scales, const uint8_t* w,
               const uint16_t* w_scales, int64_t M, int64_t N, int64_t K, const float* lora_act,
               const void* lora_up, DType lora_dtype, int64_t R, const void* bias, DType bias_dtype,
               void* out, DType out_dtype);

// codes: index_bits 8 -> uint8 [N, K/d]; 12 -> uint8 [N, 3*ceil((K/d)/2)] (docs/formats.md).
// codebook [k, d] (F32/F16/BF16); channel_scale fp32 [N] or nullptr. out [N, K] in out_dtype.
void vq_dequantize(const uint8_t* codes, int index_bits, const void* codebook, DType codebook_dtype,
                   int64_t k, int64_t d, const float* channel_scale, int64_t N, int64_t K, void* out,
                   DType out_dtype);

// out [M, N] (dtype of x) = x [M, K] (F16/BF16/F32) @ W^T + bias, W decoded as in vq_dequantize.
void vq_gemm(const void* x, DType x_dtype, int64_t M, const uint8_t* codes, int index_bits,
             const void* codebook, DType codebook_dtype, int64_t k, int64_t d, const float* channel_scale,
             int64_t N, int64_t K, const void* bias, DType bias_dtype, void* out);

// Entry linears (issue "Hopper speed, step 3"): y = LayerNorm(x) * (1 + scale) + shift rounded to x's dtype
// (x [M, K] F16/BF16, shift/scale [M/T, K] same dtype, token m in sample m / T), written to y_out [M, K],
// then quantize_act of y (arguments as quantize_act).
void norm_modulate_quantize(const void* x, DType x_dtype, int64_t M, int64_t K, int64_t T, const void* shift,
                            const void* scale, float eps, const float* smooth, const void* lora_down, int64_t R,
                            ActQuant mode, void* q_out, float* scales_out, float* lora_act_out, void* y_out);

// Exit linears (docs/formats.md, "Exit quantizer"): h [M, K] F16/BF16, a GEMM's output; activation 0 none,
// 1 GELU-tanh (fp32, rounded back to h's dtype; the result goes to h_out [M, K] when not null); then the
// next linear's 8-bit input with one static scale (mode INT8_TOKEN / FP8_TOKEN): q_out [M, K], scales_out
// [M] (scale, or NaN for a row holding a non-finite value), lora_act_out [M, R] = h @ lora_down^T (fp32);
// lora_down [R, K] has its rows ld_stride >= K elements apart (a column slice of a wider one).
void exit_quantize(const void* h, DType h_dtype, int64_t M, int64_t K, int activation, float scale,
                   const float* smooth, const void* lora_down, int64_t R, int64_t ld_stride, ActQuant mode,
                   void* q_out, float* scales_out, void* h_out, float* lora_act_out);

// ---- promotion-free W4A8 (docs/formats.md: F8L, I8Q, 8-bit GEMM with row scales) ------------------

// F8L codes uint8 [N, K/2] (sign-magnitude nibbles), gscales e4m3 bits [N, K/64] -> e4m3 bytes [N, K].
void expand_f8l(const uint8_t* codes, const uint8_t* gscales, int64_t N, int64_t K, uint8_t* out);

// I8Q codes uint8 [N, K/2] (0..15), steps and zeros uint8 [N, K/64] -> int8 (q - z) * s [N, K].
void expand_i8q(const uint8_t* codes, const uint8_t* steps, const uint8_t* zeros, int64_t N, int64_t K,
                int8_t* out);

// act and w8 both int8 or both e4m3 (act_dtype I8 / F8E4M3) [M, K] / [N, K]; act_scales fp32 [M],
// w_row_scale fp32 [N]; K a positive multiple of k_multiple. lora_act fp32 [M, R] (rounded to lora_dtype
// first) with lora_up [N, R], bias [N], out [M, N] as gemm_w4a4.
void gemm_w8(const void* act, DType act_dtype, const float* act_scales, const void* w8, const float* w_row_scale,
             int64_t M, int64_t N, int64_t K, int64_t k_multiple, const float* lora_act, const void* lora_up,
             DType lora_dtype, int64_t R, const void* bias, DType bias_dtype, void* out, DType out_dtype);

// expand_f8l + gemm_w8 (act e4m3 bits [M, K]).
void gemm_w4a8_f8l(const uint8_t* act, const float* act_scales, const uint8_t* w, const uint8_t* w_gscales,
                   const float* w_row_scale, int64_t M, int64_t N, int64_t K, const float* lora_act,
                   const void* lora_up, DType lora_dtype, int64_t R, const void* bias, DType bias_dtype, void* out,
                   DType out_dtype);

// expand_i8q + gemm_w8 (act int8 [M, K]).
void gemm_w4a8_i8q(const int8_t* act, const float* act_scales, const uint8_t* w, const uint8_t* w_steps,
                   const uint8_t* w_zeros, const float* w_row_scale, int64_t M, int64_t N, int64_t K,
                   const float* lora_act, const void* lora_up, DType lora_dtype, int64_t R, const void* bias,
                   DType bias_dtype, void* out, DType out_dtype);

// ---- weight-only W4A16 (docs/formats.md: "w4a16") ------------------------------------------------

// x [M, K] (F32/F16/BF16) times w uint8 [N, K/2] (codes 0..15, even k in the low nibble), w_scales bf16 bits
// [N, K/64], w_zeros uint8 [N, K/64] (0..15): out[m, n] = sum_g s * sum_{k in g} x * (q - z) (+ bias[n]).
void gemm_w4a16(const void* x, DType x_dtype, int64_t M, int64_t K, const uint8_t* w, const uint16_t* w_scales,
                const uint8_t* w_zeros, int64_t N, const void* bias, DType bias_dtype, void* out, DType out_dtype);

}  // namespace lowbit::cpu
