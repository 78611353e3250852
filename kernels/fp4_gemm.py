"""Triton FP4 GEMMs of the ``nvfp4`` and ``mxfp4`` formats: E2M1 weights unpacked in registers.

Math contract: docs/formats.md ("E2M1", "nvfp4", "mxfp4"). One kernel, two activation kinds (constexpr):

* ``ACT_FP8`` (W4A8, for large M): activations e4m3 per token (``qa [M, K]``, ``sa [M]``, from
  ``fp8_gemm.quantize_fp8_rowwise_triton``). Each weight tile is unpacked (two codes per byte, even k in the
  low nibble), turned into E2M1 values, multiplied by its block scale (nvfp4: e4m3 per 16, mxfp4: E8M0 per
  32; the product is exact in fp32) and by the row's power-of-two ``w_inv = 2**-r``, then cast to e4m3
  (round to nearest even on the fp32 bits, as in ``fp8_gemm``) for an fp8 ``tl.dot``. This is exactly
  ``formats.{nvfp4,mxfp4}.dequantize_to_fp8``: mxfp4 is exact, nvfp4 takes one RNE rounding of relative
  error <= 1/21 (the rounding docs/formats.md accepts). Epilogue: ``(acc * sa[m]) * w_scale[n]`` with
  ``w_scale = 2**r * tensor_scale`` (mxfp4: ``2**r``), + bias.
* ``ACT_BF16`` (weight-only, for small M): ``x [M, K]`` bf16; the tile ``value * block_scale`` is exact in
  bf16 (at most 6 significant bits, fp32's exponent range), so the bf16 ``tl.dot`` (fp32 accumulate)
  sees the weight without error; epilogue ``acc * w_scale[n]`` with ``w_scale = tensor_scale`` (nvfp4) or
  1 (mxfp4), + bias.

``w_inv`` and ``w_scale`` are per-layer constants prepared once (``lowbit_engine.ops_float.fp4_fp8_scales``).
CPU: interpreted copies only (see ``fp8_gemm``); only ``triton.language`` builtins inside the kernel.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch import Tensor

from lowbit_engine.kernels import fp8_gemm as _fp8  # quantizer + config table (replaced in interpreter tests)

FMT_NVFP4 = tl.constexpr(0)
FMT_MXFP4 = tl.constexpr(1)
ACT_FP8 = tl.constexpr(0)
ACT_BF16 = tl.constexpr(1)
FMTS = {"nvfp4": (0, 16), "mxfp4": (1, 32)}
ACTS = {"fp8": 0, "bf16": 1}


@triton.jit
def _fp4_gemm_kernel(
    a_ptr, a_scale_ptr, w_ptr, bs_ptr, w_inv_ptr, w_scale_ptr, bias_ptr, out_ptr,
    M, N, K,
    FMT: tl.constexpr, ACT: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, BF16_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_m = (M + BLOCK_M - 1) // BLOCK_M
    num_pid_n = (N + BLOCK_N - 1) // BLOCK_N
    pids_per_group = GROUP_M * num_pid_n
    first_pid_m = (pid // pids_per_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % pids_per_group) % group_rows
    pid_n = (pid % pids_per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_b = tl.arange(0, BLOCK_K // 2)
    offs_g = tl.arange(0, BLOCK_K // GROUP)
    mask_m = offs_m < M
    mask_n = offs_n < N
    rows_m = offs_m.to(tl.int64)
    rows_n = offs_n.to(tl.int64)
    a_ptrs = a_ptr + rows_m[:, None] * K + offs_k[None, :]
    w_ptrs = w_ptr + rows_n[:, None] * (K // 2) + offs_b[None, :]
    bs_ptrs = bs_ptr + rows_n[:, None] * (K // GROUP) + offs_g[None, :]
    if ACT == ACT_FP8:
        w_inv = tl.load(w_inv_ptr + rows_n, mask=mask_n, other=1.0)

    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = (k0 + offs_k) < K
        mask_b = (k0 // 2 + offs_b) < K // 2
        mask_g = (k0 // GROUP + offs_g) < K // GROUP
        # --- unpack E2M1 codes: even k in the low nibble; join + reshape restores natural k order ---
        wb = tl.load(w_ptrs, mask=mask_n[:, None] & mask_b[None, :], other=0).to(tl.int32)
        codes = tl.reshape(tl.join(wb & 15, wb >> 4), (BLOCK_N, BLOCK_K))
        m3 = codes & 7
        ex = m3 >> 1
        mant = m3 & 1
        # magnitudes 0, 0.5 (exponent 0) and (1 + mant / 2) * 2**(ex - 1) = (2 + mant) << ex / 4
        mag = tl.where(ex == 0, mant.to(tl.float32) * 0.5, ((2 + mant) << ex).to(tl.float32) * 0.25)
        val = tl.where((codes & 8) != 0, -mag, mag)
        # --- block scales -> fp32 ---
        sb = tl.load(bs_ptrs, mask=mask_n[:, None] & mask_g[None, :], other=0)
        if FMT == FMT_NVFP4:
            bscale = sb.to(tl.float8e4nv, bitcast=True).to(tl.float32)
        else:
            e8 = sb.to(tl.int32)
            bscale = tl.where(e8 == 0, 0x400000, e8 << 23).to(tl.float32, bitcast=True)  # 2**(b - 127)
        prod = tl.reshape(tl.reshape(val, (BLOCK_N, BLOCK_K // GROUP, GROUP)) * bscale[:, :, None],
                          (BLOCK_N, BLOCK_K))  # exact in fp32
        if ACT == ACT_FP8:
            y = prod * w_inv[:, None]  # times 2**-r: exact
            y = tl.minimum(tl.maximum(y, -448.0), 448.0)
            # fp32 -> e4m3 bits, round to nearest even (see fp8_gemm._quantize_fp8_rowwise_kernel)
            u = y.to(tl.int32, bitcast=True)
            sign = (u >> 24) & 0x80
            a_ = u & 0x7FFFFFFF
            r_ = a_ + 0x7FFFF + ((a_ >> 20) & 1)
            normal_bits = (r_ >> 20) - 960
            e_ = (a_ >> 23) - 127
            man = (a_ & 0x7FFFFF) | 0x800000
            sh = tl.minimum(14 - e_, 25)
            qi = man >> sh
            rem = man - (qi << sh)
            half = (rem * 0 + 1) << (sh - 1)
            qi = qi + ((rem > half) | ((rem == half) & ((qi & 1) == 1))).to(tl.int32)
            wbits = (tl.where(a_ >= 0x3C800000, normal_bits, qi) | sign).to(tl.uint8)
            w_op = wbits.to(tl.float8e4nv, bitcast=True)
            a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0).to(tl.float8e4nv, bitcast=True)
            acc += tl.dot(a, tl.trans(w_op), out_dtype=tl.float32)
        else:
            a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            if BF16_DOT:
                acc += tl.dot(a, tl.trans(prod.to(tl.bfloat16)), out_dtype=tl.float32)
            else:
                # Interpreter only: its bf16 dot reads the raw bits as integers (Triton 3.9), so the same
                # products (prod is exact in bf16) go through an fp32 dot; fp32 accumulate either way.
                acc += tl.dot(a.to(tl.float32), tl.trans(prod), input_precision="ieee")
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K // 2
        bs_ptrs += BLOCK_K // GROUP

    w_scale = tl.load(w_scale_ptr + rows_n, mask=mask_n, other=0.0)
    if ACT == ACT_FP8:
        a_scale = tl.load(a_scale_ptr + rows_m, mask=mask_m, other=0.0)
        acc = (acc * a_scale[:, None]) * w_scale[None, :]
    else:
        acc = acc * w_scale[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc += bias[None, :]
    out_ptrs = out_ptr + rows_m[:, None] * N + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# --------------------------------------------------------------------------------------------------

INTERPRETER_CONFIG = _fp8.TileConfig(32, 32, 64, group_m=2, num_warps=1, num_stages=1)
# Weight-only (bf16) defaults per M bucket: small M is bandwidth bound, a wide N tile and deep K.
BF16_DEFAULTS = {
    16: _fp8.TileConfig(16, 64, 128, num_warps=4, num_stages=4),
    64: _fp8.TileConfig(64, 64, 128, num_warps=4, num_stages=4),
    256: _fp8.TileConfig(128, 128, 64, num_warps=8, num_stages=3),
    2**62: _fp8.TileConfig(128, 128, 64, num_warps=8, num_stages=3),
}
# Unmeasured: the unpack costs registers, so the fp8 path starts from 128x128x128 for large M.
FP8_DEFAULTS = {**_fp8.DEFAULT_BY_BUCKET, 2**62: _fp8.TileConfig(128, 128, 128, num_warps=8, num_stages=3)}


def interpreted() -> bool:
    return not isinstance(_fp4_gemm_kernel, triton.runtime.jit.JITFunction)


_expand = _gemm8 = None  # kernels/w4_expand.py and kernels/gemm8.py, on first use (tests set interpreted copies)


def _w8_modules():
    global _expand, _gemm8
    if _expand is None:
        from lowbit_engine.kernels import gemm8, w4_expand

        _expand, _gemm8 = w4_expand, gemm8
    return _expand, _gemm8


def fp4_gemm_triton(
    act: Tensor, act_scale: Tensor | None, w_packed: Tensor, w_block_scales: Tensor, w_inv: Tensor | None,
    w_scale: Tensor, fmt: str, bias: Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
    *, out: Tensor | None = None, config=None,
) -> Tensor:
    """FP4 weights times fp8 per-token activations (``act`` e4m3 + ``act_scale`` fp32 [M], ``w_inv`` fp32
    [N]) or times bf16 activations (``act`` bf16, ``act_scale`` and ``w_inv`` None).

    Weights: ``w_packed uint8 [N, K/2]``; ``w_block_scales`` e4m3 ``[N, K/16]`` (nvfp4) or uint8 ``[N, K/32]``
    (mxfp4); ``w_scale fp32 [N]`` (see the module docstring). Output ``[M, N]`` in ``out_dtype``.
    """
    fn = "fp4_gemm_triton"
    if fmt not in FMTS:
        raise ValueError(f"{fn}: fmt must be one of {list(FMTS)}, got {fmt!r}")
    fmt_code, group = FMTS[fmt]
    fp8_act = act.dtype == torch.float8_e4m3fn
    _fp8._check_2d(f"{fn}: act", act, (torch.float8_e4m3fn, torch.bfloat16))
    M, K = act.shape
    if M < 1 or K % group != 0:
        raise ValueError(f"{fn}: need M >= 1 and K a multiple of {group} for {fmt}, got M={M}, K={K}")
    _fp8._check_2d(f"{fn}: w_packed", w_packed, (torch.uint8,), None, K // 2)
    N = w_packed.shape[0]
    bs_dtype = torch.float8_e4m3fn if fmt == "nvfp4" else torch.uint8
    _fp8._check_2d(f"{fn}: w_block_scales", w_block_scales, (bs_dtype,), N, K // group)
    vecs = [("w_scale", w_scale, N)]
    if fp8_act:
        if act_scale is None or w_inv is None:
            raise ValueError(f"{fn}: fp8 activations need act_scale [M] and w_inv [N]")
        vecs += [("act_scale", act_scale, M), ("w_inv", w_inv, N)]
    for name, t, n in vecs:
        if t.dtype != torch.float32 or tuple(t.shape) != (n,) or not t.is_contiguous():
            raise ValueError(f"{fn}: {name} must be contiguous fp32 [{n}], got {t.dtype} {tuple(t.shape)}")
    _fp8._check_epilogue(fn, M, N, None, None, bias, out_dtype)
    if not interpreted() and not act.is_cuda:
        raise RuntimeError(f"{fn}: needs CUDA tensors (or the Triton interpreter)")
    out = _fp8._out_tensor(out, M, N, out_dtype, act.device)
    kernel = "fp4_gemm_" + ("fp8" if fp8_act else "bf16") + "_" + fmt

    def launch(cfg, dst: Tensor) -> Tensor:
        block_k = min(max(cfg.block_k, group, 32), max(32, triton.next_power_of_2(K)))
        grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n),)
        guard = torch.cuda.device(act.device) if act.is_cuda else contextlib.nullcontext()
        with guard:
            _fp4_gemm_kernel[grid](
                act.view(torch.uint8) if fp8_act else act, act_scale if fp8_act else dst,
                w_packed, w_block_scales.view(torch.uint8), w_inv if fp8_act else dst, w_scale,
                bias if bias is not None else dst, dst, M, N, K,
                FMT=fmt_code, ACT=0 if fp8_act else 1, GROUP=group, HAS_BIAS=bias is not None, BF16_DOT=not interpreted(),
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=block_k, GROUP_M=cfg.group_m,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )
        return dst

    if config is None:
        if interpreted():
            config = INTERPRETER_CONFIG
        else:
            def bench(cfg) -> float:
                scratch = torch.empty_like(out)
                return triton.testing.do_bench(lambda: launch(cfg, scratch), warmup=5, rep=20)
            config = _fp8.choose_config(M, N, K, kernel=kernel, bench=bench,
                                        defaults=FP8_DEFAULTS if fp8_act else BF16_DEFAULTS, table={})
    return launch(config, out)


def fp4_linear_triton(
    x: Tensor, w_packed: Tensor, w_block_scales: Tensor, w_inv: Tensor, w_scale_fp8: Tensor,
    w_scale_bf16: Tensor, fmt: str, act: str = "fp8", bias: Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """The whole FP4 layer on ``x [M, K]``: ``act="fp8"`` quantizes x per token with the fused Triton
    quantizer, then (M > ``w4_expand.SMALL_M``) expands the FP4 weights to their e4m3 operand in the shared
    scratch buffer and runs the 8-bit GEMM (kernels/gemm8.py), or (small M) runs the direct kernel that
    decodes them in registers (kernels/w4_expand.py): the same math as :func:`fp4_gemm_triton`, whose
    in-loop decode per M tile measured 0.10x cuBLAS bf16 at M = 4608. ``act="bf16"`` casts x to bf16 and runs
    the weight-only kernel of this module."""
    out_dtype = x.dtype if out_dtype is None else out_dtype
    if act == "fp8":
        qa, sa = _fp8.quantize_fp8_rowwise_triton(x)
        expand, gemm8 = _w8_modules()
        M, N, K = x.shape[0], w_packed.shape[0], x.shape[1]
        if M <= expand.SMALL_M:
            return expand.direct_triton(fmt, qa, sa, w_packed, w_block_scales, None, w_inv, w_scale_fp8,
                                        bias=bias, out_dtype=out_dtype)
        w8 = expand.scratch.get(N * K, x.device).view(torch.float8_e4m3fn).view(N, K)
        expand.expand_triton(fmt, w_packed, w_block_scales, row_inv=w_inv, out=w8)
        return gemm8.gemm8_triton(qa, sa, w8, w_scale_fp8, None, None, bias, out_dtype, kernel_name="gemm8_fp4")
    if act == "bf16":
        return fp4_gemm_triton(x.to(torch.bfloat16).contiguous(), None, w_packed, w_block_scales, None,
                               w_scale_bf16, fmt, bias, out_dtype)
    raise ValueError(f"fp4_linear_triton: act must be 'fp8' or 'bf16', got {act!r}")
