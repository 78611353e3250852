"""vq: vector quantization of weights with a per-layer codebook (formats ``vq2`` and ``vq3``, VQ4DiT).

Layout and exact math: docs/formats.md ("vq"). Each weight row ``[K]`` is cut into ``K/d`` sub-vectors
along K; each is stored as the index of one of the ``k`` centroids of the layer's ``codebook [k, d]``,
optionally times a per-output-channel fp32 scale::

    W[n, j*d + t] = codebook[idx[n, j], t] * (channel_scale[n] if present else 1)

Indices are packed per row: one byte each (8-bit, k <= 256) or two per three bytes (12-bit, k <= 4096).

Example:
    >>> import torch
    >>> from lowbit_engine.formats import vq
    >>> w = torch.randn(16, 64)
    >>> codes, codebook, scale = vq.quantize(w, k=256, d=4, iters=5, seed=0)
    >>> codes.shape, codebook.shape, scale
    (torch.Size([16, 16]), torch.Size([256, 4]), None)
    >>> w_hat = vq.dequantize(codes, codebook, 16, 64, index_bits=8)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

INDEX_BITS = (8, 12)


@dataclass(frozen=True)
class VQSpec:
    """A named vq format: ``k`` centroids of ``d`` weights, indices packed in ``index_bits`` bits."""

    k: int
    d: int
    index_bits: int

    @property
    def bits_per_weight(self) -> float:
        return self.index_bits / self.d


FORMATS: dict[str, VQSpec] = {
    "vq2": VQSpec(k=256, d=4, index_bits=8),  # 2 bits per weight
    "vq3": VQSpec(k=4096, d=4, index_bits=12),  # 3 bits per weight
}


def index_bits_for(k: int) -> int:
    """The narrowest index packing that holds ``k`` centroids: 8 (k <= 256) or 12 (k <= 4096)."""
    if 1 <= k <= 256:
        return 8
    if 256 < k <= 4096:
        return 12
    raise ValueError(f"vq: k must be in [1, 4096] (8- or 12-bit indices), got {k}")


def _check_bits(index_bits: int) -> None:
    if index_bits not in INDEX_BITS:
        raise ValueError(f"vq: index_bits must be 8 or 12, got {index_bits}")


def packed_row_bytes(n: int, index_bits: int) -> int:
    """Bytes of one packed row of ``n`` indices: ``n`` (8-bit) or ``3 * ceil(n / 2)`` (12-bit)."""
    _check_bits(index_bits)
    return n if index_bits == 8 else 3 * ((n + 1) // 2)


def pack_indices(idx: torch.Tensor, index_bits: int) -> torch.Tensor:
    """Pack indices ``[N, n]`` (any integer dtype) into ``uint8 [N, packed_row_bytes(n)]``.

    12-bit indices go in pairs ``(i0, i1)``, a missing last partner being 0:
    ``b0 = i0 & 0xFF``, ``b1 = (i0 >> 8) | ((i1 & 0xF) << 4)``, ``b2 = i1 >> 4``.

    Example:
        >>> pack_indices(torch.tensor([[0xABC, 0x123]]), 12).tolist()
        [[188, 58, 18]]
    """
    _check_bits(index_bits)
    if idx.dim() != 2:
        raise ValueError(f"vq.pack_indices: expected a 2-d [N, n] tensor, got shape {tuple(idx.shape)}")
    if idx.dtype.is_floating_point or idx.dtype == torch.bool:
        raise ValueError(f"vq.pack_indices: expected an integer tensor, got {idx.dtype}")
    v = idx.to(torch.int64)
    if v.numel() and (int(v.min()) < 0 or int(v.max()) >= (1 << index_bits)):
        raise ValueError(
            f"vq.pack_indices: indices must be in [0, {(1 << index_bits) - 1}] for {index_bits}-bit packing, "
            f"got range [{int(v.min())}, {int(v.max())}]"
        )
    if index_bits == 8:
        return v.to(torch.uint8)
    N, n = v.shape
    if n % 2:
        v = torch.cat([v, v.new_zeros(N, 1)], dim=1)
    i0, i1 = v[:, 0::2], v[:, 1::2]
    b = torch.stack([i0 & 0xFF, (i0 >> 8) | ((i1 & 0xF) << 4), i1 >> 4], dim=-1)
    return b.reshape(N, -1).to(torch.uint8)


def unpack_indices(codes: torch.Tensor, n: int, index_bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_indices`: ``uint8 [N, packed_row_bytes(n)]`` to ``int64 [N, n]``."""
    _check_bits(index_bits)
    if codes.dtype != torch.uint8 or codes.dim() != 2:
        raise ValueError(
            f"vq.unpack_indices: expected a 2-d uint8 tensor, got {codes.dtype} of shape {tuple(codes.shape)}"
        )
    want = packed_row_bytes(n, index_bits)
    if codes.shape[1] != want:
        raise ValueError(
            f"vq.unpack_indices: {n} indices of {index_bits} bits take {want} bytes per row, got {codes.shape[1]}"
        )
    c = codes.to(torch.int64)
    if index_bits == 8:
        return c
    c = c.reshape(codes.shape[0], -1, 3)
    i0 = c[..., 0] | ((c[..., 1] & 0xF) << 8)
    i1 = (c[..., 1] >> 4) | (c[..., 2] << 4)
    return torch.stack([i0, i1], dim=-1).reshape(codes.shape[0], -1)[:, :n]


def dequantize(
    codes: torch.Tensor,
    codebook: torch.Tensor,
    N: int,
    K: int,
    index_bits: int,
    channel_scale: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Decode packed indices into the dense weight ``[N, K]`` (fp32 math, rounded once to ``out_dtype``).

    ``codebook [k, d]`` (fp32, bf16 or fp16); ``channel_scale`` fp32 ``[N]`` or None. The centroid value
    is multiplied by the channel scale in fp32, exactly as the C++ and GPU kernels do.

    Example:
        >>> cb = torch.arange(8.0).reshape(2, 4)
        >>> dequantize(pack_indices(torch.tensor([[1, 0]]), 8), cb, 1, 8, 8).tolist()
        [[4.0, 5.0, 6.0, 7.0, 0.0, 1.0, 2.0, 3.0]]
    """
    if codebook.dim() != 2:
        raise ValueError(f"vq.dequantize: codebook must be [k, d], got shape {tuple(codebook.shape)}")
    k, d = codebook.shape
    if k > (1 << index_bits):
        raise ValueError(f"vq.dequantize: k={k} centroids do not fit {index_bits}-bit indices")
    if K % d != 0:
        raise ValueError(f"vq.dequantize: K={K} must be a multiple of d={d}")
    if codes.shape[0] != N:
        raise ValueError(f"vq.dequantize: codes has {codes.shape[0]} rows, expected N={N}")
    idx = unpack_indices(codes, K // d, index_bits)
    if idx.numel() and int(idx.max()) >= k:
        raise ValueError(f"vq.dequantize: index {int(idx.max())} is not below k={k}")
    w = codebook.float()[idx].reshape(N, K)
    if channel_scale is not None:
        if channel_scale.shape != (N,):
            raise ValueError(f"vq.dequantize: channel_scale must be [N={N}], got {tuple(channel_scale.shape)}")
        w = w * channel_scale.float()[:, None]
    return w.to(out_dtype)


# ---- calibration-free k-means ----------------------------------------------------------------


def _nearest(x: torch.Tensor, centroids: torch.Tensor, chunk_elems: int = 1 << 22) -> torch.Tensor:
    """Index of the nearest centroid for each row of ``x`` (float64, chunked to bound memory)."""
    c2 = (centroids * centroids).sum(1)
    rows = max(1, chunk_elems // max(1, centroids.shape[0]))
    out = torch.empty(x.shape[0], dtype=torch.int64)
    for start in range(0, x.shape[0], rows):
        xc = x[start : start + rows]
        # ||x - c||^2 up to the per-row constant ||x||^2, which does not change the argmin.
        dist = c2[None, :] - 2.0 * (xc @ centroids.T)
        out[start : start + rows] = dist.argmin(dim=1)
    return out


def _kmeans_pp(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: each new centroid is a data point drawn with probability ~ squared distance."""
    P = x.shape[0]
    centroids = torch.empty(k, x.shape[1], dtype=x.dtype)
    pick = int(torch.randint(P, (1,), generator=gen))
    centroids[0] = x[pick]
    d2 = ((x - x[pick]) ** 2).sum(1)
    for i in range(1, k):
        if float(d2.sum()) > 0:
            pick = int(torch.multinomial(d2, 1, generator=gen))
        else:  # every point already coincides with a centroid: the rest are spares
            pick = int(torch.randint(P, (1,), generator=gen))
        centroids[i] = x[pick]
        d2 = torch.minimum(d2, ((x - x[pick]) ** 2).sum(1))
    return centroids


def quantize(
    w: torch.Tensor,
    k: int,
    d: int,
    iters: int = 10,
    seed: int = 0,
    *,
    index_bits: int | None = None,
    channel_scale: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Vector-quantize ``w [N, K]`` with plain k-means over its ``K/d``-long sub-vectors.

    k-means++ seeding, then up to ``iters`` Lloyd iterations (stopping early once the centroids no
    longer move); deterministic for a given ``seed``. Distances and centroid means are computed in
    float64, so a weight built exactly from ``k`` distinct centroids is reconstructed exactly.
    This is the calibration-free baseline for small layers on the CPU: the full VQ4DiT calibration
    (candidate assignments refined on calibration data) is a later issue and lives in
    ``lowbit_engine.quant``.

    ``channel_scale=True`` first divides each row by its absolute maximum (fp32 ``[N]``, 1 for a zero
    row) so that all rows share one codebook on equal terms, and returns that scale.

    Returns ``(codes uint8 [N, packed_row_bytes], codebook fp32 [k, d], channel_scale fp32 [N] | None)``.

    Example:
        >>> spec = FORMATS["vq2"]
        >>> codes, cb, _ = quantize(torch.randn(8, 32), spec.k, spec.d, iters=3)
        >>> cb.shape
        torch.Size([256, 4])
    """
    if w.dim() != 2:
        raise ValueError(f"vq.quantize: expected a 2-d weight [N, K], got shape {tuple(w.shape)}")
    N, K = w.shape
    if d < 1 or K % d != 0:
        raise ValueError(f"vq.quantize: K={K} must be a positive multiple of d={d}")
    bits = index_bits_for(k) if index_bits is None else index_bits
    _check_bits(bits)
    if k < 1 or k > (1 << bits):
        raise ValueError(f"vq.quantize: k={k} does not fit {bits}-bit indices")

    wf = w.detach().float().cpu()
    scale = None
    if channel_scale:
        amax = wf.abs().amax(dim=1)
        scale = torch.where(amax > 0, amax, torch.ones_like(amax))
        wf = wf / scale[:, None]

    x = wf.reshape(-1, d).double()
    gen = torch.Generator().manual_seed(seed)
    centroids = _kmeans_pp(x, k, gen)
    for _ in range(iters):
        assign = _nearest(x, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k)
        used = counts > 0
        moved = centroids.clone()
        moved[used] = sums[used] / counts[used, None].double()  # an empty cluster keeps its centroid
        if torch.equal(moved, centroids):
            break
        centroids = moved

    codebook = centroids.float()
    idx = _nearest(x, codebook.double()).reshape(N, K // d)
    return pack_indices(idx, bits), codebook, scale
