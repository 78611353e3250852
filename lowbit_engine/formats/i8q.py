"""I8Q: 4-bit weights on an int8 grid: fp32 row scale x ((uint4 - zero) x uint8 group step), group 64.

The promotion-free weight layout for int8 tokens (docs/formats.md, "I8Q"; the two-level scheme of
QServe, dequantized the LiquidGEMM way). Per row n an fp32 scale ``r``; per group g of 64 k an integer
step ``s`` (uint8) and an integer zero point ``z`` (uint8, 0..15); per weight a code ``q`` in 0..15:

    w8 = (q - z) * s          an int8 (the format guarantees -128 <= w8 <= 127 for every q in 0..15)
    w  = w8 * r

The int8 ``w8`` is the GEMM's weight operand, so the whole of K accumulates exactly in int32 and the row
scale is applied once per output (no promotion). A kernel widens four codes per 32-bit register with
one ``IMAD`` (``q * s + (128 - z * s)`` stays in 0..255 per byte, so no carry crosses a byte) and one
``XOR 0x80`` (which subtracts the 128 back).

The guarantee ``(q - z) * s in [-128, 127]`` for all q means ``z * s <= 128`` and ``(15 - z) * s <= 127``;
so ``s <= 16`` (``s = 16`` needs ``z = 8``). :func:`check` tests it; every kernel assumes it.

Quantization is asymmetric min/max per group in units of ``r = amax / Q1`` (default Q1 = 119, QServe's
protective range), with ``s = ceil(range / 15)``; ``search=True`` also tries, per row, Q1 in
:data:`SEARCH_Q1` and, per group, the steps and zero points next to the min/max ones, keeping the least
squared error.

Example:
    >>> import torch
    >>> from lowbit_engine.formats import i8q
    >>> w = torch.randn(8, 128)
    >>> codes, steps, zeros, row = i8q.quantize(w)
    >>> w_hat = i8q.dequantize(i8q.pack(codes), steps, zeros, row)
    >>> bool(((w_hat - w).norm() / w.norm()) < 0.15)
    True
"""

from __future__ import annotations

import torch

GROUP_SIZE = 64
QMAX = 15          # codes are 0..15
DEFAULT_Q1 = 119.0  # row scale = amax / Q1
SEARCH_Q1 = (105.0, 112.0, 119.0, 127.0)


def _check(name: str, w: torch.Tensor) -> None:
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"i8q.{name}: expected a float [N, K] tensor, got {w.dtype} {tuple(w.shape)}")
    if w.shape[1] == 0 or w.shape[1] % GROUP_SIZE != 0:
        raise ValueError(f"i8q.{name}: K = {w.shape[1]} must be a positive multiple of {GROUP_SIZE}")


def zero_range(steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For integer steps ``s >= 1``: the zero points z that keep ``(q - z) * s`` in int8 for q in 0..15,
    as ``(z_min, z_max)`` (int64; empty where ``z_min > z_max``, i.e. ``s > 16``).

    Example:
        >>> [t.tolist() for t in zero_range(torch.tensor([1, 8, 16, 17]))]
        [[0, 0, 8, 8], [15, 15, 8, 7]]
    """
    s = steps.to(torch.int64)
    z_min = torch.clamp(QMAX - torch.div(127, s, rounding_mode="floor"), min=0)   # (15 - z) * s <= 127
    z_max = torch.clamp(torch.div(128, s, rounding_mode="floor"), max=QMAX)       # z * s <= 128
    return z_min, z_max


def _fit(v: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes for values ``v [..., 64]`` (in row-scale units) with steps/zeros ``[...]``, and the SSE."""
    sf, zf = s.unsqueeze(-1).float(), z.unsqueeze(-1).float()
    q = torch.clamp(torch.round(v / sf) + zf, 0, QMAX)
    err = ((q - zf) * sf - v).pow(2).sum(-1)
    return q, err


def _min_max_params(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain asymmetric step and zero point of each group ``v [..., 64]``."""
    lo, hi = v.amin(dim=-1), v.amax(dim=-1)
    s = torch.clamp(torch.ceil((hi - lo) / QMAX), 1, 16).to(torch.int64)
    z_min, z_max = zero_range(s)
    z = torch.round(-lo / s.float()).to(torch.int64)
    return s, torch.maximum(torch.minimum(z, z_max), z_min)


def _quantize_rows(g: torch.Tensor, q1: float, search: bool):
    """``g [rows, G, 64]`` float weights; returns (codes, steps, zeros, row scale, per-row SSE in w units)."""
    amax = g.abs().amax(dim=(-1, -2))
    row = amax / q1
    row = torch.where(row > 0, row, torch.ones_like(row))
    v = g / row[:, None, None]
    s, z = _min_max_params(v)
    q, err = _fit(v, s, z)
    if search:
        for ds in (-1, 0, 1):
            s_c = torch.clamp(s + ds, 1, 16)
            z_min, z_max = zero_range(s_c)
            lo = v.amin(dim=-1)
            z0 = torch.round(-lo / s_c.float()).to(torch.int64)
            for dz in (-1, 0, 1):
                z_c = torch.maximum(torch.minimum(z0 + dz, z_max), z_min)
                q_c, err_c = _fit(v, s_c, z_c)
                better = err_c < err
                err = torch.where(better, err_c, err)
                q = torch.where(better[..., None], q_c, q)
                s = torch.where(better, s_c, s)
                z = torch.where(better, z_c, z)
    return q, s, z, row, err.sum(-1) * row.pow(2)


def quantize(w: torch.Tensor, search: bool = False, rows_per_chunk: int = 256
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``w [N, K]``: ``(codes uint8 [N, K], steps uint8 [N, K/64], zeros uint8 [N, K/64],
    row_scale fp32 [N])``; codes are unpacked (0..15; :func:`pack` packs them).

    Example:
        >>> codes, s, z, r = quantize(torch.tensor([[-1.0, 3.0] * 32]))   # units of 3/119: -39.7 and 119
        >>> s.item(), z.item(), codes[0, :2].tolist()      # step ceil(158.7 / 15) = 11: -44 and 121 units
        (11, 4, [0, 15])
    """
    _check("quantize", w)
    wf = w.detach().float()
    if not torch.isfinite(wf).all():
        raise ValueError("i8q.quantize: weight has non-finite values")
    N, K = wf.shape
    G = K // GROUP_SIZE
    g_all = wf.reshape(N, G, GROUP_SIZE)
    codes = torch.empty(N, G, GROUP_SIZE, dtype=torch.uint8, device=w.device)
    steps = torch.empty(N, G, dtype=torch.uint8, device=w.device)
    zeros = torch.empty(N, G, dtype=torch.uint8, device=w.device)
    row_scale = torch.empty(N, dtype=torch.float32, device=w.device)
    q1s = SEARCH_Q1 if search else (DEFAULT_Q1,)
    for lo in range(0, N, rows_per_chunk):
        hi = min(N, lo + rows_per_chunk)
        best = None
        for q1 in q1s:
            cand = _quantize_rows(g_all[lo:hi], q1, search)
            if best is None:
                best = list(cand)
                continue
            better = cand[4] < best[4]
            for i in range(4):
                shape = (-1,) + (1,) * (cand[i].dim() - 1)
                best[i] = torch.where(better.reshape(shape), cand[i], best[i])
            best[4] = torch.where(better, cand[4], best[4])
        q, s, z, row, _ = best
        codes[lo:hi] = q.to(torch.uint8)
        steps[lo:hi] = s.to(torch.uint8)
        zeros[lo:hi] = z.to(torch.uint8)
        row_scale[lo:hi] = row
    return codes.reshape(N, K), steps, zeros, row_scale


def pack(codes: torch.Tensor) -> torch.Tensor:
    """Pack codes ``uint8 [..., K]`` (0..15) into ``uint8 [..., K/2]``, even k in the low nibble."""
    if codes.dtype != torch.uint8 or codes.shape[-1] % 2 != 0:
        raise ValueError(f"i8q.pack: expected uint8 codes with an even last dimension, got {codes.dtype} "
                         f"{tuple(codes.shape)}")
    if codes.numel() and int(codes.max()) > QMAX:
        raise ValueError(f"i8q.pack: codes must be 0..15, got a maximum of {int(codes.max())}")
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack`: ``uint8 [..., K/2]`` to codes ``uint8 [..., K]``."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"i8q.unpack: expected uint8, got {packed.dtype}")
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def check(steps: torch.Tensor, zeros: torch.Tensor) -> None:
    """Raise ValueError unless every group's ``(q - z) * s`` stays in int8 for q in 0..15.

    Example:
        >>> check(torch.tensor([[16]], dtype=torch.uint8), torch.tensor([[7]], dtype=torch.uint8))
        Traceback (most recent call last):
        ...
        ValueError: i8q: 1 group(s) leave the int8 range, e.g. step 16 with zero 7 (needs z*s <= 128 and (15-z)*s <= 127)
    """
    if steps.dtype != torch.uint8 or zeros.dtype != torch.uint8 or steps.shape != zeros.shape:
        raise ValueError(f"i8q: steps and zeros must be uint8 of one shape, got {steps.dtype} {tuple(steps.shape)} "
                         f"and {zeros.dtype} {tuple(zeros.shape)}")
    s, z = steps.to(torch.int64), zeros.to(torch.int64)
    bad = (z > QMAX) | (z * s > 128) | ((QMAX - z) * s > 127)
    if bool(bad.any()):
        i = int(bad.flatten().nonzero()[0])
        raise ValueError(f"i8q: {int(bad.sum())} group(s) leave the int8 range, e.g. step {int(s.flatten()[i])} "
                         f"with zero {int(z.flatten()[i])} (needs z*s <= 128 and (15-z)*s <= 127)")


def _check_tensors(fn: str, packed: torch.Tensor, steps: torch.Tensor, zeros: torch.Tensor,
                   row_scale: torch.Tensor | None) -> None:
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"i8q.{fn}: packed codes must be uint8 [N, K/2], got {packed.dtype} {tuple(packed.shape)}")
    N, K = packed.shape[0], packed.shape[1] * 2
    if K % GROUP_SIZE != 0:
        raise ValueError(f"i8q.{fn}: K = {K} must be a multiple of {GROUP_SIZE}")
    for name, t in (("steps", steps), ("zeros", zeros)):
        if t.dtype != torch.uint8 or tuple(t.shape) != (N, K // GROUP_SIZE):
            raise ValueError(f"i8q.{fn}: {name} must be uint8 [{N}, {K // GROUP_SIZE}], got {t.dtype} {tuple(t.shape)}")
    if row_scale is not None and (row_scale.dtype != torch.float32 or tuple(row_scale.shape) != (N,)):
        raise ValueError(f"i8q.{fn}: row_scale must be float32 [{N}], got {row_scale.dtype} {tuple(row_scale.shape)}")


def expand(packed: torch.Tensor, steps: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """The int8 GEMM's weight operand ``w8 = (q - z) * s``, int8 ``[N, K]`` (exact for a valid layout).

    Example:
        >>> codes, s, z, r = quantize(torch.randn(4, 64))
        >>> expand(pack(codes), s, z).dtype
        torch.int8
    """
    _check_tensors("expand", packed, steps, zeros, None)
    N, K = packed.shape[0], packed.shape[1] * 2
    q = unpack(packed).to(torch.int32).reshape(N, K // GROUP_SIZE, GROUP_SIZE)
    w8 = (q - zeros.to(torch.int32)[..., None]) * steps.to(torch.int32)[..., None]
    return w8.reshape(N, K).to(torch.int8)


def dequantize(packed: torch.Tensor, steps: torch.Tensor, zeros: torch.Tensor, row_scale: torch.Tensor) -> torch.Tensor:
    """``float(w8) * row_scale[n]``, fp32 ``[N, K]``."""
    _check_tensors("dequantize", packed, steps, zeros, row_scale)
    return expand(packed, steps, zeros).float() * row_scale.float()[:, None]
