"""Triton W4A4 / W4A8 GEMM: the plain, correct Triton baseline of ``lowbit::gemm_w4a4`` and ``gemm_w4a8``.

Math contract: docs/formats.md, sections "W4A4 GEMM", "W4A8 GEMM" and "int4". Per output tile the kernel
walks K one scale group (64 values) at a time:

* the packed int4 tiles (weights, and activations for W4A4) are loaded as bytes and unpacked to int8 in
  registers (two's-complement nibbles, even k in the low nibble);
* int8 operands are multiplied with an integer ``tl.dot`` (int32 accumulate, exact); fp8 e4m3 activations
  meet the weights converted to e4m3 (every int4 value is exact in e4m3) in an fp8 ``tl.dot`` with fp32
  accumulate;
* each group's partial sum is promoted into one fp32 accumulator with its scales: ``act_scale * w_scale``
  per group for W4A4, ``w_scale`` per group and the per-token ``act_scale`` once at the end for W4A8;
* the epilogue adds ``lora_act @ lora_up^T`` (fp32, R walked in power-of-two blocks) and the bias, and
  stores in ``out_dtype`` with masks (M and N need not be multiples of the tile; M may be 1).

This is deliberately simple. Measured on an H100 at M=4608, K=N=3072 with the default tiles it reaches
0.14x of cuBLAS bf16 (W4A4) and 0.21-0.22x (W4A8 int8 / fp8): the unpack lands in a register layout that
has to be shuffled into the tensor-core operand layout, the dots are one group (K=64) deep and the
scales are promoted every 64. The fast path is hand-written CUDA with weights pre-permuted into the MMA
fragment order; this kernel is the reference point it must beat and the fallback where it does not apply.

CPU: the kernels run under the Triton interpreter when ``TRITON_INTERPRET=1`` was set before this module
was imported (Triton decides between compiled and interpreted at ``@triton.jit`` decoration time). The
default dispatch never selects this backend for CPU tensors or for interpreted kernels.

Example (on a CUDA GPU)::

    import torch
    from lowbit_engine.formats import int4
    from lowbit_engine.kernels.gemm_w4a4 import gemm_w4a4_triton

    qa, sa = int4.quantize(torch.randn(3, 128, device="cuda"))
    qw, sw = int4.quantize(torch.randn(8, 128, device="cuda"), scale_dtype=torch.bfloat16)
    out = gemm_w4a4_triton(int4.pack(qa), sa, int4.pack(qw), sw)   # bf16 [3, 8]
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from lowbit_engine import _dispatch

GROUP = 64  # K values per scale group; one K step of the kernel

# Activation kinds: one kernel, specialized at compile time by the constexpr ACT.
ACT_INT4 = tl.constexpr(0)  # W4A4: packed int4 [M, K/2], fp32 scales [M, K/64]
ACT_INT8 = tl.constexpr(1)  # W4A8: int8 [M, K], fp32 scales [M]
ACT_FP8 = tl.constexpr(2)  # W4A8: float8_e4m3fn [M, K], fp32 scales [M]

# Triton globals used inside a kernel must be constexpr.
_GROUP = tl.constexpr(GROUP)
_GROUP_BYTES = tl.constexpr(GROUP // 2)


@triton.jit
def _gemm_w4_kernel(
    act_ptr, act_scales_ptr, w_ptr, w_scales_ptr, lora_act_ptr, lora_up_ptr, bias_ptr, out_ptr,
    M, N, K, R,
    ACT: tl.constexpr,
    HAS_LORA: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """One ``[BLOCK_M, BLOCK_N]`` output tile; K is walked one 64-wide scale group per step.

    Only builtins of ``triton.language`` are called here, no ``@triton.jit`` functions (which includes
    ``tl.zeros`` and ``tl.cdiv``): the CPU tests run an interpreted copy of this module in a process where
    Triton may already have been imported in compiled mode, and an interpreted kernel cannot call a
    compiled ``@triton.jit`` function.
    """
    # Grouped tile order: GROUP_M consecutive programs share a column of weight tiles, so a weight
    # tile is fetched from HBM once and then served from L2 to the other row tiles of the group.
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
    mask_m = offs_m < M
    mask_n = offs_n < N
    # Row offsets in int64: M * K and N * K can pass 2^31 bytes for long videos or wide layers.
    rows_m = offs_m.to(tl.int64)
    rows_n = offs_n.to(tl.int64)
    n_groups = K // _GROUP
    offs_byte = tl.arange(0, _GROUP_BYTES)
    offs_k = tl.arange(0, _GROUP)

    w_ptrs = w_ptr + rows_n[:, None] * (K // 2) + offs_byte[None, :]
    w_scale_ptrs = w_scales_ptr + rows_n * n_groups
    if ACT == ACT_INT4:
        a_ptrs = act_ptr + rows_m[:, None] * (K // 2) + offs_byte[None, :]
        a_scale_ptrs = act_scales_ptr + rows_m * n_groups
    else:
        a_ptrs = act_ptr + rows_m[:, None] * K + offs_k[None, :]

    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for _ in range(0, n_groups):
        # Unpack int4 -> int8. A byte holds k = 2j in its low nibble and k = 2j + 1 in its high nibble,
        # both two's complement. Reinterpreting the byte as int8 lets arithmetic shifts sign-extend:
        # (b << 4) >> 4 keeps the low nibble, b >> 4 the high one, with no masks or compares. join +
        # reshape then interleaves (lo, hi) pairs back into natural k order, so an unpacked int4 tile
        # lines up with the unpacked int8/fp8 activation tile of W4A8 and one K=64 dot covers the group.
        wb = tl.load(w_ptrs, mask=mask_n[:, None], other=0).to(tl.int8, bitcast=True)
        w_q = tl.reshape(tl.join((wb << 4) >> 4, wb >> 4), (BLOCK_N, _GROUP))
        w_scale = tl.load(w_scale_ptrs, mask=mask_n, other=0.0).to(tl.float32)

        if ACT == ACT_FP8:
            # fp8 x fp8 on the tensor cores: int4 -> fp16 -> e4m3 is exact for -8..7. The products are
            # exact, but Hopper's fp8 MMA adds them with reduced precision (~14 bits, the DeepSeek-V3
            # report), so each group's sum starts from a fresh accumulator and is promoted into the fp32
            # accumulator right away (measured on the H100: ~3e-5 relative error at K=3072).
            # max_num_imprecise_acc=32 would promote after every MMA instead: ~1.7x less error, ~1.5x
            # slower; not worth it here.
            a_q = tl.load(a_ptrs, mask=mask_m[:, None], other=0.0)
            w_f8 = w_q.to(tl.float16).to(tl.float8e4nv)
            gsum = tl.dot(a_q, tl.trans(w_f8), out_dtype=tl.float32)
            acc += gsum * w_scale[None, :]
        else:
            if ACT == ACT_INT4:
                ab = tl.load(a_ptrs, mask=mask_m[:, None], other=0).to(tl.int8, bitcast=True)
                a_q = tl.reshape(tl.join((ab << 4) >> 4, ab >> 4), (BLOCK_M, _GROUP))
            else:
                a_q = tl.load(a_ptrs, mask=mask_m[:, None], other=0)
            # Integer dot, int32 accumulate: exact (|sum| <= 64 * 128 * 8), as the contract requires.
            isum = tl.dot(a_q, tl.trans(w_q), out_dtype=tl.int32)
            if ACT == ACT_INT4:
                a_scale = tl.load(a_scale_ptrs, mask=mask_m, other=0.0)
                # Contract order: the two scales are multiplied first, then the promoted sum.
                acc += isum.to(tl.float32) * (a_scale[:, None] * w_scale[None, :])
                a_scale_ptrs += 1
            else:
                acc += isum.to(tl.float32) * w_scale[None, :]

        w_ptrs += _GROUP_BYTES
        w_scale_ptrs += 1
        if ACT == ACT_INT4:
            a_ptrs += _GROUP_BYTES
        else:
            a_ptrs += _GROUP

    if ACT != ACT_INT4:
        # W4A8: the per-token scale is constant over K, so it is applied once, after the K loop.
        a_scale = tl.load(act_scales_ptr + rows_m, mask=mask_m, other=0.0)
        acc = acc * a_scale[:, None]

    if HAS_LORA:
        # Low-rank up-projection, fp32: "ieee" keeps the dot in full fp32 (the default would round
        # the inputs to tf32, ~1e-3 relative error). R is walked in BLOCK_R chunks, masked at the end.
        offs_r = tl.arange(0, BLOCK_R)
        for r0 in range(0, R, BLOCK_R):
            r = r0 + offs_r
            mask_r = r < R
            la = tl.load(lora_act_ptr + rows_m[:, None] * R + r[None, :],
                         mask=mask_m[:, None] & mask_r[None, :], other=0.0)
            lu = tl.load(lora_up_ptr + rows_n[:, None] * R + r[None, :],
                         mask=mask_n[:, None] & mask_r[None, :], other=0.0).to(tl.float32)
            acc += tl.dot(la, tl.trans(lu), input_precision="ieee")

    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc += bias[None, :]

    out_ptrs = out_ptr + rows_m[:, None] * N + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# --------------------------------------------------------------------------------------------------
# tile configurations


@dataclass(frozen=True)
class TileConfig:
    """Launch parameters of one kernel instance (BLOCK_K is fixed at one scale group, 64)."""

    block_m: int
    block_n: int
    block_r: int = 32  # rank chunk of the low-rank epilogue (power of two, >= 16 for tl.dot)
    group_m: int = 8  # row tiles that share a weight column (L2 reuse)
    num_warps: int = 8
    num_stages: int = 3


# H100 defaults keyed by M (rows of the activation); the first entry with M <= bound applies. Small M is
# weight-bandwidth bound: a short tile wastes no MMA rows and more column tiles keep the SMs busy. For
# large M, 128x64 with 4 warps was the fastest of seven tiles measured at M=4608, K=N=3072 (W4A4 837 us,
# W4A8 int8 565 us, fp8 528 us; 128x128 with 8 warps: 1004 / 762 / 708 us; cuBLAS bf16: 118 us): the
# unpacked operands and the int32 partial sums cost registers, so smaller tiles keep more in flight.
H100_CONFIGS: tuple[tuple[int, TileConfig], ...] = (
    (16, TileConfig(block_m=16, block_n=64, num_warps=4, num_stages=4)),
    (64, TileConfig(block_m=64, block_n=64, num_warps=4, num_stages=4)),
    (2**62, TileConfig(block_m=128, block_n=64, num_warps=4, num_stages=4)),
)

# The interpreter runs each program as numpy ops: cost grows with the number of programs, not the tile
# area. Small tiles keep several tiles (and ragged edges) in the test shapes.
INTERPRETER_CONFIG = TileConfig(block_m=32, block_n=32, block_r=16, group_m=2, num_warps=1, num_stages=1)


def interpreted() -> bool:
    """Whether the kernels were decorated under ``TRITON_INTERPRET=1`` (they then run on CPU tensors)."""
    return not isinstance(_gemm_w4_kernel, triton.runtime.jit.JITFunction)


def default_config(M: int) -> TileConfig:
    """The tile configuration used when the caller gives none."""
    if interpreted():
        return INTERPRETER_CONFIG
    for bound, cfg in H100_CONFIGS:
        if M <= bound:
            return cfg
    return H100_CONFIGS[-1][1]


# --------------------------------------------------------------------------------------------------
# launch


def _out_tensor(out: Tensor | None, M: int, N: int, out_dtype: torch.dtype, device: torch.device) -> Tensor:
    if out is None:
        return torch.empty(M, N, dtype=out_dtype, device=device)
    if out.shape != (M, N) or out.dtype != out_dtype or out.device != device or not out.is_contiguous():
        raise ValueError(f"out: expected a contiguous {out_dtype} tensor of shape ({M}, {N}) on {device}, "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device} (contiguous={out.is_contiguous()})")
    return out


def _launch(
    act_kind: int, act: Tensor, act_scales: Tensor, w: Tensor, w_scales: Tensor, lora_act: Tensor | None,
    lora_up: Tensor | None, bias: Tensor | None, out_dtype: torch.dtype, out: Tensor | None = None,
    config: TileConfig | None = None,
) -> Tensor:
    """Launch the kernel on already-validated inputs (shapes and dtypes as the op schemas say)."""
    M, N, K = act.shape[0], w.shape[0], w.shape[1] * 2
    R = 0 if lora_act is None else lora_act.shape[1]
    if not interpreted() and not act.is_cuda:
        raise RuntimeError("the Triton W4 GEMM needs CUDA tensors; on the CPU it runs only under the "
                           "Triton interpreter (TRITON_INTERPRET=1 set before lowbit_engine is imported)")
    out = _out_tensor(out, M, N, out_dtype, act.device)
    cfg = config or default_config(M)
    block_r = min(cfg.block_r, max(16, triton.next_power_of_2(max(R, 1))))
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n),)
    # Unused pointer slots get a real tensor rather than None: the branches that would read them are
    # compiled out (HAS_LORA / HAS_BIAS), and every Triton version accepts a tensor there.
    dummy = out
    guard = torch.cuda.device(act.device) if act.is_cuda else contextlib.nullcontext()
    with guard:  # Triton launches on the current device and stream
        _gemm_w4_kernel[grid](
            act, act_scales, w, w_scales,
            lora_act if R > 0 else dummy, lora_up if R > 0 else dummy, bias if bias is not None else dummy,
            out, M, N, K, R,
            ACT=act_kind, HAS_LORA=R > 0, HAS_BIAS=bias is not None,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_R=block_r, GROUP_M=cfg.group_m,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return out


def gemm_w4a4_triton(
    act: Tensor, act_scales: Tensor, w: Tensor, w_scales: Tensor, lora_act: Tensor | None = None,
    lora_up: Tensor | None = None, bias: Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
    *, out: Tensor | None = None, config: TileConfig | None = None,
) -> Tensor:
    """W4A4 GEMM (``lowbit::gemm_w4a4`` contract) with the Triton kernel, on the inputs' device.

    Args:
        act, act_scales: packed int4 uint8 ``[M, K/2]`` and fp32 ``[M, K/64]``.
        w, w_scales: packed int4 uint8 ``[N, K/2]`` and bf16 ``[N, K/64]``.
        lora_act, lora_up: optional fp32 ``[M, R]`` and bf16/fp16 ``[N, R]`` (both or neither).
        bias: optional ``[N]`` bf16/fp16/fp32.
        out_dtype: bf16, fp16 or fp32.
        out: optional preallocated contiguous ``[M, N]`` output of ``out_dtype`` (written, and returned).
        config: optional tile configuration (default: :func:`default_config`).
    """
    from lowbit_engine import ops  # late: ops imports this package at its end

    ops._check_gemm_w4a4(act, act_scales, w, w_scales, lora_act, lora_up, bias, out_dtype)
    return _launch(ACT_INT4.value, act, act_scales, w, w_scales, lora_act, lora_up, bias, out_dtype, out,
                   config)


def gemm_w4a8_triton(
    act: Tensor, act_scales: Tensor, w: Tensor, w_scales: Tensor, lora_act: Tensor | None = None,
    lora_up: Tensor | None = None, bias: Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
    *, out: Tensor | None = None, config: TileConfig | None = None,
) -> Tensor:
    """W4A8 GEMM (``lowbit::gemm_w4a8`` contract): int8 or fp8 e4m3 ``act [M, K]``, fp32 ``act_scales [M]``.

    Weights, epilogue, ``out`` and ``config`` as in :func:`gemm_w4a4_triton`.
    """
    from lowbit_engine import ops

    ops._check_gemm_w4a8(act, act_scales, w, w_scales, lora_act, lora_up, bias, out_dtype)
    kind = ACT_FP8 if act.dtype == torch.float8_e4m3fn else ACT_INT8
    return _launch(kind.value, act, act_scales, w, w_scales, lora_act, lora_up, bias, out_dtype, out, config)


# --------------------------------------------------------------------------------------------------
# dispatch


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _applies(act: Tensor, *_args) -> bool:
    """CUDA (not ROCm) tensors, compiled (not interpreted) kernels, and tensor cores for the operand type:
    int8 MMA needs sm_80, fp8 e4m3 MMA sm_89."""
    if not act.is_cuda or torch.version.hip is not None or interpreted():
        return False
    need = (8, 9) if act.dtype == torch.float8_e4m3fn else (8, 0)
    return _capability(act.device.index if act.device.index is not None else torch.cuda.current_device()) >= need


def _run_w4a4(act, act_scales, w, w_scales, lora_act, lora_up, bias, out_dtype) -> Tensor:
    return _launch(ACT_INT4.value, act, act_scales, w, w_scales, lora_act, lora_up, bias, out_dtype)


def _run_w4a8(act, act_scales, w, w_scales, lora_act, lora_up, bias, out_dtype) -> Tensor:
    kind = ACT_FP8 if act.dtype == torch.float8_e4m3fn else ACT_INT8
    return _launch(kind.value, act, act_scales, w, w_scales, lora_act, lora_up, bias, out_dtype)


def register() -> None:
    """Register the ``triton`` backend of ``gemm_w4a4`` and ``gemm_w4a8`` (the ops have validated inputs)."""
    _dispatch.register("gemm_w4a4", "triton", _applies, _run_w4a4)
    _dispatch.register("gemm_w4a8", "triton", _applies, _run_w4a8)
