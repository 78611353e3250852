"""Triton per-token 8-bit activation quantizer with smoothing and the fused low-rank down-projection.

The ``triton`` backend of ``lowbit::quantize_act`` for ``mode="int8"`` and ``"fp8"``. Math contract:
docs/formats.md ("8-bit per-token activations", "Fused activation quantizer"): ``xs = x / smooth`` (fp32
division), ``scale = amax(|xs|) / 127 | 448`` per row, ``q = rint(xs / scale)`` clamped to +-127 (int8) or
``e4m3(clamp(xs / scale, +-448))`` (fp8, RNE); ``lora_act = x @ lora_down^T`` on the RAW x, fp32
accumulate. q and the scales are bit-exact with the references (every division is ``tl.div_rn``, IEEE);
lora_act is fp32 with a free summation order. A row holding a NaN or an infinity gets a NaN scale and
q = 0 (the non-finite policy of docs/formats.md): the GEMM then writes NaN for that token.

One program owns ``BLOCK_M`` token rows and walks K twice:

1. pass 1 reads x once from memory, accumulates the row amax of ``x / smooth`` and, on the tensor cores,
   ``x @ lora_down^T`` for all R ranks (the lora-down reads the unquantized x: from the quantized tokens
   it would cost 2 dB, ../shared/DESIGN.md);
2. pass 2 reads the same rows again (they were just read: L2 hits, so x crosses DRAM once) and writes q.

Holding the rows in registers instead would cap K; at ``BLOCK_M = 16`` rows a program's slice of x is
16 x K x 2 bytes (96 KiB at K = 3072), small against the 50 MB L2.

Interpreter notes (tests/triton_interp.py): the bf16 ``tl.dot`` of Triton 3.9's interpreter is wrong, so
there the lora operands go through an fp32 dot (the same math: a 16-bit product is exact in fp32); the
fp32 -> e4m3 cast is written out on the bit pattern in both modes (as kernels/fp8_gemm.py does), and rint
is the 1.5 * 2^23 trick, exact for |v| <= 127.

Example (on a CUDA GPU)::

    x = torch.randn(4608, 3072, dtype=torch.bfloat16, device="cuda")
    q, scale, lora_act = quantize_8bit_triton(x, None, None, "int8")
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch import Tensor

MODES = ("int8", "fp8")
MAX_RANK = 256


@triton.jit
def _nan_max(a, b):
    """max that propagates NaN (torch.amax semantics); ``a != a`` is the NaN test."""
    return tl.where((a != a) | (a > b), a, b)


@triton.jit
def _round_to(v, x_ptr, EMULATE: tl.constexpr):
    """fp32 ``v`` rounded to x's 16-bit dtype (RNE). The interpreter's own fp32 -> bf16 cast truncates, so
    there bf16 is rounded on the bit pattern first (the cast of the result is then exact)."""
    if EMULATE:
        if x_ptr.dtype.element_ty == tl.bfloat16:
            u = v.to(tl.int32, bitcast=True)
            v = ((u + 0x7FFF + ((u >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
    return v.to(x_ptr.dtype.element_ty)


@triton.jit
def _add(a, b):
    """Combine of the row sums (``tl.sum`` is a jit function of triton.language: interpreted copies cannot
    call it)."""
    return a + b


@triton.jit
def _e4m3_bits(y):
    """fp32 ``y`` with |y| <= 448 -> e4m3 bits (int32), round to nearest even on the bit pattern."""
    u = y.to(tl.int32, bitcast=True)
    sign = (u >> 24) & 0x80
    a = u & 0x7FFFFFFF
    r = a + 0x7FFFF + ((a >> 20) & 1)
    normal_bits = (r >> 20) - 960
    e = (a >> 23) - 127
    mant = (a & 0x7FFFFF) | 0x800000
    sh = tl.minimum(tl.maximum(14 - e, 1), 25)
    qi = mant >> sh
    rem = mant - (qi << sh)
    half = (rem * 0 + 1) << (sh - 1)
    qi = qi + ((rem > half) | ((rem == half) & ((qi & 1) == 1))).to(tl.int32)
    return tl.where(a >= 0x3C800000, normal_bits, qi) | sign


@triton.jit
def _quant8_kernel(
    x_ptr, smooth_ptr, ld_ptr, q_ptr, scale_ptr, la_ptr, M, K, R, static_scale, LDR,
    IS_FP8: tl.constexpr, HAS_SMOOTH: tl.constexpr, HAS_LORA: tl.constexpr, EMULATE_16BIT_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, STATIC: tl.constexpr = False,
):
    """Per-token scales, or with ``STATIC`` the one ``static_scale`` (docs/formats.md, "Exit quantizer":
    saturating; a row holding a non-finite value gets a NaN scale and q = 0 on its non-finite elements).
    ``LDR``: the row stride of lora_down (>= K: a column slice of a wider one is read in place)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = rows < M
    rows64 = rows.to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    amax = tl.full((BLOCK_M,), 0.0, tl.float32)
    lacc = tl.full((BLOCK_M, BLOCK_R), 0.0, tl.float32)

    # pass 1: row amax of x / smooth, and x @ lora_down^T
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        mask_k = ks < K
        x = tl.load(x_ptr + rows64[:, None] * K + ks[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if HAS_LORA:
            ld = tl.load(ld_ptr + offs_r[None, :].to(tl.int64) * LDR + ks[:, None],
                         mask=(offs_r < R)[None, :] & mask_k[:, None], other=0.0)  # [BLOCK_K, BLOCK_R]
            if EMULATE_16BIT_DOT:
                lacc += tl.dot(x.to(tl.float32), ld.to(tl.float32), input_precision="ieee")
            else:
                lacc = tl.dot(x, ld, lacc)
        xs = x.to(tl.float32)
        if HAS_SMOOTH:
            sm = tl.load(smooth_ptr + ks, mask=mask_k, other=1.0)
            xs = tl.div_rn(xs, tl.broadcast_to(sm[None, :], (BLOCK_M, BLOCK_K)))
        amax = _nan_max(amax, tl.reduce(tl.abs(xs), 1, _nan_max))

    if STATIC:
        scale = tl.full((BLOCK_M,), 1.0, tl.float32) * static_scale
    elif IS_FP8:
        scale = tl.div_rn(amax, tl.full((BLOCK_M,), 448.0, tl.float32))
    else:
        scale = tl.div_rn(amax, tl.full((BLOCK_M,), 127.0, tl.float32))
    finite = amax <= 3.4028234663852886e38  # false for NaN and inf
    scale = tl.where(finite, scale, float("nan"))
    use = finite & (scale > 0.0)
    if STATIC:  # the finite elements of a bad row are still quantized (its NaN scale marks the token)
        safe = tl.full((BLOCK_M,), 1.0, tl.float32) * static_scale
    else:
        safe = tl.where(use, scale, 1.0)
    tl.store(scale_ptr + rows, scale, mask=mask_m)
    if HAS_LORA:
        tl.store(la_ptr + rows64[:, None] * R + offs_r[None, :], lacc, mask=mask_m[:, None] & (offs_r < R)[None, :])

    # pass 2: quantize (the rows were just read: L2 hits)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        mask_k = ks < K
        mask = mask_m[:, None] & mask_k[None, :]
        xs = tl.load(x_ptr + rows64[:, None] * K + ks[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_SMOOTH:
            sm = tl.load(smooth_ptr + ks, mask=mask_k, other=1.0)
            xs = tl.div_rn(xs, tl.broadcast_to(sm[None, :], (BLOCK_M, BLOCK_K)))
        if STATIC:  # element-wise: a non-finite value becomes code 0, the rest of its row is quantized
            xs = tl.where((xs == xs) & (tl.abs(xs) <= 3.4028234663852886e38), xs, 0.0)
            keep = tl.full((BLOCK_M, BLOCK_K), 1, tl.int1)
        else:  # per-token: a zero row (scale 0) or a non-finite row is all zeros
            keep = tl.broadcast_to(use[:, None], (BLOCK_M, BLOCK_K))
        y = tl.div_rn(xs, tl.broadcast_to(safe[:, None], (BLOCK_M, BLOCK_K)))
        if IS_FP8:
            y = tl.minimum(tl.maximum(y, -448.0), 448.0)
            bits = tl.where(keep, _e4m3_bits(y), 0)
        else:
            y = tl.minimum(tl.maximum(y, -127.0), 127.0)
            y = (y + 12582912.0) - 12582912.0  # round half to even (|y| <= 127 < 2^22)
            bits = tl.where(keep, y.to(tl.int32), 0)
        tl.store(q_ptr + rows64[:, None] * K + ks[None, :], (bits & 0xFF).to(tl.uint8), mask=mask)


def interpreted() -> bool:
    return not isinstance(_quant8_kernel, triton.runtime.jit.JITFunction)


def quantize_8bit_triton(x: Tensor, smooth: Tensor | None, lora_down: Tensor | None, mode: str, *,
                         out: tuple[Tensor, Tensor, Tensor] | None = None, static_scale: float | None = None
                         ) -> tuple[Tensor, Tensor, Tensor]:
    """``(q int8 | e4m3 [M, K], scales fp32 [M], lora_act fp32 [M, R])`` of ``x [M, K]`` (bf16/fp16), as the
    references compute them. ``smooth`` fp32 [K] or None; ``lora_down [R, K]`` in x's dtype (R <= 256) or
    None (then lora_act is ``[M, 0]``); its rows may be further apart than K (unit column stride: a column
    slice of a wider lora_down). ``out``: the three tensors to write (tests poison them).
    ``static_scale``: one scale for every token (``reference.quantize_act_static``) instead of per-token.
    Inputs are assumed validated by the op layer."""
    if mode not in MODES:
        raise ValueError(f"quantize_8bit_triton: mode must be one of {MODES}, got {mode!r}")
    M, K = x.shape
    R = 0 if lora_down is None else lora_down.shape[0]
    if R > MAX_RANK:
        raise ValueError(f"quantize_8bit_triton: rank {R} > {MAX_RANK}")
    if not interpreted() and not x.is_cuda:
        raise RuntimeError("quantize_8bit_triton needs CUDA tensors (or the Triton interpreter)")
    ldr = K
    if R:
        if tuple(lora_down.shape) != (R, K) or (K > 1 and lora_down.stride(1) != 1) \
                or (R > 1 and lora_down.stride(0) < K):
            raise ValueError(f"quantize_8bit_triton: lora_down must be [R, {K}] with column stride 1 and row "
                             f"stride >= {K}, got shape {tuple(lora_down.shape)} strides {lora_down.stride()}")
        ldr = lora_down.stride(0) if R > 1 else K
    if out is None:
        q = torch.empty(M, K, dtype=torch.float8_e4m3fn if mode == "fp8" else torch.int8, device=x.device)
        scales = torch.empty(M, dtype=torch.float32, device=x.device)
        lora_act = torch.empty(M, R, dtype=torch.float32, device=x.device)
    else:
        q, scales, lora_act = out
    if M == 0:
        return q, scales, lora_act
    if interpreted():
        block_m, block_k, warps = 16, 64, 1
    else:
        block_m, block_k, warps = 16, 256, 4
    block_r = max(16, triton.next_power_of_2(max(R, 1)))
    guard = torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()
    with guard:
        _quant8_kernel[(triton.cdiv(M, block_m),)](
            x, smooth if smooth is not None else x, lora_down if R else x, q.view(torch.uint8), scales,
            lora_act if R else scales, M, K, R, 1.0 if static_scale is None else float(static_scale), ldr,
            IS_FP8=mode == "fp8", HAS_SMOOTH=smooth is not None, HAS_LORA=R > 0,
            EMULATE_16BIT_DOT=interpreted(), BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=block_r,
            STATIC=static_scale is not None, num_warps=warps, num_stages=2 if not interpreted() else 1)
    return q, scales, lora_act


# --------------------------------------------------------------------------------------------------
# the entry linears: LayerNorm + adaLN modulate + (smoothing, 8-bit quantization, lora-down) in one kernel


@triton.jit
def _ln_mod_quant8_kernel(
    x_ptr, shift_ptr, scale_ptr, smooth_ptr, ld_ptr, q_ptr, qscale_ptr, la_ptr, y_ptr, M, K, R, T, eps,
    IS_FP8: tl.constexpr, HAS_SMOOTH: tl.constexpr, HAS_LORA: tl.constexpr, STORE_Y: tl.constexpr,
    EMULATE_16BIT_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Rows ``BLOCK_M`` of ``x [M, K]`` (token m belongs to sample ``m // T``): three passes over K.

    1. mean and variance of each row (fp32, chunk statistics merged as in Chan et al.: no cancellation);
    2. ``y = round16((x - mean) * rstd * (1 + scale) + shift)``, the linear's input as the unfused path
       would hold it in x's dtype; its amax after smoothing, and ``y @ lora_down^T`` on the MMA;
    3. y again, quantized.
    Passes 2 and 3 read the rows the first one just read (L2 hits): x crosses DRAM once.
    """
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = rows < M
    rows64 = rows.to(tl.int64)
    sample = (rows // T).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)

    # pass 1: row statistics
    mean = tl.full((BLOCK_M,), 0.0, tl.float32)
    m2 = tl.full((BLOCK_M,), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        mask_k = ks < K
        xf = tl.load(x_ptr + rows64[:, None] * K + ks[None, :], mask=mask_m[:, None] & mask_k[None, :],
                     other=0.0).to(tl.float32)
        n_b = tl.reduce(mask_k.to(tl.float32), 0, _add)
        mean_b = tl.reduce(xf, 1, _add) / n_b
        d = tl.where(mask_k[None, :], xf - mean_b[:, None], 0.0)
        m2_b = tl.reduce(d * d, 1, _add)
        n_a = k0 * 1.0
        n = n_a + n_b
        delta = mean_b - mean
        mean = mean + delta * (n_b / n)
        m2 = m2 + m2_b + delta * delta * (n_a * n_b / n)
    rstd = 1.0 / tl.sqrt(m2 / K + eps)

    # pass 2: y, its smoothed amax, the lora-down
    amax = tl.full((BLOCK_M,), 0.0, tl.float32)
    lacc = tl.full((BLOCK_M, BLOCK_R), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        mask_k = ks < K
        mask = mask_m[:, None] & mask_k[None, :]
        xf = tl.load(x_ptr + rows64[:, None] * K + ks[None, :], mask=mask, other=0.0).to(tl.float32)
        sc = tl.load(scale_ptr + sample[:, None] * K + ks[None, :], mask=mask, other=0.0).to(tl.float32)
        sh = tl.load(shift_ptr + sample[:, None] * K + ks[None, :], mask=mask, other=0.0).to(tl.float32)
        y = _round_to((xf - mean[:, None]) * rstd[:, None] * (1.0 + sc) + sh, x_ptr, EMULATE_16BIT_DOT)
        if STORE_Y:
            tl.store(y_ptr + rows64[:, None] * K + ks[None, :], y, mask=mask)
        if HAS_LORA:
            ld = tl.load(ld_ptr + offs_r[None, :].to(tl.int64) * K + ks[:, None],
                         mask=(offs_r < R)[None, :] & mask_k[:, None], other=0.0)
            if EMULATE_16BIT_DOT:
                lacc += tl.dot(y.to(tl.float32), ld.to(tl.float32), input_precision="ieee")
            else:
                lacc = tl.dot(y, ld, lacc)
        ys = y.to(tl.float32)
        if HAS_SMOOTH:
            sm = tl.load(smooth_ptr + ks, mask=mask_k, other=1.0)
            ys = tl.div_rn(ys, tl.broadcast_to(sm[None, :], (BLOCK_M, BLOCK_K)))
        amax = _nan_max(amax, tl.reduce(tl.where(mask, tl.abs(ys), 0.0), 1, _nan_max))

    if IS_FP8:
        qs = tl.div_rn(amax, tl.full((BLOCK_M,), 448.0, tl.float32))
    else:
        qs = tl.div_rn(amax, tl.full((BLOCK_M,), 127.0, tl.float32))
    finite = amax <= 3.4028234663852886e38
    qs = tl.where(finite, qs, float("nan"))
    use = finite & (qs > 0.0)
    safe = tl.where(use, qs, 1.0)
    tl.store(qscale_ptr + rows, qs, mask=mask_m)
    if HAS_LORA:
        tl.store(la_ptr + rows64[:, None] * R + offs_r[None, :], lacc, mask=mask_m[:, None] & (offs_r < R)[None, :])

    # pass 3: quantize y
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        mask_k = ks < K
        mask = mask_m[:, None] & mask_k[None, :]
        xf = tl.load(x_ptr + rows64[:, None] * K + ks[None, :], mask=mask, other=0.0).to(tl.float32)
        sc = tl.load(scale_ptr + sample[:, None] * K + ks[None, :], mask=mask, other=0.0).to(tl.float32)
        sh = tl.load(shift_ptr + sample[:, None] * K + ks[None, :], mask=mask, other=0.0).to(tl.float32)
        ys = _round_to((xf - mean[:, None]) * rstd[:, None] * (1.0 + sc) + sh, x_ptr, EMULATE_16BIT_DOT).to(tl.float32)
        if HAS_SMOOTH:
            sm = tl.load(smooth_ptr + ks, mask=mask_k, other=1.0)
            ys = tl.div_rn(ys, tl.broadcast_to(sm[None, :], (BLOCK_M, BLOCK_K)))
        v = tl.div_rn(ys, tl.broadcast_to(safe[:, None], (BLOCK_M, BLOCK_K)))
        if IS_FP8:
            v = tl.minimum(tl.maximum(v, -448.0), 448.0)
            bits = tl.where(use[:, None], _e4m3_bits(v), 0)
        else:
            v = tl.minimum(tl.maximum(v, -127.0), 127.0)
            v = (v + 12582912.0) - 12582912.0
            bits = tl.where(use[:, None], v.to(tl.int32), 0)
        tl.store(q_ptr + rows64[:, None] * K + ks[None, :], (bits & 0xFF).to(tl.uint8), mask=mask)


def norm_modulate_quantize_triton(
    x: Tensor, shift: Tensor, scale: Tensor, eps: float, smooth: Tensor | None, lora_down: Tensor | None, mode: str,
    *, tokens_per_sample: int | None = None, return_y: bool = False,
) -> tuple[Tensor, Tensor, Tensor] | tuple[Tensor, Tensor, Tensor, Tensor]:
    """The entry linear's input, normalized, modulated and quantized in one kernel.

    ``x [M, K]`` bf16/fp16, M = B * T tokens (``tokens_per_sample`` = T, default M: one sample); ``shift``,
    ``scale`` ``[B, K]`` in x's dtype (adaLN: ``y = LayerNorm(x) * (1 + scale) + shift``, LayerNorm without
    affine). Returns ``(q, scales, lora_act)`` of :func:`quantize_8bit_triton` applied to ``y`` rounded to
    x's dtype (and ``y`` itself with ``return_y``): the contract of
    :func:`lowbit_engine.reference.norm_modulate_quantize`.
    """
    if mode not in MODES:
        raise ValueError(f"norm_modulate_quantize_triton: mode must be one of {MODES}, got {mode!r}")
    M, K = x.shape
    T = M if tokens_per_sample is None else tokens_per_sample
    if T < 1 or M % T:
        raise ValueError(f"norm_modulate_quantize_triton: {M} tokens are not a whole number of samples of {T}")
    B = M // T
    for name, t in (("shift", shift), ("scale", scale)):
        if tuple(t.shape) != (B, K) or t.dtype != x.dtype or not t.is_contiguous():
            raise ValueError(f"norm_modulate_quantize_triton: {name} must be contiguous {x.dtype} [{B}, {K}], got "
                             f"{t.dtype} {tuple(t.shape)}")
    R = 0 if lora_down is None else lora_down.shape[0]
    if R > MAX_RANK:
        raise ValueError(f"norm_modulate_quantize_triton: rank {R} > {MAX_RANK}")
    if not interpreted() and not x.is_cuda:
        raise RuntimeError("norm_modulate_quantize_triton needs CUDA tensors (or the Triton interpreter)")
    q = torch.empty(M, K, dtype=torch.float8_e4m3fn if mode == "fp8" else torch.int8, device=x.device)
    scales = torch.empty(M, dtype=torch.float32, device=x.device)
    lora_act = torch.empty(M, R, dtype=torch.float32, device=x.device)
    y = torch.empty(M, K, dtype=x.dtype, device=x.device) if return_y else None
    if interpreted():
        block_m, block_k, warps = 16, 64, 1
    else:
        block_m, block_k, warps = 16, 256, 4
    block_r = max(16, triton.next_power_of_2(max(R, 1)))
    guard = torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()
    with guard:
        _ln_mod_quant8_kernel[(triton.cdiv(M, block_m),)](
            x, shift, scale, smooth if smooth is not None else x, lora_down if R else x, q.view(torch.uint8), scales,
            lora_act if R else scales, y if return_y else x, M, K, R, T, float(eps),
            IS_FP8=mode == "fp8", HAS_SMOOTH=smooth is not None, HAS_LORA=R > 0, STORE_Y=return_y,
            EMULATE_16BIT_DOT=interpreted(), BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=block_r,
            num_warps=warps, num_stages=2 if not interpreted() else 1)
    return (q, scales, lora_act, y) if return_y else (q, scales, lora_act)
