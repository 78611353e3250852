"""Triton codebook-lookup GEMM: the Triton backend of ``lowbit::vq_gemm`` (formats ``vq2`` / ``vq3``).

Math contract: docs/formats.md, "vq" and "VQ GEMM": ``out = x @ W^T + bias`` with
``W[n, j*d + t] = codebook[idx[n, j], t] * channel_scale[n]``, fp32 accumulate, output in x's dtype.

Per ``[BLOCK_M, BLOCK_N]`` output tile the kernel walks K in ``BLOCK_K`` steps:

* the packed indices of the weight tile are decoded on the fly: one byte each (8-bit), or two per three
  bytes (12-bit: element k of row n reads the three bytes of its pair and picks the low or high 12 bits);
* the weight tile is gathered from the codebook with the index as an offset (``tl.load(codebook +
  idx * d + t)``): the codebook (4 KiB for vq2 in fp32, 64 KiB for vq3) stays in L1/L2 and every weight
  element is one cached load, no dense weight ever exists in global memory;
* bf16/fp16 x meets the gathered tile in its own dtype in ``tl.dot`` (fp32 accumulate); fp32 x uses an
  fp32 ("ieee") dot, so the fp32 path is exact up to summation order;
* the channel scale (constant along K, so ``sum_k x*c*s = s * sum_k x*c``) and the bias are applied once
  in the epilogue.

**fp8 variant** (:func:`vq_gemm_fp8_triton`): the codebook is stored as e4m3 with one fp32 scale
(:func:`quantize_codebook_fp8`), x is quantized per token to e4m3 (:func:`quantize_x_fp8`), the gathered
e4m3 tile and the e4m3 x tile go into an fp8 ``tl.dot``; each BLOCK_K partial sum is promoted into the
fp32 accumulator at once (Hopper's fp8 MMA accumulates with ~14 bits), and ``x_scale[m] * cb_scale *
channel_scale[n]`` is applied in the epilogue. It computes a different (coarser) quantity than the op
contract, so it is not registered as a backend of ``lowbit::vq_gemm``; callers opt in.

**Small M** (M <= 16, decode-like GEMV): one 16-row M tile, so each program reads its weight indices once,
and K is split over ``SPLIT_K`` programs per N block (more programs for the SMs when N/BLOCK_N is small);
the partial sums go to an fp32 workspace ``[SPLIT_K, M, N]`` that the wrapper sums and finishes (scale,
bias, cast) in torch.

**Dequantize** (:func:`vq_dequantize_triton`, backend of ``lowbit::vq_dequantize``): the same decode and
gather into a dense ``[N, K]`` weight (fp32 math, one rounding), for feeding cuBLAS at large M.

Interpreter note: Triton 3.9's interpreter returns garbage from a bf16 ``tl.dot``; under the interpreter
(only) the bf16 path rounds the gathered weights to bf16 and runs the dot in fp32, which is the same math
(a bf16 x bf16 product is exact in fp32). Compiled kernels use the bf16 MMA.

Not measured on a GPU yet (written without one): tile tables below are first guesses.

CPU: as kernels/gemm_w4a4.py, the kernels run under the Triton interpreter only when ``TRITON_INTERPRET=1``
was set when this module was imported (tests load a private interpreted copy); the dispatch selects this
backend only for CUDA tensors with compiled kernels. Only builtins of ``triton.language`` are called in
the kernel (no ``tl.zeros``/``tl.cdiv``: they are ``@triton.jit`` functions).

Example (on a CUDA GPU)::

    import torch
    from lowbit_engine.kernels.vq_gemm import vq_gemm_triton
    cb = torch.randn(256, 4, device="cuda")
    codes = torch.randint(0, 256, (64, 32), dtype=torch.uint8, device="cuda")
    out = vq_gemm_triton(torch.randn(5, 128, device="cuda", dtype=torch.bfloat16), codes, cb, 64, 128, 8)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from lowbit_engine import _dispatch

FP8_MAX = 448.0


@triton.jit
def _vq_gemm_kernel(
    x_ptr, x_scale_ptr, codes_ptr, cb_ptr, cb_scale, cs_ptr, bias_ptr, out_ptr,
    M, N, K, ROW_BYTES, K_PER_SPLIT,
    D: tl.constexpr,
    INDEX_BITS: tl.constexpr,
    FP8: tl.constexpr,
    FP32_DOT: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
    HAS_CS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PARTIAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One ``[BLOCK_M, BLOCK_N]`` tile over the K range of split ``program_id(2)``.

    ``PARTIAL``: write the raw fp32 partial sum to ``out [SPLIT_K, M, N]`` (split-K); else finish the
    epilogue (scales, bias) and store in out's dtype.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    rows_m = offs_m.to(tl.int64)
    rows_n = offs_n.to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    t = offs_k % D  # position inside the sub-vector

    k_begin = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_begin + K_PER_SPLIT, K)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        kk = k0 + offs_k
        mask_k = kk < k_end
        sub = kk // D  # sub-vector (index) number along the row
        wmask = mask_n[:, None] & mask_k[None, :]
        if INDEX_BITS == 8:
            idx = tl.load(codes_ptr + rows_n[:, None] * ROW_BYTES + sub[None, :], mask=wmask, other=0)
            idx = idx.to(tl.int32)
        else:
            # 12-bit: pair p = sub // 2 in bytes 3p..3p+2; i0 = b0 | (b1 & 0xF) << 8, i1 = b1 >> 4 | b2 << 4.
            base = codes_ptr + rows_n[:, None] * ROW_BYTES + (3 * (sub // 2))[None, :]
            b0 = tl.load(base, mask=wmask, other=0).to(tl.int32)
            b1 = tl.load(base + 1, mask=wmask, other=0).to(tl.int32)
            b2 = tl.load(base + 2, mask=wmask, other=0).to(tl.int32)
            hi = (sub % 2)[None, :] == 1
            idx = tl.where(hi, (b1 >> 4) | (b2 << 4), b0 | ((b1 & 0xF) << 8))
        # The gather: the index is an offset into the codebook (small, cache resident).
        w = tl.load(cb_ptr + idx * D + t[None, :], mask=wmask, other=0.0)
        xmask = mask_m[:, None] & mask_k[None, :]
        xt = tl.load(x_ptr + rows_m[:, None] * K + kk[None, :], mask=xmask, other=0.0)
        if FP8:
            # e4m3 x e4m3 -> fp32; each BLOCK_K partial is promoted into the fp32 accumulator at once.
            acc += tl.dot(xt, tl.trans(w), out_dtype=tl.float32)
        elif FP32_DOT:
            acc += tl.dot(xt, tl.trans(w.to(tl.float32)), input_precision="ieee", out_dtype=tl.float32)
        elif EMULATE_BF16:
            # Interpreter only (its bf16 tl.dot returns garbage in Triton 3.9): the same math in fp32.
            # A bf16 x bf16 product is exact in fp32, so this matches an MMA up to summation order.
            wq = w.to(tl.bfloat16).to(tl.float32)
            acc += tl.dot(xt.to(tl.float32), tl.trans(wq), input_precision="ieee", out_dtype=tl.float32)
        else:
            acc += tl.dot(xt, tl.trans(w.to(xt.dtype)), out_dtype=tl.float32)

    if PARTIAL:
        ptrs = out_ptr + pid_k.to(tl.int64) * M * N + rows_m[:, None] * N + offs_n[None, :]
        tl.store(ptrs, acc, mask=mask_m[:, None] & mask_n[None, :])
    else:
        if FP8:
            xs = tl.load(x_scale_ptr + rows_m, mask=mask_m, other=0.0)
            acc = acc * (xs[:, None] * cb_scale)
        if HAS_CS:
            cs = tl.load(cs_ptr + offs_n, mask=mask_n, other=0.0)
            acc = acc * cs[None, :]
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            acc += bias[None, :]
        ptrs = out_ptr + rows_m[:, None] * N + offs_n[None, :]
        tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _vq_dequant_kernel(
    codes_ptr, cb_ptr, cs_ptr, out_ptr, N, K, ROW_BYTES,
    D: tl.constexpr, INDEX_BITS: tl.constexpr, HAS_CS: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One ``[BLOCK_N, BLOCK_K]`` tile of the dense weight: decode, gather, scale in fp32, round once."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    kk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_n < N)[:, None] & (kk < K)[None, :]
    rows_n = offs_n.to(tl.int64)
    sub = kk // D
    if INDEX_BITS == 8:
        idx = tl.load(codes_ptr + rows_n[:, None] * ROW_BYTES + sub[None, :], mask=mask, other=0).to(tl.int32)
    else:
        base = codes_ptr + rows_n[:, None] * ROW_BYTES + (3 * (sub // 2))[None, :]
        b0 = tl.load(base, mask=mask, other=0).to(tl.int32)
        b1 = tl.load(base + 1, mask=mask, other=0).to(tl.int32)
        b2 = tl.load(base + 2, mask=mask, other=0).to(tl.int32)
        idx = tl.where((sub % 2)[None, :] == 1, (b1 >> 4) | (b2 << 4), b0 | ((b1 & 0xF) << 8))
    w = tl.load(cb_ptr + idx * D + (kk % D)[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_CS:
        w = w * tl.load(cs_ptr + offs_n, mask=offs_n < N, other=0.0)[:, None]
    tl.store(out_ptr + rows_n[:, None] * K + kk[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------
# tile configurations


@dataclass(frozen=True)
class TileConfig:
    """Launch parameters; ``split_k`` > 1 uses the fp32 workspace (small M)."""

    block_m: int
    block_n: int
    block_k: int = 64
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3


# First guesses for the H100 (not measured): M <= 16 is the GEMV path (one 16-row tile, split-K when the
# N blocks alone cannot fill 132 SMs); larger M uses plain tiles.
H100_SMS = 132
INTERPRETER_CONFIG = TileConfig(block_m=16, block_n=32, block_k=32, num_warps=1, num_stages=1)


def interpreted() -> bool:
    """Whether the kernels were decorated under ``TRITON_INTERPRET=1`` (they then run on CPU tensors)."""
    return not isinstance(_vq_gemm_kernel, triton.runtime.jit.JITFunction)


def default_config(M: int, N: int, K: int) -> TileConfig:
    """The tile configuration used when the caller gives none."""
    if interpreted():
        return INTERPRETER_CONFIG
    if M <= 16:
        n_blocks = triton.cdiv(N, 64)
        split = max(1, min(K // 256, H100_SMS // max(1, n_blocks)))
        return TileConfig(block_m=16, block_n=64, block_k=128, split_k=split, num_warps=4, num_stages=4)
    if M <= 64:
        return TileConfig(block_m=64, block_n=64, block_k=64, num_warps=4, num_stages=4)
    return TileConfig(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3)


# --------------------------------------------------------------------------------------------------
# launch


def _check_out(out: Tensor | None, M: int, N: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    if out is None:
        return torch.empty(M, N, dtype=dtype, device=device)
    if out.shape != (M, N) or out.dtype != dtype or out.device != device or not out.is_contiguous():
        raise ValueError(f"out: expected a contiguous {dtype} tensor of shape ({M}, {N}) on {device}, "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device} (contiguous={out.is_contiguous()})")
    return out


def _launch(x: Tensor, x_scale: Tensor | None, codes: Tensor, codebook: Tensor, cb_scale: float,
            channel_scale: Tensor | None, bias: Tensor | None, N: int, K: int, index_bits: int,
            out_dtype: torch.dtype, out: Tensor | None, config: TileConfig | None) -> Tensor:
    if not interpreted() and not x.is_cuda:
        raise RuntimeError("the Triton VQ GEMM needs CUDA tensors; on the CPU it runs only under the "
                           "Triton interpreter (TRITON_INTERPRET=1 set before the module is imported)")
    M = x.shape[0]
    d = codebook.shape[1]
    fp8 = x.dtype == torch.float8_e4m3fn
    cfg = config or default_config(M, N, K)
    if cfg.block_k % (2 * d):
        raise ValueError(f"block_k={cfg.block_k} must be a multiple of 2*d={2 * d}")
    out = _check_out(out, M, N, out_dtype, x.device)
    split = max(1, min(cfg.split_k, triton.cdiv(K, cfg.block_k)))
    # Each split covers a whole number of BLOCK_K steps (so it starts on a 12-bit pair boundary).
    k_per_split = triton.cdiv(triton.cdiv(K, split), cfg.block_k) * cfg.block_k
    split = triton.cdiv(K, k_per_split)
    partial = split > 1
    target = torch.empty(split, M, N, dtype=torch.float32, device=x.device) if partial else out
    dummy = target
    grid = (triton.cdiv(M, cfg.block_m), triton.cdiv(N, cfg.block_n), split)
    guard = torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()
    with guard:
        _vq_gemm_kernel[grid](
            x, x_scale if x_scale is not None else dummy, codes, codebook, float(cb_scale),
            channel_scale if channel_scale is not None else dummy, bias if bias is not None else dummy, target,
            M, N, K, codes.shape[1], k_per_split,
            D=d, INDEX_BITS=index_bits, FP8=fp8, FP32_DOT=x.dtype == torch.float32,
            EMULATE_BF16=interpreted() and x.dtype == torch.bfloat16,
            HAS_CS=channel_scale is not None, HAS_BIAS=bias is not None, PARTIAL=partial,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    if partial:  # split-K: sum the partials and finish the epilogue (M <= 16 rows: negligible work)
        acc = target.sum(0)
        if fp8:
            acc = acc * (x_scale[:, None] * float(cb_scale))
        if channel_scale is not None:
            acc = acc * channel_scale[None, :]
        if bias is not None:
            acc = acc + bias.float()[None, :]
        out.copy_(acc)
    return out


def vq_gemm_triton(
    x: Tensor, codes: Tensor, codebook: Tensor, N: int, K: int, index_bits: int,
    channel_scale: Tensor | None = None, bias: Tensor | None = None, *, out: Tensor | None = None,
    config: TileConfig | None = None,
) -> Tensor:
    """``lowbit::vq_gemm`` with the Triton kernel: ``x [M, K]`` (bf16/fp16/fp32) ``@ W^T + bias``.

    ``codes`` uint8 ``[N, packed_row_bytes(K/d)]`` (8- or 12-bit), ``codebook [k, d]`` (fp32/bf16/fp16),
    ``channel_scale`` fp32 ``[N]``, ``bias [N]``; output in x's dtype. Inputs are validated like the op.
    """
    from lowbit_engine import ops

    ops._check_vq_gemm(x, codes, codebook, channel_scale, bias, N, K, index_bits)
    return _launch(x.contiguous(), None, codes.contiguous(), codebook.contiguous(), 1.0, channel_scale, bias,
                   N, K, index_bits, x.dtype, out, config)


def vq_dequantize_triton(
    codes: Tensor, codebook: Tensor, N: int, K: int, index_bits: int, channel_scale: Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16, *, out: Tensor | None = None, block_n: int = 32, block_k: int = 64,
) -> Tensor:
    """``lowbit::vq_dequantize`` with Triton: the dense ``[N, K]`` weight in ``out_dtype`` (fp32 math, one
    rounding), e.g. to feed a cuBLAS GEMM at large M."""
    from lowbit_engine import ops

    ops._check_vq("vq_dequantize", codes.device, codes, codebook, channel_scale, N, K, index_bits)
    return _launch_dequant(codes, codebook, channel_scale, N, K, index_bits, out_dtype, out, block_n, block_k)


def _launch_dequant(codes, codebook, channel_scale, N, K, index_bits, out_dtype, out=None, block_n=32,
                    block_k=64) -> Tensor:
    if not interpreted() and not codes.is_cuda:
        raise RuntimeError("the Triton VQ dequantize needs CUDA tensors (or the Triton interpreter)")
    out = _check_out(out, N, K, out_dtype, codes.device)
    grid = (triton.cdiv(N, block_n), triton.cdiv(K, block_k))
    guard = torch.cuda.device(codes.device) if codes.is_cuda else contextlib.nullcontext()
    with guard:
        _vq_dequant_kernel[grid](
            codes.contiguous(), codebook.contiguous(), channel_scale if channel_scale is not None else out, out,
            N, K, codes.shape[1], D=codebook.shape[1], INDEX_BITS=index_bits, HAS_CS=channel_scale is not None,
            BLOCK_N=block_n, BLOCK_K=block_k,
        )
    return out


# --------------------------------------------------------------------------------------------------
# fp8 variant


def quantize_codebook_fp8(codebook: Tensor) -> tuple[Tensor, float]:
    """The codebook as e4m3 with one fp32 scale: ``codebook ~= cb_fp8.float() * scale``."""
    amax = codebook.detach().float().abs().max().item()
    scale = amax / FP8_MAX if amax > 0 else 1.0
    return (codebook.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def quantize_x_fp8(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token e4m3 quantization: ``x ~= xq.float() * scale[:, None]`` (scale fp32 ``[M]``; 1 for a zero row)."""
    amax = x.detach().float().abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    return (x.float() / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def vq_gemm_fp8_triton(
    x: Tensor, codes: Tensor, cb_fp8: Tensor, cb_scale: float, N: int, K: int, index_bits: int,
    channel_scale: Tensor | None = None, bias: Tensor | None = None, *, out_dtype: torch.dtype | None = None,
    out: Tensor | None = None, config: TileConfig | None = None,
) -> Tensor:
    """fp8 VQ GEMM: x quantized per token to e4m3 here, the e4m3 codebook ``cb_fp8`` (one fp32
    ``cb_scale``, from :func:`quantize_codebook_fp8`), fp8 ``tl.dot``, fp32 accumulate.

    ``out = (xq * x_scale) @ (cb_fp8[idx] * cb_scale * channel_scale)^T + bias`` in ``out_dtype``
    (default: x's dtype). On a GPU this needs sm_89+ (fp8 tensor cores).

    Above ``LARGE_M`` tokens the codebook gather runs once per layer instead of once per M tile: the
    dequantize kernel copies the e4m3 codebook bytes of every weight into the shared 8-bit scratch buffer
    (kernels/w4_expand.py), and the 8-bit GEMM (kernels/gemm8.py) runs with the row scale
    ``cb_scale * channel_scale``. The same math up to the order of the scale multiplies.
    """
    if cb_fp8.dtype != torch.float8_e4m3fn or cb_fp8.dim() != 2:
        raise ValueError(f"vq_gemm_fp8: cb_fp8 must be a 2-d float8_e4m3fn codebook, got {cb_fp8.dtype} "
                         f"{tuple(cb_fp8.shape)}")
    from lowbit_engine import ops

    # Validate the shared arguments with the op's checks (on a bf16 view of the codebook's shape).
    ops._check_vq_gemm(x, codes, cb_fp8.new_empty(cb_fp8.shape, dtype=torch.bfloat16), channel_scale, bias,
                       N, K, index_bits)
    xq, xs = quantize_x_fp8(x)
    if x.shape[0] > LARGE_M and config is None:
        expand, gemm8 = _w8_modules()
        w8 = expand.scratch.get(N * K, x.device).view(N, K)
        _launch_dequant(codes, cb_fp8.contiguous().view(torch.uint8), None, N, K, index_bits, torch.uint8, out=w8)
        row = torch.full((N,), float(cb_scale), dtype=torch.float32, device=x.device)
        if channel_scale is not None:
            row = row * channel_scale.float()
        return gemm8.gemm8_triton(xq.contiguous(), xs.contiguous(), w8.view(torch.float8_e4m3fn), row, None, None,
                                  bias, out_dtype or x.dtype, out=out, kernel_name="gemm8_vq")
    return _launch(xq, xs, codes.contiguous(), cb_fp8.contiguous(), cb_scale, channel_scale, bias, N, K,
                   index_bits, out_dtype or x.dtype, out, config)


LARGE_M = 64  # above: gather once into the 8-bit scratch + the 8-bit GEMM (as the 4-bit formats)
_expand = _gemm8 = None  # kernels/w4_expand.py and kernels/gemm8.py, on first use (tests set interpreted copies)


def _w8_modules():
    global _expand, _gemm8
    if _expand is None:
        from lowbit_engine.kernels import gemm8, w4_expand

        _expand, _gemm8 = w4_expand, gemm8
    return _expand, _gemm8


# --------------------------------------------------------------------------------------------------
# dispatch


def _applies(x: Tensor, *_args) -> bool:
    """CUDA (not ROCm) tensors with compiled kernels; bf16/fp16 tensor cores need sm_80."""
    if not x.is_cuda or torch.version.hip is not None or interpreted():
        return False
    return torch.cuda.get_device_capability(x.device) >= (8, 0)


def _run(x, codes, codebook, channel_scale, bias, N, K, index_bits) -> Tensor:
    return _launch(x.contiguous(), None, codes.contiguous(), codebook.contiguous(), 1.0, channel_scale, bias,
                   N, K, index_bits, x.dtype, None, None)


def _applies_dequant(codes: Tensor, *_args) -> bool:
    return codes.is_cuda and torch.version.hip is None and not interpreted()


def _run_dequant(codes, codebook, channel_scale, N, K, index_bits, out_dtype) -> Tensor:
    return _launch_dequant(codes, codebook, channel_scale, N, K, index_bits, out_dtype)


def register() -> None:
    """Register the ``triton`` backends of ``vq_gemm`` and ``vq_dequantize`` (the ops validate inputs)."""
    _dispatch.register("vq_gemm", "triton", _applies, _run)
    _dispatch.register("vq_dequantize", "triton", _applies_dequant, _run_dequant)
