// C++ CPU references of the vq format (docs/formats.md, "vq"): decoding packed 8- or 12-bit codebook
// indices into a dense weight (vq_dequantize) and x @ W^T + bias with W decoded row by row (vq_gemm).
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "lowbit/cpu_ref.h"
#include "lowbit/numeric.h"

namespace lowbit::cpu {
namespace {

[[noreturn]] void bad(const char* op, const std::string& msg) {
  throw std::invalid_argument(std::string(op) + ": " + msg);
}

// Bytes of one packed index row: one per index (8-bit), or 3 per pair of indices (12-bit).
int64_t row_bytes(int index_bits, int64_t n_idx) { return index_bits == 8 ? n_idx : 3 * ((n_idx + 1) / 2); }

// The shape and codebook of one vq weight, checked and with the codebook converted to fp32 once.
struct VQWeight {
  const char* op;
  const uint8_t* codes;
  int index_bits;
  int64_t k, d, N, K, n_idx;
  std::vector<float> codebook;  // [k, d] fp32
  const float* channel_scale;   // [N] or nullptr

  // Decodes the indices of row n (12-bit pairs: b0 = i0 & 0xFF, b1 = i0 >> 8 | (i1 & 0xF) << 4,
  // b2 = i1 >> 4) and writes the row W[n, :] = codebook[idx] (* channel_scale[n]) in fp32.
  void decode_row(int64_t n, int32_t* idx, float* w_row) const {
    const uint8_t* c = codes + n * row_bytes(index_bits, n_idx);
    if (index_bits == 8) {
      for (int64_t j = 0; j < n_idx; ++j) idx[j] = c[j];
    } else {
      for (int64_t j = 0; j < n_idx; j += 2) {
        const uint8_t* p = c + 3 * (j / 2);
        idx[j] = int32_t(p[0]) | (int32_t(p[1] & 0xF) << 8);
        if (j + 1 < n_idx) idx[j + 1] = int32_t(p[1] >> 4) | (int32_t(p[2]) << 4);
      }
    }
    for (int64_t j = 0; j < n_idx; ++j) {
      // An index past the codebook would read out of bounds: refuse it rather than guess.
      if (idx[j] >= k) {
        bad(op, "index " + std::to_string(idx[j]) + " at row " + std::to_string(n) + ", position " +
                    std::to_string(j) + " is not below k=" + std::to_string(k));
      }
      const float* centroid = codebook.data() + int64_t(idx[j]) * d;
      float* dst = w_row + j * d;
      if (channel_scale != nullptr) {
        const float s = channel_scale[n];
        for (int64_t t = 0; t < d; ++t) dst[t] = centroid[t] * s;  // one fp32 multiply
      } else {
        for (int64_t t = 0; t < d; ++t) dst[t] = centroid[t];
      }
    }
  }
};

// Validates the vq arguments; returns false when N * K is empty (nothing to decode).
bool check_vq(const char* op, const uint8_t* codes, int index_bits, const void* codebook, DType codebook_dtype,
              int64_t k, int64_t d, int64_t N, int64_t K) {
  if (index_bits != 8 && index_bits != 12) bad(op, "index_bits must be 8 or 12, got " + std::to_string(index_bits));
  if (k < 1 || k > (int64_t(1) << index_bits)) {
    bad(op, "k must be in [1, " + std::to_string(int64_t(1) << index_bits) + "] for " +
                std::to_string(index_bits) + "-bit indices, got " + std::to_string(k));
  }
  if (d < 1) bad(op, "d must be >= 1, got " + std::to_string(d));
  if (N < 0) bad(op, "N must be >= 0, got " + std::to_string(N));
  if (K < 0 || K % d != 0) {
    bad(op, "K must be a non-negative multiple of d=" + std::to_string(d) + ", got " + std::to_string(K));
  }
  if (!is_float_dtype(codebook_dtype)) {
    bad(op, "codebook must be float32, float16 or bfloat16, got dtype code " + std::to_string(int(codebook_dtype)));
  }
  if (N == 0 || K == 0) return false;
  if (codes == nullptr) bad(op, "codes is null");
  if (codebook == nullptr) bad(op, "codebook is null");
  return true;
}

VQWeight make_weight(const char* op, const uint8_t* codes, int index_bits, const void* codebook,
                     DType codebook_dtype, int64_t k, int64_t d, const float* channel_scale, int64_t N,
                     int64_t K) {
  VQWeight v{op, codes, index_bits, k, d, N, K, K / d, std::vector<float>(size_t(k * d)), channel_scale};
  load_floats(codebook, codebook_dtype, 0, k * d, v.codebook.data());
  return v;
}

}  // namespace

void vq_dequantize(const uint8_t* codes, int index_bits, const void* codebook, DType codebook_dtype,
                   int64_t k, int64_t d, const float* channel_scale, int64_t N, int64_t K, void* out,
                   DType out_dtype) {
  const char* op = "vq_dequantize";
  if (!is_float_dtype(out_dtype)) {
    bad(op, "out dtype must be float32, float16 or bfloat16, got dtype code " + std::to_string(int(out_dtype)));
  }
  if (!check_vq(op, codes, index_bits, codebook, codebook_dtype, k, d, N, K)) return;
  if (out == nullptr) bad(op, "out is null");
  const VQWeight wt = make_weight(op, codes, index_bits, codebook, codebook_dtype, k, d, channel_scale, N, K);

  std::vector<int32_t> idx(static_cast<size_t>(wt.n_idx));
  std::vector<float> row(static_cast<size_t>(K));
  for (int64_t n = 0; n < N; ++n) {
    wt.decode_row(n, idx.data(), row.data());
    store_floats(row.data(), K, out, out_dtype, n * K);
  }
}

void vq_gemm(const void* x, DType x_dtype, int64_t M, const uint8_t* codes, int index_bits,
             const void* codebook, DType codebook_dtype, int64_t k, int64_t d, const float* channel_scale,
             int64_t N, int64_t K, const void* bias, DType bias_dtype, void* out) {
  const char* op = "vq_gemm";
  if (!is_float_dtype(x_dtype)) {
    bad(op, "x must be float32, float16 or bfloat16, got dtype code " + std::to_string(int(x_dtype)));
  }
  if (bias != nullptr && !is_float_dtype(bias_dtype)) {
    bad(op, "bias must be float32, float16 or bfloat16, got dtype code " + std::to_string(int(bias_dtype)));
  }
  if (M < 0) bad(op, "M must be >= 0, got " + std::to_string(M));
  if (K == 0) bad(op, "K must be > 0");
  if (!check_vq(op, codes, index_bits, codebook, codebook_dtype, k, d, N, K) || M == 0) return;
  if (x == nullptr) bad(op, "x is null");
  if (out == nullptr) bad(op, "out is null");
  const VQWeight wt = make_weight(op, codes, index_bits, codebook, codebook_dtype, k, d, channel_scale, N, K);

  std::vector<float> xf(static_cast<size_t>(M * K));
  load_floats(x, x_dtype, 0, M * K, xf.data());
  std::vector<float> bf(size_t(N), 0.0f);
  if (bias != nullptr) load_floats(bias, bias_dtype, 0, N, bf.data());

  std::vector<int32_t> idx(static_cast<size_t>(wt.n_idx));
  std::vector<float> w_row(static_cast<size_t>(K));
  for (int64_t n = 0; n < N; ++n) {
    wt.decode_row(n, idx.data(), w_row.data());  // each weight row is decoded once, used for all tokens
    for (int64_t m = 0; m < M; ++m) {
      const float* xr = xf.data() + m * K;
      float acc = 0.0f;
      for (int64_t kk = 0; kk < K; ++kk) acc += xr[kk] * w_row[size_t(kk)];
      if (bias != nullptr) acc += bf[size_t(n)];
      store_floats(&acc, 1, out, x_dtype, m * N + n);
    }
  }
}

}  // namespace lowbit::cpu
