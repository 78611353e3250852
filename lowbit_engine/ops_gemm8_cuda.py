"""The hand-written sm_90a 8-bit GEMM (csrc/cuda/gemm8_sm90.cu) as the ``cuda`` backend of
``lowbit::gemm_w4a8_f8l``, and its plain-fp8 form for the benchmarks.

The kernel is a persistent, warp-specialized TMA / wgmma GEMM: one producer warpgroup, two consumer
warpgroups, 256 weight rows x 128 tokens per CTA, 2-CTA clusters multicasting the token tile, the whole K
in the wgmma accumulators, and the SVDQuant epilogue (row x token scales, the low-rank up-projection as a
bf16 wgmma, bias, bf16 out by TMA store). docs/kernels.md ("Persistent TMA 8-bit GEMM") has the design.

It is **off by default**: only with ``LOWBIT_GEMM8_CUDA=1`` (read on every call) does dispatch take it,
ahead of the Triton path. It stays off until a GPU run shows it correct and faster (issue 15); it has been compiled
and checked offline (ptxas, the SASS census, a CPU model of its pipeline protocol) but not yet run.

Where it applies (``applies``): a CUDA tensor on a Hopper device with the sm_90a build, bf16 output, K a
multiple of 128, N a multiple of 8, 16-byte aligned operands, a bf16 low-rank branch of width 16..64 (or
none). Anything else goes to the next backend.

Example (needs a Hopper GPU; the lines are skipped by the CPU doctests):

    >>> import torch                                                              # doctest: +SKIP
    >>> from lowbit_engine import ops_gemm8_cuda                                  # doctest: +SKIP
    >>> x = torch.randn(4608, 3072, device="cuda").to(torch.float8_e4m3fn)        # doctest: +SKIP
    >>> w = torch.randn(3072, 3072, device="cuda").to(torch.float8_e4m3fn)        # doctest: +SKIP
    >>> s = torch.ones(4608, device="cuda")                                       # doctest: +SKIP
    >>> ops_gemm8_cuda.gemm_fp8_sm90(x, s, w).shape                               # doctest: +SKIP
    torch.Size([4608, 3072])
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from . import _dispatch
from ._build_info import native
from ._dtypes import code

ENV = "LOWBIT_GEMM8_CUDA"
WEIGHTS_FP8, WEIGHTS_F8L = 0, 1
MAX_RANK = 64

#: the launch configuration of the most recent call: (token tile, K splits, clusters, stages)
last_config: tuple[int, int, int, int] | None = None


def enabled() -> bool:
    """Whether ``LOWBIT_GEMM8_CUDA`` asks for this backend (``1``; default ``0``). Other values are a
    ValueError naming the choices."""
    value = os.environ.get(ENV, "0")
    if value not in ("0", "1"):
        raise ValueError(f"{ENV}={value!r}; expected '0' or '1'")
    return value == "1"


def available() -> bool:
    """Whether the build holds the kernel and the current device can run it (sm_90a on a Hopper GPU)."""
    mod = native()
    return (mod is not None and hasattr(mod, "cuda_gemm8_sm90_available") and torch.cuda.is_available()
            and bool(mod.cuda_gemm8_sm90_available()))


def _aligned(t: Tensor | None) -> bool:
    return t is None or t.data_ptr() % 16 == 0


def applies(act: Tensor, act_scales: Tensor, w: Tensor, w_gscales: Tensor, w_row_scale: Tensor,
            lora_act: Tensor | None, lora_up: Tensor | None, bias: Tensor | None, out_dtype: torch.dtype) -> bool:
    """Whether the kernel takes this ``gemm_w4a8_f8l`` call (the op layer has validated shapes and dtypes):
    enabled by ``LOWBIT_GEMM8_CUDA=1``, a Hopper device with the sm_90a build, and a problem it handles."""
    if not (act.is_cuda and enabled() and out_dtype == torch.bfloat16 and available()):
        return False
    K, N = act.shape[1], w.shape[0]
    if K % 128 or N % 8 or not (_aligned(act) and _aligned(w)):
        return False
    if lora_act is not None:
        R = lora_act.shape[1]
        if R % 16 or not 16 <= R <= MAX_RANK or lora_up.dtype != torch.bfloat16 or not _aligned(lora_act) \
                or lora_up.data_ptr() % 4:
            return False
    return bias is None or bias.dtype in (torch.float32, torch.float16, torch.bfloat16)


def _ptr(t: Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _launch(weights: int, act: Tensor, act_scales: Tensor, w: Tensor, w_gscales: Tensor | None,
            row_scale: Tensor | None, lora_act: Tensor | None, lora_up: Tensor | None, bias: Tensor | None,
            gelu: bool) -> Tensor:
    global last_config
    mod = native()
    M, K = act.shape
    N = w.shape[0]
    out = torch.empty(M, N, dtype=torch.bfloat16, device=act.device)
    floats = int(mod.cuda_gemm8_sm90_workspace_floats(M, N, K))
    ws = torch.empty(floats, dtype=torch.float32, device=act.device) if floats else None
    R = 0 if lora_act is None else lora_act.shape[1]
    stream = torch.cuda.current_stream(act.device).cuda_stream
    last_config = tuple(mod.cuda_gemm8_sm90(
        weights, _ptr(act), _ptr(act_scales), _ptr(w), _ptr(w_gscales), _ptr(row_scale), _ptr(lora_act),
        _ptr(lora_up), R, _ptr(bias), code(bias.dtype) if bias is not None else 0, _ptr(out), _ptr(ws), M, N, K,
        int(gelu), stream))
    return out


def gemm_w4a8_f8l_sm90(act, act_scales, w, w_gscales, w_row_scale, lora_act, lora_up, bias, out_dtype,
                       gelu: bool = False) -> Tensor:
    """The ``cuda`` backend of ``lowbit::gemm_w4a8_f8l`` (contract: docs/formats.md), bf16 out; ``gelu``
    applies GELU-tanh after the bias (not part of the op's contract; the benchmarks time it)."""
    if out_dtype != torch.bfloat16:
        raise ValueError(f"gemm_w4a8_f8l_sm90: out_dtype must be torch.bfloat16, got {out_dtype}")
    return _launch(WEIGHTS_F8L, act, act_scales, w, w_gscales, w_row_scale, lora_act, lora_up, bias, gelu)


def gemm_fp8_sm90(act: Tensor, act_scales: Tensor, w: Tensor, row_scale: Optional[Tensor] = None,
                  bias: Optional[Tensor] = None) -> Tensor:
    """The plain fp8 GEMM on the same skeleton (weights already e4m3 ``[N, K]``, no conversion): what the
    skeleton is gated on. ``out[m, n] = (sum_k act[m, k] w[n, k]) * act_scales[m] * row_scale[n] + bias[n]``,
    bf16. Needs M > 64 (128-token tiles only)."""
    for name, t in (("act", act), ("w", w)):
        if t.dtype != torch.float8_e4m3fn or t.dim() != 2 or not t.is_contiguous():
            raise ValueError(f"gemm_fp8_sm90: {name} must be a contiguous 2-D float8_e4m3fn tensor, got "
                             f"{t.dtype} {tuple(t.shape)}")
    if act.shape[1] != w.shape[1]:
        raise ValueError(f"gemm_fp8_sm90: act is [M, {act.shape[1]}] but w is [N, {w.shape[1]}]")
    if act_scales.dtype != torch.float32 or act_scales.shape != (act.shape[0],):
        raise ValueError(f"gemm_fp8_sm90: act_scales must be fp32 [{act.shape[0]}], got {act_scales.dtype} "
                         f"{tuple(act_scales.shape)}")
    if not available():
        raise RuntimeError("gemm_fp8_sm90: needs the sm_90a build on a Hopper GPU")
    return _launch(WEIGHTS_FP8, act, act_scales, w, None, row_scale, None, None, bias, False)


def _register() -> None:
    # Always registered, chosen only when enabled (read on every call, like LOWBIT_QUANTIZE_ACT_KERNEL, so a
    # bad value is a ValueError at the call, not at import).
    _dispatch.register("gemm_w4a8_f8l", "cuda", applies, gemm_w4a8_f8l_sm90)


_register()

__all__ = ["enabled", "available", "applies", "gemm_w4a8_f8l_sm90", "gemm_fp8_sm90", "last_config"]
