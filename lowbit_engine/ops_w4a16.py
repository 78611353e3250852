"""The weight-only op ``lowbit::w4a16_linear``: 16-bit tokens x ``w4a16`` weights (docs/formats.md).

Same patterns as :mod:`lowbit_engine.ops`: one ``custom_op`` with a fake kernel (``torch.compile`` traces
through it), input checks (:mod:`lowbit_engine._validate`) and backend dispatch
(:mod:`lowbit_engine._dispatch`):

* ``triton`` (CUDA tensors, compiled Triton, bf16 / fp16 tokens): the split-K GEMV of kernels/w4a16_gemv.py;
* ``cpu``: the C++ reference (csrc/cpu/w4a16.cpp);
* ``torch``: :func:`lowbit_engine.formats.w4a16.matmul` (any device; warns once on a CUDA tensor).

Math: ``out[m, n] = round(sum_k float(x[m, k]) * (q[n, k] - z[n, g]) * float(s[n, g]) + bias[n])``, fp32,
sum order free (the kernels sum each group, then scale it).

Example:
    >>> import torch
    >>> from lowbit_engine import ops_w4a16
    >>> from lowbit_engine.formats import w4a16
    >>> q, s, z = w4a16.quantize(torch.randn(8, 128))
    >>> ops_w4a16.w4a16_linear(torch.randn(3, 128, dtype=torch.bfloat16), w4a16.pack(q), s, z).shape
    torch.Size([3, 8])
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _dispatch
from . import _validate as V
from ._build_info import native
from ._dtypes import code
from .formats import w4a16

GROUP = w4a16.GROUP_SIZE
X_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _check(x, w, scales, zeros, bias, out_dtype):
    op = "w4a16_linear"
    V.tensor(op, "x", x, dtypes=X_DTYPES, shape=(None, None))
    M, K = x.shape
    if M < 1:
        V.fail(op, "x", "at least one row (M >= 1)", f"shape {tuple(x.shape)}")
    V.multiple(op, "x", K, GROUP, "K = x.shape[1]")
    V.tensor(op, "w", w, dtypes=(torch.uint8,), shape=(None, K // 2), device=x.device)
    N = w.shape[0]
    if N < 1:
        V.fail(op, "w", "at least one output channel", f"shape {tuple(w.shape)}")
    V.tensor(op, "scales", scales, dtypes=(torch.bfloat16,), shape=(N, K // GROUP), device=x.device)
    V.tensor(op, "zeros", zeros, dtypes=(torch.uint8,), shape=(N, K // GROUP), device=x.device)
    V.optional(op, "bias", bias, dtypes=V.OUT_DTYPES, shape=(N,), device=x.device)
    V.one_of(op, "out_dtype", out_dtype, V.OUT_DTYPES)
    return M, N, K


@torch.library.custom_op("lowbit::w4a16_linear", mutates_args=())
def _w4a16_linear(x: Tensor, w: Tensor, scales: Tensor, zeros: Tensor, bias: Optional[Tensor],
                  out_dtype: torch.dtype) -> Tensor:
    _check(x, w, scales, zeros, bias, out_dtype)

    def why() -> str:
        if x.device.type == "cpu":
            return "the native module lowbit_engine._C is not built"
        return f"no Triton kernel applies on {x.device.type} for these inputs (Triton missing, or x is {x.dtype})"

    return _dispatch.run("w4a16_linear", (x, w, scales, zeros, bias, out_dtype), why)


@_w4a16_linear.register_fake
def _(x, w, scales, zeros, bias, out_dtype):
    M, N, _ = _check(x, w, scales, zeros, bias, out_dtype)
    return x.new_empty(M, N, dtype=out_dtype)


def w4a16_linear(x: Tensor, w: Tensor, scales: Tensor, zeros: Tensor, bias: Tensor | None = None,
                 out_dtype: torch.dtype | None = None) -> Tensor:
    """``x [M, K]`` (bf16 / fp16 / fp32) x the w4a16 weight (``w uint8 [N, K/2]``, ``scales bf16 [N, K/64]``,
    ``zeros uint8 [N, K/64]``) + bias -> ``[M, N]`` in ``out_dtype`` (x's by default). See the module example."""
    if out_dtype is None and isinstance(x, Tensor):
        out_dtype = x.dtype
    return V.call("w4a16_linear", x, w, scales, zeros, bias, out_dtype)


# --------------------------------------------------------------------------------------------------
# backends


def _cpu(x, w, scales, zeros, bias, out_dtype):
    M, K = x.shape
    N = w.shape[0]
    out = torch.empty(M, N, dtype=out_dtype)
    native().cpu_gemm_w4a16(x.data_ptr(), code(x.dtype), M, K, w.data_ptr(), scales.data_ptr(), zeros.data_ptr(), N,
                            0 if bias is None else bias.data_ptr(), 0 if bias is None else code(bias.dtype),
                            out.data_ptr(), code(out_dtype))
    return out


def _torch(x, w, scales, zeros, bias, out_dtype):
    return w4a16.matmul(x, w, scales, zeros, bias, out_dtype)


def _register() -> None:
    _dispatch.register("w4a16_linear", "torch", lambda *a: True, _torch)
    _dispatch.register("w4a16_linear", "cpu",
                       lambda x, *a: x.device.type == "cpu" and native() is not None
                       and hasattr(native(), "cpu_gemm_w4a16"), _cpu)
    try:
        from .kernels import w4a16_gemv
    except ImportError:  # no Triton: the C++ and torch references serve every call
        return

    def applies(x, *a) -> bool:
        return (x.is_cuda and not w4a16_gemv.interpreted() and torch.version.hip is None
                and x.dtype in (torch.bfloat16, torch.float16) and torch.cuda.get_device_capability(x.device) >= (8, 0))

    _dispatch.register("w4a16_linear", "triton", applies,
                       lambda x, w, s, z, bias, out_dtype: w4a16_gemv.w4a16_triton(x, w, s, z, bias, out_dtype))


_register()

OPS = ("w4a16_linear",)
