"""E2M1: the 4-bit float shared by ``nvfp4`` and ``mxfp4``.

Layout and exact math: docs/formats.md ("E2M1"). A code is ``s e1 e0 m`` (sign in bit 3); the magnitude
codes 0..7 mean 0, 0.5, 1, 1.5, 2, 3, 4, 6. Codes are packed two per byte along K, the even K in the low
nibble, exactly like int4.

Example:
    >>> import torch
    >>> from lowbit_engine.formats import e2m1
    >>> codes = e2m1.round_to_code(torch.tensor([0.3, -1.25, 5.0, 100.0]))
    >>> codes.tolist()                     # 0.5, -1 (tie to even), 4 (tie to even), 6 (saturated)
    [1, 10, 6, 7]
    >>> e2m1.code_to_value(codes).tolist()
    [0.5, -1.0, 4.0, 6.0]
    >>> e2m1.unpack(e2m1.pack(codes)).tolist()
    [1, 10, 6, 7]
"""

from __future__ import annotations

import torch

MAX = 6.0
SIGN_BIT = 0x8
#: The value of magnitude code 0..7.
MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)

# Rounding to the nearest magnitude is "count the decision points at or below |v|". The decision point
# between codes c and c+1 is their midpoint; a value exactly on it goes to the even code, so the test is
# `>=` where c+1 is even and `>` where c is even. Every midpoint is a short binary fraction, so the
# comparisons are exact in any float dtype and the result is exact for every input.
_MIDPOINTS = (
    (0.25, False),  # 0 | 0.5    tie -> 0   (code 0)
    (0.75, True),  # 0.5 | 1    tie -> 1   (code 2)
    (1.25, False),  # 1 | 1.5    tie -> 1   (code 2)
    (1.75, True),  # 1.5 | 2    tie -> 2   (code 4)
    (2.5, False),  # 2 | 3      tie -> 2   (code 4)
    (3.5, True),  # 3 | 4      tie -> 4   (code 6)
    (5.0, False),  # 4 | 6      tie -> 4   (code 6)
)


def round_to_code(v: torch.Tensor) -> torch.Tensor:
    """Round real values to E2M1 codes (``uint8`` in 0..15), same shape as ``v``.

    Nearest magnitude, ties to the even code (0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2,
    3.5 -> 4, 5 -> 4), saturating at 6 (so +-inf -> +-6); the sign goes to bit 3 except for values that
    round to zero, which are stored as code 0 (no negative zero). NaN also maps to code 0: E2M1 has no
    NaN, and the quantizers never produce one from finite input.

    Example:
        >>> round_to_code(torch.tensor([0.25, 0.75, -1.75, -0.1])).tolist()
        [0, 2, 12, 0]
    """
    if not v.is_floating_point():
        raise ValueError(f"e2m1.round_to_code: expected a floating tensor, got {v.dtype}")
    # fp32 holds every bf16/fp16 value exactly; fp64 stays fp64 so its comparisons stay exact too.
    a = v.abs() if v.dtype == torch.float64 else v.float().abs()
    mag = torch.zeros(v.shape, dtype=torch.uint8, device=v.device)
    for point, tie_goes_up in _MIDPOINTS:
        mag += (a >= point) if tie_goes_up else (a > point)
    negative = (v < 0) & (mag > 0)
    return mag | (negative.to(torch.uint8) << 3)


def _value_table(device: torch.device) -> torch.Tensor:
    mags = torch.tensor(MAGNITUDES, dtype=torch.float32, device=device)
    return torch.cat([mags, -mags])  # code 8 decodes to -0.0, which compares equal to 0


def code_to_value(codes: torch.Tensor) -> torch.Tensor:
    """Decode E2M1 codes (any integer dtype, values 0..15) to their fp32 values.

    Example:
        >>> code_to_value(torch.tensor([0, 3, 7, 9, 15], dtype=torch.uint8)).tolist()
        [0.0, 1.5, 6.0, -0.5, -6.0]
    """
    _check_codes("code_to_value", codes)
    return _value_table(codes.device)[codes.long()]


def _check_codes(fn: str, codes: torch.Tensor) -> None:
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise ValueError(f"e2m1.{fn}: expected an integer tensor of codes, got {codes.dtype}")
    if codes.numel() and (codes.min() < 0 or codes.max() > 15):
        raise ValueError(f"e2m1.{fn}: codes must lie in 0..15, got [{int(codes.min())}, {int(codes.max())}]")


def pack(codes: torch.Tensor) -> torch.Tensor:
    """Pack codes ``[..., K]`` (0..15) into ``uint8 [..., K/2]``, the even K in the low nibble.

    Example:
        >>> pack(torch.tensor([[1, 15, 0, 7]], dtype=torch.uint8)).tolist()      # 0xF1, 0x70
        [[241, 112]]
    """
    _check_codes("pack", codes)
    if codes.dim() == 0 or codes.shape[-1] % 2 != 0:
        raise ValueError(f"e2m1.pack: the last dimension must be even, got shape {tuple(codes.shape)}")
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack`: ``uint8 [..., K/2]`` to codes ``uint8 [..., K]``.

    Example:
        >>> unpack(torch.tensor([[241, 112]], dtype=torch.uint8)).tolist()
        [[1, 15, 0, 7]]
    """
    if packed.dtype != torch.uint8:
        raise ValueError(f"e2m1.unpack: expected uint8, got {packed.dtype}")
    if packed.dim() == 0:
        raise ValueError("e2m1.unpack: expected at least one dimension (the packed K)")
    codes = torch.stack([packed & 0xF, packed >> 4], dim=-1)
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * 2)
