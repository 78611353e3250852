"""int4, symmetric, group 64 along K: the weight and activation format of ``svdq-int4``.

Layout and exact math: docs/formats.md ("int4"). Values are quantized per group of ``group_size``
consecutive K, packed two per byte with the even K in the low nibble.

Example:
    >>> import torch
    >>> from lowbit_engine.formats import int4
    >>> w = torch.randn(8, 128)
    >>> q, s = int4.quantize(w, scale_dtype=torch.bfloat16)
    >>> packed = int4.pack(q)                      # uint8 [8, 64]
    >>> w_hat = int4.dequantize(int4.unpack(packed), s)
"""

from __future__ import annotations

import torch

GROUP_SIZE = 64
QMAX = 7  # the quantizer uses [-7, 7]; -8 is legal in the packed layout


def _check_groups(x: torch.Tensor, group_size: int) -> None:
    if x.shape[-1] % group_size != 0:
        raise ValueError(
            f"int4: the last dimension (K={x.shape[-1]}) must be a multiple of the group size {group_size}"
        )


def quantize(
    x: torch.Tensor, group_size: int = GROUP_SIZE, scale_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x [..., K]`` to int4 values (int8 tensor in [-7, 7]) and per-group scales.

    The scale is ``amax / 7`` in fp32, rounded to ``scale_dtype`` (bf16 for weights, fp32 for
    activations); values are divided by the *rounded* scale, so ``q * scale`` is the exact dequantization.
    """
    _check_groups(x, group_size)
    xf = x.float().reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)
    amax = xf.abs().amax(dim=-1, keepdim=True)
    # Divide by a tensor, not a Python number: CUDA torch turns division by a scalar into a multiply by
    # its reciprocal, which differs from the true division the kernels and C++ references use.
    scale = (amax / torch.full_like(amax, QMAX)).to(scale_dtype)
    sf = scale.float()
    safe = torch.where(sf > 0, sf, torch.ones_like(sf))
    q = torch.where(sf > 0, torch.clamp(torch.round(xf / safe), -8, 7), torch.zeros_like(xf))
    return q.to(torch.int8).reshape(x.shape), scale.squeeze(-1)


def dequantize(q: torch.Tensor, scales: torch.Tensor, group_size: int = GROUP_SIZE) -> torch.Tensor:
    """``q [..., K]`` int values times their group scales ``[..., K/group_size]``, as fp32."""
    _check_groups(q, group_size)
    qf = q.float().reshape(*q.shape[:-1], q.shape[-1] // group_size, group_size)
    return (qf * scales.float().unsqueeze(-1)).reshape(q.shape)


def pack(q: torch.Tensor, signed: bool = True) -> torch.Tensor:
    """Pack int4 values ``[..., K]`` (int8 in [-8, 7]) into ``uint8 [..., K/2]``, even K in the low nibble.

    ``signed=False`` stores ``q + 8`` (the unsigned-with-shift option).
    """
    if q.shape[-1] % 2 != 0:
        raise ValueError(f"int4.pack: the last dimension must be even, got {q.shape[-1]}")
    v = q.to(torch.int16)
    if not signed:
        v = v + 8
    nib = (v & 0xF).to(torch.uint8)
    return nib[..., 0::2] | (nib[..., 1::2] << 4)


def unpack(packed: torch.Tensor, signed: bool = True) -> torch.Tensor:
    """Inverse of :func:`pack`: ``uint8 [..., K/2]`` to int8 values ``[..., K]``."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"int4.unpack: expected uint8, got {packed.dtype}")
    lo = (packed & 0xF).to(torch.int16)
    hi = (packed >> 4).to(torch.int16)
    v = torch.stack([lo, hi], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
    v = torch.where(v >= 8, v - 16, v) if signed else v - 8
    return v.to(torch.int8)
