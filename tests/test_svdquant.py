"""SVDQuant, the algorithm (lowbit_engine.quant): smoothing, low rank, folding, residual, alpha search, refinement."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from lowbit_engine import ops
from lowbit_engine.formats import int4
from lowbit_engine.nn import SVDQLinear
from lowbit_engine.quant import (
    ALPHAS,
    NoCalibrationWarning,
    fake_quantize_act,
    lowrank_residual,
    smoothing_factors,
    svdquant,
    top_r_svd,
)
from lowbit_engine.quant.svdquant import FULL_SVD_MAX

BF = torch.bfloat16


def _outlier_layer(gen, N=192, K=256, T=128, n_outliers=4):
    """Weights with a few large columns and activations with a few large channels (like DiT layers)."""
    w = torch.randn(N, K, generator=gen) * 0.02
    w[:, torch.randperm(K, generator=gen)[:n_outliers]] *= 8
    x = torch.randn(T, K, generator=gen)
    x[:, torch.randperm(K, generator=gen)[:n_outliers]] *= 25
    return w, x.to(BF)


# ------------------------------------------------------------------------------------------------ smoothing


def test_smoothing_formula(gen):
    xa = torch.rand(128, generator=gen) * 10 + 0.1
    wa = torch.rand(128, generator=gen) + 0.01
    for alpha in (0.0, 0.3, 0.5, 1.0):
        lam = smoothing_factors(xa, wa, alpha)
        formula = xa.pow(alpha) / wa.pow(1 - alpha)
        ratio = lam / formula  # the formula up to one normalising constant
        torch.testing.assert_close(ratio, ratio[0].expand_as(ratio), rtol=1e-5, atol=0)
        assert abs(lam.log().mean().item()) < 1e-5  # geometric mean 1


def test_smoothing_dead_channels_stay_finite():
    xa = torch.tensor([0.0, 1.0, 50.0, 0.0])
    wa = torch.tensor([0.5, 0.0, 1.0, 0.0])
    for alpha in (0.0, 0.5, 1.0):
        lam = smoothing_factors(xa, wa, alpha)
        assert torch.isfinite(lam).all() and (lam > 0).all()
    with pytest.raises(ValueError, match="alpha"):
        smoothing_factors(xa, wa, 1.5)


# ------------------------------------------------------------------------------------------------ low rank


def test_top_r_svd_full_path_is_the_truncated_svd(gen):
    a = torch.randn(96, 128, generator=gen)
    up, down = top_r_svd(a, 8)
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    torch.testing.assert_close(up @ down, (u[:, :8] * s[:8]) @ vh[:8], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(down @ down.T, torch.eye(8), rtol=0, atol=1e-5)  # L_down' = V_r^T


def test_top_r_svd_randomized_path_finds_the_top_part(gen):
    # Larger than FULL_SVD_MAX, so the randomized SVD runs; a decaying spectrum like a real weight's.
    N, K, r = FULL_SVD_MAX + 64, FULL_SVD_MAX + 128, 16
    u = torch.linalg.qr(torch.randn(N, 128, generator=gen)).Q
    v = torch.linalg.qr(torch.randn(K, 128, generator=gen)).Q
    s = 10.0 * torch.arange(1, 129, dtype=torch.float32).pow(-1.0)
    a = (u * s) @ v.T + 1e-3 * torch.randn(N, K, generator=gen)
    up, down = top_r_svd(a, r)
    best = torch.linalg.matrix_norm(a - (u[:, :r] * s[:r]) @ v[:, :r].T)
    assert torch.linalg.matrix_norm(a - up @ down) <= 1.01 * best
    # An exactly low-rank matrix is reconstructed exactly.
    low = (u[:, :r] * s[:r]) @ v[:, :r].T
    up, down = top_r_svd(low, r)
    torch.testing.assert_close(up @ down, low, rtol=0, atol=1e-5)
    # Seeded: the same call gives the same factors.
    up2, down2 = top_r_svd(low, r)
    assert torch.equal(up, up2) and torch.equal(down, down2)


def test_folding_and_residual_identity(gen):
    w, x = _outlier_layer(gen)
    lam = smoothing_factors(x.float().abs().amax(0), w.abs().amax(0), 0.5)
    w_s = w * lam
    up, down = top_r_svd(w_s, 16)                                        # L_up, L_down'
    lora_up, lora_down, residual = lowrank_residual(w_s, lam, 16, torch.float32)
    xf = x.float()
    # Folding: the branch consumes the raw x and sees exactly the smoothed product.
    torch.testing.assert_close(xf @ lora_down.T, (xf / lam) @ down.T, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lora_up, up)
    # Residual identity: W' = residual + L_up L_down' (the branch written with the folded factor).
    torch.testing.assert_close(residual + (lora_up @ lora_down) * lam, w_s, rtol=0, atol=1e-6)
    # In bf16 the residual is taken against the rounded factors, so the identity still holds exactly.
    lu16, ld16, res16 = lowrank_residual(w_s, lam, 16, BF)
    torch.testing.assert_close(res16 + (lu16.float() @ ld16.float()) * lam, w_s, rtol=0, atol=1e-6)


def test_result_holds_the_quantized_residual(gen):
    w, x = _outlier_layer(gen)
    res = svdquant(w, x, rank=16, alphas=(0.4, 0.6), refine_iters=0)
    lam, lu, ld = res.smooth, res.lora_up.float(), res.lora_down.float()
    residual = w * lam - (lu @ ld) * lam
    q, s = int4.quantize(residual, scale_dtype=BF)
    assert torch.equal(int4.unpack(res.qweight), q) and torch.equal(res.wscales, s)
    assert res.lora_down.dtype == BF and res.lora_up.dtype == BF and res.smooth.dtype == torch.float32
    assert res.rank == 16 and res.alpha in (0.4, 0.6)


# ------------------------------------------------------------------------------------------------ the search


@pytest.mark.parametrize("mode", ["int4", "int8", "fp8"])
def test_fake_quantize_act_is_what_the_kernel_sees(gen, mode):
    x = torch.randn(9, 192, generator=gen).to(BF)
    lam = torch.rand(192, generator=gen) + 0.5
    q, s, _ = ops.quantize_act(x, lam, None, mode)  # the C++ reference here, the kernel on a GPU
    deq = int4.dequantize(int4.unpack(q), s) if mode == "int4" else q.float() * s[:, None]
    assert torch.equal(fake_quantize_act(x, lam, mode), deq)


def test_alpha_search_picks_the_minimum_against_brute_force(gen):
    # Log-normal channel scales on both sides: the error curve then has its minimum inside (0, 1).
    K = N = 128
    w = torch.randn(N, K, generator=gen) * 0.02 * torch.exp(0.5 * torch.randn(K, generator=gen))
    x = (torch.randn(64, K, generator=gen) * torch.exp(torch.randn(K, generator=gen))).to(BF)
    lin = torch.nn.Linear(K, N, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    alphas = tuple(i / 10 for i in range(11))
    res = svdquant(w, x, rank=4, alphas=alphas, refine_iters=0)
    assert set(res.alpha_errors) == set(alphas)
    assert res.alpha == min(res.alpha_errors, key=res.alpha_errors.get)
    assert 0.0 < res.alpha < 1.0  # an interior minimum, so the check below means something
    assert res.calib_error == res.alpha_errors[res.alpha]

    # Brute force: build the module for each alpha alone and measure it through the real ops.
    xf = x.float()  # fp32 input: the module casts it to bf16 (exact here) and the GEMM writes fp32
    y = xf.double() @ w.double().T
    brute = {}
    for a in alphas:
        m = SVDQLinear.from_linear(lin, x, rank=4, alphas=(a,), refine_iters=0)
        brute[a] = ((m(xf).double() - y).norm() / y.norm()).item()
        assert brute[a] == pytest.approx(res.alpha_errors[a], rel=1e-4)  # the search measured the kernels
    assert min(brute, key=brute.get) == res.alpha


def test_refinement_does_not_increase_the_error(gen):
    w, x = _outlier_layer(gen)
    base = svdquant(w, x, rank=16, alphas=(0.5,), refine_iters=0)
    refined = svdquant(w, x, rank=16, alphas=(0.5,), refine_iters=3)
    assert refined.calib_error <= base.calib_error
    errs = [base.calib_error, *refined.refine_errors]
    assert all(b < a for a, b in zip(errs, errs[1:]))  # only improving refits are kept
    with pytest.warns(NoCalibrationWarning):
        nb = svdquant(w, rank=16, refine_iters=0)
    with pytest.warns(NoCalibrationWarning):
        nr = svdquant(w, rank=16, refine_iters=2)
    assert nr.weight_error <= nb.weight_error


def test_low_rank_and_smoothing_each_lower_the_error(gen):
    w, x = _outlier_layer(gen)
    naive = svdquant(w, x, rank=0, smoothing=False)
    smooth = svdquant(w, x, rank=0)
    full = svdquant(w, x, rank=32)
    assert full.calib_error < smooth.calib_error < naive.calib_error
    assert naive.alpha is None and naive.alpha_errors == {} and torch.equal(naive.smooth, torch.ones(256))


# ------------------------------------------------------------------------------------------------ no calibration


def test_no_calibration_warns_and_disables_smoothing(gen):
    w, _ = _outlier_layer(gen)
    with pytest.warns(NoCalibrationWarning, match="no calibration activations.*smoothing is OFF"):
        res = svdquant(w, rank=8)
    assert torch.equal(res.smooth, torch.ones(256))
    assert res.alpha is None and res.calib_error is None and res.alpha_errors == {}
    assert 0 < res.weight_error < 0.2


def test_calibration_quiet_and_leading_dims_flattened(gen):
    w, x = _outlier_layer(gen)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        flat = svdquant(w, x, rank=8, alphas=(0.5,))
        nested = svdquant(w, x.reshape(4, 32, 256), rank=8, alphas=(0.5,))
    assert torch.equal(flat.qweight, nested.qweight) and torch.equal(flat.lora_down, nested.lora_down)


def test_default_alpha_grid():
    assert len(ALPHAS) == 21 and ALPHAS[0] == 0.0 and ALPHAS[-1] == 1.0
    assert all(math.isclose(b - a, 0.05) for a, b in zip(ALPHAS, ALPHAS[1:]))


@pytest.mark.parametrize("kw, match", [
    (dict(weight=torch.randn(8, 100)), "multiple of 64"),
    (dict(weight=torch.randn(8, 64), rank=9), "rank"),
    (dict(act_mode="int2"), "act_mode"),
    (dict(dtype=torch.float32), "dtype"),
    (dict(calib=torch.randn(4, 32)), r"\[..., K=64\]"),
    (dict(calib=torch.full((4, 64), float("nan"))), "non-finite"),
    (dict(refine_iters=-1), "refine_iters"),
])
def test_svdquant_rejects_bad_input(kw, match):
    args = dict(weight=torch.randn(16, 64), calib=torch.randn(4, 64), rank=4) | kw
    with pytest.raises(ValueError, match=match):
        svdquant(args.pop("weight"), args.pop("calib"), **args)
