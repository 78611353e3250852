"""The weight layouts of the SVDQuant formats (``svdq-int4``, ``svdq-w4a8``): one interface over three.

* ``g64``: int4 two's complement, a bf16 scale per 64 (:mod:`lowbit_engine.formats.int4`): the original
  layout; its GEMMs promote every 64-group (``lowbit::gemm_w4a4`` / ``gemm_w4a8``).
* ``f8l``: fp32 row scale x e4m3 group scale x 3-bit magnitude + sign (:mod:`lowbit_engine.formats.f8l`),
  for e4m3 tokens (``lowbit::gemm_w4a8_f8l``): no promotion.
* ``i8q``: fp32 row scale x ((uint4 - zero) x uint8 step), group 64 (:mod:`lowbit_engine.formats.i8q`), for
  int8 tokens (``lowbit::gemm_w4a8_i8q``): no promotion.

Every layout stores ``qweight uint8 [N, K/2]`` and ``wscales [N, K/64]``; f8l and i8q add ``wrow fp32 [N]``
and i8q ``wzeros uint8 [N, K/64]``. :func:`buffer_specs` says which, :func:`quantize` fills them from a float
weight, :func:`dequantize` reads them back, :func:`convert` moves a stored weight to another layout.

Example:
    >>> import torch
    >>> from lowbit_engine.formats import w4_layouts
    >>> bufs = w4_layouts.quantize(torch.randn(16, 128), "i8q")
    >>> sorted(bufs), bufs["wscales"].dtype
    (['qweight', 'wrow', 'wscales', 'wzeros'], torch.uint8)
    >>> w_hat = w4_layouts.dequantize("i8q", bufs)       # fp32 [16, 128]
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import f8l, fp8, i8q, int4

LAYOUTS = ("g64", "f8l", "i8q")
GROUP = 64
# token quantizations each layout's GEMM takes
ACTS: dict[str, tuple[str, ...]] = {"g64": ("int4", "int8", "fp8"), "f8l": ("fp8",), "i8q": ("int8",)}
# the layout an 8-bit token mode runs best with (promotion-free)
FOR_ACT: dict[str, str] = {"int4": "g64", "int8": "i8q", "fp8": "f8l"}


def check_layout(layout: str) -> str:
    """``layout`` if known, else ValueError listing the layouts."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown weight layout {layout!r}; expected one of {list(LAYOUTS)}")
    return layout


def buffer_specs(layout: str, N: int, K: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of the buffers a layer of ``layout`` holds, in state-dict order.

    Example:
        >>> buffer_specs("f8l", 8, 128)["wscales"]
        ((8, 2), torch.float8_e4m3fn)
    """
    check_layout(layout)
    specs = {"qweight": ((N, K // 2), torch.uint8)}
    if layout == "g64":
        specs["wscales"] = ((N, K // GROUP), torch.bfloat16)
    elif layout == "f8l":
        specs["wscales"] = ((N, K // GROUP), fp8.DTYPE)
        specs["wrow"] = ((N,), torch.float32)
    else:
        specs["wscales"] = ((N, K // GROUP), torch.uint8)
        specs["wzeros"] = ((N, K // GROUP), torch.uint8)
        specs["wrow"] = ((N,), torch.float32)
    return specs


def quantize(w: Tensor, layout: str, search: bool = False) -> dict[str, Tensor]:
    """Quantize a float weight ``w [N, K]`` into the buffers of ``layout`` (see :func:`buffer_specs`).

    ``search`` (f8l, i8q) tries neighbouring scales per group and keeps the least squared error: slower,
    for the final quantization rather than inside a search loop. g64 has nothing to search.
    """
    check_layout(layout)
    if layout == "g64":
        q, s = int4.quantize(w.float(), scale_dtype=torch.bfloat16)
        return {"qweight": int4.pack(q), "wscales": s}
    if layout == "f8l":
        codes, gs, row = f8l.quantize(w, search=search)
        return {"qweight": f8l.pack(codes), "wscales": gs, "wrow": row}
    codes, steps, zeros, row = i8q.quantize(w, search=search)
    return {"qweight": i8q.pack(codes), "wscales": steps, "wzeros": zeros, "wrow": row}


def dequantize(layout: str, bufs: dict[str, Tensor]) -> Tensor:
    """The fp32 weight ``[N, K]`` the buffers of ``layout`` hold (exactly what the GEMMs multiply)."""
    check_layout(layout)
    if layout == "g64":
        return int4.dequantize(int4.unpack(bufs["qweight"]), bufs["wscales"])
    if layout == "f8l":
        return f8l.dequantize(bufs["qweight"], bufs["wscales"], bufs["wrow"])
    return i8q.dequantize(bufs["qweight"], bufs["wscales"], bufs["wzeros"], bufs["wrow"])


def check(layout: str, bufs: dict[str, Tensor]) -> None:
    """ValueError unless the buffers hold a valid ``layout`` weight: the shapes and dtypes of
    :func:`buffer_specs`, finite scales, and for i8q the int8 range of every group (:func:`i8q.check`)."""
    check_layout(layout)
    N, K = bufs["qweight"].shape[0], bufs["qweight"].shape[1] * 2
    for name, (shape, dtype) in buffer_specs(layout, N, K).items():
        t = bufs.get(name)
        if t is None or tuple(t.shape) != shape or t.dtype != dtype:
            got = None if t is None else (tuple(t.shape), t.dtype)
            raise ValueError(f"{layout} weight: buffer {name!r} expected {shape} {dtype}, got {got}")
    if layout != "i8q" and not torch.isfinite(bufs["wscales"].float()).all():
        raise ValueError(f"{layout} weight: non-finite group scales")
    if layout != "g64" and not torch.isfinite(bufs["wrow"]).all():
        raise ValueError(f"{layout} weight: non-finite row scales")
    if layout == "i8q":
        i8q.check(bufs["wscales"], bufs["wzeros"])


def convert(bufs: dict[str, Tensor], src: str, dst: str, search: bool = True) -> dict[str, Tensor]:
    """A stored weight requantized into another layout (e.g. a ``g64`` checkpoint onto F8L for Hopper).

    The source is dequantized exactly and quantized again (with the scale search by default), so the result
    is the nearest ``dst`` weight to what ``src`` held; converting to the same layout returns the buffers.
    Measured on the synthetic SVDQuant r32 layers (bench/fidelity.py --layouts, docs/fidelity.md): g64 ->
    f8l costs 0.14 dB of layer SQNR, g64 -> i8q 0.7 dB (its int8 grid cannot follow int4 x bf16 values),
    while quantizing the float residual straight to f8l / i8q gains 0.4 / 2.6 dB over g64.

    Example:
        >>> old = quantize(torch.randn(4, 128), "g64")
        >>> sorted(convert(old, "g64", "f8l"))
        ['qweight', 'wrow', 'wscales']
    """
    check_layout(src)
    check_layout(dst)
    if src == dst:
        return dict(bufs)
    return quantize(dequantize(src, bufs), dst, search=search)


__all__ = ["LAYOUTS", "ACTS", "FOR_ACT", "check_layout", "buffer_specs", "quantize", "dequantize", "check", "convert"]
