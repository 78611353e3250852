"""VQ4DiT quantizer (lowbit_engine/quant/vq.py): k-means plus candidate-assignment calibration.

Layers are small (<= 128 x 256) so the whole file runs in a few seconds on 2 CPU cores. "Output MSE" is
``mean((X W^T - X W_hat^T)^2)``; the calibration-data tests measure it on *held-out* rows drawn from the
same distribution as the calibration rows, so a lower number is not just a fit to the calibration set.
"""

from __future__ import annotations

import pytest
import torch

from lowbit_engine.formats import vq as vqf
from lowbit_engine.quant.vq import sqnr_db, vq_quantize

FAST = dict(kmeans_iters=4, iters=120)


def _layer(gen, N=64, K=128):
    """A weight and anisotropic activations (per-channel scales spread like real DiT inputs): the
    nearest centroid in weight space is then not the best one for the output."""
    w = torch.randn(N, K, generator=gen) * 0.02
    ch = torch.exp(torch.randn(K, generator=gen))
    calib = torch.randn(512, K, generator=gen) * ch
    held_out = torch.randn(512, K, generator=gen) * ch
    return w, calib, held_out


def _out_mse(x, w, w_hat):
    return (x @ w.T - x @ w_hat.T).pow(2).mean().item()


def test_calibration_lowers_output_mse_vs_kmeans(gen):
    w, calib, held = _layer(gen)
    N, K = w.shape
    km = vq_quantize(w, "vq2", calib, calibrate=False, **FAST)
    cal = vq_quantize(w, "vq2", calib, **FAST)
    assert cal.stats["kept"] == "calibrated"
    assert cal.stats["mse_calibrated"] < 0.9 * cal.stats["mse_kmeans"]  # on the calibration rows
    # Same k-means start (same seed): identical codebook, and the plain result is the k-means one.
    assert torch.equal(km.codebook, cal.codebook)
    mse_km = _out_mse(held, w, km.dequantize(N, K))
    mse_cal = _out_mse(held, w, cal.dequantize(N, K))
    assert mse_cal < 0.95 * mse_km, (mse_cal, mse_km)  # and on held-out rows


def test_progressive_freezing_ends_all_hard(gen):
    w, calib, _ = _layer(gen)
    P = w.numel() // 4
    # A step budget with room to spare: at iters=120 the last sub-vector froze on one machine and not on
    # another (BLAS rounding decides a near-tie); at 240 every sub-vector is frozen by step ~160.
    iters = 240
    r = vq_quantize(w, "vq2", calib, kmeans_iters=4, iters=iters)
    assert r.stats["frozen_by_threshold"] + r.stats["frozen_forced"] == P
    assert r.stats["frozen_forced"] == 0  # the annealed softmax lets the threshold freeze everything
    assert r.stats["steps"] < iters  # and the loop stopped once all were frozen
    # Too few steps: what is still soft is forced to its argmax; the result is still a valid hard code.
    short = vq_quantize(w, "vq2", calib, kmeans_iters=4, iters=5, freeze_every=5, keep_best=False)
    assert short.stats["frozen_forced"] > 0
    assert short.stats["frozen_by_threshold"] + short.stats["frozen_forced"] == P
    idx = vqf.unpack_indices(short.codes, w.shape[1] // 4, 8)
    assert int(idx.max()) < 256


def test_deterministic_with_seed(gen):
    w, calib, _ = _layer(gen)
    a = vq_quantize(w, "vq2", calib, seed=3, **FAST)
    b = vq_quantize(w, "vq2", calib, seed=3, **FAST)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.codebook, b.codebook)
    assert a.stats == b.stats
    z1 = vq_quantize(w, "vq2", None, seed=5, **FAST)  # zero-data: the Gaussian rows come from the seed
    z2 = vq_quantize(w, "vq2", None, seed=5, **FAST)
    assert torch.equal(z1.codes, z2.codes)


def test_zero_data_never_worse_than_kmeans(gen):
    """Gaussian inputs make the output MSE equal to the weight MSE in expectation, for which the nearest
    centroid is already optimal; ``keep_best`` then keeps k-means whenever calibration does not help."""
    w, _, _ = _layer(gen)
    r = vq_quantize(w, "vq2", None, **FAST)
    assert r.stats["calib"] == "gaussian"
    final = r.stats["mse_calibrated"] if r.stats["kept"] == "calibrated" else r.stats["mse_kmeans"]
    assert final <= r.stats["mse_kmeans"]


def test_vq3_twelve_bit_path(gen):
    N, K = 96, 256  # 6144 sub-vectors for 4096 centroids
    w = torch.randn(N, K, generator=gen)
    calib = torch.randn(256, K, generator=gen) * torch.exp(torch.randn(K, generator=gen))
    r = vq_quantize(w, "vq3", calib, kmeans_iters=2, iters=60)
    assert r.index_bits == 12 and r.codebook.shape == (4096, 4)
    assert r.codes.shape == (N, vqf.packed_row_bytes(K // 4, 12)) and r.codes.dtype == torch.uint8
    idx = vqf.unpack_indices(r.codes, K // 4, 12)
    assert int(idx.max()) > 255 and int(idx.max()) < 4096  # really uses the upper index bits
    r2 = vq_quantize(w, "vq2", calib, kmeans_iters=2, iters=60)
    # 3 bits per weight beats 2 bits per weight by a wide margin
    assert sqnr_db(w, r.dequantize(N, K)) > sqnr_db(w, r2.dequantize(N, K)) + 3.0
    assert r.stats["mse_calibrated"] <= r.stats["mse_kmeans"] or r.stats["kept"] == "kmeans"


def test_channel_scale(gen):
    """Rows of very different magnitude: a shared codebook serves them badly without the channel scale."""
    N, K = 64, 128
    w = torch.randn(N, K, generator=gen) * torch.logspace(-3, 0, N)[:, None]
    calib = torch.randn(256, K, generator=gen)
    plain = vq_quantize(w, "vq2", calib, **FAST)
    scaled = vq_quantize(w, "vq2", calib, channel_scale=True, **FAST)
    assert plain.channel_scale is None
    cs = scaled.channel_scale
    assert cs.shape == (N,) and cs.dtype == torch.float32 and bool((cs > 0).all())
    # Output SQNR of every row (the small rows are what a shared codebook loses):
    def worst_row_sqnr(r):
        wh = r.dequantize(N, K)
        return min(sqnr_db(w[i], wh[i]) for i in range(N))
    assert worst_row_sqnr(scaled) > worst_row_sqnr(plain) + 5.0


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown format"):
        vq_quantize(torch.randn(4, 16), "vq5")
    with pytest.raises(ValueError, match="multiple of d"):
        vq_quantize(torch.randn(4, 18), "vq2")
    with pytest.raises(ValueError, match="n_candidates"):
        vq_quantize(torch.randn(4, 16), "vq2", n_candidates=0)
