"""Fused ops that take the activation quantizer off the linear (the Hopper plan, step 3).

``lowbit::norm_modulate_quantize``: an entry linear's input (FLUX's fused QKV, fc1, the single block's
input) computed and quantized in one pass: adaLN ``y = LayerNorm(x) * (1 + scale) + shift`` (LayerNorm
without affine), rounded to x's dtype as the unfused path holds it, then ``quantize_act(y, smooth,
lora_down, mode)`` (docs/formats.md, "Fused entry quantizer"). LayerNorm already reads the whole row, so the
per-token amax costs no extra pass over memory, and the lora-down reads the unquantized y.

Backends: ``triton`` (kernels/quant8.py; CUDA, int8 / fp8 tokens), ``cpu`` (csrc/cpu/norm_quant.cpp),
``torch`` (:func:`lowbit_engine.reference.norm_modulate_quantize`). The LayerNorm statistics are floating
point with a free order, so backends may differ by an ulp of y on a few elements; given its y, each
backend's q and scales are exactly the quantizer's.

Example:
    >>> import torch
    >>> from lowbit_engine import ops_fused
    >>> x = torch.randn(2 * 5, 128, dtype=torch.bfloat16)
    >>> shift, scale = torch.randn(2, 128).to(x.dtype), torch.randn(2, 128).to(x.dtype)
    >>> q, s, la = ops_fused.norm_modulate_quantize(x, shift, scale, mode="int8", tokens_per_sample=5)
    >>> q.dtype, s.shape, la.shape
    (torch.int8, torch.Size([10]), torch.Size([10, 0]))
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _dispatch, reference
from . import _validate as V
from ._build_info import native
from ._dtypes import code
from .ops import GROUP, MODES, _alloc_quantize_act


def _ptr(t: Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _check(x, shift, scale, eps, smooth, lora_down, mode, tokens_per_sample) -> tuple[int, int, int]:
    op = "norm_modulate_quantize"
    V.tensor(op, "x", x, dtypes=V.FLOAT16S, shape=(None, None))
    M, K = x.shape
    V.one_of(op, "mode", mode, list(MODES))
    if M < 1:
        V.fail(op, "x", "at least one row (M >= 1)", f"shape {tuple(x.shape)}")
    V.multiple(op, "x", K, GROUP, "K = x.shape[1]")
    if tokens_per_sample < 1 or M % tokens_per_sample:
        V.fail(op, "tokens_per_sample", f"a divisor of M = {M}", tokens_per_sample)
    B = M // tokens_per_sample
    V.tensor(op, "shift", shift, dtypes=(x.dtype,), shape=(B, K), device=x.device)
    V.tensor(op, "scale", scale, dtypes=(x.dtype,), shape=(B, K), device=x.device)
    if not eps > 0:
        V.fail(op, "eps", "a positive float", eps)
    V.optional(op, "smooth", smooth, dtypes=(torch.float32,), shape=(K,), device=x.device)
    V.optional(op, "lora_down", lora_down, dtypes=(x.dtype,), shape=(None, K), device=x.device)
    return M, K, 0 if lora_down is None else lora_down.shape[0]


@torch.library.custom_op("lowbit::norm_modulate_quantize", mutates_args=())
def _norm_modulate_quantize(x: Tensor, shift: Tensor, scale: Tensor, eps: float, smooth: Optional[Tensor],
                            lora_down: Optional[Tensor], mode: str, tokens_per_sample: int
                            ) -> tuple[Tensor, Tensor, Tensor]:
    args = (x, shift, scale, eps, smooth, lora_down, mode, tokens_per_sample)
    _check(*args)
    V.positive_finite("norm_modulate_quantize", "smooth", smooth)  # real tensors only: not in the fake kernel

    def why() -> str:
        if x.device.type == "cpu":
            return "the native module lowbit_engine._C is not built"
        return f"no Triton kernel applies on {x.device.type} for mode {mode!r}"

    return _dispatch.run("norm_modulate_quantize", args, why)


@_norm_modulate_quantize.register_fake
def _(x, shift, scale, eps, smooth, lora_down, mode, tokens_per_sample):
    _, _, R = _check(x, shift, scale, eps, smooth, lora_down, mode, tokens_per_sample)
    return _alloc_quantize_act(x, mode, R)


def norm_modulate_quantize(x: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6, smooth: Tensor | None = None,
                           lora_down: Tensor | None = None, mode: str = "int8", tokens_per_sample: int | None = None
                           ) -> tuple[Tensor, Tensor, Tensor]:
    """``quantize_act(LayerNorm(x) * (1 + scale) + shift, smooth, lora_down, mode)`` in one op.

    Args:
        x: ``[M, K]`` bf16 / fp16, M = B * T tokens, K a multiple of 64.
        shift, scale: ``[B, K]`` in x's dtype (the adaLN modulation of each sample).
        eps: LayerNorm's epsilon (FLUX and SD3: 1e-6).
        smooth, lora_down, mode: as :func:`lowbit_engine.ops.quantize_act` (lora_down reads the unquantized y).
        tokens_per_sample: T (default M: one sample).

    Returns ``(q, scales, lora_act)`` as :func:`lowbit_engine.ops.quantize_act`. See the module example.
    """
    T = x.shape[0] if tokens_per_sample is None and isinstance(x, Tensor) else tokens_per_sample
    eps = float(eps) if isinstance(eps, (int, float)) and not isinstance(eps, bool) else eps
    return V.call("norm_modulate_quantize", x, shift, scale, eps, smooth, lora_down, mode, T)


# --------------------------------------------------------------------------------------------------
# backends


def _cpu(x, shift, scale, eps, smooth, lora_down, mode, T):
    M, K = x.shape
    R = 0 if lora_down is None else lora_down.shape[0]
    q, scales, lora_act = _alloc_quantize_act(x, mode, R)
    y = torch.empty_like(x)
    native().cpu_norm_modulate_quantize(_ptr(x), code(x.dtype), M, K, T, _ptr(shift), _ptr(scale), eps, _ptr(smooth),
                                        _ptr(lora_down), R, int(MODES[mode]), _ptr(q), _ptr(scales),
                                        _ptr(lora_act) if R else 0, _ptr(y))
    return q, scales, lora_act


def _torch(x, shift, scale, eps, smooth, lora_down, mode, T):
    q, s, la, _ = reference.norm_modulate_quantize(x, shift, scale, eps, smooth, lora_down, mode, T)
    return q, s, (la if la is not None else torch.empty(x.shape[0], 0, dtype=torch.float32, device=x.device))


def _register() -> None:
    _dispatch.register("norm_modulate_quantize", "torch", lambda *a: True, _torch)
    _dispatch.register("norm_modulate_quantize", "cpu", lambda x, *a: x.device.type == "cpu" and native() is not None,
                       _cpu)
    try:
        from .kernels import quant8
    except ImportError:
        return

    def applies(x, shift, scale, eps, smooth, lora_down, mode, T) -> bool:
        return (mode in quant8.MODES and x.is_cuda and not quant8.interpreted()
                and (lora_down is None or lora_down.shape[0] <= quant8.MAX_RANK))

    def run(x, shift, scale, eps, smooth, lora_down, mode, T):
        return quant8.norm_modulate_quantize_triton(x, shift, scale, eps, smooth, lora_down, mode, tokens_per_sample=T)

    _dispatch.register("norm_modulate_quantize", "triton", applies, run)


_register()

OPS = ("norm_modulate_quantize",)
