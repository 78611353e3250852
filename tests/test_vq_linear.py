"""VQLinear (lowbit_engine/nn/vq_linear.py): config round trip, forward through ops.vq_gemm, fidelity.

Fidelity is the output SQNR (dB) of the quantized layer against the bf16 ``nn.Linear`` it replaces, on
held-out inputs from the calibration distribution (anisotropic channels). What is asserted: vq3 (3 bits
per weight) beats vq2 (2 bits) by >= 3 dB; calibration beats plain k-means on held-out inputs; vq2 stays
above 8 dB and vq3 above 14 dB on this random layer (a random Gaussian weight is the worst case for a
codebook: real DiT weights cluster better).
"""

from __future__ import annotations

import pytest
import torch

from lowbit_engine import ops
from lowbit_engine.errors import UnknownFormatError
from lowbit_engine.nn.vq_linear import VQLinear
from lowbit_engine.quant.vq import sqnr_db

BF16 = torch.bfloat16
FAST = dict(kmeans_iters=3, iters=100)


def _layer_and_data(gen, N=96, K=256):
    lin = torch.nn.Linear(K, N)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(N, K, generator=gen) * 0.05)
        lin.bias.copy_(torch.randn(N, generator=gen) * 0.1)
    lin = lin.to(BF16)
    ch = torch.exp(torch.randn(K, generator=gen))
    calib = (torch.randn(512, K, generator=gen) * ch).to(BF16)
    held = (torch.randn(256, K, generator=gen) * ch).to(BF16)
    return lin, calib, held


def _sqnr(lin, q, x):
    with torch.no_grad():
        ref = lin(x).float() - lin.bias.float()  # the bias is exact in both: compare the GEMM part
        out = q(x).float() - lin.bias.float()
    return sqnr_db(ref, out)


@pytest.mark.parametrize("fmt", ["vq2", "vq3"])
@pytest.mark.parametrize("cs", [False, True])
def test_config_and_state_dict_round_trip(fmt, cs):
    m = VQLinear(128, 40, fmt=fmt, channel_scale=cs, bias=not cs)
    with torch.no_grad():
        m.codes.random_(0, 256)  # every byte pattern is a legal index: k = 256 (8-bit) or 4096 (12-bit)
        m.codebook.normal_()
    m2 = VQLinear.from_config(m.config())
    assert m2.config() == m.config()
    m2.load_state_dict(m.state_dict())
    x = torch.randn(3, 128, dtype=BF16)
    torch.testing.assert_close(m2(x), m(x), rtol=0, atol=0)
    big = VQLinear(3072, 3072, fmt=fmt)  # FLUX-sized: the codebook is noise next to the indices
    assert big.nbytes < big.dense_nbytes * (0.13 if fmt == "vq2" else 0.2)


def test_from_config_rejects_bad_metadata():
    cfg = VQLinear(64, 16).config()
    with pytest.raises(ValueError, match="missing"):
        VQLinear.from_config({k: v for k, v in cfg.items() if k != "k"})
    with pytest.raises(UnknownFormatError):
        VQLinear.from_config(dict(cfg, format="vq9"))
    with pytest.raises(ValueError, match="version"):
        VQLinear.from_config(dict(cfg, version=99))
    with pytest.raises(ValueError, match="k="):
        VQLinear.from_config(dict(cfg, k=16))


def test_forward_matches_dequantized_weight(gen):
    lin, calib, held = _layer_and_data(gen, N=40, K=128)
    q = VQLinear.from_linear(lin, calib, fmt="vq2", channel_scale=True, **FAST)
    x = torch.randn(2, 7, 128, generator=gen).to(BF16)
    out = q(x)
    assert out.shape == (2, 7, 40) and out.dtype == BF16
    assert ops.last_backend("vq_gemm") in ("cpu", "torch")
    ref = x.float() @ q.dequantized_weight().T + q.bias.float()
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)
    assert q(x.float()).dtype == torch.float32
    assert q(torch.empty(0, 128, dtype=BF16)).shape == (0, 40)


def test_fidelity_vs_bf16_layer(gen):
    lin, calib, held = _layer_and_data(gen)
    s = {}
    for fmt in ("vq2", "vq3"):
        it = dict(kmeans_iters=2, iters=60) if fmt == "vq3" else FAST
        s[fmt, "kmeans"] = _sqnr(lin, VQLinear.from_linear(lin, calib, fmt=fmt, calibrate=False, **it), held)
        s[fmt, "calib"] = _sqnr(lin, VQLinear.from_linear(lin, calib, fmt=fmt, **it), held)
    print({f"{a}/{b}": round(v, 2) for (a, b), v in s.items()})
    assert s["vq2", "calib"] > s["vq2", "kmeans"] + 0.3
    assert s["vq3", "calib"] >= s["vq3", "kmeans"]
    assert s["vq3", "kmeans"] > s["vq2", "kmeans"] + 3.0
    assert s["vq2", "calib"] > 8.0 and s["vq3", "calib"] > 14.0


def test_rejects_non_linear_and_bad_shapes():
    with pytest.raises(TypeError):
        VQLinear.from_linear(torch.nn.Conv1d(4, 4, 1))
    with pytest.raises(ValueError, match="multiple of d"):
        VQLinear(30, 8)
    with pytest.raises(ValueError, match="expected input"):
        VQLinear(32, 8)(torch.randn(2, 16))


@pytest.mark.parametrize("fmt", ["vq2", "vq3"])
def test_checkpoint_round_trip(tmp_path, monkeypatch, gen, fmt):
    """Through lowbit_engine.checkpoint (VQLinear put in the registry here until nn/__init__ lists it)."""
    from lowbit_engine import checkpoint
    from lowbit_engine.nn import QUANTIZED_MODULES

    monkeypatch.setitem(QUANTIZED_MODULES, "VQLinear", VQLinear)
    m = VQLinear(64, 24, fmt=fmt, channel_scale=True)
    with torch.no_grad():
        m.codes.random_(0, 256, generator=gen)
        m.codebook.normal_(generator=gen)
        m.channel_scale.uniform_(0.5, 1.5, generator=gen)
    again = checkpoint.load_checkpoint(checkpoint.save(m, tmp_path / "vq.safetensors"))
    assert type(again) is VQLinear and again.config() == m.config()
    for (ka, a), (kb, b) in zip(m.state_dict().items(), again.state_dict().items()):
        assert ka == kb and torch.equal(a, b)
