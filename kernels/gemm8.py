"""Triton 8-bit GEMM with row scales: the one large-M GEMM every promotion-free format feeds.

Math contract: docs/formats.md, "8-bit GEMM with row scales"::

    acc[m, n] = sum_k a[m, k] * w8[n, k]       whole K in one accumulator (int8: int32, exact; e4m3: fp32)
    out[m, n] = (float(acc) * sa[m]) * sw[n] + lora_act[m, :] . lora_up[n, :] + bias[n]

``a`` and ``w8`` are both int8 or both e4m3 (``torch.float8_e4m3fn`` tensors, passed as such: Triton then
pipelines the loads into shared memory and feeds wgmma straight from there; a uint8 view bitcast inside
the kernel was the landed fp8 kernel's 4-6x slowdown). The weight operand comes from a format's expand
kernel (kernels/w4_expand.py: F8L, I8Q, nvfp4, mxfp4, VQ) or is a stored e4m3 weight (``fp8``).

Structure (the probe of ../shared/DESIGN.md that reached 1050-1196 TFLOP/s on the FLUX shapes):
128 x 256 x 128 tiles, 8 warps, 3 stages, grouped rasterization, loads without masks (row offsets wrap
modulo M and N, so out-of-range rows read valid memory and are dropped at the store; K is a multiple of
BLOCK_K on the fast path), ``acc = tl.dot(a, b, acc)`` so the MMA accumulates in place. On Hopper the fp8
MMA accumulates with fewer than fp32's bits (measured ~3.5e-5 relative at K=3072 in this project); F8L
accepts that (the whole K accumulates in the MMA), int8 is exact.

Epilogue: the two row scales, then the low-rank up-projection as one more MMA on 16-bit operands
(``LORA_16BIT``: lora_act rounded to lora_up's dtype, bf16/fp16 products exact in fp32; ``fp8_linear``'s
fp32 contract uses an fp32 "ieee" dot instead), bias, one rounding to the output dtype.

CPU: runs under the Triton interpreter in the tests (a private interpreted copy, tests/triton_interp.py);
only ``triton.language`` builtins are called in the kernel (see kernels/fp8_gemm.py). The interpreter's
bf16 ``tl.dot`` is wrong in Triton 3.9, so there (only) the 16-bit low-rank operands are rounded and the
dot runs in fp32, which is the same math (a 16-bit x 16-bit product is exact in fp32).

Example (on a CUDA GPU)::

    a = torch.randint(-127, 128, (4608, 3072), dtype=torch.int8, device="cuda")
    w = torch.randint(-127, 128, (3072, 3072), dtype=torch.int8, device="cuda")
    ones = torch.ones(4608, device="cuda"), torch.ones(3072, device="cuda")
    out = gemm8_triton(a, ones[0], w, ones[1])
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl
from torch import Tensor

from lowbit_engine.kernels import fp8_gemm as _tiles  # TileConfig, choose_config, checks (shared infra)
from lowbit_engine.kernels import quant8 as _q  # the e4m3 rounding of the exit epilogue (an interpreted copy in tests)

W8_DTYPES = (torch.int8, torch.float8_e4m3fn)


@triton.jit
def _bf16_rne_as_f32(x):
    """fp32 ``x`` rounded to bf16 (RNE) on the bit pattern, returned as fp32: the interpreter's own
    fp32 -> bf16 cast truncates (compiled kernels use the hardware conversion instead)."""
    u = x.to(tl.int32, bitcast=True)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & -65536
    return u.to(tl.float32, bitcast=True)


@triton.jit
def _gemm8_kernel(
    a_ptr, sa_ptr, w_ptr, sw_ptr, la_ptr, lu_ptr, bias_ptr, out_ptr,
    M, N, K, R,
    q_ptr, qs_ptr, nsm_ptr, nld_ptr, nla_ptr, next_scale, LDQ, QCOL, R2, LDD,
    IS_INT8: tl.constexpr, HAS_LORA: tl.constexpr, LORA_16BIT: tl.constexpr, EMULATE_16BIT_DOT: tl.constexpr,
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
    EXIT: tl.constexpr = 0, NEXT_FP8: tl.constexpr = False, HAS_NSMOOTH: tl.constexpr = False,
    HAS_NLORA: tl.constexpr = False, BLOCK_R2: tl.constexpr = 16,
):
    """One ``[BLOCK_M, BLOCK_N]`` output tile over the whole K. ``EXIT`` > 0 replaces the store by the exit
    epilogue (1: no activation, 2: GELU-tanh): the tile is quantized for the next linear instead of written."""
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
    # Wrapped rows: every load is in bounds without a mask (the store masks the real rows).
    rows_a = (offs_m % M).to(tl.int64)
    rows_w = (offs_n % N).to(tl.int64)
    a_ptrs = a_ptr + rows_a[:, None] * K + offs_k[None, :]
    w_ptrs = w_ptr + rows_w[None, :] * K + offs_k[:, None]  # [BLOCK_K, BLOCK_N]: w^T, K contiguous

    if IS_INT8:
        acc = tl.full((BLOCK_M, BLOCK_N), 0, tl.int32)
    else:
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(w_ptrs)
        else:
            if IS_INT8:
                a = tl.load(a_ptrs, mask=(k0 + offs_k)[None, :] < K, other=0)
                b = tl.load(w_ptrs, mask=(k0 + offs_k)[:, None] < K, other=0)
            else:
                a = tl.load(a_ptrs, mask=(k0 + offs_k)[None, :] < K, other=0.0)
                b = tl.load(w_ptrs, mask=(k0 + offs_k)[:, None] < K, other=0.0)
        if IS_INT8:
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)  # Triton 3.6 does not infer it from acc
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    mask_m = offs_m < M
    mask_n = offs_n < N
    sa = tl.load(sa_ptr + offs_m, mask=mask_m, other=0.0)
    sw = tl.load(sw_ptr + offs_n, mask=mask_n, other=0.0)
    out = (acc.to(tl.float32) * sa[:, None]) * sw[None, :]

    if HAS_LORA:
        offs_r = tl.arange(0, BLOCK_R)
        for r0 in range(0, R, BLOCK_R):
            r = r0 + offs_r
            la = tl.load(la_ptr + rows_a[:, None] * R + r[None, :], mask=(r < R)[None, :], other=0.0)
            lu = tl.load(lu_ptr + rows_w[None, :] * R + r[:, None], mask=(r < R)[:, None], other=0.0)
            if LORA_16BIT:
                if EMULATE_16BIT_DOT:
                    out += tl.dot(_bf16_rne_as_f32(la) if lu.dtype == tl.bfloat16 else la.to(lu.dtype).to(tl.float32),
                                  lu.to(tl.float32), input_precision="ieee")
                else:
                    out = tl.dot(la.to(lu.dtype), lu, out)
            else:
                out += tl.dot(la, lu.to(tl.float32), input_precision="ieee")

    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if EXIT == 0:
        out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
    else:
        _exit_epilogue(out, offs_m, offs_n, mask_m, mask_n, out_ptr, q_ptr, qs_ptr, nsm_ptr, nld_ptr, nla_ptr,
                       next_scale, M, N, LDQ, QCOL, R2, LDD, EXIT, NEXT_FP8, HAS_NSMOOTH, HAS_NLORA, EMULATE_16BIT_DOT,
                       BLOCK_M, BLOCK_N, BLOCK_R2)


@triton.jit
def _round16(v, ref_ptr, EMULATE: tl.constexpr):
    """fp32 ``v`` rounded (RNE) to ``ref_ptr``'s 16-bit dtype and returned as fp32 (the interpreter's fp32 ->
    bf16 cast truncates, so there bf16 is rounded on the bit pattern)."""
    if EMULATE and ref_ptr.dtype.element_ty == tl.bfloat16:
        return _bf16_rne_as_f32(v)
    return v.to(ref_ptr.dtype.element_ty).to(tl.float32)


@triton.jit
def _or(a, b):
    return a | b


@triton.jit
def _exit_epilogue(out, offs_m, offs_n, mask_m, mask_n, h_ptr, q_ptr, qs_ptr, nsm_ptr, nld_ptr, nla_ptr, next_scale,
                   M, N, LDQ, QCOL, R2, LDD, EXIT: tl.constexpr, NEXT_FP8: tl.constexpr, HAS_NSMOOTH: tl.constexpr,
                   HAS_NLORA: tl.constexpr, EMULATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_R2: tl.constexpr):
    """The exit linear's epilogue (docs/formats.md, "Exit quantizer"): the tile ``h`` is rounded to the 16-bit
    output dtype (``h_ptr``'s, as the unfused path stores it), put through the activation and rounded again,
    then written as the NEXT linear's 8-bit input with its static scale: ``q[m, QCOL + n]`` of a
    ``[M, LDQ]`` buffer (QCOL lets two producers fill one concatenated input, FLUX's single block). The next
    layer's lora-down reads the unquantized h: this tile's partial ``h @ lora_down[:, QCOL + n]^T`` is
    added atomically into the fp32 ``[M, R2]`` lora_act (zeroed by the caller); lora_down's rows are ``LDD``
    (>= LDQ) elements apart, so it may be a column slice of a wider matrix. A row holding a non-finite
    value stores a NaN into its token scale (``qs_ptr``, pre-filled with the static scale by the caller)."""
    h = _round16(out, h_ptr, EMULATE)
    if EXIT == 2:  # GELU, tanh approximation; tanh(u) = 1 - 2 / (exp(2u) + 1) (reference.exit_activation)
        u = 0.7978845608028654 * (h + 0.044715 * (h * h * h))
        h = _round16(0.5 * h * (1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0) + 1.0), h_ptr, EMULATE)
    valid = mask_m[:, None] & mask_n[None, :]
    xs = h
    if HAS_NSMOOTH:
        sm = tl.load(nsm_ptr + QCOL + offs_n, mask=mask_n, other=1.0)
        xs = tl.div_rn(xs, tl.broadcast_to(sm[None, :], (BLOCK_M, BLOCK_N)))
    finite = (xs == xs) & (tl.abs(xs) <= 3.4028234663852886e38)
    y = tl.div_rn(tl.where(finite, xs, 0.0), tl.full((BLOCK_M, BLOCK_N), 1.0, tl.float32) * next_scale)
    if NEXT_FP8:
        y = tl.minimum(tl.maximum(y, -448.0), 448.0)
        if EMULATE:  # the interpreter's e4m3 cast is not the hardware's: round on the bit pattern
            bits = _q._e4m3_bits(y)
        else:  # cvt.rn.satfinite: RNE, the reference's bytes (tests/gpu/test_w4a8_gpu.py checks the quantizer's)
            bits = y.to(tl.float8e4nv).to(tl.uint8, bitcast=True).to(tl.int32)
    else:
        y = tl.minimum(tl.maximum(y, -127.0), 127.0)
        y = (y + 12582912.0) - 12582912.0  # round half to even (|y| <= 127 < 2^22)
        bits = y.to(tl.int32)
    rows64 = offs_m.to(tl.int64)
    tl.store(q_ptr + rows64[:, None] * LDQ + QCOL + offs_n[None, :], (bits & 0xFF).to(tl.uint8), mask=valid)
    bad = tl.reduce(tl.where(valid, tl.where(finite, 0, 1), 0), 1, _or)
    tl.store(qs_ptr + offs_m, tl.full((BLOCK_M,), float("nan"), tl.float32), mask=mask_m & (bad != 0))
    if HAS_NLORA:
        hz = tl.where(valid, h, 0.0)  # wrapped rows / columns hold other tiles' values: no contribution
        offs_r = tl.arange(0, BLOCK_R2)
        for r0 in range(0, R2, BLOCK_R2):
            r = r0 + offs_r
            ld = tl.load(nld_ptr + r[None, :].to(tl.int64) * LDD + QCOL + offs_n[:, None],
                         mask=(r < R2)[None, :] & mask_n[:, None], other=0.0)  # [BLOCK_N, BLOCK_R2]
            if EMULATE:
                part = tl.dot(hz, ld.to(tl.float32), input_precision="ieee")
            else:
                part = tl.dot(hz.to(nld_ptr.dtype.element_ty), ld)
            tl.atomic_add(nla_ptr + rows64[:, None] * R2 + r[None, :], part, mask=mask_m[:, None] & (r < R2)[None, :])


# --------------------------------------------------------------------------------------------------
# tiles

TileConfig = _tiles.TileConfig
# Per M bucket (first bound >= M). The large-M tile is the DESIGN.md probe's; the others are first guesses
# (LOWBIT_AUTOTUNE=1 searches CANDIDATES and caches the winner per GPU and shape).
DEFAULTS: dict[int, TileConfig] = {
    16: TileConfig(16, 128, 128, num_warps=4, num_stages=4),
    64: TileConfig(64, 128, 128, num_warps=4, num_stages=4),
    256: TileConfig(128, 128, 128, num_warps=8, num_stages=3),
    2**62: TileConfig(128, 256, 128, num_warps=8, num_stages=3),
}
# With the exit epilogue (GELU, quantize, the next lora-down MMA, atomics) a 128 x 256 tile does not fit in
# 255 registers (the sm_90a build spills ~900 B, bench/triton_aot.py): the exit GEMM uses 128 x 128 at large M.
EXIT_DEFAULTS: dict[int, TileConfig] = DEFAULTS | {2**62: TileConfig(128, 128, 128, num_warps=8, num_stages=4)}
CANDIDATES: tuple[TileConfig, ...] = (
    TileConfig(128, 256, 128, num_warps=8, num_stages=3),
    TileConfig(128, 256, 128, num_warps=8, num_stages=4),
    TileConfig(256, 128, 128, num_warps=8, num_stages=3),
    TileConfig(128, 128, 128, num_warps=8, num_stages=4),
    TileConfig(128, 128, 128, num_warps=4, num_stages=4),
    TileConfig(128, 256, 64, num_warps=8, num_stages=4),
    TileConfig(64, 128, 128, num_warps=4, num_stages=4),
    TileConfig(64, 256, 128, num_warps=4, num_stages=4),
)
INTERPRETER_CONFIG = TileConfig(32, 32, 64, block_r=16, group_m=2, num_warps=1, num_stages=1)


def interpreted() -> bool:
    """Whether the kernel was decorated under ``TRITON_INTERPRET=1`` (it then runs on CPU tensors)."""
    return not isinstance(_gemm8_kernel, triton.runtime.jit.JITFunction)


@dataclass
class ExitSpec:
    """Where the exit epilogue writes the next linear's input (see :func:`gemm8_exit_triton`)."""

    q: Tensor                  # uint8 view of the int8 / e4m3 [M, LDQ] buffer
    scales: Tensor             # fp32 [M], pre-filled with ``scale``
    lora_act: Tensor | None    # fp32 [M, R2], zeroed
    smooth: Tensor | None      # fp32 [LDQ]
    lora_down: Tensor | None   # bf16 / fp16 [R2, LDQ], column stride 1, any row stride >= LDQ
    scale: float
    fp8: bool
    col: int
    activation: str
    h_dtype: torch.dtype


def gemm8_triton(
    a: Tensor, sa: Tensor, w8: Tensor, sw: Tensor, lora_act: Tensor | None = None, lora_up: Tensor | None = None,
    bias: Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16, *, lora_16bit: bool = True,
    out: Tensor | None = None, config: TileConfig | None = None, kernel_name: str = "gemm8",
    _exit: ExitSpec | None = None,
) -> Tensor:
    """``(a @ w8^T) * sa[:, None] * sw[None, :] + lora_act @ lora_up^T + bias`` in ``out_dtype``.

    Args:
        a, w8: int8 or float8_e4m3fn ``[M, K]`` and ``[N, K]`` (same dtype), K a multiple of 16.
        sa, sw: fp32 ``[M]`` and ``[N]``.
        lora_act, lora_up: optional fp32 ``[M, R]`` and bf16/fp16 (fp32 when ``lora_16bit=False``) ``[N, R]``.
        bias: optional ``[N]`` bf16/fp16/fp32.
        lora_16bit: round lora_act to lora_up's dtype and use a 16-bit MMA (the SVDQuant contract), else an
            fp32 dot (``fp8_linear``'s contract).
        kernel_name: the autotune cache entry (callers that feed the GEMM from different formats share it).
        _exit: internal (:func:`gemm8_exit_triton`): quantize the tile for the next linear instead of storing it.
    """
    fn = "gemm8_triton"
    _tiles._check_2d(f"{fn}: a", a, W8_DTYPES)
    M, K = a.shape
    _tiles._check_2d(f"{fn}: w8", w8, (a.dtype,), None, K)
    N = w8.shape[0]
    if K % 16 != 0 or M < 1 or N < 1:
        raise ValueError(f"{fn}: need M, N >= 1 and K a multiple of 16, got M={M}, N={N}, K={K}")
    for name, t, n in (("sa", sa, M), ("sw", sw, N)):
        if t.dtype != torch.float32 or tuple(t.shape) != (n,) or not t.is_contiguous():
            raise ValueError(f"{fn}: {name} must be contiguous fp32 [{n}], got {t.dtype} {tuple(t.shape)}")
    R = _tiles._check_epilogue(fn, M, N, lora_act, lora_up, bias, out_dtype)
    if R and lora_16bit and lora_up.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"{fn}: lora_16bit needs a bf16/fp16 lora_up, got {lora_up.dtype}")
    _tiles._need_device(a, "8-bit GEMM")
    if _exit is None:
        out = _tiles._out_tensor(out, M, N, out_dtype, a.device)
    else:  # nothing [M, N] is written: a one-element tensor carries the 16-bit dtype h is rounded to
        out = torch.empty(1, dtype=_exit.h_dtype, device=a.device)
    is_int8 = a.dtype == torch.int8
    ex = _exit

    def launch(cfg: TileConfig, dst: Tensor, ex: ExitSpec | None = ex) -> Tensor:
        block_k = min(cfg.block_k, max(32, triton.next_power_of_2(K)))
        block_r = min(cfg.block_r, max(16, triton.next_power_of_2(max(R, 1))))
        grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n),)
        guard = torch.cuda.device(a.device) if a.is_cuda else contextlib.nullcontext()
        if ex is None:
            exit_args = (dst, dst, dst, dst, dst, 1.0, 0, 0, 0, 0)
            exit_kw = {}
        else:
            R2 = 0 if ex.lora_down is None else ex.lora_down.shape[0]
            exit_args = (ex.q, ex.scales, ex.smooth if ex.smooth is not None else ex.scales,
                         ex.lora_down if R2 else dst, ex.lora_act if R2 else ex.scales, float(ex.scale),
                         ex.q.shape[1], ex.col, R2, ex.lora_down.stride(0) if R2 > 1 else ex.q.shape[1])
            exit_kw = dict(EXIT=2 if ex.activation == "gelu_tanh" else 1, NEXT_FP8=ex.fp8,
                           HAS_NSMOOTH=ex.smooth is not None, HAS_NLORA=R2 > 0,
                           BLOCK_R2=min(cfg.block_r, max(16, triton.next_power_of_2(max(R2, 1)))))
        with guard:
            _gemm8_kernel[grid](
                a, sa, w8, sw, lora_act if R else dst, lora_up if R else dst, bias if bias is not None else dst,
                dst, M, N, K, R, *exit_args,
                IS_INT8=is_int8, HAS_LORA=R > 0, LORA_16BIT=lora_16bit, EMULATE_16BIT_DOT=interpreted(),
                HAS_BIAS=bias is not None, EVEN_K=K % block_k == 0,
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=block_k, BLOCK_R=block_r, GROUP_M=cfg.group_m,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages, **exit_kw,
            )
        return dst

    if config is None:
        if interpreted():
            config = INTERPRETER_CONFIG
        else:
            def bench(cfg: TileConfig) -> float:
                scratch = torch.empty_like(out)
                if ex is None:
                    return triton.testing.do_bench(lambda: launch(cfg, scratch), warmup=5, rep=20)
                # the exit epilogue writes (and atomically adds) into its outputs: time it on copies
                side = replace(ex, q=torch.empty_like(ex.q), scales=ex.scales.clone(),
                               lora_act=None if ex.lora_act is None else torch.empty_like(ex.lora_act))
                return triton.testing.do_bench(lambda: launch(cfg, scratch, side), warmup=5, rep=20)
            name = f"{kernel_name}_{'int8' if is_int8 else 'fp8'}{'' if ex is None else '_exit'}"
            config = _tiles.choose_config(M, N, K, kernel=name, bench=bench, candidates=CANDIDATES,
                                          defaults=DEFAULTS if ex is None else EXIT_DEFAULTS, table={})
    return launch(config, out)


def gemm8_exit_triton(
    a: Tensor, sa: Tensor, w8: Tensor, sw: Tensor, lora_act: Tensor | None, lora_up: Tensor | None,
    bias: Tensor | None, h_dtype: torch.dtype, *, activation: str, next_scale: float, next_mode: str,
    next_smooth: Tensor | None = None, next_lora_down: Tensor | None = None, q_out: Tensor | None = None,
    scales_out: Tensor | None = None, lora_out: Tensor | None = None, col: int = 0,
    config: TileConfig | None = None, kernel_name: str = "gemm8",
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The GEMM of an exit linear's producer with its output never written: each tile ``h`` (the GEMM's
    result in ``h_dtype``) goes through ``activation`` and is quantized for the NEXT linear with the static
    ``next_scale`` (``reference.quantize_act_static``), and the next layer's lora-down partial sums are added
    into its lora_act. Returns ``(q, scales, lora_act)`` for the next linear.

    ``q_out [M, LDQ]`` (int8 / e4m3), ``scales_out [M]`` and ``lora_out [M, R2]`` may be given to fill
    columns ``col : col + N`` of a wider input (FLUX's single block concatenates attention and MLP); the
    caller then pre-fills ``scales_out`` with ``next_scale`` and zeroes ``lora_out`` once for all producers.
    ``next_smooth`` is ``[LDQ]`` fp32 and ``next_lora_down`` ``[R2, LDQ]`` 16-bit, the next layer's own;
    next_lora_down may be a row-strided view (column stride 1, row stride >= LDQ), e.g. a column slice of a
    wider next layer's lora-down, read in place.
    """
    fn = "gemm8_exit_triton"
    M, N = a.shape[0], w8.shape[0]
    if activation not in ("none", "gelu_tanh"):
        raise ValueError(f"{fn}: activation must be 'none' or 'gelu_tanh', got {activation!r}")
    if next_mode not in ("int8", "fp8"):
        raise ValueError(f"{fn}: next_mode must be 'int8' or 'fp8', got {next_mode!r}")
    if not (next_scale > 0 and next_scale < float("inf")):
        raise ValueError(f"{fn}: next_scale must be a finite float > 0, got {next_scale!r}")
    if h_dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"{fn}: h_dtype must be bf16 / fp16, got {h_dtype}")
    qdtype = torch.float8_e4m3fn if next_mode == "fp8" else torch.int8
    fresh = q_out is None
    if fresh:
        q_out = torch.empty(M, N, dtype=qdtype, device=a.device)
    ldq = q_out.shape[1]
    if q_out.dtype != qdtype or q_out.dim() != 2 or q_out.shape[0] != M or not q_out.is_contiguous() \
            or not 0 <= col <= ldq - N:
        raise ValueError(f"{fn}: q_out must be contiguous {qdtype} [M={M}, >= col + N = {col + N}], got "
                         f"{q_out.dtype} {tuple(q_out.shape)} with col={col}")
    if next_smooth is not None and (next_smooth.dtype != torch.float32 or tuple(next_smooth.shape) != (ldq,)
                                    or (ldq > 1 and next_smooth.stride(0) != 1)):
        raise ValueError(f"{fn}: next_smooth must be fp32 [{ldq}] with stride 1, got {next_smooth.dtype} "
                         f"{tuple(next_smooth.shape)} stride {next_smooth.stride()}")
    R2 = 0
    if next_lora_down is not None:
        if next_lora_down.dtype not in (torch.bfloat16, torch.float16) or next_lora_down.dim() != 2 \
                or next_lora_down.shape[1] != ldq or (ldq > 1 and next_lora_down.stride(1) != 1) \
                or (next_lora_down.shape[0] > 1 and next_lora_down.stride(0) < ldq):
            raise ValueError(f"{fn}: next_lora_down must be bf16 / fp16 [R2, {ldq}] with column stride 1 and row "
                             f"stride >= {ldq}, got {next_lora_down.dtype} {tuple(next_lora_down.shape)} strides "
                             f"{next_lora_down.stride()}")
        R2 = next_lora_down.shape[0]
    if scales_out is None:
        scales_out = torch.full((M,), float(next_scale), dtype=torch.float32, device=a.device)
    if R2 and lora_out is None:
        lora_out = torch.zeros(M, R2, dtype=torch.float32, device=a.device)
    if R2 and (lora_out.dtype != torch.float32 or tuple(lora_out.shape) != (M, R2) or not lora_out.is_contiguous()):
        raise ValueError(f"{fn}: lora_out must be contiguous fp32 [{M}, {R2}], got {lora_out.dtype} "
                         f"{tuple(lora_out.shape)}")
    spec = ExitSpec(q=q_out.view(torch.uint8), scales=scales_out, lora_act=lora_out if R2 else None,
                    smooth=next_smooth, lora_down=next_lora_down if R2 else None, scale=float(next_scale),
                    fp8=next_mode == "fp8", col=col, activation=activation, h_dtype=h_dtype)
    gemm8_triton(a, sa, w8, sw, lora_act, lora_up, bias, h_dtype, config=config, kernel_name=kernel_name,
                 _exit=spec)
    return q_out, scales_out, lora_out if R2 else None
