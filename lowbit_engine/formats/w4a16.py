"""W4A16: weight-only 4-bit, asymmetric, group 64 along K (AWQ-style): the format of the adaLN linears.

Layout (docs/formats.md, "w4a16"), a weight ``w [N, K]`` with K % 64 == 0:

- ``qweight uint8 [N, K/2]``: codes q in 0..15, two per byte, even k in the low nibble;
- ``scales bf16 [N, K/64]``: the step s of each group (> 0);
- ``zeros uint8 [N, K/64]``: the integer zero point z of each group, 0..15.

``w[n, k] = (q - z) * float(s)``. The zero point is an *integer* (AWQ's choice, not a bf16 value) because
then ``q - z`` is an integer in [-15, 15]: exact in bf16, so a kernel multiplies 16-bit activations with it
on the tensor cores without rounding, and the scale is applied once per group. The dequantized weight is
exact in fp32 too (4 x 8 significant bits).

Quantization: per group, the range ``[min(w, 0), max(w, 0)]`` (0 is always representable, so a zero
weight stays 0) is cut into 15 steps, ``s = bf16(ratio * range / 15)``, ``z = clamp(round(-min / s), 0,
15)``, ``q = clamp(round(w / s) + z, 0, 15)`` with the rounded s. ``search=True`` (the default) tries the
range ratios ``SEARCH_RATIOS`` (clipping the range, as AWQ's clip search does) and keeps, per group, the
one of least squared error.

Why not F8L's layout for these layers: measured on the synthetic layers of bench/fidelity.py
(``--w4a16``), this layout is 2.6 dB above weight-only F8L (18.2 vs 15.5 dB, docs/fidelity.md); its bytes are
4.375 bits per weight against F8L's 4.125.

Example:
    >>> import torch
    >>> from lowbit_engine.formats import w4a16
    >>> w = torch.randn(8, 128)
    >>> q, s, z = w4a16.quantize(w)
    >>> packed = w4a16.pack(q)                               # uint8 [8, 64]
    >>> w_hat = w4a16.dequantize(packed, s, z)               # fp32 [8, 128]
    >>> bool(((w_hat - w).norm() / w.norm()) < 0.12)
    True
"""

from __future__ import annotations

import torch
from torch import Tensor

GROUP_SIZE = 64
QMAX = 15
# Range ratios tried per group by the search (1.0 = plain min-max); a smaller ratio clips the extremes
# and rounds the bulk more finely. Five points: beyond 0.8 nothing was gained on the synthetic layers.
SEARCH_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8)


def _check(name: str, w: Tensor) -> None:
    if not isinstance(w, Tensor) or w.dim() != 2 or not w.is_floating_point():
        got = f"{w.dtype} {tuple(w.shape)}" if isinstance(w, Tensor) else type(w).__name__
        raise ValueError(f"w4a16.{name}: expected a float [N, K] tensor, got {got}")
    if w.shape[1] == 0 or w.shape[1] % GROUP_SIZE != 0:
        raise ValueError(f"w4a16.{name}: K = {w.shape[1]} must be a positive multiple of {GROUP_SIZE}")


def _round_scale(step: Tensor) -> Tensor:
    """bf16 step, never 0 (a zero group gets 1: its codes are then all z = 0)."""
    s = step.to(torch.bfloat16)
    return torch.where(s > 0, s, torch.ones_like(s))


def _codes(wg: Tensor, lo: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """Zero points ``[N, G]`` and codes ``[N, G, 64]`` of groups ``wg`` for steps ``s`` (bf16) and minima ``lo``."""
    sf = s.float()
    z = torch.clamp(torch.round(-lo / sf), 0, QMAX)
    q = torch.clamp(torch.round(wg / sf.unsqueeze(-1)) + z.unsqueeze(-1), 0, QMAX)
    return z, q


def quantize(w: Tensor, search: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """``(q uint8 [N, K], scales bf16 [N, K/64], zeros uint8 [N, K/64])`` of ``w`` (any float dtype).

    Runs on ``w``'s device, vectorised over all groups (and search ratios). Raises ValueError for a
    non-finite weight or a K that is not a multiple of 64.

    Example:
        >>> q, s, z = quantize(torch.tensor([[0.0] * 63 + [1.5]]), search=False)
        >>> float(s[0, 0]), int(z[0, 0]), int(q[0, -1]), int(q[0, 0])
        (0.10009765625, 0, 15, 0)
    """
    _check("quantize", w)
    wf = w.detach().float()
    if not torch.isfinite(wf).all():
        raise ValueError("w4a16.quantize: the weight holds NaN or inf")
    N, K = wf.shape
    wg = wf.reshape(N, K // GROUP_SIZE, GROUP_SIZE)
    lo = wg.amin(-1).clamp(max=0.0)
    hi = wg.amax(-1).clamp(min=0.0)
    ratios = SEARCH_RATIOS if search else (1.0,)
    best = None
    for r in ratios:  # a handful of ratios, each one vectorised over the whole weight
        s = _round_scale((hi - lo) * r / QMAX)
        z, q = _codes(wg, lo * r, s)
        err = ((q - z.unsqueeze(-1)) * s.float().unsqueeze(-1) - wg).square().sum(-1)
        if best is None:
            best = [err, s, z, q]
            continue
        take = err < best[0]
        best[0] = torch.where(take, err, best[0])
        best[1] = torch.where(take, s, best[1])
        best[2] = torch.where(take, z, best[2])
        best[3] = torch.where(take.unsqueeze(-1), q, best[3])
    _, s, z, q = best
    return q.reshape(N, K).to(torch.uint8), s.contiguous(), z.to(torch.uint8).contiguous()


def pack(q: Tensor) -> Tensor:
    """Codes ``uint8 [N, K]`` (0..15) -> ``uint8 [N, K/2]``, even k in the low nibble."""
    if q.dtype != torch.uint8 or q.dim() != 2 or q.shape[1] % 2:
        raise ValueError(f"w4a16.pack: expected uint8 [N, K] codes with K even, got {q.dtype} {tuple(q.shape)}")
    if q.numel() and int(q.max()) > QMAX:
        raise ValueError(f"w4a16.pack: codes must be in 0..{QMAX}, got max {int(q.max())}")
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack(packed: Tensor) -> Tensor:
    """``uint8 [N, K/2]`` -> codes ``uint8 [N, K]``."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"w4a16.unpack: expected uint8 [N, K/2], got {packed.dtype} {tuple(packed.shape)}")
    return torch.stack((packed & 15, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


def check(packed: Tensor, scales: Tensor, zeros: Tensor) -> None:
    """ValueError unless the three tensors are a valid w4a16 weight: shapes, dtypes, zeros <= 15,
    finite positive scales (checkpoints call this after loading)."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"w4a16.check: qweight must be uint8 [N, K/2], got {packed.dtype} {tuple(packed.shape)}")
    N, K = packed.shape[0], packed.shape[1] * 2
    if K % GROUP_SIZE:
        raise ValueError(f"w4a16.check: K = {K} must be a multiple of {GROUP_SIZE}")
    G = K // GROUP_SIZE
    if scales.dtype != torch.bfloat16 or tuple(scales.shape) != (N, G):
        raise ValueError(f"w4a16.check: scales must be bfloat16 [{N}, {G}], got {scales.dtype} {tuple(scales.shape)}")
    if zeros.dtype != torch.uint8 or tuple(zeros.shape) != (N, G):
        raise ValueError(f"w4a16.check: zeros must be uint8 [{N}, {G}], got {zeros.dtype} {tuple(zeros.shape)}")
    if zeros.numel() and int(zeros.max()) > QMAX:
        raise ValueError(f"w4a16.check: zero points must be in 0..{QMAX}, got max {int(zeros.max())}")
    sf = scales.float()
    if not (torch.isfinite(sf).all() and (sf > 0).all()):
        raise ValueError("w4a16.check: scales must be finite and positive")


def dequantize(packed: Tensor, scales: Tensor, zeros: Tensor) -> Tensor:
    """fp32 ``[N, K]``: ``(q - z) * float(s)`` (exact in fp32)."""
    q = unpack(packed).float()
    N, K = q.shape
    qg = q.reshape(N, K // GROUP_SIZE, GROUP_SIZE)
    return ((qg - zeros.float().unsqueeze(-1)) * scales.float().unsqueeze(-1)).reshape(N, K)


def matmul(x: Tensor, packed: Tensor, scales: Tensor, zeros: Tensor, bias: Tensor | None = None,
           out_dtype: torch.dtype | None = None) -> Tensor:
    """Reference layer: ``x [M, K]`` (16-bit) times the dequantized weight in fp32, + bias, rounded to
    ``out_dtype`` (x's dtype by default). The contract of ``lowbit::w4a16_linear``."""
    acc = x.float() @ dequantize(packed, scales, zeros).t()
    if bias is not None:
        acc = acc + bias.float()
    return acc.to(x.dtype if out_dtype is None else out_dtype)


__all__ = ["GROUP_SIZE", "SEARCH_RATIOS", "quantize", "pack", "unpack", "check", "dequantize", "matmul"]
