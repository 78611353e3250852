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
    """Index of the nearest centroid for each row of ``x``, on x's device, chunked to bound memory.

    Distances in fp32 (``||c||^2 - 2 x.c``; the per-row ``||x||^2`` does not change the argmin): the
    sub-vectors are 4 weights, so the error of the expansion is far below any gap between distinct
    centroids that matters, and fp32 is twice the speed of fp64 on a CPU and 30x on a GPU.
    """
    xf, cf = x.float(), centroids.float()
    c2 = (cf * cf).sum(1)
    rows = max(1, chunk_elems // max(1, cf.shape[0]))
    out = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    for start in range(0, x.shape[0], rows):  # chunks of rows, each one vectorised over all centroids
        dist = torch.addmm(c2[None, :], xf[start : start + rows], cf.T, alpha=-2.0)
        out[start : start + rows] = dist.argmin(dim=1)
    return out


def _sq_dist(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``[P, B]`` squared distances as exact differences: for small batches (B x B, within a batch)."""
    return ((x[:, None, :] - c[None, :, :]) ** 2).sum(-1)


def _min_sq_dist(x: torch.Tensor, c: torch.Tensor, chunk_elems: int = 1 << 22) -> torch.Tensor:
    """Squared distance of each row of ``x`` to its nearest row of ``c``, fp32 expansion, chunked.

    The expansion ``||x||^2 + ||c||^2 - 2 x.c`` carries a rounding error of a few fp32 ulps of the
    magnitudes, so a distance under ``1e-5 (||x||^2 + ||c||^2)`` is taken as 0: the point is covered
    (it coincides with a centroid to fp32 resolution; seeding it again would waste a centroid).
    """
    xf, cf = x.float(), c.float()
    x2, c2 = (xf * xf).sum(1), (cf * cf).sum(1)
    rows = max(1, chunk_elems // max(1, cf.shape[0]))
    out = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    for start in range(0, x.shape[0], rows):
        xs = x2[start : start + rows, None]
        dist = torch.addmm(xs + c2[None, :], xf[start : start + rows], cf.T, alpha=-2.0)
        dist = torch.where(dist <= 1e-5 * (xs + c2[None, :]), torch.zeros_like(dist), dist)
        out[start : start + rows] = dist.amin(dim=1)
    return out


def _kmeans_pp(x: torch.Tensor, k: int, gen: torch.Generator, rounds: int = 8) -> torch.Tensor:
    """Batched k-means++ seeding: ``rounds`` rounds, each drawing a batch of about ``k / rounds`` points with
    probability ~ their squared distance to the centroids so far (without replacement), then updating the
    distances against the whole batch at once. No Python loop per centroid.

    Within a batch, a point that (nearly) duplicates an earlier point of the batch is dropped (its slot goes
    to the next round), so a weight made of ``k`` distinct vectors still gets all ``k`` as centroids, as with the
    sequential algorithm. When every point coincides with a centroid, the remaining slots are spares
    (random points).
    """
    P = x.shape[0]
    dev = x.device
    centroids = torch.empty(k, x.shape[1], dtype=x.dtype, device=dev)
    first = torch.randint(P, (1,), generator=gen, device=dev)
    centroids[:1] = x[first]
    d2 = _min_sq_dist(x, centroids[:1])
    filled = 1
    batch = max(1, -(-(k - 1) // rounds))
    while filled < k:
        want = min(batch, k - filled)
        positive = int((d2 > 0).sum())
        if positive == 0:  # every point is a centroid already: the rest are spares
            centroids[filled:] = x[torch.randint(P, (k - filled,), generator=gen, device=dev)]
            break
        pick = torch.multinomial(d2, min(want, positive), replacement=False, generator=gen)
        cand = x[pick]
        # drop a candidate that (nearly) duplicates an earlier one of the same batch: closer to it than a
        # millionth of its own squared distance to the centroids so far (sequential k-means++ would almost
        # never pick it after the first)
        same = (_sq_dist(cand, cand) <= 1e-6 * d2[pick][None, :]).triu(diagonal=1).any(dim=0)
        cand = cand[~same]
        centroids[filled : filled + cand.shape[0]] = cand
        filled += cand.shape[0]
        d2 = torch.minimum(d2, _min_sq_dist(x, cand))
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
    max_points_per_centroid: int = 64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Vector-quantize ``w [N, K]`` with plain k-means over its ``K/d``-long sub-vectors.

    Batched k-means++ seeding, then up to ``iters`` Lloyd iterations (stopping early once the centroids no
    longer move), fitted on at most ``max_points_per_centroid * k`` sub-vectors (a seeded random subset;
    every sub-vector is assigned at the end); deterministic for a given ``seed`` on a given device.
    Everything is vectorised torch on ``w``'s device (a GPU when the weights are there). Centroid means
    are computed in float64 and distances in fp32, so a weight built exactly from ``k`` distinct
    centroids is reconstructed exactly. Cost of a 3072 x 3072 vq3 layer (2.4 M sub-vectors, 4096 centroids):
    docs/usage.md ("Quantization time"; bench/quant_time.py measures it). The VQ4DiT calibration of the assignments lives in
    ``lowbit_engine.quant.vq``.

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

    wf = w.detach().float()  # on the weight's device: a GPU runs this 30-100x faster than 2 CPU cores
    scale = None
    if channel_scale:
        amax = wf.abs().amax(dim=1)
        scale = torch.where(amax > 0, amax, torch.ones_like(amax))
        wf = wf / scale[:, None]

    x = wf.reshape(-1, d).double()
    gen = torch.Generator(device=x.device).manual_seed(seed)
    # Fit on at most max_points_per_centroid points per centroid (faiss caps at 256; 64 keeps a 3072 x 3072
    # vq3 layer's Lloyd steps at 262k x 4096 distances): beyond that the centroids barely move and every
    # Lloyd step costs P x k distances. Every point is assigned at the end.
    fit = x
    if x.shape[0] > max_points_per_centroid * k:
        fit = x[torch.randperm(x.shape[0], generator=gen, device=x.device)[: max_points_per_centroid * k]]
    centroids = _kmeans_pp(fit, k, gen)
    for _ in range(iters):
        assign = _nearest(fit, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, assign, fit)  # means in fp64
        counts = torch.bincount(assign, minlength=k)
        used = counts > 0
        moved = centroids.clone()
        moved[used] = sums[used] / counts[used, None].double()  # an empty cluster keeps its centroid
        if torch.equal(moved, centroids):
            break
        centroids = moved

    codebook = centroids.float()
    idx = _nearest(x, codebook).reshape(N, K // d)
    return pack_indices(idx.cpu(), bits).to(w.device), codebook, scale
