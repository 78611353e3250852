"""SVDQLinear (lowbit_engine.nn) and quantize_linear: fidelity, the forward contract, config, errors."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from lowbit_engine import ops, ops_w4a8
from lowbit_engine.errors import UnknownFormatError
from lowbit_engine.formats import FORMATS
from lowbit_engine.nn import QUANTIZED_MODULES, SVDQLinear
from lowbit_engine.quant import NoCalibrationWarning
from lowbit_engine.quantize import available_formats, quantize_linear

BF = torch.bfloat16

# SQNR floors (dB) on the synthetic outlier layer below (seed 0), against the bf16 layer's exact output
# on held-out tokens. Measured when written (int4 / int8 / fp8 activations): naive W4A4 (no smoothing, no
# low rank) 8.4 / 9.5 / 9.7, smoothing only 20.5 / 25.6 / 25.3, low rank only 22.8 / 27.0 / 27.3,
# SVDQuant r32 36.8 / 40.1 / 39.9. What is left is the int4 rounding of a Gaussian residual.
FLOOR_SVDQ_INT4 = 34.0
FLOOR_SVDQ_W4A8 = 37.0
MARGIN_OVER_NAIVE = 20.0


def sqnr_db(y: torch.Tensor, ref: torch.Tensor) -> float:
    y, ref = y.double(), ref.double()
    return (10 * torch.log10(ref.pow(2).sum() / (y - ref).pow(2).sum())).item()


def _outlier_layer(gen, K=512, N=512, T=256):
    """A bf16 layer with weight outliers and low-rank structure, activations with outlier channels.

    Returns the layer, calibration tokens and held-out tokens (the fidelity is measured on the latter).
    """
    w = torch.randn(N, K, generator=gen) * 0.02
    w += 0.02 * torch.randn(N, 4, generator=gen) @ torch.randn(4, K, generator=gen)
    w[:, torch.randperm(K, generator=gen)[:8]] *= 10
    x = torch.randn(2 * T, K, generator=gen)
    idx = torch.randperm(K, generator=gen)[: K // 64]
    x[:, idx] *= 20 + 30 * torch.rand(len(idx), generator=gen)
    lin = torch.nn.Linear(K, N, dtype=BF)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(0.1 * torch.randn(N, generator=gen))
    return lin.requires_grad_(False), x[:T].to(BF), x[T:].to(BF)


def _exact(lin: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.linear(x.double(), lin.weight.double(), lin.bias.double())


def _small(gen, K=128, N=96, bias=True, dtype=BF):
    lin = torch.nn.Linear(K, N, bias=bias, dtype=dtype).requires_grad_(False)
    calib = torch.randn(48, K, generator=gen).to(dtype)
    return lin, calib


# ------------------------------------------------------------------------------------------------ fidelity


@pytest.fixture(scope="module")
def outlier_layer():
    return _outlier_layer(torch.Generator().manual_seed(0))


def test_svdquant_beats_naive_w4a4(outlier_layer):
    lin, calib, test = outlier_layer
    ref = _exact(lin, test)
    naive = SVDQLinear.from_linear(lin, calib, rank=0, smoothing=False)
    smooth = SVDQLinear.from_linear(lin, calib, rank=0)
    svdq = SVDQLinear.from_linear(lin, calib, rank=32)
    s_naive, s_smooth, s_svdq = (sqnr_db(m(test), ref) for m in (naive, smooth, svdq))
    assert s_svdq >= FLOOR_SVDQ_INT4, (s_naive, s_smooth, s_svdq)
    assert s_svdq >= s_naive + MARGIN_OVER_NAIVE, (s_naive, s_smooth, s_svdq)
    assert s_naive < s_smooth < s_svdq


@pytest.mark.parametrize("act_mode, layout", [("int8", "g64"), ("fp8", "g64"), ("int8", "i8q"), ("fp8", "f8l")])
def test_svdquant_w4a8_fidelity(outlier_layer, act_mode, layout):
    lin, calib, test = outlier_layer
    m = quantize_linear(lin, "svdq-w4a8", calib=calib, rank=32, act_mode=act_mode, weight_layout=layout)
    assert m.weight_layout == layout
    assert sqnr_db(m(test), _exact(lin, test)) >= FLOOR_SVDQ_W4A8


# ------------------------------------------------------------------------------------------------ forward


def _composition(m: SVDQLinear, x2d: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """The forward written out: the quantizer, then the layout's GEMM with the low-rank and bias epilogue."""
    lora_down = m.lora_down if m.rank else None
    act, scales, lora_act = ops.quantize_act(x2d, m.smooth, lora_down, m.act_mode)
    lora = (lora_act, m.lora_up) if m.rank else (None, None)
    if m.weight_layout == "f8l":
        return ops_w4a8.gemm_w4a8_f8l(act, scales, m.qweight, m.wscales, m.wrow, *lora, m.bias, out_dtype)
    if m.weight_layout == "i8q":
        return ops_w4a8.gemm_w4a8_i8q(act, scales, m.qweight, m.wscales, m.wzeros, m.wrow, *lora, m.bias, out_dtype)
    gemm = ops.gemm_w4a4 if m.act_mode == "int4" else ops.gemm_w4a8
    return gemm(act, scales, m.qweight, m.wscales, *lora, m.bias, out_dtype)


@pytest.mark.parametrize("fmt, act_mode, layout, gemm", [
    ("svdq-int4", None, "auto", "gemm_w4a4"), ("svdq-w4a8", "int8", "g64", "gemm_w4a8"),
    ("svdq-w4a8", "fp8", "g64", "gemm_w4a8"), ("svdq-w4a8", None, "auto", "gemm_w4a8_i8q"),
    ("svdq-w4a8", "fp8", "auto", "gemm_w4a8_f8l"), ("svdq-int4", None, "i8q", "gemm_w4a8_i8q"),
    ("svdq-int4", None, "f8l", "gemm_w4a8_f8l"),
])
def test_forward_is_the_composition_of_the_ops_on_cpu_backends(gen, fmt, act_mode, layout, gemm):
    lin, calib = _small(gen)
    m = SVDQLinear.from_linear(lin, calib, rank=8, fmt=fmt, act_mode=act_mode, alphas=(0.5,), weight_layout=layout)
    x = torch.randn(2, 7, 128, generator=gen).to(BF)
    with ops.record_backends() as used:
        y = m(x)
    assert y.shape == (2, 7, 96) and y.dtype == BF
    assert used == {"quantize_act": {"cpu"}, gemm: {"cpu"}}
    assert torch.equal(y, _composition(m, x.reshape(14, 128), BF).reshape(2, 7, 96))


def test_leading_dims(gen):
    lin, calib = _small(gen)
    m = SVDQLinear.from_linear(lin, calib, rank=8, alphas=(0.5,))
    x = torch.randn(2, 3, 5, 128, generator=gen).to(BF)
    assert torch.equal(m(x), m(x.reshape(30, 128)).reshape(2, 3, 5, 96))
    assert torch.equal(m(x[0, 0, 0]), m(x[0, 0, :1])[0])  # a single token without a batch dim
    assert m(x[:, :0]).shape == (2, 0, 5, 96)               # an empty batch


def test_fp16_module(gen):
    lin, calib = _small(gen, dtype=torch.float16)
    m = SVDQLinear.from_linear(lin, calib, rank=8, alphas=(0.5,))
    assert m.dtype == torch.float16 and m.lora_down.dtype == torch.float16 and m.bias.dtype == torch.float16
    x = torch.randn(5, 128, generator=gen).half()
    y = m(x)
    assert y.dtype == torch.float16 and torch.equal(y, _composition(m, x, torch.float16))
    assert sqnr_db(y, _exact(lin, x)) > 15


def test_other_input_dtypes_are_cast_to_the_module_dtype(gen):
    lin, calib = _small(gen)
    m = SVDQLinear.from_linear(lin, calib, rank=8, alphas=(0.5,))
    x = torch.randn(5, 128, generator=gen).to(BF)
    for dtype in (torch.float16, torch.float32, torch.float64):
        xd = x.to(dtype)
        y = m(xd)
        assert y.dtype == dtype
        out_dtype = dtype if dtype != torch.float64 else BF
        assert torch.equal(y, _composition(m, xd.to(BF), out_dtype).to(dtype))


def test_rank_zero_and_no_bias(gen):
    lin, calib = _small(gen, bias=False)
    m = SVDQLinear.from_linear(lin, calib, rank=0, alphas=(0.5,))
    assert m.bias is None and m.lora_down.shape == (0, 128) and m.lora_up.shape == (96, 0)
    x = torch.randn(3, 128, generator=gen).to(BF)
    assert torch.equal(m(x), _composition(m, x, BF))
    assert sqnr_db(m(x), torch.nn.functional.linear(x.double(), lin.weight.double())) > 10


def test_bad_input_width(gen):
    m = SVDQLinear(128, 64, rank=4)
    with pytest.raises(ValueError, match=r"\[..., 128\]"):
        m(torch.randn(2, 64, dtype=BF))


# ------------------------------------------------------------------------------------------------ buffers, config


@pytest.mark.parametrize("layout, weight", [
    ("g64", {"qweight": ((96, 128), torch.uint8), "wscales": ((96, 4), BF)}),
    ("f8l", {"qweight": ((96, 128), torch.uint8), "wscales": ((96, 4), torch.float8_e4m3fn),
             "wrow": ((96,), torch.float32)}),
    ("i8q", {"qweight": ((96, 128), torch.uint8), "wscales": ((96, 4), torch.uint8),
             "wzeros": ((96, 4), torch.uint8), "wrow": ((96,), torch.float32)}),
])
def test_buffers_shapes_and_dtypes(layout, weight):
    m = SVDQLinear(256, 96, rank=16, dtype=torch.float16, weight_layout=layout)
    sd = m.state_dict()
    expect = weight | {
        "smooth": ((256,), torch.float32), "lora_down": ((16, 256), torch.float16),
        "lora_up": ((96, 16), torch.float16), "bias": ((96,), torch.float16),
    }
    assert set(sd) == set(expect)
    for name, (shape, dtype) in expect.items():
        assert sd[name].shape == shape and sd[name].dtype == dtype, name
    assert "bias" not in SVDQLinear(128, 64, bias=False).state_dict()


def test_nbytes_and_repr():
    m = SVDQLinear(3072, 3072, rank=32)
    assert m.nbytes == 3072 * 1536 + 3072 * 48 * 2 + 3072 * 4 + 2 * 32 * 3072 * 2 + 3072 * 2
    assert m.dense_nbytes == 2 * (3072 * 3072 + 3072)
    assert repr(m) == ("SVDQLinear(in_features=3072, out_features=3072, fmt=svdq-int4, act=int4, layout=g64, "
                       "rank=32, bias=True, 5.2 MiB (bf16: 18.0 MiB))")
    # the promotion-free layouts: f8l one byte of scale per 64 and a row scale, i8q two bytes and a row scale
    f8l = SVDQLinear(3072, 3072, rank=32, weight_layout="f8l")
    i8q = SVDQLinear(3072, 3072, rank=32, weight_layout="i8q")
    assert f8l.nbytes == m.nbytes - 3072 * 48 + 3072 * 4
    assert i8q.nbytes == m.nbytes + 3072 * 4


@pytest.mark.parametrize("fmt, act_mode, layout", [
    ("svdq-int4", None, "g64"), ("svdq-w4a8", "int8", "g64"), ("svdq-w4a8", "fp8", "g64"),
    ("svdq-w4a8", "int8", "i8q"), ("svdq-w4a8", "fp8", "f8l"), ("svdq-int4", None, "i8q"),
])
def test_config_round_trip(gen, fmt, act_mode, layout):
    lin, calib = _small(gen)
    m = SVDQLinear.from_linear(lin, calib, rank=8, fmt=fmt, act_mode=act_mode, alphas=(0.5,), weight_layout=layout)
    cfg = json.loads(json.dumps(m.config()))
    assert cfg == {"format": fmt, "version": 2, "in_features": 128, "out_features": 96, "rank": 8,
                   "group_size": 64, "act_mode": m.act_mode, "dtype": "bfloat16", "has_bias": True,
                   "weight_layout": layout}
    m2 = QUANTIZED_MODULES[type(m).__name__].from_config(cfg)
    m2.load_state_dict(m.state_dict())
    x = torch.randn(4, 128, generator=gen).to(BF)
    assert torch.equal(m2(x), m(x))


def test_version_1_configs_are_g64_layers():
    cfg = SVDQLinear(128, 64, rank=4, fmt="svdq-w4a8", weight_layout="g64").config()
    cfg.pop("weight_layout")
    m = SVDQLinear.from_config(cfg | {"version": 1})
    assert m.weight_layout == "g64" and m.wscales.dtype == BF and m.act_mode == "int8"


@pytest.mark.parametrize("change, exc, match", [
    (dict(format="svdq-int3"), UnknownFormatError, "unknown format"),
    (dict(version=3), ValueError, "version"),
    (dict(group_size=128), ValueError, "group_size"),
    (dict(dtype="float32"), ValueError, "dtype"),
    (dict(act_mode="fp8"), ValueError, "act_mode"),  # fp8 activations belong to svdq-w4a8 (or f8l weights)
    (dict(weight_layout="g128"), ValueError, "weight_layout"),
    (dict(weight_layout="f8l", act_mode="int8"), ValueError, "act_mode"),  # f8l takes fp8 tokens
])
def test_from_config_rejects_bad_configs(change, exc, match):
    cfg = SVDQLinear(128, 64, rank=4).config() | change
    with pytest.raises(exc, match=match):
        SVDQLinear.from_config(cfg)
    cfg = SVDQLinear(128, 64).config()
    del cfg["rank"]
    with pytest.raises(ValueError, match=r"missing keys \['rank'\]"):
        SVDQLinear.from_config(cfg)


@pytest.mark.parametrize("kw, match", [
    (dict(in_features=100), "multiple of 64"),
    (dict(in_features=0), "multiple of 64"),
    (dict(fmt="fp8"), "unknown format"),
    (dict(fmt="svdq-int4", act_mode="int8"), "act_mode"),
    (dict(fmt="svdq-w4a8", act_mode="int8", weight_layout="f8l"), "act_mode"),
    (dict(weight_layout="nf4"), "weight layout"),
    (dict(rank=200), "rank"),
    (dict(dtype=torch.float32), "dtype"),
])
def test_constructor_rejects_bad_arguments(kw, match):
    args = dict(in_features=128, out_features=64) | kw
    with pytest.raises(ValueError, match=match):
        SVDQLinear(**args)


def test_defaults_and_registry():
    assert (SVDQLinear(128, 64).act_mode, SVDQLinear(128, 64).weight_layout) == ("int4", "g64")
    m = SVDQLinear(128, 64, fmt="svdq-w4a8")
    assert (m.act_mode, m.weight_layout) == ("int8", "i8q")
    m = SVDQLinear(128, 64, fmt="svdq-w4a8", act_mode="fp8")
    assert (m.act_mode, m.weight_layout) == ("fp8", "f8l")
    assert QUANTIZED_MODULES["SVDQLinear"] is SVDQLinear


def test_auto_layout_follows_the_gpus_int4_tensor_cores(monkeypatch):
    from lowbit_engine.nn import svdq_linear

    monkeypatch.setattr(svdq_linear, "has_int4_tensor_cores", lambda device: False)  # a Hopper
    assert svdq_linear.resolve_layout("svdq-int4", None) == ("i8q", "int8")
    assert svdq_linear.resolve_layout("svdq-int4", "int4") == ("g64", "int4")  # asked for: W4A4 it is
    monkeypatch.setattr(svdq_linear, "has_int4_tensor_cores", lambda device: True)  # an A100 / the CPU
    assert svdq_linear.resolve_layout("svdq-int4", None) == ("g64", "int4")


def test_convert_layout_keeps_the_layer_close(gen):
    lin, calib = _small(gen)
    m = SVDQLinear.from_linear(lin, calib, rank=8, alphas=(0.5,), weight_layout="g64", fmt="svdq-w4a8")
    x = torch.randn(16, 128, generator=gen).to(BF)
    y = m(x).float()
    lora, ptr = m.lora_up.clone(), m.lora_up.data_ptr()
    m.convert_layout("f8l")
    assert (m.weight_layout, m.act_mode, m.wscales.dtype) == ("f8l", "fp8", torch.float8_e4m3fn)
    assert torch.equal(m.lora_up, lora) and m.lora_up.data_ptr() == ptr  # the branch is not touched
    m.check_buffers()
    y2 = m(x).float()
    assert ((y2 - y).norm() / y.norm()) < 0.05
    sd = m.state_dict()
    m2 = SVDQLinear.from_config(m.config())
    m2.load_state_dict(sd)
    assert torch.equal(m2(x), m(x))


def test_check_buffers_rejects_an_i8q_group_outside_int8(gen):
    lin, calib = _small(gen)
    m = SVDQLinear.from_linear(lin, calib, rank=8, alphas=(0.5,), weight_layout="i8q", fmt="svdq-w4a8")
    m.check_buffers()
    m.wscales[3, 1] = 16
    m.wzeros[3, 1] = 3
    with pytest.raises(ValueError, match="int8 range"):
        m.check_buffers()


# ------------------------------------------------------------------------------------------------ quantize_linear


def test_quantize_linear_builds_svdq_modules(gen):
    lin, calib = _small(gen, dtype=torch.float32)
    m = quantize_linear(lin, "svdq-int4", calib=calib, rank=8, alphas=(0.5,))
    assert isinstance(m, SVDQLinear) and m.dtype == BF and m.alpha == 0.5 and m.calib_error > 0
    m = quantize_linear(lin, "svdq-w4a8", calib=calib, rank=8, alphas=(0.5,))
    assert m.fmt == "svdq-w4a8" and m.act_mode == "int8" and m.weight_layout == "i8q"
    assert {"svdq-int4", "svdq-w4a8"} <= set(available_formats())


def test_quantize_linear_unknown_format_lists_the_known_ones(gen):
    lin, _ = _small(gen)
    with pytest.raises(UnknownFormatError) as info:
        quantize_linear(lin, "int3")
    assert isinstance(info.value, ValueError)
    for name in FORMATS:
        assert name in str(info.value)


@pytest.mark.parametrize("fmt", sorted(set(FORMATS) - set(available_formats())))
def test_quantize_linear_known_but_unbuilt_formats(gen, fmt):
    lin, _ = _small(gen)
    with pytest.raises(NotImplementedError, match=f"'{fmt}' is known.*not built yet.*svdq-int4"):
        quantize_linear(lin, fmt)


def test_quantize_linear_rejects_non_linear():
    with pytest.raises(TypeError, match="nn.Linear"):
        quantize_linear(torch.nn.Conv1d(64, 64, 1), "svdq-int4")


def test_no_calibration_warns_through_the_public_entry(gen):
    lin, calib = _small(gen)
    with pytest.warns(NoCalibrationWarning, match="smoothing is OFF"):
        m = quantize_linear(lin, "svdq-int4", rank=8)
    assert torch.equal(m.smooth, torch.ones(128)) and m.alpha is None and m.calib_error is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quantize_linear(lin, "svdq-int4", calib=calib, rank=8, alphas=(0.5,))
