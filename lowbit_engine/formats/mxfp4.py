"""mxfp4: E2M1 values in groups of 32 along K, one power-of-two (E8M0) scale per group.

Layout and exact math: docs/formats.md ("mxfp4"). Per block:

    e     = smallest integer with 6 * 2**e >= amax_block, clamped to [-127, 127]  (amax 0: e = -127)
    scale = 2**e, stored as uint8 e + 127
    code  = e2m1(w / scale)                                                       (exact division)

The scale is rounded up (not the OCP spec's floor), so no value saturates, and the only rounding is the
E2M1 one: a block of E2M1 values times one power of two comes back unchanged (unless its scale would need
e < -127). The codes themselves are not idempotent (a block whose amax rounds to 3 * 2**e requantizes
with e - 1), but the dequantized values are.

Example:
    >>> import torch
    >>> from lowbit_engine.formats import mxfp4
    >>> w = torch.randn(3, 64)
    >>> t = mxfp4.quantize(w)            # packed uint8 [3, 32], scales uint8 [3, 2]
    >>> w_hat = mxfp4.dequantize(*t)
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import e2m1, fp8

GROUP_SIZE = 32
E_MIN, E_MAX = -127, 127
E8M0_BIAS = 127
E8M0_NAN = 255  # never produced; rejected on input


class MXFP4Tensor(NamedTuple):
    """The two tensors of an mxfp4 weight; unpack it into :func:`dequantize` with ``*t``."""

    packed: torch.Tensor  # uint8 [..., K/2], two E2M1 codes per byte, even K in the low nibble
    scales: torch.Tensor  # uint8 [..., K/32], E8M0: the block scale is 2**(byte - 127)


def _check_groups(fn: str, k: int) -> None:
    if k % GROUP_SIZE != 0:
        raise ValueError(
            f"mxfp4.{fn}: the last dimension (K={k}) must be a multiple of the group size {GROUP_SIZE}"
        )


def _blocks(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(*x.shape[:-1], x.shape[-1] // GROUP_SIZE, GROUP_SIZE)


def block_exponent(amax: torch.Tensor) -> torch.Tensor:
    """The block exponent ``e`` (int32) for fp32 block maxima ``amax >= 0``: the smallest integer with
    ``6 * 2**e >= amax``, clamped to [-127, 127], and -127 for ``amax == 0``.

    Computed from ``frexp`` rather than a rounded ``log2``: with ``amax = m * 2**E``, ``m`` in [0.5, 1),
    ``6 * 2**e >= amax`` iff ``2**(e - E) >= m / 6``, which gives ``e = E - 3`` when ``m <= 0.75`` and
    ``e = E - 2`` otherwise.

    Example:
        >>> block_exponent(torch.tensor([6.0, 6.5, 3.0, 0.0])).tolist()
        [0, 1, -1, -127]
    """
    m, big_e = torch.frexp(amax.float())
    e = big_e - 3 + (m > 0.75).to(torch.int32)
    e = torch.clamp(e, E_MIN, E_MAX)
    return torch.where(amax > 0, e, torch.full_like(e, E_MIN))


def quantize(w: torch.Tensor) -> MXFP4Tensor:
    """Quantize ``w [..., K]`` (K % 32 == 0) to mxfp4.

    Example:
        >>> t = quantize(torch.tensor([[5.0, -0.7, 0.3, 2.5] + [0.0] * 28]))
        >>> t.scales.tolist(), e2m1.unpack(t.packed).tolist()[0][:4]    # e = 0; 5 -> 4, 2.5 -> 2 (ties)
        ([[127]], [6, 9, 1, 4])
    """
    if not w.is_floating_point():
        raise ValueError(f"mxfp4.quantize: expected a floating tensor, got {w.dtype}")
    if w.dim() == 0:
        raise ValueError("mxfp4.quantize: expected [..., K], got a 0-d tensor")
    _check_groups("quantize", w.shape[-1])
    wb = _blocks(w.float())
    e = block_exponent(wb.abs().amax(dim=-1))
    # Division by an exact power of two: the only rounding is the E2M1 one.
    codes = e2m1.round_to_code(wb / fp8.pow2(e).unsqueeze(-1))
    scales = (e + E8M0_BIAS).to(torch.uint8)
    return MXFP4Tensor(e2m1.pack(codes.reshape(w.shape)), scales)


def _check_tensors(fn: str, packed: torch.Tensor, scales: torch.Tensor) -> int:
    if packed.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"mxfp4.{fn}: expected packed and scales uint8, got {packed.dtype} and {scales.dtype}")
    k = packed.shape[-1] * 2
    _check_groups(fn, k)
    expected = (*packed.shape[:-1], k // GROUP_SIZE)
    if tuple(scales.shape) != expected:
        raise ValueError(f"mxfp4.{fn}: scales shape {tuple(scales.shape)}, expected {expected}")
    if scales.numel() and bool((scales == E8M0_NAN).any()):
        raise ValueError(f"mxfp4.{fn}: scale byte {E8M0_NAN} (E8M0 NaN) is not a valid mxfp4 scale")
    return k


def dequantize(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Decode mxfp4 to fp32 ``[..., K]``: ``e2m1_value(code) * 2**(scale - 127)``, exact in fp32.

    Example:
        >>> w = torch.tensor([[1.5, -6.0, 0.5, 3.0] * 8]) * 2.0**-10
        >>> torch.equal(dequantize(*quantize(w)), w)
        True
    """
    k = _check_tensors("dequantize", packed, scales)
    values = _blocks(e2m1.code_to_value(e2m1.unpack(packed)))
    out = values * fp8.pow2(scales.to(torch.int32) - E8M0_BIAS).unsqueeze(-1)
    return out.reshape(*packed.shape[:-1], k)


def dequantize_to_fp8(packed: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Expand mxfp4 to e4m3 with a power-of-two fp32 scale per row, the operand layout of an fp8 GEMM.

    Returns ``(q float8_e4m3fn [..., K], scale fp32 [...])``: :func:`fp8.quantize_pow2` of the
    (exact) dequantized row. An E2M1 value times a power of two has at most 2 significant bits, so
    it is exact in e4m3 whenever it is a multiple of 2**-9 and at most 448. With
    the row scale ``2**r`` (``r`` smallest with ``max |w| <= 448 * 2**r``) that holds for every block
    whose exponent is within 14 of the row's largest, and then ``fp8.dequantize(q, scale)`` equals
    :func:`dequantize` bit for bit. Blocks more than 2**14 below the row's largest lose their small
    codes to e4m3 subnormals (one RNE rounding, absolute error <= ``2**-10 * scale``).

    Example:
        >>> t = quantize(torch.randn(4, 64))
        >>> q, s = dequantize_to_fp8(*t)
        >>> torch.equal(fp8.dequantize(q, s), dequantize(*t))
        True
    """
    return fp8.quantize_pow2(dequantize(packed, scales))
