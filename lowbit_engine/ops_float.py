"""The float low-bit ops: ``lowbit::fp8_linear`` (``fp8`` format) and ``lowbit::fp4_linear`` (``nvfp4`` /
``mxfp4``). Same patterns as :mod:`lowbit_engine.ops`: one ``custom_op`` each with a fake kernel, input
checks (:mod:`lowbit_engine._validate`) and backend dispatch (:mod:`lowbit_engine._dispatch`): ``triton``
(compiled kernels on a CUDA GPU with fp8 tensor cores) and ``torch`` (the reference, any device; on a
CPU it warns once with :class:`~lowbit_engine.errors.ReferenceFallbackWarning`).

The torch backend computes the same quantized math as the kernels: activations quantized per token with
``formats.fp8.quantize`` (the Triton quantizer is bit-exact with it), weights dequantized exactly as the
kernels see them (``fp8.dequantize``; ``{nvfp4,mxfp4}.dequantize_to_fp8`` for fp8 activations,
``dequantize`` for bf16 activations), one fp32 matmul, + low-rank branch, + bias.

Example:
    >>> import torch
    >>> from lowbit_engine import ops_float
    >>> from lowbit_engine.formats import fp8
    >>> w_q, w_s = fp8.quantize(torch.randn(8, 64))
    >>> ops_float.fp8_linear(torch.randn(3, 64), w_q, w_s).shape
    torch.Size([3, 8])
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _dispatch
from . import _validate as V
from .formats import fp8, mxfp4, nvfp4

FP4_FORMATS = {"nvfp4": nvfp4.GROUP_SIZE, "mxfp4": mxfp4.GROUP_SIZE}
FP4_ACTS = ("fp8", "bf16")
X_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _run(op: str, device: torch.device, *args):
    """Dispatch one call (see :func:`lowbit_engine._dispatch.run`), saying why when the reference runs."""

    def why() -> str:
        if device.type != "cuda":
            return f"no Triton kernel runs on {device.type} tensors"
        return "no Triton kernel applies for these inputs (Triton missing or no fp8 tensor cores)"

    return _dispatch.run(op, args, why)


# --------------------------------------------------------------------------------------------------
# fp8_linear


def _check_fp8_linear(x, w_q, w_scale, bias, lora_down, lora_up, out_dtype):
    op = "fp8_linear"
    V.tensor(op, "x", x, dtypes=X_DTYPES, shape=(None, None))
    M, K = x.shape
    if M < 1 or K % 16 != 0:
        V.fail(op, "x", "M >= 1 rows and K a multiple of 16", f"shape {tuple(x.shape)}")
    V.tensor(op, "w_q", w_q, dtypes=(torch.float8_e4m3fn,), shape=(None, K), device=x.device)
    N = w_q.shape[0]
    if N < 1:
        V.fail(op, "w_q", "at least one output channel", f"shape {tuple(w_q.shape)}")
    V.tensor(op, "w_scale", w_scale, dtypes=(torch.float32,), shape=(N,), device=x.device)
    V.optional(op, "bias", bias, dtypes=V.OUT_DTYPES, shape=(N,), device=x.device)
    V.pair(op, "lora_down", lora_down, "lora_up", lora_up)
    if lora_down is not None:
        V.tensor(op, "lora_down", lora_down, dtypes=X_DTYPES, shape=(None, K), device=x.device)
        V.tensor(op, "lora_up", lora_up, dtypes=X_DTYPES, shape=(N, lora_down.shape[0]), device=x.device)
    V.one_of(op, "out_dtype", out_dtype, V.OUT_DTYPES)
    return M, N, K


@torch.library.custom_op("lowbit::fp8_linear", mutates_args=())
def _fp8_linear(x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Optional[Tensor], lora_down: Optional[Tensor],
                lora_up: Optional[Tensor], out_dtype: torch.dtype) -> Tensor:
    _check_fp8_linear(x, w_q, w_scale, bias, lora_down, lora_up, out_dtype)
    return _run("fp8_linear", x.device, x, w_q, w_scale, bias, lora_down, lora_up, out_dtype)


@_fp8_linear.register_fake
def _(x, w_q, w_scale, bias, lora_down, lora_up, out_dtype):
    M, N, _ = _check_fp8_linear(x, w_q, w_scale, bias, lora_down, lora_up, out_dtype)
    return x.new_empty(M, N, dtype=out_dtype)


def _epilogue_torch(acc: Tensor, x: Tensor, bias, lora_down, lora_up, out_dtype) -> Tensor:
    if lora_down is not None and lora_down.shape[0] > 0:
        acc = acc + (x.float() @ lora_down.float().t()) @ lora_up.float().t()
    if bias is not None:
        acc = acc + bias.float()
    return acc.to(out_dtype)


def fp8_linear_torch(x, w_q, w_scale, bias, lora_down, lora_up, out_dtype) -> Tensor:
    """Reference: ``fp8.quantize(x)`` per token, both operands dequantized, fp32 matmul, epilogue."""
    qa, sa = fp8.quantize(x)
    acc = fp8.dequantize(qa, sa) @ fp8.dequantize(w_q, w_scale).t()
    return _epilogue_torch(acc, x, bias, lora_down, lora_up, out_dtype)


def fp8_linear(x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None = None,
               lora_down: Tensor | None = None, lora_up: Tensor | None = None,
               out_dtype: torch.dtype | None = None) -> Tensor:
    """``fp8`` layer: x ``[M, K]`` quantized per token to e4m3, times e4m3 weights ``[N, K]`` with fp32
    per-channel scales, + optional ``(x @ lora_down^T) @ lora_up^T`` + bias; output ``out_dtype`` (x's)."""
    if out_dtype is None and isinstance(x, Tensor):  # (a non-tensor x is named by V.call's check)
        out_dtype = x.dtype
    return V.call("fp8_linear", x, w_q, w_scale, bias, lora_down, lora_up, out_dtype)


# --------------------------------------------------------------------------------------------------
# fp4_linear


@torch.no_grad()
def fp4_fp8_scales(fmt: str, packed: Tensor, block_scales: Tensor,
                   tensor_scale: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row constants of the FP4 kernels, computed once per layer: ``(w_inv, w_scale_fp8,
    w_scale_bf16)``, fp32 ``[N]`` each. ``w_inv = 2**-r`` and ``w_scale_fp8 = 2**r * tensor_scale`` (mxfp4:
    ``2**r``) with ``2**r`` the row scale of ``dequantize_to_fp8``; ``w_scale_bf16`` is the tensor scale
    (mxfp4: 1) applied after the weight-only dot."""
    N = packed.shape[0]
    if fmt == "nvfp4":
        if tensor_scale is None:
            raise ValueError("fp4_fp8_scales: nvfp4 needs its tensor_scale")
        prods = nvfp4._scaled_values(packed, block_scales).reshape(N, -1)
        _, row = fp8.quantize_pow2(prods)
        ts = tensor_scale.float()
        return (1.0 / row).contiguous(), (row * ts).contiguous(), ts.expand(N).contiguous()
    if fmt == "mxfp4":
        _, row = fp8.quantize_pow2(mxfp4.dequantize(packed, block_scales))
        return (1.0 / row).contiguous(), row.contiguous(), torch.ones(N, device=packed.device)
    raise ValueError(f"fp4_fp8_scales: fmt must be one of {list(FP4_FORMATS)}, got {fmt!r}")


def _check_fp4_linear(x, w_packed, w_block_scales, w_inv, w_scale_fp8, w_scale_bf16, bias, fmt, act, out_dtype):
    op = "fp4_linear"
    V.one_of(op, "fmt", fmt, list(FP4_FORMATS))
    V.one_of(op, "act", act, list(FP4_ACTS))
    group = FP4_FORMATS[fmt]
    V.tensor(op, "x", x, dtypes=X_DTYPES, shape=(None, None))
    M, K = x.shape
    if M < 1:
        V.fail(op, "x", "at least one row (M >= 1)", f"shape {tuple(x.shape)}")
    V.multiple(op, "x", K, group, "K = x.shape[1]")
    V.tensor(op, "w_packed", w_packed, dtypes=(torch.uint8,), shape=(None, K // 2), device=x.device)
    N = w_packed.shape[0]
    if N < 1:
        V.fail(op, "w_packed", "at least one output channel", f"shape {tuple(w_packed.shape)}")
    bs_dtype = torch.float8_e4m3fn if fmt == "nvfp4" else torch.uint8
    V.tensor(op, "w_block_scales", w_block_scales, dtypes=(bs_dtype,), shape=(N, K // group), device=x.device)
    for name, t in (("w_inv", w_inv), ("w_scale_fp8", w_scale_fp8), ("w_scale_bf16", w_scale_bf16)):
        V.tensor(op, name, t, dtypes=(torch.float32,), shape=(N,), device=x.device)
    V.optional(op, "bias", bias, dtypes=V.OUT_DTYPES, shape=(N,), device=x.device)
    V.one_of(op, "out_dtype", out_dtype, V.OUT_DTYPES)
    return M, N, K


@torch.library.custom_op("lowbit::fp4_linear", mutates_args=())
def _fp4_linear(x: Tensor, w_packed: Tensor, w_block_scales: Tensor, w_inv: Tensor, w_scale_fp8: Tensor,
                w_scale_bf16: Tensor, bias: Optional[Tensor], fmt: str, act: str, out_dtype: torch.dtype) -> Tensor:
    args = (x, w_packed, w_block_scales, w_inv, w_scale_fp8, w_scale_bf16, bias, fmt, act, out_dtype)
    _check_fp4_linear(*args)
    return _run("fp4_linear", x.device, *args)


@_fp4_linear.register_fake
def _(x, w_packed, w_block_scales, w_inv, w_scale_fp8, w_scale_bf16, bias, fmt, act, out_dtype):
    M, N, _ = _check_fp4_linear(x, w_packed, w_block_scales, w_inv, w_scale_fp8, w_scale_bf16, bias, fmt, act,
                                out_dtype)
    return x.new_empty(M, N, dtype=out_dtype)


def fp4_linear_torch(x, w_packed, w_block_scales, w_inv, w_scale_fp8, w_scale_bf16, bias, fmt, act, out_dtype):
    """Reference of the two FP4 kernels (see the module docstring)."""
    K = x.shape[1]
    if act == "fp8":
        qa, sa = fp8.quantize(x)
        if fmt == "nvfp4":
            prods = nvfp4._scaled_values(w_packed, w_block_scales).reshape(-1, K)
        else:
            prods = mxfp4.dequantize(w_packed, w_block_scales)
        qw = torch.clamp(prods * w_inv[:, None], -fp8.E4M3_MAX, fp8.E4M3_MAX).to(fp8.DTYPE)
        acc = fp8.dequantize(qa, sa) @ fp8.dequantize(qw, w_scale_fp8).t()
    else:
        if fmt == "nvfp4":
            wv = nvfp4._scaled_values(w_packed, w_block_scales).reshape(-1, K)
        else:
            wv = mxfp4.dequantize(w_packed, w_block_scales)
        acc = (x.to(torch.bfloat16).float() @ wv.t()) * w_scale_bf16
    return _epilogue_torch(acc, x, bias, None, None, out_dtype)


def fp4_linear(x: Tensor, w_packed: Tensor, w_block_scales: Tensor, w_inv: Tensor, w_scale_fp8: Tensor,
               w_scale_bf16: Tensor, bias: Tensor | None = None, fmt: str = "nvfp4", act: str = "fp8",
               out_dtype: torch.dtype | None = None) -> Tensor:
    """FP4 layer: weights nvfp4/mxfp4 (+ the per-row constants of :func:`fp4_fp8_scales`), activations
    fp8 per token (``act="fp8"``) or bf16 (``act="bf16"``, weight-only); output ``out_dtype`` (x's)."""
    if out_dtype is None and isinstance(x, Tensor):  # (a non-tensor x is named by V.call's check)
        out_dtype = x.dtype
    return V.call("fp4_linear", x, w_packed, w_block_scales, w_inv, w_scale_fp8, w_scale_bf16, bias, fmt, act,
                  out_dtype)


# --------------------------------------------------------------------------------------------------
# backends


def _register() -> None:
    _dispatch.register("fp8_linear", "torch", lambda *a: True, fp8_linear_torch)
    _dispatch.register("fp4_linear", "torch", lambda *a: True, fp4_linear_torch)
    try:
        from .kernels import fp4_gemm, fp8_gemm
    except ImportError:  # no Triton: the torch reference serves every call
        return

    def fp8_run(x, w_q, w_scale, bias, lora_down, lora_up, out_dtype):
        return fp8_gemm.fp8_linear_triton(x, w_q, w_scale, bias, lora_down, lora_up, out_dtype)

    def fp4_run(x, w_packed, w_bs, w_inv, w_s8, w_s16, bias, fmt, act, out_dtype):
        return fp4_gemm.fp4_linear_triton(x, w_packed, w_bs, w_inv, w_s8, w_s16, fmt, act, bias, out_dtype)

    _dispatch.register("fp8_linear", "triton",
                       lambda x, *a: fp8_gemm.fp8_tensor_cores(x) and x.shape[1] <= fp8_gemm.MAX_QUANT_K, fp8_run)
    # The bf16 weight-only path needs only bf16 tensor cores (sm_80); the fp8 one sm_89.
    _dispatch.register("fp4_linear", "triton",
                       lambda x, *a: x.shape[1] <= fp8_gemm.MAX_QUANT_K and (
                           fp8_gemm.fp8_tensor_cores(x) or (a[-2] == "bf16" and x.is_cuda
                                                            and not fp8_gemm.interpreted()
                                                            and torch.version.hip is None)),
                       fp4_run)


_register()

OPS = ("fp8_linear", "fp4_linear")
