"""Triton GEMV / small-M GEMM of the weight-only ``w4a16`` format (docs/formats.md, "w4a16").

The layers it serves (FLUX's adaLN modulation linears, 3072 -> 18432 and 3072 -> 9216) run on one token
per image: M = 1..16, so the time is the read of the 4-bit weights, and the kernel's job is to stream
them at full bandwidth. Design:

* Tiles of ``BLOCK_N`` output rows x ``BLOCK_K`` columns; the grid is ``(N tiles, K splits, M tiles)``.
  N = 18432 at ``BLOCK_N = 64`` gives 288 tiles: about two per SM, too few in flight to saturate HBM, so
  K is split (:func:`split_k_for`) until at least ``waves`` waves of programs stream the weights. The fp32
  partial sums go to a workspace ``[splits, M, N]`` that :func:`_finish_kernel` adds in split order
  (deterministic), then the bias, then the rounding to the output dtype.
* Per group of 64 the codes are decoded in registers to ``q - z`` (an integer in [-15, 15], exact in
  bf16 and fp16; built from the bit pattern ``MAGIC | q`` = the float ``OFFSET + q`` minus ``OFFSET + z``,
  which spares the quarter-rate int -> float conversion: 1 I2F per weight bounded the kernel at about half
  of HBM speed in the SASS census) and multiplied with the 16-bit tokens on the tensor cores (``tl.dot``, fp32 accumulate,
  every product exact); the group's bf16 step multiplies the group's partial sum once (the "promotion":
  one FMA per output and group, negligible at M <= 16). ``BLOCK_K // 64`` groups are unrolled per loop
  step so each step issues enough loads.
* The packed bytes are loaded as ``[BLOCK_N, 32]`` per group; the low nibbles are the even k, the high
  nibbles the odd k, so the token tile is split into its even and odd columns instead of interleaving
  the decoded weights (the order of k inside a sum is free).

The tokens are padded to ``BLOCK_M = 16`` rows (the smallest ``tl.dot`` tile): at M = 1 the MMA does 16x
the needed work, which costs nothing here (the tensor cores are idle waiting for memory).

CPU: tests run an interpreted copy of this file (tests/triton_interp.py); only ``triton.language``
builtins and this module's own ``@triton.jit`` functions are called inside kernels.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch import Tensor

GROUP = 64
_GROUP = tl.constexpr(GROUP)  # what the kernels read (a plain global is not visible inside @triton.jit)
H100_SMS = 132
# bf16 0x4300 is 128.0 with a mantissa ulp of 1 (fp16: 0x6400 = 1024.0): MAGIC | q is the float OFFSET + q
MAGIC = {torch.bfloat16: {"MAGIC": 0x4300, "OFFSET": 128}, torch.float16: {"MAGIC": 0x6400, "OFFSET": 1024}}
MAX_M = 64  # above: the dispatcher still calls this kernel (M tiles), but it is not built for it


@triton.jit
def _w4a16_kernel(x_ptr, w_ptr, s_ptr, z_ptr, ws_ptr, M, N, K, K_PER_SPLIT,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_N: tl.constexpr,
                  EMULATE_16BIT_DOT: tl.constexpr, MAGIC: tl.constexpr, OFFSET: tl.constexpr):
    """Partial sums ``ws[split, m, n] = sum over the split's K of x[m, k] * w[n, k]`` for one tile.
    ``EMULATE_16BIT_DOT``: the interpreter's bf16 casts and bf16 ``tl.dot`` return garbage, so there both
    operands go to fp32 (exact: they are 16-bit values) and the dot runs in IEEE fp32; the products are the
    same exact numbers the tensor cores form. ``MAGIC`` / ``OFFSET``: the 16-bit pattern of the float
    ``OFFSET`` whose last mantissa bits are 1 apart (bf16: 0x4300 = 128.0; fp16: 0x6400 = 1024.0)."""
    GB: tl.constexpr = _GROUP // 2          # bytes (and even / odd columns) per group
    G: tl.constexpr = BLOCK_K // _GROUP     # groups per loop step
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = rows < N
    rows64 = rows.to(tl.int64)
    KG = K // _GROUP
    k_begin = pid_s * K_PER_SPLIT
    k_end = k_begin + K_PER_SPLIT          # the host makes K_PER_SPLIT a multiple of BLOCK_K
    acc = tl.full((BLOCK_N, BLOCK_M), 0.0, tl.float32)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * K
    offs_b = tl.arange(0, GB)
    offs_x = tl.arange(0, _GROUP)
    for k0 in range(k_begin, k_end, BLOCK_K):
        for j in tl.static_range(G):
            kg = k0 + j * _GROUP
            g = kg // _GROUP
            x = tl.load(x_rows + (kg + offs_x)[None, :], mask=mask_m[:, None], other=0.0)   # [BLOCK_M, 64]
            x_even, x_odd = tl.split(tl.reshape(x, (BLOCK_M, GB, 2)))
            bptrs = w_ptr + rows64[:, None] * (K // 2) + (kg // 2 + offs_b)[None, :]
            if EVEN_N:
                byte = tl.load(bptrs).to(tl.int32)
                z = tl.load(z_ptr + rows64 * KG + g).to(tl.int32)
                s = tl.load(s_ptr + rows64 * KG + g).to(tl.float32)
            else:
                byte = tl.load(bptrs, mask=mask_n[:, None], other=0).to(tl.int32)
                z = tl.load(z_ptr + rows64 * KG + g, mask=mask_n, other=0).to(tl.int32)
                s = tl.load(s_ptr + rows64 * KG + g, mask=mask_n, other=0.0).to(tl.float32)
            # q - z without an int -> float conversion (I2F runs at a quarter of the ALU rate and would bound
            # the kernel below the memory speed): the 16-bit pattern MAGIC | q is the float OFFSET + q, and
            # (OFFSET + q) - (OFFSET + z) is exact in 16 bits (an integer in [-15, 15]).
            lo16 = ((byte & 15) | MAGIC).to(tl.int16).to(x.dtype, bitcast=True)   # the even k
            hi16 = ((byte >> 4) | MAGIC).to(tl.int16).to(x.dtype, bitcast=True)   # the odd k
            if EMULATE_16BIT_DOT:
                zf = (z + OFFSET).to(tl.float32)[:, None]
                xe = tl.trans(x_even.to(tl.float32))
                xo = tl.trans(x_odd.to(tl.float32))
                part = tl.dot(lo16.to(tl.float32) - zf, xe, input_precision="ieee")
                part = tl.dot(hi16.to(tl.float32) - zf, xo, part, input_precision="ieee")
            else:
                zb = (z + OFFSET).to(tl.float32).to(x.dtype)[:, None]
                part = tl.dot(lo16 - zb, tl.trans(x_even))
                part = tl.dot(hi16 - zb, tl.trans(x_odd), part)
            acc += part * s[:, None]
    ptrs = ws_ptr + (pid_s.to(tl.int64) * M + offs_m[None, :]) * N + rows[:, None]
    tl.store(ptrs, acc, mask=mask_m[None, :] & mask_n[:, None])


@triton.jit
def _finish_kernel(ws_ptr, bias_ptr, out_ptr, M, N, SPLITS, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """``out = round(sum of the splits in split order + bias)`` over a flat ``[M * N]`` range."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    acc = tl.full((BLOCK,), 0.0, tl.float32)
    for sp in range(0, SPLITS):
        acc += tl.load(ws_ptr + sp * M * N + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------
# host side


def interpreted() -> bool:
    return not isinstance(_w4a16_kernel, triton.runtime.jit.JITFunction)


def split_k_for(n_tiles: int, K: int, block_k: int, sms: int = H100_SMS, waves: int = 4) -> int:
    """Splits of K (equal, whole ``block_k`` steps, each at least ``2 * block_k`` long) so that
    ``n_tiles * splits`` programs make at least ``waves`` waves over ``sms`` SMs. A GEMV needs more
    programs in flight than a GEMM (each holds little), hence 4 waves by default.

    Example:
        >>> split_k_for(288, 3072, 128), split_k_for(144, 3072, 128), split_k_for(2, 128, 128)
        (2, 4, 1)
    """
    steps = K // block_k
    want = max(1, -(-waves * sms // n_tiles))
    splits = max(1, min(want, steps // 2))
    while steps % splits:
        splits -= 1
    return splits


def config(M: int, N: int, K: int) -> dict[str, int]:
    """Tile sizes for a call: the interpreter gets small tiles (speed of the CPU tests), a GPU the
    bandwidth-oriented ones. ``BLOCK_K`` is the largest of 256 / 128 / 64 that divides K."""
    block_k = next(b for b in (256, 128, 64) if K % b == 0)
    if interpreted():
        return {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": min(block_k, 128), "num_warps": 1, "num_stages": 1}
    return {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": min(block_k, 128), "num_warps": 4, "num_stages": 4}


def w4a16_triton(x: Tensor, w: Tensor, scales: Tensor, zeros: Tensor, bias: Tensor | None = None,
                 out_dtype: torch.dtype | None = None, *, splits: int | None = None, cfg: dict | None = None,
                 out: Tensor | None = None) -> Tensor:
    """``x [M, K]`` (bf16 / fp16) x the w4a16 weight (``w uint8 [N, K/2]``, ``scales bf16 [N, K/64]``,
    ``zeros uint8 [N, K/64]``) + bias -> ``[M, N]`` in ``out_dtype`` (x's by default). ``splits`` and
    ``cfg`` override :func:`split_k_for` and :func:`config` (benchmarks, tests); ``out`` (contiguous
    ``[M, N]`` of ``out_dtype``) is written when given."""
    M, K = x.shape
    N = w.shape[0]
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"w4a16_triton: x must be bfloat16 or float16, got {x.dtype}")
    if K % GROUP:
        raise ValueError(f"w4a16_triton: K = {K} must be a multiple of {GROUP}")
    if not interpreted() and not x.is_cuda:
        raise RuntimeError("w4a16_triton needs CUDA tensors (or the Triton interpreter)")
    c = dict(config(M, N, K), **(cfg or {}))
    bm, bn, bk = c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"]
    if K % bk:
        raise ValueError(f"w4a16_triton: BLOCK_K = {bk} does not divide K = {K}")
    n_tiles = triton.cdiv(N, bn)
    m_tiles = triton.cdiv(M, bm)
    if splits is None:
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else H100_SMS
        splits = split_k_for(n_tiles * m_tiles, K, bk, sms)
    if splits < 1 or K % splits or (K // splits) % bk:
        raise ValueError(f"w4a16_triton: {splits} splits do not cut K = {K} into multiples of BLOCK_K = {bk}")
    out_dtype = x.dtype if out_dtype is None else out_dtype
    ws = torch.empty(splits, M, N, dtype=torch.float32, device=x.device)
    if out is None:
        out = torch.empty(M, N, dtype=out_dtype, device=x.device)
    elif out.shape != (M, N) or out.dtype != out_dtype or not out.is_contiguous():
        raise ValueError(f"w4a16_triton: out must be contiguous {out_dtype} [{M}, {N}], got {out.dtype} "
                         f"{tuple(out.shape)}")
    guard = torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()
    with guard:
        _w4a16_kernel[(n_tiles, splits, m_tiles)](
            x, w, scales, zeros, ws, M, N, K, K // splits, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
            EVEN_N=N % bn == 0, EMULATE_16BIT_DOT=interpreted(), **MAGIC[x.dtype], num_warps=c["num_warps"], num_stages=c["num_stages"])
        fin = 256 if interpreted() else 1024
        _finish_kernel[(triton.cdiv(M * N, fin),)](
            ws, bias if bias is not None else ws, out, M, N, splits, HAS_BIAS=bias is not None, BLOCK=fin,
            num_warps=1 if interpreted() else 4)
    return out


__all__ = ["w4a16_triton", "split_k_for", "config", "interpreted"]
