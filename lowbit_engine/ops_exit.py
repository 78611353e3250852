"""Exit-linear ops: the next linear's 8-bit input written where it is produced (the Hopper plan, step 3).

An exit linear (FLUX's MLP fc2, the attention output projection, the single block's proj_out) reads the
output of a GEMM (fc1, after GELU) or of attention. Unfused, that output is written in bf16, read back by the
quantizer, and written again in 8 bits. With a **static per-tensor scale**, calibrated once
(:func:`lowbit_engine.integrations.fused_blocks.calibrate_exit_scales`), no row statistic is needed, so the
producer can quantize each tile as it computes it (docs/formats.md, "Exit quantizer"):

* ``lowbit::gemm_w4a8_exit``: an F8L / I8Q GEMM (fc1) whose epilogue applies the activation and writes the
  next linear's ``(q, scales, lora_act)``; the next layer's lora-down runs on the unquantized, activated
  values as partial sums added atomically in the epilogue. The ``[M, N]`` 16-bit output is never written.
* ``lowbit::quantize_act_static``: the same quantizer on an existing tensor (the light pass for an
  attention output, and the unfused form of the above).

Backends: ``triton`` (CUDA; M > ``w4_expand.SMALL_M`` runs expand + the 8-bit GEMM with the exit epilogue;
at small M the direct kernel writes h and the exit runs as torch ops on that small tensor;
``quantize_act_static`` is the 8-bit quantizer of kernels/quant8.py with its ``STATIC`` switch), ``cpu``
(csrc/cpu/exit_quant.cpp after the C++ GEMM), ``torch`` (the references; warns once on CUDA tensors).

Example:
    >>> import torch
    >>> from lowbit_engine import ops, ops_exit
    >>> from lowbit_engine.formats import f8l
    >>> codes, gs, r = f8l.quantize(torch.randn(96, 64))
    >>> qa, sa, _ = ops.quantize_act(torch.randn(5, 64, dtype=torch.bfloat16), mode="fp8")
    >>> q, s, la = ops_exit.gemm_w4a8_exit("f8l", qa, sa, f8l.pack(codes), gs, None, r, next_scale=0.01,
    ...                                    next_lora_down=torch.randn(8, 96, dtype=torch.bfloat16))
    >>> q.dtype, q.shape, s.shape, la.shape
    (torch.float8_e4m3fn, torch.Size([5, 96]), torch.Size([5]), torch.Size([5, 8]))
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from . import _dispatch, ops_w4a8, reference
from . import _validate as V
from ._build_info import native
from ._dtypes import code
from .ops import MODE_DTYPES

ACTIVATIONS = reference.EXIT_ACTIVATIONS
NEXT_MODES = ("int8", "fp8")
FORMATS = ("f8l", "i8q")
_MODE_CODE = {"int8": 1, "fp8": 2}  # ActQuant codes of csrc/include/lowbit/cpu_ref.h


def _ptr(t: Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _check_next(op: str, dev, K: int, next_scale: float, next_smooth, next_lora_down, next_mode, dtype,
                prefix: str = "next_") -> int:
    """The next linear's quantizer arguments (named ``prefix + name`` in ``op``'s schema). lora_down may be a
    row-strided view: a column slice of a wider one is read in place (docs/formats.md, "Exit quantizer")."""
    V.one_of(op, prefix + "mode", next_mode, list(NEXT_MODES))
    if not (isinstance(next_scale, float) and math.isfinite(next_scale) and next_scale > 0):
        V.fail(op, prefix + "scale", "a finite float > 0 (the calibrated static scale)", next_scale)
    V.optional(op, prefix + "smooth", next_smooth, dtypes=(torch.float32,), shape=(K,), device=dev)
    V.optional(op, prefix + "lora_down", next_lora_down, dtypes=(dtype,), shape=(None, K), device=dev,
               row_view=True)
    return 0 if next_lora_down is None else next_lora_down.shape[0]


def _alloc(M: int, K: int, R: int, mode: str, dev) -> tuple[Tensor, Tensor, Tensor]:
    return (torch.empty(M, K, dtype=MODE_DTYPES[mode], device=dev), torch.empty(M, dtype=torch.float32, device=dev),
            torch.empty(M, R, dtype=torch.float32, device=dev))


# --------------------------------------------------------------------------------------------------
# lowbit::quantize_act_static


def _check_static(x, scale, smooth, lora_down, mode) -> tuple[int, int, int]:
    op = "quantize_act_static"
    V.tensor(op, "x", x, dtypes=V.FLOAT16S, shape=(None, None))
    M, K = x.shape
    if M < 1 or K < 1:
        V.fail(op, "x", "at least one row and one column", f"shape {tuple(x.shape)}")
    R = _check_next(op, x.device, K, scale, smooth, lora_down, mode, x.dtype, prefix="")
    return M, K, R


@torch.library.custom_op("lowbit::quantize_act_static", mutates_args=())
def _quantize_act_static(x: Tensor, scale: float, smooth: Optional[Tensor], lora_down: Optional[Tensor],
                         mode: str) -> tuple[Tensor, Tensor, Tensor]:
    args = (x, scale, smooth, lora_down, mode)
    _check_static(*args)

    def why() -> str:
        return ("the native module lowbit_engine._C is not built" if x.device.type == "cpu"
                else f"no Triton kernel applies on {x.device.type} (Triton missing, or rank > 256)")

    return _dispatch.run("quantize_act_static", args, why)


@_quantize_act_static.register_fake
def _(x, scale, smooth, lora_down, mode):
    M, K, R = _check_static(x, scale, smooth, lora_down, mode)
    return _alloc(M, K, R, mode, x.device)


def quantize_act_static(x: Tensor, scale: float, smooth: Tensor | None = None, lora_down: Tensor | None = None,
                        mode: str = "fp8") -> tuple[Tensor, Tensor, Tensor]:
    """``x [M, K]`` (bf16 / fp16) quantized with one static scale: ``(q [M, K], scales [M], lora_act [M, R])``
    as :func:`lowbit_engine.reference.quantize_act_static` (lora_act is ``[M, 0]`` without lora_down).

    Example:
        >>> q, s, la = quantize_act_static(torch.randn(4, 64, dtype=torch.bfloat16), 0.01, mode="int8")
        >>> q.dtype, s.shape, la.shape
        (torch.int8, torch.Size([4]), torch.Size([4, 0]))
    """
    scale = float(scale) if isinstance(scale, (int, float)) and not isinstance(scale, bool) else scale
    return V.call("quantize_act_static", x, scale, smooth, lora_down, mode)


def _static_torch(x, scale, smooth, lora_down, mode):
    q, s, la = reference.quantize_act_static(x, scale, smooth, lora_down, mode)
    return q, s, la if la is not None else torch.empty(x.shape[0], 0, dtype=torch.float32, device=x.device)


def _exit_cpu(h: Tensor, activation: str, scale: float, smooth, lora_down, mode) -> tuple[Tensor, Tensor, Tensor]:
    M, K = h.shape
    R = 0 if lora_down is None else lora_down.shape[0]
    q, s, la = _alloc(M, K, R, mode, h.device)
    ldr = V.row_stride(lora_down) if R else K
    native().cpu_exit_quantize(_ptr(h), code(h.dtype), M, K, ACTIVATIONS.index(activation), scale, _ptr(smooth),
                               _ptr(lora_down), R, ldr, _MODE_CODE[mode], _ptr(q), _ptr(s), 0, _ptr(la) if R else 0)
    return q, s, la


def _static_cpu(x, scale, smooth, lora_down, mode):
    return _exit_cpu(x.contiguous(), "none", scale, smooth, lora_down, mode)


# --------------------------------------------------------------------------------------------------
# lowbit::gemm_w4a8_exit


def _check_exit(fmt, act, act_scales, w, s1, s2, row, lora_act, lora_up, bias, h_dtype, activation, next_scale,
                next_smooth, next_lora_down, next_mode) -> tuple[int, int, int]:
    op = "gemm_w4a8_exit"
    V.one_of(op, "fmt", fmt, list(FORMATS))
    V.one_of(op, "h_dtype", h_dtype, list(V.FLOAT16S))
    V.one_of(op, "activation", activation, list(ACTIVATIONS))
    if fmt == "f8l":
        if s2 is not None:
            V.fail(op, "s2", "None for f8l (it has no zeros)", "a tensor")
        M, N, _ = ops_w4a8._check_f8l(act, act_scales, w, s1, row, lora_act, lora_up, bias, h_dtype)
    else:
        M, N, _ = ops_w4a8._check_i8q(act, act_scales, w, s1, s2, row, lora_act, lora_up, bias, h_dtype)
    R2 = _check_next(op, act.device, N, next_scale, next_smooth, next_lora_down, next_mode, h_dtype)
    return M, N, R2


@torch.library.custom_op("lowbit::gemm_w4a8_exit", mutates_args=())
def _gemm_w4a8_exit(fmt: str, act: Tensor, act_scales: Tensor, w: Tensor, s1: Tensor, s2: Optional[Tensor],
                    row: Tensor, lora_act: Optional[Tensor], lora_up: Optional[Tensor], bias: Optional[Tensor],
                    h_dtype: torch.dtype, activation: str, next_scale: float, next_smooth: Optional[Tensor],
                    next_lora_down: Optional[Tensor], next_mode: str) -> tuple[Tensor, Tensor, Tensor]:
    args = (fmt, act, act_scales, w, s1, s2, row, lora_act, lora_up, bias, h_dtype, activation, next_scale,
            next_smooth, next_lora_down, next_mode)
    _check_exit(*args)

    def why() -> str:
        return ("the native module lowbit_engine._C is not built" if act.device.type == "cpu"
                else f"no Triton kernel applies on {act.device.type} for {fmt}")

    return _dispatch.run("gemm_w4a8_exit", args, why)


@_gemm_w4a8_exit.register_fake
def _(*args):
    M, N, R2 = _check_exit(*args)
    return _alloc(M, N, R2, args[-1], args[1].device)


def gemm_w4a8_exit(fmt: str, act: Tensor, act_scales: Tensor, w: Tensor, s1: Tensor, s2: Tensor | None, row: Tensor,
                   lora_act: Tensor | None = None, lora_up: Tensor | None = None, bias: Tensor | None = None, *,
                   h_dtype: torch.dtype = torch.bfloat16, activation: str = "gelu_tanh", next_scale: float,
                   next_smooth: Tensor | None = None, next_lora_down: Tensor | None = None,
                   next_mode: str = "fp8") -> tuple[Tensor, Tensor, Tensor]:
    """An F8L / I8Q GEMM (arguments as :func:`lowbit_engine.ops_w4a8.gemm_w4a8_f8l` / ``_i8q``: ``s1`` the
    group scales or steps, ``s2`` the I8Q zeros or None) whose output ``h`` (in ``h_dtype``) goes through
    ``activation`` and is returned as the next linear's input ``(q, scales, lora_act)``, quantized with the
    static ``next_scale``, smoothed by ``next_smooth`` and with ``lora_act = act(h) @ next_lora_down^T``.
    Equal to ``quantize_act_static(exit_activation(gemm(...)), ...)``. See the module example."""
    if isinstance(next_scale, (int, float)) and not isinstance(next_scale, bool):
        next_scale = float(next_scale)
    return V.call("gemm_w4a8_exit", fmt, act, act_scales, w, s1, s2, row, lora_act, lora_up, bias, h_dtype,
                  activation, next_scale, next_smooth, next_lora_down, next_mode)


def _producer_torch(fmt, act, act_scales, w, s1, s2, row, lora_act, lora_up, bias, h_dtype):
    if fmt == "f8l":
        return reference.gemm_w4a8_f8l(act, act_scales, w, s1, row, lora_act, lora_up, bias, h_dtype)
    return reference.gemm_w4a8_i8q(act, act_scales, w, s1, s2, row, lora_act, lora_up, bias, h_dtype)


def _exit_torch(fmt, act, act_scales, w, s1, s2, row, lora_act, lora_up, bias, h_dtype, activation, next_scale,
                next_smooth, next_lora_down, next_mode):
    h = _producer_torch(fmt, act, act_scales, w, s1, s2, row, lora_act, lora_up, bias, h_dtype)
    return _static_torch(reference.exit_activation(h, activation), next_scale, next_smooth, next_lora_down,
                         next_mode)


def _exit_cpu_backend(fmt, act, act_scales, w, s1, s2, row, lora_act, lora_up, bias, h_dtype, activation,
                      next_scale, next_smooth, next_lora_down, next_mode):
    if fmt == "f8l":
        h = ops_w4a8._f8l_cpu(act, act_scales, w, s1, row, lora_act, lora_up, bias, h_dtype)
    else:
        h = ops_w4a8._i8q_cpu(act, act_scales, w, s1, s2, row, lora_act, lora_up, bias, h_dtype)
    return _exit_cpu(h, activation, next_scale, next_smooth, next_lora_down, next_mode)


def _register() -> None:
    _dispatch.register("quantize_act_static", "torch", lambda *a: True, _static_torch)
    _dispatch.register("gemm_w4a8_exit", "torch", lambda *a: True, _exit_torch)
    on_cpu = lambda t: t.device.type == "cpu" and native() is not None  # noqa: E731
    _dispatch.register("quantize_act_static", "cpu", lambda x, *a: on_cpu(x), _static_cpu)
    _dispatch.register("gemm_w4a8_exit", "cpu", lambda fmt, act, *a: on_cpu(act), _exit_cpu_backend)
    try:
        from .kernels import gemm8, quant8, w4_expand
    except ImportError:
        return

    def static_applies(x, scale, smooth, lora_down, mode) -> bool:
        return (x.is_cuda and not quant8.interpreted()
                and (lora_down is None or lora_down.shape[0] <= quant8.MAX_RANK))

    def static_run(x, scale, smooth, lora_down, mode):
        return quant8.quantize_8bit_triton(x.contiguous(), smooth, lora_down, mode, static_scale=scale)

    _dispatch.register("quantize_act_static", "triton", static_applies, static_run)

    def applies(fmt, act, *a) -> bool:
        return (not (gemm8.interpreted() or w4_expand.interpreted())
                and ops_w4a8._tensor_cores(act, (8, 9) if fmt == "f8l" else (8, 0)))

    _dispatch.register("gemm_w4a8_exit", "triton", applies, run_triton)


def run_triton(fmt, act, act_scales, w, s1, s2, row, lora_act, lora_up, bias, h_dtype, activation, next_scale,
               next_smooth, next_lora_down, next_mode, *, small_m: int | None = None):
    """Large M: expand into the shared scratch, then the 8-bit GEMM with the exit epilogue. Small M: the
    direct kernel writes the (small) h and the exit runs as torch ops on it."""
    from .kernels import gemm8, w4_expand

    M, K = act.shape
    N = w.shape[0]
    if M <= (w4_expand.SMALL_M if small_m is None else small_m):
        h = w4_expand.direct_triton(fmt, act, act_scales, w, s1, s2, None, row, lora_act, lora_up, bias, h_dtype)
        return _static_torch(reference.exit_activation(h, activation), next_scale, next_smooth, next_lora_down,
                             next_mode)
    dtype = torch.int8 if fmt == "i8q" else torch.float8_e4m3fn
    w8 = w4_expand.scratch.get(N * K, act.device).view(dtype).view(N, K)
    w4_expand.expand_triton(fmt, w, s1, s2, out=w8)
    q, s, la = gemm8.gemm8_exit_triton(act, act_scales, w8, row, lora_act, lora_up, bias, h_dtype,
                                       activation=activation, next_scale=next_scale, next_mode=next_mode,
                                       next_smooth=next_smooth, next_lora_down=next_lora_down,
                                       kernel_name="gemm8_w4")
    return q, s, la if la is not None else torch.empty(M, 0, dtype=torch.float32, device=act.device)


_register()

OPS = ("quantize_act_static", "gemm_w4a8_exit")
