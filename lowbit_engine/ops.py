"""The ``lowbit::`` custom ops: schemas, fake kernels, input checks and backend dispatch.

Every op is defined once with :func:`torch.library.custom_op`, so ``torch.compile(fullgraph=True)``
traces through it as one opaque node (the fake kernel gives output shapes without running anything).
At run time the op checks its inputs (:mod:`lowbit_engine._validate`), picks a backend
(:mod:`lowbit_engine._dispatch`: CUDA kernel, Triton kernel, C++ CPU reference or torch reference, in that
order of preference) and records which one ran.

Example:
    >>> import torch
    >>> from lowbit_engine import ops
    >>> x = torch.randn(17, 128, dtype=torch.bfloat16)
    >>> q, scales, _ = ops.quantize_act(x, mode="int4")
    >>> q.shape, scales.shape, ops.last_backend("quantize_act")
    (torch.Size([17, 64]), torch.Size([17, 2]), 'cpu')
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from . import _dispatch, reference
from . import _validate as V
from ._build_info import native
from ._dispatch import last_backend, record_backends, use_backend, call_counts, backends  # noqa: F401 (API)
from ._dtypes import ActQuant, code

GROUP = 64
MODES = {"int4": ActQuant.INT4_G64, "int8": ActQuant.INT8_TOKEN, "fp8": ActQuant.FP8_TOKEN}
MODE_DTYPES = {"int4": torch.uint8, "int8": torch.int8, "fp8": torch.float8_e4m3fn}
INDEX_BITS = (8, 12)
CUDA_MAX_RANK = 256  # the CUDA quantizer keeps one fp32 accumulator per rank column in registers/smem


def _ptr(t: Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _dcode(t: Tensor | None) -> int:
    return 0 if t is None else code(t.dtype)


def _has_native() -> bool:
    return native() is not None


def _has_cuda_kernels() -> bool:
    mod = native()
    return mod is not None and bool(getattr(mod, "with_cuda", False))


def _run(op: str, device: torch.device, *args):
    """Dispatch one call (see :func:`lowbit_engine._dispatch.run`), saying why when the reference runs."""

    def why() -> str:
        if device.type == "cpu":
            return "the native module lowbit_engine._C is not built"
        return f"no CUDA or Triton kernel applies on {device.type} for these inputs"

    return _dispatch.run(op, args, why)


# --------------------------------------------------------------------------------------------------
# quantize_act: x [M, K] -> (q, scales, lora_act)


def _check_quantize_act(x, smooth, lora_down, mode) -> tuple[int, int, int]:
    op = "quantize_act"
    V.tensor(op, "x", x, dtypes=V.FLOAT16S, shape=(None, None))
    M, K = x.shape
    V.one_of(op, "mode", mode, list(MODES))
    if M < 1:
        V.fail(op, "x", "at least one row (M >= 1)", f"shape {tuple(x.shape)}")
    V.multiple(op, "x", K, GROUP, "K = x.shape[1]")
    V.optional(op, "smooth", smooth, dtypes=(torch.float32,), shape=(K,), device=x.device)
    V.optional(op, "lora_down", lora_down, dtypes=(x.dtype,), shape=(None, K), device=x.device)
    R = 0 if lora_down is None else lora_down.shape[0]
    return M, K, R


def _alloc_quantize_act(x: Tensor, mode: str, R: int) -> tuple[Tensor, Tensor, Tensor]:
    M, K = x.shape
    dev = x.device
    if mode == "int4":
        q = torch.empty(M, K // 2, dtype=torch.uint8, device=dev)
        scales = torch.empty(M, K // GROUP, dtype=torch.float32, device=dev)
    else:
        q = torch.empty(M, K, dtype=MODE_DTYPES[mode], device=dev)
        scales = torch.empty(M, dtype=torch.float32, device=dev)
    return q, scales, torch.empty(M, R, dtype=torch.float32, device=dev)


@torch.library.custom_op("lowbit::quantize_act", mutates_args=())
def _quantize_act(
    x: Tensor, smooth: Optional[Tensor], lora_down: Optional[Tensor], mode: str
) -> tuple[Tensor, Tensor, Tensor]:
    _check_quantize_act(x, smooth, lora_down, mode)
    V.positive_finite("quantize_act", "smooth", smooth)  # real tensors only: not in the fake kernel
    return _run("quantize_act", x.device, x, smooth, lora_down, mode)


@_quantize_act.register_fake
def _(x, smooth, lora_down, mode):
    _, _, R = _check_quantize_act(x, smooth, lora_down, mode)
    return _alloc_quantize_act(x, mode, R)


def _quantize_act_native(x, smooth, lora_down, mode, on_cuda: bool):
    M, K = x.shape
    R = 0 if lora_down is None else lora_down.shape[0]
    q, scales, lora_act = _alloc_quantize_act(x, mode, R)
    args = (_ptr(x), code(x.dtype), M, K, _ptr(smooth), _ptr(lora_down), R, int(MODES[mode]),
            _ptr(q), _ptr(scales), _ptr(lora_act) if R else 0)
    if on_cuda:
        for name, t in (("x", x), ("smooth", smooth), ("lora_down", lora_down)):
            V.aligned("quantize_act", name, t)
        with torch.cuda.device(x.device):
            native().cuda_quantize_act(*args, torch.cuda.current_stream(x.device).cuda_stream)
    else:
        native().cpu_quantize_act(*args)
    return q, scales, lora_act


def _quantize_act_torch(x, smooth, lora_down, mode):
    q, scales, lora_act = reference.quantize_act(x, smooth=smooth, lora_down=lora_down, mode=mode)
    if lora_act is None:
        lora_act = torch.empty(x.shape[0], 0, dtype=torch.float32, device=x.device)
    return q, scales, lora_act


_dispatch.register(
    "quantize_act", "cuda",
    lambda x, s, ld, mode: x.is_cuda and _has_cuda_kernels() and (ld is None or ld.shape[0] <= CUDA_MAX_RANK),
    lambda x, s, ld, mode: _quantize_act_native(x, s, ld, mode, on_cuda=True),
)
_dispatch.register(
    "quantize_act", "cpu",
    lambda x, *a: x.device.type == "cpu" and _has_native(),
    lambda x, s, ld, mode: _quantize_act_native(x, s, ld, mode, on_cuda=False),
)
_dispatch.register("quantize_act", "torch", lambda *a: True, _quantize_act_torch)


def quantize_act(
    x: Tensor, smooth: Tensor | None = None, lora_down: Tensor | None = None, mode: str = "int4"
) -> tuple[Tensor, Tensor, Tensor]:
    """Quantize activations per token, with optional smoothing and the low-rank down-projection fused.

    Args:
        x: ``[M, K]`` bf16 or fp16, K a multiple of 64.
        smooth: optional fp32 ``[K]``; the quantizer divides x by it (SVDQuant smoothing). Finite and > 0:
            zeros, negatives or non-finite values raise OpInputError (checked for CPU tensors).
        lora_down: optional ``[R, K]`` in x's dtype; ``lora_act = x @ lora_down^T`` on the raw x.
        mode: ``"int4"`` (packed uint8 ``[M, K/2]`` + fp32 scales ``[M, K/64]``), ``"int8"`` or ``"fp8"``
            (``[M, K]`` + fp32 scales ``[M]``).

    Returns:
        ``(q, scales, lora_act)``; ``lora_act`` is fp32 ``[M, R]`` (``[M, 0]`` without ``lora_down``).

    Example:
        >>> q, s, la = quantize_act(torch.randn(4, 64, dtype=torch.bfloat16), mode="int8")
        >>> q.dtype, s.shape, la.shape
        (torch.int8, torch.Size([4]), torch.Size([4, 0]))
    """
    return V.call("quantize_act", x, smooth, lora_down, mode)


# --------------------------------------------------------------------------------------------------
# gemm_w4a4 / gemm_w4a8: quantized activations x int4 weights (+ low-rank up-projection + bias)


def _check_epilogue(op, dev, M, N, lora_act, lora_up, bias, out_dtype) -> int:
    V.pair(op, "lora_act", lora_act, "lora_up", lora_up)
    R = 0
    if lora_act is not None:
        V.tensor(op, "lora_act", lora_act, dtypes=(torch.float32,), shape=(M, None), device=dev)
        R = lora_act.shape[1]
        V.tensor(op, "lora_up", lora_up, dtypes=V.FLOAT16S, shape=(N, R), device=dev)
    V.optional(op, "bias", bias, dtypes=V.OUT_DTYPES, shape=(N,), device=dev)
    V.one_of(op, "out_dtype", out_dtype, V.OUT_DTYPES)
    return R


def _check_weights(op, dev, K, w, w_scales) -> int:
    V.tensor(op, "w", w, dtypes=(torch.uint8,), shape=(None, K // 2), device=dev)
    N = w.shape[0]
    if N < 1:
        V.fail(op, "w", "at least one output channel", f"shape {tuple(w.shape)}")
    V.tensor(op, "w_scales", w_scales, dtypes=(torch.bfloat16,), shape=(N, K // GROUP), device=dev)
    return N


def _check_gemm_w4a4(act, act_scales, w, w_scales, lora_act, lora_up, bias, out_dtype):
    op = "gemm_w4a4"
    V.tensor(op, "act", act, dtypes=(torch.uint8,), shape=(None, None))
    M, K = act.shape[0], act.shape[1] * 2
    if M < 1:
        V.fail(op, "act", "at least one row (M >= 1)", f"shape {tuple(act.shape)}")
    V.multiple(op, "act", K, GROUP, "K = 2 * act.shape[1]")
    N = _check_weights(op, act.device, K, w, w_scales)
    V.tensor(op, "act_scales", act_scales, dtypes=(torch.float32,), shape=(M, K // GROUP), device=act.device)
    R = _check_epilogue(op, act.device, M, N, lora_act, lora_up, bias, out_dtype)
    return M, N, K, R


def _check_gemm_w4a8(act, act_scales, w, w_scales, lora_act, lora_up, bias, out_dtype):
    op = "gemm_w4a8"
    V.tensor(op, "act", act, dtypes=(torch.int8, torch.float8_e4m3fn), shape=(None, None))
    M, K = act.shape
    if M < 1:
        V.fail(op, "act", "at least one row (M >= 1)", f"shape {tuple(act.shape)}")
    V.multiple(op, "act", K, GROUP, "K = act.shape[1]")
    N = _check_weights(op, act.device, K, w, w_scales)
    V.tensor(op, "act_scales", act_scales, dtypes=(torch.float32,), shape=(M,), device=act.device)
    R = _check_epilogue(op, act.device, M, N, lora_act, lora_up, bias, out_dtype)
    return M, N, K, R


@torch.library.custom_op("lowbit::gemm_w4a4", mutates_args=())
def _gemm_w4a4(
    act: Tensor, act_scales: Tensor, w: Tensor, w_scales: Tensor, lora_act: Optional[Tensor],
    lora_up: Optional[Tensor], bias: Optional[Tensor], out_dtype: torch.dtype,
) -> Tensor:
    _check_gemm_w4a4(act, act_scales, w, w_scales, lora_act, lora_up, bias, out_dtype)
    return _run("gemm_w4a4", act.device, act, act_scales, w, w_scales, lora_act, lora_up, bias, out_dtype)


@_gemm_w4a4.register_fake
def _(act, act_scales, w, w_scales, lora_act, lora_up, bias, out_dtype):
    M, N, _, _ = _check_gemm_w4a4(act, act_scales, w, w_scales, lora_act, lora_up, bias, out_dtype)
    return act.new_empty(M, N, dtype=out_dtype)


@torch.library.custom_op("lowbit::gemm_w4a8", mutates_args=())
def _gemm_w4a8(
    act: Tensor, act_scales: Tensor, w: Tensor, w_scales: Tensor, lora_act: Optional[Tensor],
    lora_up: Optional[Tensor], bias: Optional[Tensor], out_dtype: torch.dtype,
) -> Tensor:
    _check_gemm_w4a8(act, act_scales, w, w_scales, lora_act, lora_up, bias, out_dtype)
    return _run("gemm_w4a8", act.device, act, act_scales, w, w_scales, lora_act, lora_up, bias, out_dtype)


@_gemm_w4a8.register_fake
def _(act, act_scales, w, w_scales, lora_act, lora_up, bias, out_dtype):
    M, N, _, _ = _check_gemm_w4a8(act, act_scales, w, w_scales, lora_act, lora_up, bias, out_dtype)
    return act.new_empty(M, N, dtype=out_dtype)


def _gemm_cpu(which: str):
    def run(act, act_scales, w, w_scales, lora_act, lora_up, bias, out_dtype):
        M, N = act.shape[0], w.shape[0]
        K = w.shape[1] * 2
        R = 0 if lora_act is None else lora_act.shape[1]
        out = torch.empty(M, N, dtype=out_dtype)
        tail = (_ptr(w), _ptr(w_scales), M, N, K, _ptr(lora_act), _ptr(lora_up), _dcode(lora_up), R,
                _ptr(bias), _dcode(bias), _ptr(out), code(out_dtype))
        if which == "w4a4":
            native().cpu_gemm_w4a4(_ptr(act), _ptr(act_scales), *tail)
        else:
            native().cpu_gemm_w4a8(_ptr(act), code(act.dtype), _ptr(act_scales), *tail)
        return out

    return run


def _gemm_torch(fn):
    def run(act, act_scales, w, w_scales, lora_act, lora_up, bias, out_dtype):
        return fn(act, act_scales, w, w_scales, lora_act=lora_act, lora_up=lora_up, bias=bias,
                  out_dtype=out_dtype)

    return run


def _gemm_cuda(which: str):
    """csrc/cuda/gemm_w4.cu: int4 widened to int8 on the int8 tensor cores, low-rank on tf32 MMAs."""
    op = f"gemm_{which}"

    def run(act, act_scales, w, w_scales, lora_act, lora_up, bias, out_dtype):
        M, N = act.shape[0], w.shape[0]
        K = w.shape[1] * 2
        R = 0 if lora_act is None else lora_act.shape[1]
        for name, t, nbytes in (("act", act, 16), ("w", w, 16), ("lora_act", lora_act, 8)):
            V.aligned(op, name, t, nbytes)
        out = torch.empty(M, N, dtype=out_dtype, device=act.device)
        with torch.cuda.device(act.device):
            native().cuda_gemm_w4(
                _act_kind(which, act), _ptr(act), _ptr(act_scales), _ptr(w), _ptr(w_scales), M, N, K,
                _ptr(lora_act), _ptr(lora_up), _dcode(lora_up), R, _ptr(bias), _dcode(bias), _ptr(out),
                code(out_dtype), torch.cuda.current_stream(act.device).cuda_stream)
        return out

    return run


def _act_kind(which: str, act: Tensor) -> int:
    """ActQuant code of the activations (csrc/include/lowbit/dtype.h): 0 int4 g64, 1 int8, 2 fp8 e4m3."""
    if which == "w4a4":
        return 0
    return 1 if act.dtype == torch.int8 else 2


@functools.lru_cache(maxsize=None)
def _cuda_fp8_gemm_supported(device_index: int) -> bool:
    """True when the sm_90a wgmma GEMM (the only CUDA kernel taking fp8 tokens) runs on this device."""
    with torch.cuda.device(device_index):
        return bool(native().cuda_gemm_w4_fp8_supported())


def _gemm_cuda_applies(which: str):
    # Ranks in steps of 8 (tf32 MMA k8); fp8 tokens only where the wgmma kernel runs (Hopper, sm_90a
    # build), elsewhere they stay on Triton.
    def applies(act, act_scales, w, w_scales, lora_act, *rest) -> bool:
        if not (act.is_cuda and _has_cuda_kernels()):
            return False
        if which == "w4a8" and act.dtype != torch.int8:
            if act.dtype != torch.float8_e4m3fn or not _cuda_fp8_gemm_supported(act.device.index or 0):
                return False
        return lora_act is None or lora_act.shape[1] % 8 == 0

    return applies


for _which, _ref in (("w4a4", reference.gemm_w4a4), ("w4a8", reference.gemm_w4a8)):
    _dispatch.register(f"gemm_{_which}", "cuda", _gemm_cuda_applies(_which), _gemm_cuda(_which))
    _dispatch.register(f"gemm_{_which}", "cpu", lambda act, *a: act.device.type == "cpu" and _has_native(),
                       _gemm_cpu(_which))
    _dispatch.register(f"gemm_{_which}", "torch", lambda *a: True, _gemm_torch(_ref))


def gemm_w4a4(
    act: Tensor, act_scales: Tensor, w: Tensor, w_scales: Tensor, lora_act: Tensor | None = None,
    lora_up: Tensor | None = None, bias: Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
) -> Tensor:
    """W4A4 GEMM: int4 activations x int4 weights, group-64 scales, low-rank and bias epilogue.

    ``out[m, n] = sum_g dot_g(act, w) * act_scales[m, g] * w_scales[n, g] + lora_act[m] . lora_up[n]
    + bias[n]`` (docs/formats.md). ``act`` uint8 ``[M, K/2]`` and ``act_scales`` fp32 ``[M, K/64]`` come
    from :func:`quantize_act`; ``w`` uint8 ``[N, K/2]`` and ``w_scales`` bf16 ``[N, K/64]`` from
    :mod:`lowbit_engine.formats.int4`.

    Example:
        >>> from lowbit_engine.formats import int4
        >>> x, wf = torch.randn(3, 128, dtype=torch.bfloat16), torch.randn(8, 128)
        >>> qw, sw = int4.quantize(wf, scale_dtype=torch.bfloat16)
        >>> qa, sa, _ = quantize_act(x)
        >>> gemm_w4a4(qa, sa, int4.pack(qw), sw).shape
        torch.Size([3, 8])
    """
    return V.call("gemm_w4a4", act, act_scales, w, w_scales, lora_act, lora_up, bias, out_dtype)


def gemm_w4a8(
    act: Tensor, act_scales: Tensor, w: Tensor, w_scales: Tensor, lora_act: Tensor | None = None,
    lora_up: Tensor | None = None, bias: Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
) -> Tensor:
    """W4A8 GEMM: int8 or fp8 e4m3 per-token activations x int4 group-64 weights, same epilogue as W4A4.

    Example:
        >>> from lowbit_engine.formats import int4
        >>> qw, sw = int4.quantize(torch.randn(8, 128), scale_dtype=torch.bfloat16)
        >>> qa, sa, _ = quantize_act(torch.randn(3, 128, dtype=torch.bfloat16), mode="int8")
        >>> gemm_w4a8(qa, sa, int4.pack(qw), sw).shape
        torch.Size([3, 8])
    """
    return V.call("gemm_w4a8", act, act_scales, w, w_scales, lora_act, lora_up, bias, out_dtype)


# --------------------------------------------------------------------------------------------------
# vq_dequantize / vq_gemm: codebook weights


def _vq_row_bytes(n_idx: int, index_bits: int) -> int:
    return n_idx if index_bits == 8 else 3 * ((n_idx + 1) // 2)


def _check_vq(op, dev, codes, codebook, channel_scale, N, K, index_bits):
    V.one_of(op, "index_bits", index_bits, INDEX_BITS)
    V.tensor(op, "codebook", codebook, dtypes=V.OUT_DTYPES, shape=(None, None), device=dev)
    k, d = codebook.shape
    if not 1 <= k <= 2 ** index_bits:
        V.fail(op, "codebook", f"1 to {2 ** index_bits} centroids for {index_bits}-bit indices", f"{k}")
    if N < 1 or K < 1:
        V.fail(op, "N/K", "positive sizes", f"N={N}, K={K}")
    V.multiple(op, "K", K, d, "K (the codebook holds sub-vectors of d = codebook.shape[1])")
    V.tensor(op, "codes", codes, dtypes=(torch.uint8,), shape=(N, _vq_row_bytes(K // d, index_bits)),
             device=dev)
    V.optional(op, "channel_scale", channel_scale, dtypes=(torch.float32,), shape=(N,), device=dev)


@torch.library.custom_op("lowbit::vq_dequantize", mutates_args=())
def _vq_dequantize(
    codes: Tensor, codebook: Tensor, channel_scale: Optional[Tensor], N: int, K: int, index_bits: int,
    out_dtype: torch.dtype,
) -> Tensor:
    _check_vq("vq_dequantize", codes.device, codes, codebook, channel_scale, N, K, index_bits)
    V.one_of("vq_dequantize", "out_dtype", out_dtype, V.OUT_DTYPES)
    return _run("vq_dequantize", codes.device, codes, codebook, channel_scale, N, K, index_bits, out_dtype)


@_vq_dequantize.register_fake
def _(codes, codebook, channel_scale, N, K, index_bits, out_dtype):
    _check_vq("vq_dequantize", codes.device, codes, codebook, channel_scale, N, K, index_bits)
    return codes.new_empty(N, K, dtype=out_dtype)


def _check_vq_gemm(x, codes, codebook, channel_scale, bias, N, K, index_bits):
    op = "vq_gemm"
    V.tensor(op, "x", x, dtypes=V.OUT_DTYPES, shape=(None, K))
    if x.shape[0] < 1:
        V.fail(op, "x", "at least one row (M >= 1)", f"shape {tuple(x.shape)}")
    _check_vq(op, x.device, codes, codebook, channel_scale, N, K, index_bits)
    V.optional(op, "bias", bias, dtypes=V.OUT_DTYPES, shape=(N,), device=x.device)


@torch.library.custom_op("lowbit::vq_gemm", mutates_args=())
def _vq_gemm(
    x: Tensor, codes: Tensor, codebook: Tensor, channel_scale: Optional[Tensor], bias: Optional[Tensor],
    N: int, K: int, index_bits: int,
) -> Tensor:
    _check_vq_gemm(x, codes, codebook, channel_scale, bias, N, K, index_bits)
    return _run("vq_gemm", x.device, x, codes, codebook, channel_scale, bias, N, K, index_bits)


@_vq_gemm.register_fake
def _(x, codes, codebook, channel_scale, bias, N, K, index_bits):
    _check_vq_gemm(x, codes, codebook, channel_scale, bias, N, K, index_bits)
    return x.new_empty(x.shape[0], N)


def _vq_dequantize_cpu(codes, codebook, channel_scale, N, K, index_bits, out_dtype):
    out = torch.empty(N, K, dtype=out_dtype)
    k, d = codebook.shape
    native().cpu_vq_dequantize(_ptr(codes), index_bits, _ptr(codebook), code(codebook.dtype), k, d,
                               _ptr(channel_scale), N, K, _ptr(out), code(out_dtype))
    return out


def _vq_gemm_cpu(x, codes, codebook, channel_scale, bias, N, K, index_bits):
    out = torch.empty(x.shape[0], N, dtype=x.dtype)
    k, d = codebook.shape
    native().cpu_vq_gemm(_ptr(x), code(x.dtype), x.shape[0], _ptr(codes), index_bits, _ptr(codebook),
                         code(codebook.dtype), k, d, _ptr(channel_scale), N, K, _ptr(bias), _dcode(bias),
                         _ptr(out))
    return out


_cpu_only = lambda t, *a: t.device.type == "cpu" and _has_native()  # noqa: E731
_dispatch.register("vq_dequantize", "cpu", _cpu_only, _vq_dequantize_cpu)
_dispatch.register(
    "vq_dequantize", "torch", lambda *a: True,
    lambda codes, cb, cs, N, K, bits, od: reference.vq_dequantize(codes, cb, N, K, bits, channel_scale=cs,
                                                                 out_dtype=od),
)
_dispatch.register("vq_gemm", "cpu", _cpu_only, _vq_gemm_cpu)
_dispatch.register(
    "vq_gemm", "torch", lambda *a: True,
    lambda x, codes, cb, cs, bias, N, K, bits: reference.vq_gemm(x, codes, cb, N, K, bits, channel_scale=cs,
                                                                bias=bias),
)


def vq_dequantize(
    codes: Tensor, codebook: Tensor, N: int, K: int, index_bits: int, channel_scale: Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> Tensor:
    """Decode VQ indices through the layer's codebook into a dense ``[N, K]`` weight.

    Example:
        >>> cb = torch.randn(256, 4)
        >>> codes = torch.randint(0, 256, (8, 32), dtype=torch.uint8)
        >>> vq_dequantize(codes, cb, 8, 128, 8).shape
        torch.Size([8, 128])
    """
    return V.call("vq_dequantize", codes, codebook, channel_scale, N, K, index_bits, out_dtype)


def vq_gemm(
    x: Tensor, codes: Tensor, codebook: Tensor, N: int, K: int, index_bits: int,
    channel_scale: Tensor | None = None, bias: Tensor | None = None,
) -> Tensor:
    """``x @ W^T + bias`` with W decoded from a VQ codebook; fp32 accumulate, output in x's dtype.

    Example:
        >>> cb = torch.randn(256, 4)
        >>> codes = torch.randint(0, 256, (8, 32), dtype=torch.uint8)
        >>> vq_gemm(torch.randn(5, 128), codes, cb, 8, 128, 8).shape
        torch.Size([5, 8])
    """
    return V.call("vq_gemm", x, codes, codebook, channel_scale, bias, N, K, index_bits)


OPS = ("quantize_act", "gemm_w4a4", "gemm_w4a8", "vq_dequantize", "vq_gemm")

# Last, once every op above exists: importing the Triton kernels registers their backends.
from . import kernels as _kernels  # noqa: E402,F401  registers the Triton backends
from . import ops_float as _ops_float  # noqa: E402,F401  registers lowbit::fp8_linear / lowbit::fp4_linear
from . import ops_w4a8 as _ops_w4a8  # noqa: E402,F401  registers lowbit::gemm_w4a8_f8l / gemm_w4a8_i8q
from . import ops_gemm8_cuda as _ops_gemm8_cuda  # noqa: E402,F401  the sm_90a cuda backend (LOWBIT_GEMM8_CUDA=1)
from . import ops_fused as _ops_fused  # noqa: E402,F401  registers lowbit::norm_modulate_quantize
from . import ops_exit as _ops_exit  # noqa: E402,F401  registers lowbit::gemm_w4a8_exit / quantize_act_static
from . import ops_w4a16 as _ops_w4a16  # noqa: E402,F401  registers lowbit::w4a16_linear
