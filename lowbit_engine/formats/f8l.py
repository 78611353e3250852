"""F8L: 4-bit weights as an fp32 row scale x an e4m3 group-64 scale x a 3-bit magnitude and a sign.

The promotion-free weight layout for fp8 tokens (docs/formats.md, "F8L"). Per (row n, group g of 64 k)
the e4m3 group scale ``gs`` defines an 8-entry table ``lut[m] = e4m3(gs * m)``, m = 0..7; a 4-bit code
(bit 3 sign, bits 0-2 magnitude) picks an entry and its sign. The table entries are the fp8 GEMM's weight
operand, so the whole of K accumulates in one fp32 accumulator and the row scale is applied once per
output: no per-group promotion in the main loop. A kernel builds the 8 table bytes per (row, group) once
and converts 4 codes with one byte permute (``prmt``) plus the sign bits.

Quantization picks, per weight, the nearest table entry (the entries are rounded, so this can differ from
rounding ``w / gs``), and with ``search=True`` also tries the neighbouring e4m3 group scales and keeps the
one of least squared error per group.

Example:
    >>> import torch
    >>> from lowbit_engine.formats import f8l
    >>> w = torch.randn(8, 128)
    >>> codes, gscales, row_scale = f8l.quantize(w)
    >>> packed = f8l.pack(codes)                                  # uint8 [8, 64]
    >>> w_hat = f8l.dequantize(packed, gscales, row_scale)        # fp32 [8, 128]
    >>> bool(((w_hat - w).norm() / w.norm()) < 0.15)
    True
"""

from __future__ import annotations

import torch

from . import fp8

GROUP_SIZE = 64
MAX_MAG = 7
# The largest group scale: 7 * 64 = 448, the largest e4m3 value, so every table entry is finite.
GS_MAX = 64.0
SIGN = 0x8
# e4m3 codes of the candidate group scales tried around the nearest one when searching.
SEARCH_OFFSETS = (-2, -1, 0, 1)


def _check(name: str, w: torch.Tensor, group_size: int) -> None:
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"f8l.{name}: expected a float [N, K] tensor, got {w.dtype} {tuple(w.shape)}")
    if w.shape[1] == 0 or w.shape[1] % group_size != 0:
        raise ValueError(f"f8l.{name}: K = {w.shape[1]} must be a positive multiple of {group_size}")


def table(gscales: torch.Tensor) -> torch.Tensor:
    """The 8 table entries of each group scale as fp32: ``e4m3(clamp(float(gs) * m, -448, 448))``, m = 0..7.

    ``gscales`` is e4m3 ``[...]``; returns fp32 ``[..., 8]``. The product is exact in fp32 (4 x 3
    significant bits); the cast rounds to nearest even, so an entry may differ from ``gs * m`` by up to
    1/16 of it. The clamp only matters for an invalid scale above 64.

    Example:
        >>> table(torch.tensor([1.125]).to(torch.float8_e4m3fn)).tolist()   # 3.375 -> 3.5, 6.75 -> 7, 7.875 -> 8
        [[0.0, 1.125, 2.25, 3.5, 4.5, 5.5, 7.0, 8.0]]
    """
    if gscales.dtype != fp8.DTYPE:
        raise ValueError(f"f8l.table: group scales must be {fp8.DTYPE}, got {gscales.dtype}")
    mags = torch.arange(MAX_MAG + 1, dtype=torch.float32, device=gscales.device)
    prod = gscales.float().unsqueeze(-1) * mags
    return torch.clamp(prod, -fp8.E4M3_MAX, fp8.E4M3_MAX).to(fp8.DTYPE).float()


def _nearest(a: torch.Tensor, lut: torch.Tensor, gs: torch.Tensor) -> torch.Tensor:
    """Index of the table entry nearest each magnitude ``a [N, G, 64]`` (``lut [N, G, 8]``, ``gs [N, G]``).

    The entries are within 1/16 of ``gs * m``, so the nearest one is within one step of
    ``round(a / gs)``: three candidates suffice. Ties go to the smaller magnitude.
    """
    safe = torch.where(gs > 0, gs, torch.ones_like(gs)).unsqueeze(-1)
    m0 = torch.clamp(torch.round(a / safe), 0, MAX_MAG).to(torch.int64)
    best = torch.zeros_like(m0)
    best_err = torch.full_like(a, float("inf"))
    for d in (-1, 0, 1):
        m = torch.clamp(m0 + d, 0, MAX_MAG)
        err = (torch.gather(lut, -1, m) - a).abs()
        better = (err < best_err) | ((err == best_err) & (m < best))
        best = torch.where(better, m, best)
        best_err = torch.where(better, err, best_err)
    return best


def _e4m3_code(x: torch.Tensor) -> torch.Tensor:
    return x.to(fp8.DTYPE).view(torch.uint8).to(torch.int64)


def _code_value(code: torch.Tensor) -> torch.Tensor:
    return code.clamp(0, 0x7E).to(torch.uint8).view(fp8.DTYPE).float()


def quantize(w: torch.Tensor, group_size: int = GROUP_SIZE, search: bool = False,
             rows_per_chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``w [N, K]`` to F8L: ``(codes uint8 [N, K], gscales e4m3 [N, K/64], row_scale fp32 [N])``.

    ``codes`` are unpacked 4-bit codes (sign in bit 3, magnitude in bits 0-2; :func:`pack` packs them).
    Row scale ``r = max_g(amax_g / 7) / 64`` (fp32; 1 for a zero row), group scale
    ``gs = e4m3(amax_g / 7 / r)`` (<= 64), and each weight takes the nearest of ``+-lut(gs)[m] * r``.
    ``search`` also tries the e4m3 values next to ``gs`` (:data:`SEARCH_OFFSETS`) and keeps, per group, the
    one with the least squared error (slower; what SVDQuant uses for the final residual).

    Example:
        >>> codes, gs, r = quantize(torch.tensor([[7.0] + [-1.0] * 63]))
        >>> int(codes[0, 0]), int(codes[0, 1]), float(gs[0, 0]), float(r[0])   # 7 = lut[7] * (1/64) ...
        (7, 9, 64.0, 0.015625)
    """
    _check("quantize", w, group_size)
    if group_size != GROUP_SIZE:
        raise ValueError(f"f8l.quantize: the group size is {GROUP_SIZE}, got {group_size}")
    wf = w.detach().float()
    if not torch.isfinite(wf).all():
        raise ValueError("f8l.quantize: weight has non-finite values")
    N, K = wf.shape
    G = K // GROUP_SIZE
    g = wf.reshape(N, G, GROUP_SIZE)
    step = g.abs().amax(dim=-1) / MAX_MAG  # ideal step per group, [N, G]
    row = step.amax(dim=-1) / GS_MAX
    row = torch.where(row > 0, row, torch.ones_like(row))
    ideal = torch.clamp(step / row[:, None], 0, GS_MAX)

    codes = torch.empty(N, G, GROUP_SIZE, dtype=torch.uint8, device=w.device)
    gscales = torch.empty(N, G, dtype=fp8.DTYPE, device=w.device)
    offsets = SEARCH_OFFSETS if search else (0,)
    gs_max_code = int(_e4m3_code(torch.tensor(GS_MAX)))
    for lo in range(0, N, rows_per_chunk):  # chunks bound the [rows, G, 64] temporaries
        hi = min(N, lo + rows_per_chunk)
        a = g[lo:hi].abs() / row[lo:hi, None, None]
        base = _e4m3_code(ideal[lo:hi])
        best_err = best_m = best_code = None
        for off in offsets:
            code = torch.clamp(base + off, 0, gs_max_code)
            gs = _code_value(code)
            lut = table(gs.to(fp8.DTYPE))  # [rows, G, 8]
            m = _nearest(a, lut, gs)
            err = (torch.gather(lut, -1, m) - a).pow(2).sum(-1)
            if best_err is None:
                best_err, best_m, best_code = err, m, code
            else:
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_m = torch.where(better[..., None], m, best_m)
                best_code = torch.where(better, code, best_code)
        neg = (g[lo:hi] < 0) & (best_m > 0)  # zero is stored as +0
        codes[lo:hi] = (best_m | (neg.to(torch.int64) << 3)).to(torch.uint8)
        gscales[lo:hi] = best_code.to(torch.uint8).view(fp8.DTYPE)
    return codes.reshape(N, K), gscales, row.contiguous()


def pack(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes ``uint8 [..., K]`` (values 0..15) into ``uint8 [..., K/2]``, even k in the low nibble."""
    if codes.dtype != torch.uint8 or codes.shape[-1] % 2 != 0:
        raise ValueError(f"f8l.pack: expected uint8 codes with an even last dimension, got {codes.dtype} "
                         f"{tuple(codes.shape)}")
    if codes.numel() and int(codes.max()) > 15:
        raise ValueError(f"f8l.pack: codes must be 4-bit (0..15), got a maximum of {int(codes.max())}")
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack`: ``uint8 [..., K/2]`` to codes ``uint8 [..., K]``."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"f8l.unpack: expected uint8, got {packed.dtype}")
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def _check_tensors(fn: str, packed: torch.Tensor, gscales: torch.Tensor, row_scale: torch.Tensor | None) -> None:
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"f8l.{fn}: packed codes must be uint8 [N, K/2], got {packed.dtype} {tuple(packed.shape)}")
    N, K = packed.shape[0], packed.shape[1] * 2
    if K % GROUP_SIZE != 0:
        raise ValueError(f"f8l.{fn}: K = {K} must be a multiple of {GROUP_SIZE}")
    if gscales.dtype != fp8.DTYPE or tuple(gscales.shape) != (N, K // GROUP_SIZE):
        raise ValueError(f"f8l.{fn}: gscales must be {fp8.DTYPE} [{N}, {K // GROUP_SIZE}], got {gscales.dtype} "
                         f"{tuple(gscales.shape)}")
    if row_scale is not None and (row_scale.dtype != torch.float32 or tuple(row_scale.shape) != (N,)):
        raise ValueError(f"f8l.{fn}: row_scale must be float32 [{N}], got {row_scale.dtype} {tuple(row_scale.shape)}")


def expand(packed: torch.Tensor, gscales: torch.Tensor) -> torch.Tensor:
    """The fp8 GEMM's weight operand: e4m3 ``[N, K]``, byte ``lut(gs)[m] XOR (sign << 7)``.

    Exact (no rounding beyond the table's own): ``float(expand(...)) * row_scale`` is :func:`dequantize`.
    A code with sign 1 and magnitude 0 gives -0 (0x80); the quantizer never writes it.

    Example:
        >>> codes, gs, r = quantize(torch.randn(4, 64))
        >>> expand(pack(codes), gs).dtype
        torch.float8_e4m3fn
    """
    _check_tensors("expand", packed, gscales, None)
    N, K = packed.shape[0], packed.shape[1] * 2
    codes = unpack(packed).to(torch.int64).reshape(N, K // GROUP_SIZE, GROUP_SIZE)
    lut = table(gscales).to(fp8.DTYPE).view(torch.uint8).to(torch.int64)  # [N, G, 8] e4m3 bytes
    mag = torch.gather(lut, -1, codes & MAX_MAG)
    byte = mag ^ ((codes >> 3) << 7)
    return byte.to(torch.uint8).reshape(N, K).view(fp8.DTYPE)


def dequantize(packed: torch.Tensor, gscales: torch.Tensor, row_scale: torch.Tensor) -> torch.Tensor:
    """``float(expand(packed, gscales)) * row_scale[n]`` (one fp32 multiply per element), fp32 ``[N, K]``."""
    _check_tensors("dequantize", packed, gscales, row_scale)
    return expand(packed, gscales).float() * row_scale.float()[:, None]


def from_int4_g64(packed: torch.Tensor, scales: torch.Tensor, search: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Convert today's ``svdq`` int4 layout (two's-complement int4, bf16 scale per 64) to F8L.

    The int4 weights are dequantized exactly and requantized (with the scale search by default): F8L's
    grid (e4m3-rounded table entries) cannot hold every int4 x bf16 value, so this is the nearest F8L
    weight, not a bit-for-bit copy. Returns ``(packed codes, gscales, row_scale)``.

    Example:
        >>> from lowbit_engine.formats import int4
        >>> q, s = int4.quantize(torch.randn(4, 128), scale_dtype=torch.bfloat16)
        >>> p, gs, r = from_int4_g64(int4.pack(q), s)
        >>> p.shape, gs.dtype, r.shape
        (torch.Size([4, 64]), torch.float8_e4m3fn, torch.Size([4]))
    """
    from . import int4

    w = int4.dequantize(int4.unpack(packed), scales)
    codes, gs, row = quantize(w, search=search)
    return pack(codes), gs, row
