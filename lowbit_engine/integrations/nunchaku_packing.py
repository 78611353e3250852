"""Nunchaku's on-disk tensor order for SVDQuant W4A4 linears, both ways (docs/formats.md, "Nunchaku").

Nunchaku stores every tensor of a W4A4 linear in the order its CUDA kernel loads it into MMA fragments,
not row-major. This module turns those tensors into plain row-major ones (``unpack_*``) and back
(``pack_*``, used by the tests to write synthetic Nunchaku-layout files). The orders follow
``NunchakuWeightPacker`` (nunchaku/lora/flux/packer.py, copied there from deepcompressor) with
``warp_n = 128``, int4 weights, group 64:

* ``qweight`` int8 ``[N, K/2]``: tiles of 128 N x 64 K, N-tile major. Inside a tile the 4-bit codes go
  ``[n_pack 8][n_lane 8][k_lane 4][n_half 2][k_half 2][8 codes]`` with
  ``n = n_pack*16 + n_half*8 + n_lane`` and ``k = k_half*32 + k_lane*8 + code``; 8 codes make one
  little-endian 32-bit word, code j in bits 4j..4j+3 (so byte j//2, low nibble for even j). Signed
  two's complement nibbles (the kernel's MMA is s4 x s4).
* ``wscales`` ``[K/64, N]`` in 16-bit floats: the shape is nominal; the data is ``[N/128][K/64][128]``
  with the 128 of a tile permuted: ``n = a*16 + b*8 + c*2 + d`` is stored at ``a*16 + c*4 + b*2 + d``.
* ``bias`` and ``smooth`` ``[N]`` / ``[K]``: the same per-128 permutation (one "group").
* ``lora_down`` (``proj_down``) stored ``[K, R]`` and ``lora_up`` (``proj_up``) ``[N, R]``: 16 x 16 fragments,
  channel-fragment major, each fragment ``[n_lane 8][k_lane 4][n_half 2][k_half 2][2]`` with
  ``row = n_half*8 + n_lane`` and ``col = k_half*8 + k_lane*2 + e``; for ``lora_down`` the fragment rows are
  rank and the columns are input channels, for ``lora_up`` rows are output channels and columns rank.

Every dimension must be a multiple of the tile: N and K of 128, R of 16 (Nunchaku pads to these).

Example:
    >>> import torch
    >>> codes = torch.randint(-8, 8, (128, 128), dtype=torch.int8)
    >>> packed = pack_weight(codes)
    >>> packed.shape, packed.dtype, torch.equal(unpack_weight(packed), codes)
    (torch.Size([128, 64]), torch.int8, True)
"""

from __future__ import annotations

import torch
from torch import Tensor

TILE_N = 128  # warp_n: output channels per weight / scale tile
TILE_K = 64   # K per weight tile (one MMA k-step of int4: 256 bits / 4)
PAD_K = 128   # Nunchaku requires K % (64 * 2 unrolls)
FRAG = 16     # low-rank fragment: 16 x 16 16-bit values


def _need(cond: bool, what: str) -> None:
    if not cond:
        raise ValueError(f"nunchaku_packing: {what}")


# ---- int4 weights ---------------------------------------------------------------------------------

# codes [N, K] viewed as (tn, p, s, ln, tk, kp, lk, r):  n = tn*128 + p*16 + s*8 + ln,  k = tk*64 + kp*32 + lk*8 + r
# stored order: (tn, tk, p, ln, lk, s, kp, r)
_W_PERM = (0, 4, 1, 3, 6, 2, 5, 7)
_W_INV = tuple(_W_PERM.index(i) for i in range(8))


def pack_weight(codes: Tensor) -> Tensor:
    """int4 codes ``[N, K]`` (any int dtype, values in [-8, 7]) -> Nunchaku ``qweight`` int8 ``[N, K/2]``."""
    _need(codes.dim() == 2 and not codes.is_floating_point(), f"codes must be an integer [N, K] tensor, "
          f"got {codes.dtype} {tuple(codes.shape)}")
    N, K = codes.shape
    _need(N % TILE_N == 0 and K % PAD_K == 0, f"weight [N={N}, K={K}]: N must be a multiple of {TILE_N} "
          f"and K of {PAD_K}")
    c = codes.to(torch.int16)
    _need(bool(((c >= -8) & (c <= 7)).all()), "int4 codes must lie in [-8, 7]")
    v = c.reshape(N // TILE_N, 8, 2, 8, K // TILE_K, 2, 4, 8).permute(_W_PERM).contiguous()
    nib = (v & 0xF).to(torch.uint8).reshape(-1, 4, 2)
    return (nib[..., 0] | (nib[..., 1] << 4)).reshape(N, K // 2).view(torch.int8)


def unpack_weight(qweight: Tensor) -> Tensor:
    """Nunchaku ``qweight`` int8 (or uint8) ``[N, K/2]`` -> int4 codes int8 ``[N, K]`` (row-major, K fastest)."""
    _need(qweight.dim() == 2 and qweight.dtype in (torch.int8, torch.uint8),
          f"qweight must be int8 [N, K/2], got {qweight.dtype} {tuple(qweight.shape)}")
    N, K = qweight.shape[0], qweight.shape[1] * 2
    _need(N % TILE_N == 0 and K % PAD_K == 0, f"qweight [N={N}, K={K}]: N must be a multiple of {TILE_N} "
          f"and K of {PAD_K}")
    b = qweight.contiguous().view(torch.uint8).to(torch.int16)
    nib = torch.stack([b & 0xF, b >> 4], dim=-1)  # low nibble first: code 2j, then 2j+1
    nib = torch.where(nib >= 8, nib - 16, nib)
    v = nib.reshape(N // TILE_N, K // TILE_K, 8, 8, 4, 2, 2, 8).permute(_W_INV)
    return v.reshape(N, K).to(torch.int8)


# ---- per-channel vectors and group scales -------------------------------------------------------------

# a tile of 128 viewed as (a 8, b 2, c 4, d 2): stored as (a, c, b, d)
def _check_scale_rows(n: int, what: str) -> None:
    _need(n % TILE_N == 0, f"{what}: the channel count {n} must be a multiple of {TILE_N}")


def pack_scales(scales: Tensor) -> Tensor:
    """Group scales ``[N, G]`` (G = K/64) -> Nunchaku ``wscales`` ``[G, N]`` (nominal shape; tile-major data)."""
    _need(scales.dim() == 2, f"scales must be [N, G], got {tuple(scales.shape)}")
    N, G = scales.shape
    _check_scale_rows(N, "scales")
    v = scales.reshape(N // TILE_N, 8, 2, 4, 2, G).permute(0, 5, 1, 3, 2, 4).contiguous()
    return v.reshape(G, N)


def unpack_scales(wscales: Tensor) -> Tensor:
    """Nunchaku ``wscales`` ``[G, N]`` -> group scales ``[N, G]``, same dtype (a pure permutation: exact)."""
    _need(wscales.dim() == 2, f"wscales must be [G, N], got {tuple(wscales.shape)}")
    G, N = wscales.shape
    _check_scale_rows(N, "wscales")
    v = wscales.contiguous().reshape(N // TILE_N, G, 8, 4, 2, 2).permute(0, 2, 4, 3, 5, 1)
    return v.reshape(N, G)


def pack_vector(v: Tensor) -> Tensor:
    """A per-channel vector (``bias [N]``, ``smooth [K]``) -> Nunchaku's order (``pack_scale`` of one group)."""
    _need(v.dim() == 1, f"expected a 1-D vector, got {tuple(v.shape)}")
    return pack_scales(v.reshape(-1, 1)).reshape(-1)


def unpack_vector(v: Tensor) -> Tensor:
    """Inverse of :func:`pack_vector`."""
    _need(v.dim() == 1, f"expected a 1-D vector, got {tuple(v.shape)}")
    return unpack_scales(v.reshape(1, -1)).reshape(-1)


# ---- low-rank factors ----------------------------------------------------------------------------

# a fragment [16 rows, 16 cols] viewed as (s 2, ln 8, kp 2, lk 4, e 2): stored as (ln, lk, s, kp, e)
_F_PERM = (0, 1, 3, 5, 2, 4, 6)
_F_INV = tuple(_F_PERM.index(i) for i in range(7))


def _frags_pack(x: Tensor) -> Tensor:
    """``[A, B, 16, 16]`` fragments -> the same fragments, each in lane order (flat)."""
    A, B = x.shape[:2]
    return x.reshape(A, B, 2, 8, 2, 4, 2).permute(_F_PERM).contiguous().reshape(A, B, FRAG, FRAG)


def _frags_unpack(x: Tensor) -> Tensor:
    A, B = x.shape[:2]
    return x.reshape(A, B, 8, 4, 2, 2, 2).permute(_F_INV).contiguous().reshape(A, B, FRAG, FRAG)


def _check_lowrank(w: Tensor, rows: int, cols: int, what: str) -> None:
    _need(w.dim() == 2, f"{what} must be 2-D, got {tuple(w.shape)}")
    _need(rows % FRAG == 0 and cols % FRAG == 0, f"{what} {tuple(w.shape)}: both sizes must be multiples of {FRAG}")


def pack_lowrank(w: Tensor, down: bool) -> Tensor:
    """A low-rank factor -> Nunchaku's ``lora_down`` / ``lora_up``.

    ``down=True``: ``w`` is ``lora_down [R, K]`` (``lora_act = x @ w.T``); the result is ``[K, R]``.
    ``down=False``: ``w`` is ``lora_up [N, R]``; the result is ``[N, R]``.
    """
    if down:
        R, K = w.shape if w.dim() == 2 else (0, 0)
        _check_lowrank(w, R, K, "lora_down [R, K]")
        frags = w.reshape(R // FRAG, FRAG, K // FRAG, FRAG).permute(2, 0, 1, 3)  # [K/16, R/16, rank, chan]
        return _frags_pack(frags).reshape(K, R)
    N, R = w.shape if w.dim() == 2 else (0, 0)
    _check_lowrank(w, N, R, "lora_up [N, R]")
    frags = w.reshape(N // FRAG, FRAG, R // FRAG, FRAG).permute(0, 2, 1, 3)  # [N/16, R/16, chan, rank]
    return _frags_pack(frags).reshape(N, R)


def unpack_lowrank(w: Tensor, down: bool) -> Tensor:
    """Inverse of :func:`pack_lowrank`: ``[K, R]`` -> ``lora_down [R, K]`` (down), ``[N, R]`` -> ``lora_up``."""
    C, R = w.shape if w.dim() == 2 else (0, 0)
    _check_lowrank(w, C, R, "packed low-rank factor [C, R]")
    frags = _frags_unpack(w.contiguous().reshape(C // FRAG, R // FRAG, FRAG, FRAG))
    if down:  # frags [K/16, R/16, rank, chan]
        return frags.permute(1, 2, 0, 3).reshape(R, C)
    return frags.permute(0, 2, 1, 3).reshape(C, R)


# ---- a whole W4A4 linear -------------------------------------------------------------------------


def _pad_to(t: Tensor, dims: dict[int, int], value: float = 0) -> Tensor:
    """``t`` padded at the end of each ``dim`` to a multiple of ``dims[dim]`` with ``value``."""
    for d, m in dims.items():
        extra = -t.shape[d] % m
        if extra:
            shape = list(t.shape)
            shape[d] = extra
            t = torch.cat([t, t.new_full(shape, value)], dim=d)
    return t


def pack_linear(codes: Tensor, scales: Tensor, smooth: Tensor, lora_down: Tensor, lora_up: Tensor,
                bias: Tensor | None = None) -> dict[str, Tensor]:
    """The tensors of one Nunchaku W4A4 linear (names of its C++ loader) from row-major parts.

    ``codes [N, K]`` int4 values, ``scales [N, K/64]``, ``smooth [K]``, ``lora_down [R, K]``,
    ``lora_up [N, R]``, ``bias [N]``: 16-bit floats. Padded the way deepcompressor's converter pads: N and
    K to 128 (codes 0, scales and smooth 1, bias 0), R to 16 (zeros). Written for tests and tools that
    need a file in Nunchaku's layout.

    Example:
        >>> N, K, R = 128, 128, 16
        >>> t = pack_linear(torch.zeros(N, K, dtype=torch.int8), torch.ones(N, K // 64, dtype=torch.bfloat16),
        ...                 torch.ones(K, dtype=torch.bfloat16), torch.zeros(R, K, dtype=torch.bfloat16),
        ...                 torch.zeros(N, R, dtype=torch.bfloat16))
        >>> {k: tuple(v.shape) for k, v in t.items()}
        {'qweight': (128, 64), 'wscales': (2, 128), 'smooth': (128,), 'lora_down': (128, 16), 'lora_up': (128, 16)}
    """
    codes = _pad_to(codes, {0: TILE_N, 1: PAD_K})
    out = {
        "qweight": pack_weight(codes),
        "wscales": pack_scales(_pad_to(scales, {0: TILE_N, 1: PAD_K // 64}, 1)),
        "smooth": pack_vector(_pad_to(smooth, {0: PAD_K}, 1)),
        "lora_down": pack_lowrank(_pad_to(lora_down, {0: FRAG, 1: PAD_K}), down=True),
        "lora_up": pack_lowrank(_pad_to(lora_up, {0: TILE_N, 1: FRAG}), down=False),
    }
    if bias is not None:
        out["bias"] = pack_vector(_pad_to(bias, {0: TILE_N}))
    return out


__all__ = ["pack_weight", "unpack_weight", "pack_scales", "unpack_scales", "pack_vector", "unpack_vector",
           "pack_lowrank", "unpack_lowrank", "pack_linear", "TILE_N", "TILE_K", "PAD_K", "FRAG"]
