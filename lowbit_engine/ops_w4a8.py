"""The promotion-free W4A8 GEMM ops: ``lowbit::gemm_w4a8_f8l`` (e4m3 tokens) and ``lowbit::gemm_w4a8_i8q``
(int8 tokens), plus the Triton backend of ``lowbit::quantize_act`` for the 8-bit modes.

Math contract: docs/formats.md ("F8L", "I8Q", "8-bit GEMM with row scales"). Same patterns as
:mod:`lowbit_engine.ops`: one ``custom_op`` each with a fake kernel (``torch.compile(fullgraph=True)``
traces through it), input checks (:mod:`lowbit_engine._validate`) and backend dispatch
(:mod:`lowbit_engine._dispatch`):

* ``triton`` (CUDA tensors, compiled Triton): M > ``SMALL_M`` expands the 4-bit weights into a scratch
  buffer (kernels/w4_expand.py) and runs the 8-bit GEMM (kernels/gemm8.py); M <= ``SMALL_M`` runs the
  direct split-K kernel that decodes the 4-bit weights in registers. F8L needs fp8 tensor cores (sm_89+),
  I8Q int8 ones (sm_80+).
* ``cpu``: the C++ reference (csrc/cpu/gemm8.cpp).
* ``torch``: :func:`lowbit_engine.reference.gemm_w4a8_f8l` / ``gemm_w4a8_i8q`` (any device; warns once on
  a CUDA tensor, with :class:`~lowbit_engine.errors.ReferenceFallbackWarning`).

Which quantizer feeds them: ``LOWBIT_QUANTIZE_ACT_KERNEL`` = ``triton`` (default for the 8-bit modes: the
Triton quantizer of kernels/quant8.py) or ``cuda`` (csrc/cuda/quantize_act.cu). Both give the same q and
scales bit for bit; bench/ measures both.

Example:
    >>> import torch
    >>> from lowbit_engine import ops, ops_w4a8
    >>> from lowbit_engine.formats import i8q
    >>> codes, s, z, r = i8q.quantize(torch.randn(8, 128))
    >>> qa, sa, _ = ops.quantize_act(torch.randn(3, 128, dtype=torch.bfloat16), mode="int8")
    >>> ops_w4a8.gemm_w4a8_i8q(qa, sa, i8q.pack(codes), s, z, r).shape
    torch.Size([3, 8])
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch
from torch import Tensor

from . import _dispatch, reference
from . import _validate as V
from ._build_info import native
from ._dtypes import code
from .formats import fp8

GROUP = 64
QUANTIZE_KERNEL_ENV = "LOWBIT_QUANTIZE_ACT_KERNEL"
QUANTIZE_KERNELS = ("triton", "cuda")


def _ptr(t: Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _dcode(t: Tensor | None) -> int:
    return 0 if t is None else code(t.dtype)


def _run(op: str, device: torch.device, *args):
    def why() -> str:
        if device.type == "cpu":
            return "the native module lowbit_engine._C is not built"
        return (f"no Triton kernel applies on {device.type} for these inputs (Triton missing, or no "
                f"{'fp8' if op.endswith('f8l') else 'int8'} tensor cores)")

    return _dispatch.run(op, args, why)


# --------------------------------------------------------------------------------------------------
# checks


def _check_epilogue(op: str, dev, M: int, N: int, lora_act, lora_up, bias, out_dtype) -> None:
    V.pair(op, "lora_act", lora_act, "lora_up", lora_up)
    if lora_act is not None:
        V.tensor(op, "lora_act", lora_act, dtypes=(torch.float32,), shape=(M, None), device=dev)
        V.tensor(op, "lora_up", lora_up, dtypes=V.FLOAT16S, shape=(N, lora_act.shape[1]), device=dev)
    V.optional(op, "bias", bias, dtypes=V.OUT_DTYPES, shape=(N,), device=dev)
    V.one_of(op, "out_dtype", out_dtype, V.OUT_DTYPES)


def _check_act(op: str, act, act_scales, dtype) -> tuple[int, int]:
    V.tensor(op, "act", act, dtypes=(dtype,), shape=(None, None))
    M, K = act.shape
    if M < 1:
        V.fail(op, "act", "at least one row (M >= 1)", f"shape {tuple(act.shape)}")
    V.multiple(op, "act", K, GROUP, "K = act.shape[1]")
    V.tensor(op, "act_scales", act_scales, dtypes=(torch.float32,), shape=(M,), device=act.device)
    return M, K


def _check_codes(op: str, dev, K: int, w) -> int:
    V.tensor(op, "w", w, dtypes=(torch.uint8,), shape=(None, K // 2), device=dev)
    N = w.shape[0]
    if N < 1:
        V.fail(op, "w", "at least one output channel", f"shape {tuple(w.shape)}")
    return N


def _check_f8l(act, act_scales, w, w_gscales, w_row_scale, lora_act, lora_up, bias, out_dtype):
    op = "gemm_w4a8_f8l"
    M, K = _check_act(op, act, act_scales, fp8.DTYPE)
    N = _check_codes(op, act.device, K, w)
    V.tensor(op, "w_gscales", w_gscales, dtypes=(fp8.DTYPE,), shape=(N, K // GROUP), device=act.device)
    V.tensor(op, "w_row_scale", w_row_scale, dtypes=(torch.float32,), shape=(N,), device=act.device)
    _check_epilogue(op, act.device, M, N, lora_act, lora_up, bias, out_dtype)
    return M, N, K


def _check_i8q(act, act_scales, w, w_steps, w_zeros, w_row_scale, lora_act, lora_up, bias, out_dtype):
    op = "gemm_w4a8_i8q"
    M, K = _check_act(op, act, act_scales, torch.int8)
    N = _check_codes(op, act.device, K, w)
    for name, t in (("w_steps", w_steps), ("w_zeros", w_zeros)):
        V.tensor(op, name, t, dtypes=(torch.uint8,), shape=(N, K // GROUP), device=act.device)
    V.tensor(op, "w_row_scale", w_row_scale, dtypes=(torch.float32,), shape=(N,), device=act.device)
    _check_epilogue(op, act.device, M, N, lora_act, lora_up, bias, out_dtype)
    return M, N, K


# --------------------------------------------------------------------------------------------------
# ops


@torch.library.custom_op("lowbit::gemm_w4a8_f8l", mutates_args=())
def _gemm_w4a8_f8l(act: Tensor, act_scales: Tensor, w: Tensor, w_gscales: Tensor, w_row_scale: Tensor,
                   lora_act: Optional[Tensor], lora_up: Optional[Tensor], bias: Optional[Tensor],
                   out_dtype: torch.dtype) -> Tensor:
    args = (act, act_scales, w, w_gscales, w_row_scale, lora_act, lora_up, bias, out_dtype)
    _check_f8l(*args)
    return _run("gemm_w4a8_f8l", act.device, *args)


@_gemm_w4a8_f8l.register_fake
def _(act, act_scales, w, w_gscales, w_row_scale, lora_act, lora_up, bias, out_dtype):
    M, N, _ = _check_f8l(act, act_scales, w, w_gscales, w_row_scale, lora_act, lora_up, bias, out_dtype)
    return act.new_empty(M, N, dtype=out_dtype)


@torch.library.custom_op("lowbit::gemm_w4a8_i8q", mutates_args=())
def _gemm_w4a8_i8q(act: Tensor, act_scales: Tensor, w: Tensor, w_steps: Tensor, w_zeros: Tensor,
                   w_row_scale: Tensor, lora_act: Optional[Tensor], lora_up: Optional[Tensor],
                   bias: Optional[Tensor], out_dtype: torch.dtype) -> Tensor:
    args = (act, act_scales, w, w_steps, w_zeros, w_row_scale, lora_act, lora_up, bias, out_dtype)
    _check_i8q(*args)
    return _run("gemm_w4a8_i8q", act.device, *args)


@_gemm_w4a8_i8q.register_fake
def _(act, act_scales, w, w_steps, w_zeros, w_row_scale, lora_act, lora_up, bias, out_dtype):
    M, N, _ = _check_i8q(act, act_scales, w, w_steps, w_zeros, w_row_scale, lora_act, lora_up, bias, out_dtype)
    return act.new_empty(M, N, dtype=out_dtype)


def gemm_w4a8_f8l(act: Tensor, act_scales: Tensor, w: Tensor, w_gscales: Tensor, w_row_scale: Tensor,
                  lora_act: Tensor | None = None, lora_up: Tensor | None = None, bias: Tensor | None = None,
                  out_dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """W4A8 GEMM on F8L weights: e4m3 tokens ``act [M, K]`` (fp32 ``act_scales [M]``, from
    ``ops.quantize_act(..., mode="fp8")``) x F8L codes ``w uint8 [N, K/2]``, ``w_gscales`` e4m3
    ``[N, K/64]``, ``w_row_scale`` fp32 ``[N]`` (:mod:`lowbit_engine.formats.f8l`); optional low-rank
    ``lora_act fp32 [M, R]`` x ``lora_up [N, R]`` (bf16/fp16; lora_act is rounded to its dtype) and bias.

    Example:
        >>> from lowbit_engine import ops
        >>> from lowbit_engine.formats import f8l
        >>> codes, gs, r = f8l.quantize(torch.randn(8, 128))
        >>> qa, sa, _ = ops.quantize_act(torch.randn(3, 128, dtype=torch.bfloat16), mode="fp8")
        >>> gemm_w4a8_f8l(qa, sa, f8l.pack(codes), gs, r).shape
        torch.Size([3, 8])
    """
    return V.call("gemm_w4a8_f8l", act, act_scales, w, w_gscales, w_row_scale, lora_act, lora_up, bias,
                  out_dtype)


def gemm_w4a8_i8q(act: Tensor, act_scales: Tensor, w: Tensor, w_steps: Tensor, w_zeros: Tensor,
                  w_row_scale: Tensor, lora_act: Tensor | None = None, lora_up: Tensor | None = None,
                  bias: Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """W4A8 GEMM on I8Q weights: int8 tokens ``act [M, K]`` (fp32 ``act_scales [M]``) x I8Q codes
    ``w uint8 [N, K/2]``, ``w_steps`` / ``w_zeros`` uint8 ``[N, K/64]``, ``w_row_scale`` fp32 ``[N]``
    (:mod:`lowbit_engine.formats.i8q`); epilogue as :func:`gemm_w4a8_f8l`. See the module example."""
    return V.call("gemm_w4a8_i8q", act, act_scales, w, w_steps, w_zeros, w_row_scale, lora_act, lora_up,
                  bias, out_dtype)


# --------------------------------------------------------------------------------------------------
# backends


def _f8l_cpu(act, act_scales, w, w_gscales, w_row_scale, lora_act, lora_up, bias, out_dtype):
    M, N, K = act.shape[0], w.shape[0], act.shape[1]
    R = 0 if lora_act is None else lora_act.shape[1]
    out = torch.empty(M, N, dtype=out_dtype)
    native().cpu_gemm_w4a8_f8l(_ptr(act), _ptr(act_scales), _ptr(w), _ptr(w_gscales), _ptr(w_row_scale), M, N, K,
                               _ptr(lora_act), _ptr(lora_up), _dcode(lora_up), R, _ptr(bias), _dcode(bias),
                               _ptr(out), code(out_dtype))
    return out


def _i8q_cpu(act, act_scales, w, w_steps, w_zeros, w_row_scale, lora_act, lora_up, bias, out_dtype):
    M, N, K = act.shape[0], w.shape[0], act.shape[1]
    R = 0 if lora_act is None else lora_act.shape[1]
    out = torch.empty(M, N, dtype=out_dtype)
    native().cpu_gemm_w4a8_i8q(_ptr(act), _ptr(act_scales), _ptr(w), _ptr(w_steps), _ptr(w_zeros), _ptr(w_row_scale),
                               M, N, K, _ptr(lora_act), _ptr(lora_up), _dcode(lora_up), R, _ptr(bias),
                               _dcode(bias), _ptr(out), code(out_dtype))
    return out


def _f8l_torch(act, act_scales, w, w_gscales, w_row_scale, lora_act, lora_up, bias, out_dtype):
    return reference.gemm_w4a8_f8l(act, act_scales, w, w_gscales, w_row_scale, lora_act, lora_up, bias, out_dtype)


def _i8q_torch(act, act_scales, w, w_steps, w_zeros, w_row_scale, lora_act, lora_up, bias, out_dtype):
    return reference.gemm_w4a8_i8q(act, act_scales, w, w_steps, w_zeros, w_row_scale, lora_act, lora_up, bias,
                                   out_dtype)


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _tensor_cores(t: Tensor, need: tuple[int, int]) -> bool:
    if not t.is_cuda or torch.version.hip is not None:
        return False
    return _capability(t.device.index if t.device.index is not None else torch.cuda.current_device()) >= need


def quantize_kernel() -> str:
    """The quantizer the 8-bit modes of ``lowbit::quantize_act`` prefer on CUDA (``LOWBIT_QUANTIZE_ACT_KERNEL``,
    default ``triton``). An unknown value is a ValueError naming the choices."""
    value = os.environ.get(QUANTIZE_KERNEL_ENV, "triton")
    if value not in QUANTIZE_KERNELS:
        raise ValueError(f"{QUANTIZE_KERNEL_ENV}={value!r}; expected one of {list(QUANTIZE_KERNELS)}")
    return value


def _register() -> None:
    _dispatch.register("gemm_w4a8_f8l", "torch", lambda *a: True, _f8l_torch)
    _dispatch.register("gemm_w4a8_i8q", "torch", lambda *a: True, _i8q_torch)
    cpu = lambda act, *a: act.device.type == "cpu" and native() is not None  # noqa: E731
    _dispatch.register("gemm_w4a8_f8l", "cpu", cpu, _f8l_cpu)
    _dispatch.register("gemm_w4a8_i8q", "cpu", cpu, _i8q_cpu)
    try:
        from .kernels import gemm8, quant8, w4_expand
    except ImportError:  # no Triton: the C++ and torch references serve every call
        return

    def compiled(t: Tensor) -> bool:
        return not (gemm8.interpreted() or w4_expand.interpreted())

    def f8l_triton(act, act_scales, w, w_gscales, w_row_scale, lora_act, lora_up, bias, out_dtype):
        return run_triton("f8l", act, act_scales, w, w_gscales, None, w_row_scale, lora_act, lora_up, bias,
                          out_dtype)

    def i8q_triton(act, act_scales, w, w_steps, w_zeros, w_row_scale, lora_act, lora_up, bias, out_dtype):
        return run_triton("i8q", act, act_scales, w, w_steps, w_zeros, w_row_scale, lora_act, lora_up, bias,
                          out_dtype)

    _dispatch.register("gemm_w4a8_f8l", "triton", lambda act, *a: compiled(act) and _tensor_cores(act, (8, 9)),
                       f8l_triton)
    _dispatch.register("gemm_w4a8_i8q", "triton", lambda act, *a: compiled(act) and _tensor_cores(act, (8, 0)),
                       i8q_triton)

    # The 8-bit quantizer: CUDA kernels of ops.py stay registered; the env var picks between them.
    def quant_applies(x, smooth, lora_down, mode) -> bool:
        return (mode in quant8.MODES and x.is_cuda and not quant8.interpreted() and quantize_kernel() == "triton"
                and (lora_down is None or lora_down.shape[0] <= quant8.MAX_RANK))

    _dispatch.register("quantize_act", "triton", quant_applies, quant8.quantize_8bit_triton)
    _prefer_triton_quantizer()


def _prefer_triton_quantizer() -> None:
    """Let the CUDA quantizer step aside for the 8-bit modes when the Triton one is preferred (dispatch tries
    ``cuda`` before ``triton``)."""
    backends = _dispatch._BACKENDS.get("quantize_act", {})
    cuda = backends.get("cuda")
    if cuda is None:
        return
    inner = cuda.applies

    def applies(x, smooth, lora_down, mode) -> bool:
        if mode in ("int8", "fp8") and quantize_kernel() == "triton" and "triton" in backends \
                and backends["triton"].applies(x, smooth, lora_down, mode):
            return False
        return inner(x, smooth, lora_down, mode)

    _dispatch.register("quantize_act", "cuda", applies, cuda.run)


def run_triton(fmt: str, act: Tensor, act_scales: Tensor, w: Tensor, s1: Tensor, s2: Tensor | None, row: Tensor,
               lora_act, lora_up, bias, out_dtype, *, small_m: int | None = None) -> Tensor:
    """The Triton path of either op: direct kernel at small M, else expand into the scratch + gemm8.
    ``small_m`` overrides ``w4_expand.SMALL_M`` (to time both sides of the switch on one shape)."""
    from .kernels import gemm8, w4_expand

    M, K = act.shape
    N = w.shape[0]
    if M <= (w4_expand.SMALL_M if small_m is None else small_m):
        return w4_expand.direct_triton(fmt, act, act_scales, w, s1, s2, None, row, lora_act, lora_up, bias,
                                       out_dtype)
    dtype = torch.int8 if fmt == "i8q" else fp8.DTYPE
    w8 = w4_expand.scratch.get(N * K, act.device).view(dtype).view(N, K)
    w4_expand.expand_triton(fmt, w, s1, s2, out=w8)
    return gemm8.gemm8_triton(act, act_scales, w8, row, lora_act, lora_up, bias, out_dtype, kernel_name="gemm8_w4")


_register()

OPS = ("gemm_w4a8_f8l", "gemm_w4a8_i8q")
