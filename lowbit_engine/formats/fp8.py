"""fp8 e4m3 with one fp32 scale per row: the ``fp8`` format (weights per output channel, activations per
token) and the fp8 activations of ``svdq-w4a8``.

Layout and exact math: docs/formats.md ("fp8 e4m3, per row"). ``scale = amax / 448`` (fp32; a zero row
gets 1), ``q = e4m3(clamp(x / scale, -448, 448))`` rounded to nearest even, ``x ~= float(q) * scale``.

This module also holds :func:`quantize_pow2`, the per-row cast with a power-of-two scale that the 4-bit
float formats use to hand their weights to an fp8 GEMM (``nvfp4.dequantize_to_fp8``,
``mxfp4.dequantize_to_fp8``): a power-of-two scale moves no bits, so a value that fits e4m3 stays exact.

Example:
    >>> import torch
    >>> from lowbit_engine.formats import fp8
    >>> x = torch.randn(5, 96)
    >>> q, scale = fp8.quantize(x)                 # float8_e4m3fn [5, 96], fp32 [5]
    >>> x_hat = fp8.dequantize(q, scale)
"""

from __future__ import annotations

import torch

E4M3_MAX = 448.0
DTYPE = torch.float8_e4m3fn


def _check_rows(fn: str, x: torch.Tensor) -> None:
    if not x.is_floating_point():
        raise ValueError(f"fp8.{fn}: expected a floating tensor, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"fp8.{fn}: expected [..., K] with K >= 1, got shape {tuple(x.shape)}")


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize each row of ``x [..., K]`` to e4m3: returns ``(q float8_e4m3fn [..., K], scale fp32 [...])``.

    ``scale = amax / 448`` in fp32; a row whose scale is 0 (all zero, or so tiny that ``amax / 448``
    underflows) gets scale 1, which quantizes it to zeros without dividing by zero. The quotient is
    clamped to +-448 before the cast because ``x / scale`` can land an ulp above 448.

    Example:
        >>> q, s = quantize(torch.tensor([[1.0, -2.0, 448.0], [0.0, 0.0, 0.0]]))
        >>> s.tolist(), q.float().tolist()
        ([1.0, 1.0], [[1.0, -2.0, 448.0], [0.0, 0.0, 0.0]])
    """
    _check_rows("quantize", x)
    xf = x.float()
    scale = xf.abs().amax(dim=-1) / E4M3_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(xf / scale.unsqueeze(-1), -E4M3_MAX, E4M3_MAX).to(DTYPE)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``float(q) * scale`` row by row (one fp32 multiply per element), as fp32 ``[..., K]``.

    Example:
        >>> q, s = quantize(torch.tensor([[7.0, -0.5, 0.1]]))       # scale 7 / 448 = 2**-6
        >>> dequantize(q, s).tolist()                               # 6.4 -> 6.5 in e4m3
        [[7.0, -0.5, 0.1015625]]
    """
    if q.dtype != DTYPE:
        raise ValueError(f"fp8.dequantize: expected {DTYPE}, got {q.dtype}")
    if tuple(scale.shape) != tuple(q.shape[:-1]):
        raise ValueError(f"fp8.dequantize: scale shape {tuple(scale.shape)} != rows {tuple(q.shape[:-1])}")
    return q.float() * scale.float().unsqueeze(-1)


def pow2(e: torch.Tensor) -> torch.Tensor:
    """``2**e`` as an exact fp32 tensor for integer ``e`` in [-149, 127], built from its bit pattern.

    Built from bits rather than ``exp2``/``ldexp`` so that exactness does not hang on a math library.

    Example:
        >>> pow2(torch.tensor([-149, -127, 0, 127])).tolist() == [2.0**-149, 2.0**-127, 1.0, 2.0**127]
        True
    """
    if e.is_floating_point() or e.is_complex():
        raise ValueError(f"fp8.pow2: expected an integer exponent tensor, got {e.dtype}")
    e = e.to(torch.int32)
    if e.numel() and (e.min() < -149 or e.max() > 127):
        raise ValueError(f"fp8.pow2: exponents must lie in [-149, 127], got [{int(e.min())}, {int(e.max())}]")
    one = torch.ones_like(e)
    normal = torch.clamp(e + 127, 1, 254) << 23  # biased exponent field, mantissa 0
    subnormal = one << torch.clamp(e + 149, 0, 22)  # a lone mantissa bit: 2^-149 * 2^(e+149)
    return torch.where(e >= -126, normal, subnormal).view(torch.float32)


def quantize_pow2(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cast each row of ``x [..., K]`` to e4m3 under a power-of-two row scale.

    ``scale = 2**r`` with ``r`` the smallest integer such that ``amax <= 448 * 2**r`` (clamped to
    [-126, 127] so the scale is a normal fp32; a zero row gets ``r = 0``), and
    ``q = e4m3(x / scale)`` rounded to nearest even. Dividing by a power of two is exact, so
    ``float(q) * scale == x`` exactly for every element whose ``x / scale`` is an e4m3 value (a multiple of
    2**-9 with at most 4 significant bits); the others get one RNE rounding, relative error <= 2**-4 in the
    normal range, absolute error <= 2**-10 * scale in the subnormal range. The result has the same
    ``(q, scale)`` layout as :func:`quantize`, so :func:`dequantize` and the fp8 GEMM consume it directly.

    Example:
        >>> q, s = quantize_pow2(torch.tensor([[6.0, 0.5], [1000.0, 3.0]]))
        >>> s.tolist(), dequantize(q, s).tolist()                   # 1000 / 4 = 250 -> 256 in e4m3
        ([0.015625, 4.0], [[6.0, 0.5], [1024.0, 3.0]])
    """
    _check_rows("quantize_pow2", x)
    xf = x.float()
    amax = xf.abs().amax(dim=-1)
    # amax = m * 2^E with m in [0.5, 1) and 448 = 0.875 * 2^9, so amax <= 448 * 2^r  <=>  r >= E - 9 when
    # m <= 0.875, else r >= E - 8. Exact: no rounded logarithm involved.
    m, big_e = torch.frexp(amax)
    r = big_e - 9 + (m > 0.875).to(torch.int32)
    r = torch.where(amax > 0, torch.clamp(r, -126, 127), torch.zeros_like(r))
    scale = pow2(r)
    q = torch.clamp(xf / scale.unsqueeze(-1), -E4M3_MAX, E4M3_MAX).to(DTYPE)
    return q, scale
