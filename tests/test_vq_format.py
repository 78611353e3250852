"""The vq format in torch (lowbit_engine.formats.vq): index packing, dequantization and k-means quantize."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit_engine.formats import vq


@st.composite
def index_rows(draw):
    """(indices int64 [N, n], index_bits) with any n >= 1, odd counts included."""
    bits = draw(st.sampled_from(vq.INDEX_BITS))
    N = draw(st.integers(1, 5))
    n = draw(st.integers(1, 41))
    flat = draw(st.lists(st.integers(0, (1 << bits) - 1), min_size=N * n, max_size=N * n))
    return torch.tensor(flat, dtype=torch.int64).reshape(N, n), bits


@settings(max_examples=150, deadline=None)
@given(index_rows())
def test_pack_unpack_round_trip(case):
    idx, bits = case
    N, n = idx.shape
    codes = vq.pack_indices(idx, bits)
    assert codes.dtype == torch.uint8
    assert codes.shape == (N, vq.packed_row_bytes(n, bits))
    assert codes.shape[1] == (n if bits == 8 else 3 * ((n + 1) // 2))
    assert torch.equal(vq.unpack_indices(codes, n, bits), idx)
    if bits == 12 and n % 2:  # the missing last partner is stored as 0
        assert int(codes[:, -1].max()) == 0 and int((codes[:, -2] >> 4).max()) == 0


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 4095), st.integers(0, 4095))
def test_12bit_layout_bytes(i0, i1):
    """The byte formulas of docs/formats.md, written out independently."""
    codes = vq.pack_indices(torch.tensor([[i0, i1]]), 12)
    assert codes[0].tolist() == [i0 & 0xFF, (i0 >> 8) | ((i1 & 0xF) << 4), i1 >> 4]


def test_known_12bit_row():
    # 0xABC, 0x123, 0xFFF (odd count: partner 0) -> BC 3A 12 | FF 0F 00
    codes = vq.pack_indices(torch.tensor([[0xABC, 0x123, 0xFFF]]), 12)
    assert codes[0].tolist() == [0xBC, 0x3A, 0x12, 0xFF, 0x0F, 0x00]
    assert vq.unpack_indices(codes, 3, 12).tolist() == [[0xABC, 0x123, 0xFFF]]


def test_packing_errors():
    with pytest.raises(ValueError, match="index_bits must be 8 or 12"):
        vq.pack_indices(torch.zeros(1, 4, dtype=torch.int64), 10)
    with pytest.raises(ValueError, match=r"indices must be in \[0, 255\]"):
        vq.pack_indices(torch.tensor([[256]]), 8)
    with pytest.raises(ValueError, match=r"indices must be in \[0, 4095\]"):
        vq.pack_indices(torch.tensor([[-1]]), 12)
    with pytest.raises(ValueError, match="take 6 bytes per row, got 4"):
        vq.unpack_indices(torch.zeros(1, 4, dtype=torch.uint8), 3, 12)


def test_named_formats():
    assert vq.FORMATS["vq2"] == vq.VQSpec(k=256, d=4, index_bits=8)
    assert vq.FORMATS["vq3"] == vq.VQSpec(k=4096, d=4, index_bits=12)
    assert [vq.FORMATS[f].bits_per_weight for f in ("vq2", "vq3")] == [2.0, 3.0]
    assert (vq.index_bits_for(256), vq.index_bits_for(257), vq.index_bits_for(4096)) == (8, 12, 12)
    with pytest.raises(ValueError, match="k must be in"):
        vq.index_bits_for(4097)


@pytest.mark.parametrize("bits", vq.INDEX_BITS)
@pytest.mark.parametrize("cb_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_is_the_gather(bits, cb_dtype):
    gen = torch.Generator().manual_seed(7)
    N, K, k, d = 5, 36, 200, 4  # 9 indices per row: odd, for the 12-bit layout
    codebook = torch.randn(k, d, generator=gen).to(cb_dtype)
    idx = torch.randint(k, (N, K // d), generator=gen)
    scale = torch.rand(N, generator=gen) + 0.5
    codes = vq.pack_indices(idx, bits)
    w = vq.dequantize(codes, codebook, N, K, bits)
    s = vq.dequantize(codes, codebook, N, K, bits, scale, out_dtype=torch.bfloat16)
    for n in range(N):
        for j in range(K // d):
            block = codebook[idx[n, j]].float()
            assert torch.equal(w[n, j * d : (j + 1) * d], block)
            assert torch.equal(s[n, j * d : (j + 1) * d], (block * scale[n]).to(torch.bfloat16))
    with pytest.raises(ValueError, match="is not below k=100"):
        vq.dequantize(codes, codebook[:100], N, K, bits)


def _exact_weight(N, K, k, d, gen):
    """A weight built from k distinct centroids, each used at least once."""
    codebook = torch.randn(k, d, generator=gen)
    n = N * K // d
    assert n >= k
    idx = torch.cat([torch.arange(k), torch.randint(k, (n - k,), generator=gen)])
    idx = idx[torch.randperm(n, generator=gen)].reshape(N, K // d)
    return codebook[idx].reshape(N, K), idx


@pytest.mark.parametrize("name,N,K", [("vq2", 32, 64), ("vq3", 128, 160)])
def test_quantize_reconstructs_codebook_weight(name, N, K):
    spec = vq.FORMATS[name]
    w, _ = _exact_weight(N, K, spec.k, spec.d, torch.Generator().manual_seed(3))
    codes, codebook, scale = vq.quantize(w, spec.k, spec.d, iters=3, seed=0)
    assert scale is None and codebook.shape == (spec.k, spec.d) and codebook.dtype == torch.float32
    assert codes.shape == (N, vq.packed_row_bytes(K // spec.d, spec.index_bits))
    assert torch.equal(vq.dequantize(codes, codebook, N, K, spec.index_bits), w)


def test_quantize_with_channel_scale():
    gen = torch.Generator().manual_seed(5)
    N, K, k, d = 24, 64, 64, 4
    base, idx = _exact_weight(N, K, k, d, gen)
    # Every row holds the centroid with the largest |value|, so each row's absmax is scale[n] times
    # the same number and the normalized rows share one codebook (up to fp32 rounding).
    top = int(base.abs().reshape(-1, d).amax(dim=1).argmax())
    row_top = base.reshape(-1, d)[top]
    base.reshape(N, K // d, d)[:, 0] = row_top
    s_true = torch.rand(N, generator=gen) * 4 + 0.25
    w = base * s_true[:, None]
    codes, codebook, scale = vq.quantize(w, k, d, iters=5, seed=1, channel_scale=True)
    assert scale is not None and scale.shape == (N,) and scale.dtype == torch.float32
    w_hat = vq.dequantize(codes, codebook, N, K, 8, scale)
    assert float((w_hat - w).norm() / w.norm()) < 1e-6


def test_quantize_is_deterministic_and_lloyd_helps():
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(11))
    a = vq.quantize(w, 64, 4, iters=6, seed=4)
    b = vq.quantize(w, 64, 4, iters=6, seed=4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    err = {}
    for iters in (0, 6):
        codes, codebook, _ = vq.quantize(w, 64, 4, iters=iters, seed=4)
        err[iters] = float((vq.dequantize(codes, codebook, 48, 128, 8) - w).norm() / w.norm())
    assert err[6] <= err[0]
    assert err[6] < 0.5  # 64 centroids for 4-d Gaussian sub-vectors: a coarse but real fit


def test_quantize_errors():
    with pytest.raises(ValueError, match="multiple of d=4"):
        vq.quantize(torch.randn(4, 30), 16, 4)
    with pytest.raises(ValueError, match="does not fit 8-bit indices"):
        vq.quantize(torch.randn(4, 32), 300, 4, index_bits=8)


def test_quantize_fits_on_a_subset_of_large_layers_and_assigns_every_subvector():
    # 65536 sub-vectors for 64 centroids: at 64 points per centroid the Lloyd steps see 4096 of them
    w = torch.randn(512, 512, generator=torch.Generator().manual_seed(2))
    sub = vq.quantize(w, 64, 4, iters=8, seed=0)
    full = vq.quantize(w, 64, 4, iters=8, seed=0, max_points_per_centroid=10**9)
    err = {n: float((vq.dequantize(c, cb, 512, 512, 8) - w).norm() / w.norm())
           for n, (c, cb, _) in (("sub", sub), ("full", full))}
    assert err["sub"] <= 1.03 * err["full"], err      # the subset fit loses (almost) nothing
    assert len(torch.unique(vq.unpack_indices(sub[0], 128, 8))) == 64   # every centroid in use


def test_batched_seeding_gives_k_distinct_centroids():
    x = torch.randn(5000, 4, generator=torch.Generator().manual_seed(1)).double()
    c = vq._kmeans_pp(x, 300, torch.Generator().manual_seed(0))
    assert c.shape == (300, 4) and len(torch.unique(c, dim=0)) == 300
    # every centroid is a data point (k-means++ draws points, never averages)
    assert bool((torch.cdist(c, x).amin(dim=1) == 0).all())
