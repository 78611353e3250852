"""Triton kernels that turn 4-bit weights into the 8-bit GEMM operand: expand (large M) and direct (small M).

Math contract: docs/formats.md ("F8L", "I8Q", "nvfp4", "mxfp4", "8-bit GEMM with row scales").

* **Expand** (large M): one pass over a layer's 4-bit weights writes its 8-bit operand ``w8 [N, K]``
  (e4m3 for F8L and the FP4 formats, int8 for I8Q) into a scratch buffer that every layer reuses
  (:func:`scratch`), then ``kernels/gemm8.py`` runs. The weights stay 4-bit in memory; the extra traffic is
  one read of the 4-bit weights and one write + read of the 8-bit copy, small against a GEMM of
  M = 4608 tokens (and the GEMM reads 8-bit weights either way).
* **Direct** (M <= ``SMALL_M``): the expand costs more than the GEMM there, so one kernel reads the 4-bit
  weights, decodes each tile in registers and multiplies it with the (padded) token tile, split over K so
  that at least two waves of programs stream the weights (:func:`split_k_for`); the fp32 / int32 partial
  sums of the splits go to a workspace that :func:`_finish_kernel` adds in a fixed order (deterministic)
  before the epilogue (row scales, 16-bit low-rank term, bias).

Decoding, per weight (``code`` = its 4-bit nibble, even k in the low nibble):

* F8L: ``e4m3(float(gs) * (code & 7)) XOR ((code >> 3) << 7)``; ``gs * m`` is exact in fp32, the cast
  rounds to nearest even.
* I8Q: ``(code - z) * s`` as int8 (exact for a valid layout).
* nvfp4 / mxfp4: ``e4m3(e2m1(code) * block_scale * w_inv[n])`` (exactly ``dequantize_to_fp8``).

The fp32 -> e4m3 cast: compiled kernels use the hardware conversion (``cvt.rn.satfinite.e4m3x2.f32``,
RNE; the values are clamped to +-448 first, so saturation never acts); the Triton interpreter's cast is
wrong (it rounds ties away and mis-rounds some values by a binade), so under the interpreter (``HW_CVT``
false) the same RNE is written out on the fp32 bit pattern. Both give the reference's bytes; the CPU tests
check the written-out one, the GPU tests (tests/gpu/test_w4a8_gpu.py) the hardware one.

CPU: as the other Triton modules, the tests run a private interpreted copy; only ``triton.language``
builtins and this module's own ``@triton.jit`` helpers are called inside kernels.
"""

from __future__ import annotations

import contextlib
import threading

import torch
import triton
import triton.language as tl
from torch import Tensor

FMT_F8L = 0
FMT_I8Q = 1
FMT_NVFP4 = 2
FMT_MXFP4 = 3
FMTS = {"f8l": FMT_F8L, "i8q": FMT_I8Q, "nvfp4": FMT_NVFP4, "mxfp4": FMT_MXFP4}
GROUPS = {FMT_F8L: 64, FMT_I8Q: 64, FMT_NVFP4: 16, FMT_MXFP4: 32}
SMALL_M = 64   # at or below: the direct kernel; above: expand + gemm8
H100_SMS = 132


@triton.jit
def _e4m3_bits_rne(y):
    """fp32 ``y`` (|y| <= 448, or NaN) -> e4m3 bits as int32, round to nearest even, on the bit pattern."""
    u = y.to(tl.int32, bitcast=True)
    sign = (u >> 24) & 0x80
    a = u & 0x7FFFFFFF
    # normal e4m3 (|y| >= 2^-6): keep 3 mantissa bits, RNE on the integer pattern, rebias 127 -> 7
    r = a + 0x7FFFF + ((a >> 20) & 1)
    normal_bits = (r >> 20) - 960
    # subnormal e4m3 (|y| < 2^-6): round(|y| * 2^9) = RNE of (mantissa with implicit bit) >> (14 - e)
    e = (a >> 23) - 127
    mant = (a & 0x7FFFFF) | 0x800000
    sh = tl.minimum(tl.maximum(14 - e, 1), 25)
    qi = mant >> sh
    rem = mant - (qi << sh)
    half = (rem * 0 + 1) << (sh - 1)
    qi = qi + ((rem > half) | ((rem == half) & ((qi & 1) == 1))).to(tl.int32)
    bits = tl.where(a >= 0x3C800000, normal_bits, qi)
    bits = tl.where(a > 0x7F800000, 0x7F, bits)  # NaN stays NaN
    return bits | sign


@triton.jit
def _to_e4m3(y, HW_CVT: tl.constexpr):
    """fp32 ``y`` -> e4m3 (RNE), saturating at +-448, NaN kept. Compiled: the hardware conversion
    (``cvt.rn.satfinite.e4m3x2.f32`` saturates by itself); interpreted: clamp, then the bit-pattern RNE."""
    if HW_CVT:
        return y.to(tl.float8e4nv)
    else:
        y = tl.where(y > 448.0, 448.0, tl.where(y < -448.0, -448.0, y))
        return (_e4m3_bits_rne(y) & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True)


@triton.jit
def _decode_codes(c, s1, s2, rinv, FMT: tl.constexpr, HW_CVT: tl.constexpr):
    """8-bit weights of 4-bit codes ``c`` (int32, any shape) with their group's ``s1`` / ``s2`` and row's
    ``rinv`` broadcast to it: int8 (I8Q) or e4m3 (the others) tensors of c's shape."""
    if FMT == 0:  # F8L: e4m3(gs * m) with the code's bit 3 as the sign (RNE is symmetric)
        mf = ((c & 7) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0  # float(m), exact
        v = s1.to(tl.float8e4nv, bitcast=True).to(tl.float32) * mf
        v = (v.to(tl.int32, bitcast=True) ^ ((c << 28) & -2147483648)).to(tl.float32, bitcast=True)
        return _to_e4m3(v, HW_CVT)
    elif FMT == 1:  # I8Q: (q - z) * s, exact in int8 for a valid layout
        return ((c - s2.to(tl.int32)) * s1.to(tl.int32)).to(tl.int8)
    else:  # nvfp4 (e4m3 block scales) / mxfp4 (e8m0 block scales): e4m3(e2m1 * block_scale * 2^-r)
        if FMT == 2:
            bscale = s1.to(tl.float8e4nv, bitcast=True).to(tl.float32)
        else:
            e8 = s1.to(tl.int32)
            bscale = tl.where(e8 == 0, 0x400000, e8 << 23).to(tl.float32, bitcast=True)  # 2**(b - 127)
        m3 = c & 7
        ex = m3 >> 1
        mant = m3 & 1
        mag = tl.where(ex == 0, mant.to(tl.float32) * 0.5, ((2 + mant) << ex).to(tl.float32) * 0.25)
        val = tl.where((c & 8) != 0, -mag, mag)
        return _to_e4m3((val * bscale) * rinv, HW_CVT)


@triton.jit
def _decode_halves(w_ptr, s1_ptr, s2_ptr, rowinv_ptr, rows, k0, K, mask_n, k_limit,
                   FMT: tl.constexpr, HW_CVT: tl.constexpr, GROUP: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN: tl.constexpr):
    """The 8-bit weights of rows ``rows`` and columns ``k0 .. k0 + BLOCK_K`` (columns at or past ``k_limit``
    zero), as two ``[BLOCK_N, BLOCK_K / 2]`` tiles: the even k (low nibbles) and the odd k (high nibbles).

    Each packed byte is loaded once (``[BLOCK_N, BLOCK_K / 2]``), each group scale once (``[BLOCK_N,
    groups]``, broadcast over its group's bytes). Keeping the halves apart spares the interleave: a GEMM
    takes the even and the odd token columns against them (the order of k inside a sum is free).
    ``EVEN``: every row and column of the tile exists, so the loads go without masks (predicated byte loads
    cannot be vectorized: with masks the loads alone cost more instructions than the decode)."""
    G: tl.constexpr = BLOCK_K // GROUP
    GB: tl.constexpr = GROUP // 2
    HALF: tl.constexpr = BLOCK_K // 2
    rows64 = rows.to(tl.int64)
    kb = k0 // 2 + tl.arange(0, HALF)
    g = tl.arange(0, G)
    bptrs = w_ptr + rows64[:, None] * (K // 2) + kb[None, :]
    sidx = rows64[:, None] * (K // GROUP) + (k0 // GROUP) + g[None, :]
    if EVEN:
        byte = tl.load(bptrs).to(tl.int32)
        s1g = tl.load(s1_ptr + sidx)
        if FMT == 1:
            s2g = tl.load(s2_ptr + sidx)
    else:
        bmask = mask_n[:, None] & (kb * 2 < k_limit)[None, :]
        byte = tl.load(bptrs, mask=bmask, other=0).to(tl.int32)
        smask = mask_n[:, None] & ((k0 + g * GROUP) < k_limit)[None, :]
        s1g = tl.load(s1_ptr + sidx, mask=smask, other=0)
        if FMT == 1:
            s2g = tl.load(s2_ptr + sidx, mask=smask, other=0)
    s1 = tl.reshape(tl.broadcast_to(s1g[:, :, None], (BLOCK_N, G, GB)), (BLOCK_N, HALF))
    if FMT == 1:
        s2 = tl.reshape(tl.broadcast_to(s2g[:, :, None], (BLOCK_N, G, GB)), (BLOCK_N, HALF))
    else:
        s2 = s1
    if FMT >= 2:
        rinv = tl.load(rowinv_ptr + rows64, mask=mask_n, other=1.0)[:, None]
    else:
        rinv = 1.0
    lo = _decode_codes(byte & 15, s1, s2, rinv, FMT, HW_CVT)
    hi = _decode_codes(byte >> 4, s1, s2, rinv, FMT, HW_CVT)
    return lo, hi


@triton.jit
def _expand_kernel(w_ptr, s1_ptr, s2_ptr, rowinv_ptr, out_ptr, N, K,
                   FMT: tl.constexpr, HW_CVT: tl.constexpr, GROUP: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN: tl.constexpr):
    """One ``[BLOCK_N, BLOCK_K]`` tile of ``w8 [N, K]`` in k order (int8, or e4m3 through a uint8 view)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    mask_n = rows < N
    lo, hi = _decode_halves(w_ptr, s1_ptr, s2_ptr, rowinv_ptr, rows, k0, K, mask_n, K, FMT, HW_CVT, GROUP,
                            BLOCK_N, BLOCK_K, EVEN)
    w8 = tl.reshape(tl.join(lo.to(tl.uint8, bitcast=True), hi.to(tl.uint8, bitcast=True)), (BLOCK_N, BLOCK_K))
    ks = k0 + tl.arange(0, BLOCK_K)
    if EVEN:
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * K + ks[None, :], w8)
    else:
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * K + ks[None, :], w8, mask=mask_n[:, None] & (ks < K)[None, :])


@triton.jit
def _direct_kernel(a_ptr, w_ptr, s1_ptr, s2_ptr, rowinv_ptr, ws_ptr, M, N, K, K_PER_SPLIT,
                   FMT: tl.constexpr, HW_CVT: tl.constexpr, GROUP: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN: tl.constexpr):
    """Partial sums of the ``[BLOCK_N weights, BLOCK_M tokens]`` tile ``w8 @ a^T`` over split
    ``program_id(1)``'s K range, decoding the 4-bit weights in registers: the decoded halves are the MMAs'
    A operands, the even and odd token columns their B operands. Written transposed to ``ws [splits, M, N]``
    (int32 for I8Q, fp32 otherwise)."""
    HALF: tl.constexpr = BLOCK_K // 2
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = rows < N
    k_begin = pid_s * K_PER_SPLIT
    k_end = tl.minimum(k_begin + K_PER_SPLIT, K)  # a split need not be a whole number of BLOCK_K steps
    if FMT == 1:
        acc = tl.full((BLOCK_N, BLOCK_M), 0, tl.int32)
    else:
        acc = tl.full((BLOCK_N, BLOCK_M), 0.0, tl.float32)
    a_rows = a_ptr + offs_m.to(tl.int64)[:, None] * K
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(k_begin, k_end, BLOCK_K):
        ks = k0 + offs_k
        amask = mask_m[:, None] & (ks < k_end)[None, :]
        if FMT == 1:
            a = tl.load(a_rows + ks[None, :], mask=amask, other=0)  # [BLOCK_M, BLOCK_K], one contiguous load
        else:
            a = tl.load(a_rows + ks[None, :], mask=amask, other=0.0)
        a_lo, a_hi = tl.split(tl.reshape(a, (BLOCK_M, HALF, 2)))   # the even and the odd k
        a_lo = tl.trans(a_lo)  # [HALF, BLOCK_M]
        a_hi = tl.trans(a_hi)
        w_lo, w_hi = _decode_halves(w_ptr, s1_ptr, s2_ptr, rowinv_ptr, rows, k0, K, mask_n, k_end, FMT, HW_CVT,
                                    GROUP, BLOCK_N, BLOCK_K, EVEN)
        if FMT == 1:  # int32 accumulate, said explicitly (Triton 3.6 does not infer it from acc)
            acc = tl.dot(w_lo, a_lo, acc, out_dtype=tl.int32)
            acc = tl.dot(w_hi, a_hi, acc, out_dtype=tl.int32)
        else:
            acc = tl.dot(w_lo, a_lo, acc)
            acc = tl.dot(w_hi, a_hi, acc)
    ptrs = ws_ptr + (pid_s.to(tl.int64) * M + offs_m[None, :]) * N + rows[:, None]
    tl.store(ptrs, acc, mask=mask_m[None, :] & mask_n[:, None])


@triton.jit
def _bf16_rne_as_f32(x):
    """fp32 ``x`` rounded to bf16 (RNE) on the bit pattern, returned as fp32 (the interpreter's own cast
    truncates)."""
    u = x.to(tl.int32, bitcast=True)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & -65536
    return u.to(tl.float32, bitcast=True)


@triton.jit
def _finish_kernel(ws_ptr, sa_ptr, sw_ptr, la_ptr, lu_ptr, bias_ptr, out_ptr, M, N, R, SPLITS,
                   IS_INT: tl.constexpr, HAS_LORA: tl.constexpr, EMULATE_16BIT_DOT: tl.constexpr,
                   HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """Sum the split partials in split order, then ``(acc * sa) * sw`` + 16-bit low-rank + bias, store."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask = mask_m[:, None] & mask_n[None, :]
    ptrs = ws_ptr + offs_m[:, None] * N + offs_n[None, :]
    if IS_INT:
        acc = tl.full((BLOCK_M, BLOCK_N), 0, tl.int32)
    else:
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for _ in range(0, SPLITS):
        acc += tl.load(ptrs, mask=mask, other=0)
        ptrs += M * N
    sa = tl.load(sa_ptr + offs_m, mask=mask_m, other=0.0)
    sw = tl.load(sw_ptr + offs_n, mask=mask_n, other=0.0)
    out = (acc.to(tl.float32) * sa[:, None]) * sw[None, :]
    if HAS_LORA:
        offs_r = tl.arange(0, BLOCK_R)
        for r0 in range(0, R, BLOCK_R):
            r = r0 + offs_r
            la = tl.load(la_ptr + offs_m[:, None] * R + r[None, :], mask=mask_m[:, None] & (r < R)[None, :],
                         other=0.0)
            lu = tl.load(lu_ptr + offs_n.to(tl.int64)[None, :] * R + r[:, None],
                         mask=mask_n[None, :] & (r < R)[:, None], other=0.0)
            if EMULATE_16BIT_DOT:
                la16 = _bf16_rne_as_f32(la) if lu.dtype == tl.bfloat16 else la.to(lu.dtype).to(tl.float32)
                out += tl.dot(la16, lu.to(tl.float32), input_precision="ieee")
            else:
                out = tl.dot(la.to(lu.dtype), lu, out)
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------
# host side


def interpreted() -> bool:
    return not isinstance(_expand_kernel, triton.runtime.jit.JITFunction)


def _guard(t: Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


class _Scratch:
    """One grow-only 8-bit buffer per (device, stream): the expanded weights of whichever layer runs.

    Layers on one stream run one after another, so one buffer serves them all; a second stream gets its
    own. Grow-only and never freed while the process lives, so a CUDA graph captured after a warm-up call
    keeps a valid address (capture needs the buffer to be large enough already: warm up first).
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple, Tensor] = {}
        self._lock = threading.Lock()

    def get(self, numel: int, device: torch.device) -> Tensor:
        stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
        key = (device.type, device.index, stream)
        with self._lock:
            buf = self._buffers.get(key)
            if buf is None or buf.numel() < numel:
                if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                    # an allocation here would come from the graph's private pool and outlive it
                    raise RuntimeError(
                        f"lowbit: the 8-bit weight scratch of this stream holds {0 if buf is None else buf.numel()} "
                        f"bytes, a layer needs {numel}: run the model once on this stream before capturing a "
                        "CUDA graph (a warm-up call sizes the scratch)")
                buf = torch.empty(numel, dtype=torch.uint8, device=device)
                self._buffers[key] = buf
            return buf[:numel]

    def nbytes(self) -> int:
        return sum(b.numel() for b in self._buffers.values())


scratch = _Scratch()


def _check_fmt(fmt: str) -> int:
    if fmt not in FMTS:
        raise ValueError(f"w4_expand: fmt must be one of {list(FMTS)}, got {fmt!r}")
    return FMTS[fmt]


def expand_triton(fmt: str, w: Tensor, s1: Tensor, s2: Tensor | None = None, row_inv: Tensor | None = None,
                  *, out: Tensor | None = None) -> Tensor:
    """The 8-bit operand ``[N, K]`` of 4-bit weights ``w uint8 [N, K/2]``: int8 for ``"i8q"`` (``s1`` steps,
    ``s2`` zeros), e4m3 for ``"f8l"`` (``s1`` gscales), ``"nvfp4"`` / ``"mxfp4"`` (``s1`` block scales,
    ``row_inv`` fp32 [N] = ``2**-r``). ``out`` (same shape, int8 or e4m3) is written when given."""
    code = _check_fmt(fmt)
    N, K = w.shape[0], w.shape[1] * 2
    dtype = torch.int8 if code == FMT_I8Q else torch.float8_e4m3fn
    if out is None:
        out = torch.empty(N, K, dtype=dtype, device=w.device)
    elif out.shape != (N, K) or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"expand_triton: out must be contiguous {dtype} [{N}, {K}], got {out.dtype} {tuple(out.shape)}")
    if not interpreted() and not w.is_cuda:
        raise RuntimeError("expand_triton needs CUDA tensors (or the Triton interpreter)")
    bn, bk = (16, 64) if interpreted() else (32, 256)
    grid = (triton.cdiv(N, bn), triton.cdiv(K, bk))
    with _guard(w):
        _expand_kernel[grid](w, s1.view(torch.uint8), (s2 if s2 is not None else s1).view(torch.uint8),
                             row_inv if row_inv is not None else w, out.view(torch.uint8), N, K,
                             FMT=code, HW_CVT=not interpreted(), GROUP=GROUPS[code], BLOCK_N=bn, BLOCK_K=bk,
                             EVEN=N % bn == 0 and K % bk == 0,
                             num_warps=1 if interpreted() else 4)
    return out


def split_k_for(n_tiles: int, K: int, block_k: int, sms: int = H100_SMS, waves: int = 2) -> int:
    """Splits of K so that ``n_tiles * splits`` programs make at least ``waves`` waves over ``sms`` SMs:
    equal splits of whole ``block_k`` steps (of 64-column groups when K is not a multiple of ``block_k``),
    none shorter than ``2 * block_k`` (one split when K is short).

    Example:
        >>> split_k_for(48, 3072, 128), split_k_for(288, 3072, 128), split_k_for(48, 15360, 128)
        (6, 1, 6)
    """
    groups = max(1, K // 64)
    # equal splits of whole BLOCK_K steps when K allows (the kernel then runs without masks), else of groups
    unit = K // block_k if K % block_k == 0 else groups
    want = max(1, -(-waves * sms // n_tiles))
    splits = max(1, min(want, K // (2 * block_k)))
    while unit % splits:
        splits -= 1
    return splits


def _device_sms(t: Tensor) -> int:
    if t.is_cuda:
        return torch.cuda.get_device_properties(t.device).multi_processor_count
    return H100_SMS


def direct_triton(fmt: str, a: Tensor, sa: Tensor, w: Tensor, s1: Tensor, s2: Tensor | None, row_inv: Tensor | None,
                  sw: Tensor, lora_act: Tensor | None = None, lora_up: Tensor | None = None, bias: Tensor | None = None,
                  out_dtype: torch.dtype = torch.bfloat16, *, splits: int | None = None,
                  out: Tensor | None = None) -> Tensor:
    """The small-M W4A8 GEMM straight from 4-bit weights: ``a`` int8 (I8Q) or e4m3 ``[M, K]`` with fp32
    ``sa [M]``; weights as :func:`expand_triton`; ``sw`` fp32 [N] the per-row scale of the 8-bit operand;
    epilogue as ``gemm8_triton`` with ``lora_16bit``. ``M <= SMALL_M`` (one M tile). ``splits`` overrides
    :func:`split_k_for`; ``out`` (contiguous ``[M, N]`` of ``out_dtype``) is written when given."""
    code = _check_fmt(fmt)
    M, K = a.shape
    N = w.shape[0]
    if M > SMALL_M:
        raise ValueError(f"direct_triton: M = {M} is above SMALL_M = {SMALL_M}; use expand + gemm8")
    if not interpreted() and not a.is_cuda:
        raise RuntimeError("direct_triton needs CUDA tensors (or the Triton interpreter)")
    R = 0 if lora_act is None else lora_act.shape[1]
    block_m = max(16, triton.next_power_of_2(M))
    if interpreted():
        block_n, block_k, warps = 32, 64, 1
    else:
        block_n, block_k, warps = 64, 128, 4
    block_k = min(block_k, max(64, triton.next_power_of_2(K)))
    n_tiles = triton.cdiv(N, block_n)
    if splits is None:
        splits = split_k_for(n_tiles, K, block_k, _device_sms(a))
    if splits < 1 or K % splits or (K // splits) % 64:
        raise ValueError(f"direct_triton: {splits} splits do not cut K = {K} into multiples of 64")
    is_int = code == FMT_I8Q
    ws = torch.empty(splits, M, N, dtype=torch.int32 if is_int else torch.float32, device=a.device)
    if out is None:
        out = torch.empty(M, N, dtype=out_dtype, device=a.device)
    elif out.shape != (M, N) or out.dtype != out_dtype or not out.is_contiguous():
        raise ValueError(f"direct_triton: out must be contiguous {out_dtype} [{M}, {N}], got {out.dtype} "
                         f"{tuple(out.shape)}")
    with _guard(a):
        _direct_kernel[(n_tiles, splits)](
            a, w, s1.view(torch.uint8), (s2 if s2 is not None else s1).view(torch.uint8),
            row_inv if row_inv is not None else sw, ws, M, N, K, K // splits,
            FMT=code, HW_CVT=not interpreted(), GROUP=GROUPS[code], BLOCK_M=block_m, BLOCK_N=block_n,
            BLOCK_K=block_k, EVEN=N % block_n == 0 and (K // splits) % block_k == 0,
            num_warps=warps, num_stages=1 if interpreted() else 3)
        fin_n = 32 if interpreted() else 128
        block_r = max(16, triton.next_power_of_2(max(R, 1))) if R else 16
        _finish_kernel[(triton.cdiv(N, fin_n),)](
            ws, sa, sw, lora_act if R else ws, lora_up if R else ws, bias if bias is not None else ws, out,
            M, N, R, splits, IS_INT=is_int, HAS_LORA=R > 0, EMULATE_16BIT_DOT=interpreted(),
            HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=fin_n, BLOCK_R=min(block_r, 64),
            num_warps=1 if interpreted() else 4)
    return out
