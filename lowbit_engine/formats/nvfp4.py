"""nvfp4: E2M1 values in groups of 16 along K, an e4m3 scale per group and one fp32 tensor scale.

Layout and exact math: docs/formats.md ("nvfp4"). Every step below is one fp32 operation in the order the
document writes it, so the codes and scales agree bit for bit with the C++ and CUDA quantizers:

    tensor_scale = amax(all of w) / (6 * 448)                 (1.0 when that is 0)
    block_scale  = e4m3(clamp(amax_block / 6 / tensor_scale, 0, 448))
    eff          = float(block_scale) * tensor_scale
    code         = eff > 0 ? e2m1(w / eff) : 0
    dequant      = e2m1_value(code) * float(block_scale) * tensor_scale      (left to right)

Example:
    >>> import torch
    >>> from lowbit_engine.formats import nvfp4
    >>> w = torch.randn(3, 64)
    >>> t = nvfp4.quantize(w)            # packed uint8 [3, 32], block_scales e4m3 [3, 4], tensor_scale fp32 []
    >>> w_hat = nvfp4.dequantize(*t)
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import e2m1, fp8

GROUP_SIZE = 16
_TENSOR_DIV = e2m1.MAX * fp8.E4M3_MAX  # 6 * 448 = 2688, one fp32 division by it


class NVFP4Tensor(NamedTuple):
    """The three tensors of an nvfp4 weight; unpack it into :func:`dequantize` with ``*t``."""

    packed: torch.Tensor  # uint8 [..., K/2], two E2M1 codes per byte, even K in the low nibble
    block_scales: torch.Tensor  # float8_e4m3fn [..., K/16]
    tensor_scale: torch.Tensor  # fp32, 0-d


def _check_groups(fn: str, k: int) -> None:
    if k % GROUP_SIZE != 0:
        raise ValueError(
            f"nvfp4.{fn}: the last dimension (K={k}) must be a multiple of the group size {GROUP_SIZE}"
        )


def _blocks(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(*x.shape[:-1], x.shape[-1] // GROUP_SIZE, GROUP_SIZE)


def quantize(w: torch.Tensor) -> NVFP4Tensor:
    """Quantize ``w [..., K]`` (K % 16 == 0) to nvfp4.

    The tensor scale spans all of ``w``: quantize one weight matrix at a time. A tensor scale of 0
    (all-zero ``w``, or an amax so small that the division underflows) is replaced by 1, which leaves
    every block scale and code 0. Blocks whose scale rounds to 0 in e4m3 are stored as zeros.

    Example:
        >>> t = quantize(torch.tensor([[10.5, -5.25, 0.875, 2.0] + [0.0] * 12]))
        >>> t.tensor_scale.item(), t.block_scales.float().tolist()      # 10.5 / 2688 = 2**-8
        (0.00390625, [[448.0]])
        >>> e2m1.unpack(t.packed).tolist()[0][:4]                        # w / 1.75 = 6, -3, 0.5, 1.14
        [7, 13, 1, 2]
        >>> dequantize(*t).tolist()[0][:4]
        [10.5, -5.25, 0.875, 1.75]
    """
    if not w.is_floating_point():
        raise ValueError(f"nvfp4.quantize: expected a floating tensor, got {w.dtype}")
    if w.dim() == 0:
        raise ValueError("nvfp4.quantize: expected [..., K], got a 0-d tensor")
    _check_groups("quantize", w.shape[-1])
    wb = _blocks(w.float())
    amax = wb.abs().amax() if wb.numel() else torch.zeros((), device=w.device)
    tensor_scale = amax / _TENSOR_DIV
    tensor_scale = torch.where(tensor_scale > 0, tensor_scale, torch.ones_like(tensor_scale))

    amax_block = wb.abs().amax(dim=-1)
    block_scales = torch.clamp(amax_block / e2m1.MAX / tensor_scale, 0, fp8.E4M3_MAX).to(fp8.DTYPE)

    eff = (block_scales.float() * tensor_scale).unsqueeze(-1)
    safe = torch.where(eff > 0, eff, torch.ones_like(eff))
    codes = torch.where(eff > 0, e2m1.round_to_code(wb / safe), torch.zeros((), dtype=torch.uint8))
    return NVFP4Tensor(e2m1.pack(codes.reshape(w.shape)), block_scales, tensor_scale)


def _check_tensors(fn: str, packed: torch.Tensor, block_scales: torch.Tensor, tensor_scale: torch.Tensor) -> int:
    if packed.dtype != torch.uint8 or block_scales.dtype != fp8.DTYPE:
        raise ValueError(
            f"nvfp4.{fn}: expected packed uint8 and block_scales {fp8.DTYPE}, "
            f"got {packed.dtype} and {block_scales.dtype}"
        )
    k = packed.shape[-1] * 2
    _check_groups(fn, k)
    expected = (*packed.shape[:-1], k // GROUP_SIZE)
    if tuple(block_scales.shape) != expected:
        raise ValueError(f"nvfp4.{fn}: block_scales shape {tuple(block_scales.shape)}, expected {expected}")
    if tensor_scale.dim() != 0:
        raise ValueError(f"nvfp4.{fn}: tensor_scale must be 0-d, got shape {tuple(tensor_scale.shape)}")
    return k


def _scaled_values(packed: torch.Tensor, block_scales: torch.Tensor) -> torch.Tensor:
    """``e2m1_value(code) * float(block_scale)`` in blocks ``[..., K/16, 16]``; exact in fp32 (a 2-bit by a
    4-bit significand, magnitudes in [2**-10, 2688])."""
    values = _blocks(e2m1.code_to_value(e2m1.unpack(packed)))
    return values * block_scales.float().unsqueeze(-1)


def dequantize(packed: torch.Tensor, block_scales: torch.Tensor, tensor_scale: torch.Tensor) -> torch.Tensor:
    """Decode nvfp4 to fp32 ``[..., K]``: ``(value * block_scale) * tensor_scale``.

    The first product is exact; the multiply by the tensor scale is the one rounding.

    Example:
        >>> w = torch.tensor([[1.0, 2.0, 3.0, 6.0] * 4]) * 1.75      # tensor scale 2**-8, block scale 448
        >>> torch.equal(dequantize(*quantize(w)), w)
        True
    """
    k = _check_tensors("dequantize", packed, block_scales, tensor_scale)
    out = _scaled_values(packed, block_scales) * tensor_scale.float()
    return out.reshape(*packed.shape[:-1], k)


def dequantize_to_fp8(
    packed: torch.Tensor, block_scales: torch.Tensor, tensor_scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Expand nvfp4 to e4m3 with one fp32 scale per row, the operand layout of an fp8 GEMM.

    Returns ``(q float8_e4m3fn [..., K], scale fp32 [...])`` with ``fp8.dequantize(q, scale)`` close to
    :func:`dequantize`: the exact products ``p = value * block_scale`` go through
    :func:`fp8.quantize_pow2` (row scale ``2**r``, ``r`` smallest with ``max |p| <= 448 * 2**r``) and
    ``scale = 2**r * tensor_scale``. Where every ``p / 2**r`` is an e4m3 value the result equals
    :func:`dequantize` bit for bit (both are one fp32 rounding of ``p * tensor_scale``).

    Rounding accepted (one RNE rounding of ``p / 2**r`` to e4m3, nothing else):

    - ``p`` has up to 6 significant bits (2 from the E2M1 value, 4 from the block scale) and e4m3 keeps 4.
      Values 0.5, 1, 2, 4 keep the block scale's significand and are exact. Values 1.5, 3, 6 multiply it
      by 0b11, which fits only when the block scale's significand is 1, 1.25 or 1.5; with 1.125, 1.375,
      1.625, 1.75 or 1.875 the product is rounded. The worst case is significand 1.75 (e.g. 6 * 448 =
      2688 -> 2560): relative error 1/21 = 4.8% (the generic e4m3 bound is 2**-4).
    - This always hits the largest weights: the block holding the tensor's amax gets block scale
      448 = 1.75 * 2**8, so its values 1.5, 3 and 6 (the amax itself among them) shrink by exactly 1/21
      (binary 10101 rounds to the even 10100). An nvfp4 tensor with any nonzero weight never expands
      exactly.
    - Where ``p / 2**r`` falls below 2**-6, e4m3 subnormals bound the error by ``2**-10 * scale``
      (absolute) instead; this hits the small codes of blocks whose scale is under about 1/1200 of the
      row's largest block scale.
    - Measured on a Gaussian 1024 x 4096 weight: 25% of the elements are rounded, and the expansion adds
      2.1% relative (Frobenius) error on top of nvfp4's own 9.5%.

    tests/test_formats.py checks these bounds and the 1/21 worst case exhaustively over every (E2M1 value,
    block scale) pair. Where this is too lossy, run a GEMM that applies the block scales itself.

    Example:
        >>> w = torch.randn(4, 64)
        >>> t = quantize(w)
        >>> q, s = dequantize_to_fp8(*t)
        >>> ref = dequantize(*t)
        >>> bool(((fp8.dequantize(q, s) - ref).abs() <= ref.abs() / 21 + 2**-10 * s[:, None]).all())
        True
    """
    k = _check_tensors("dequantize_to_fp8", packed, block_scales, tensor_scale)
    products = _scaled_values(packed, block_scales).reshape(*packed.shape[:-1], k)
    q, row_scale = fp8.quantize_pow2(products)
    return q, row_scale * tensor_scale.float()
