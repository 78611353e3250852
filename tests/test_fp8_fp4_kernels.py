"""Triton fp8 (W8A8) and FP4 (nvfp4 / mxfp4) kernels, their ops (``lowbit_engine.ops_float``) and modules.

CPU: private interpreted copies of kernels/fp8_gemm.py and kernels/fp4_gemm.py (as tests/test_triton_gemm.py
does), checked against float64 references of the same quantized math on small ragged shapes.

Limits (relative Frobenius error against a float64 reference of the same quantized operands):
- fp32 out: products of e4m3 (or E2M1 x scale) values are exact in fp32; the kernel adds only fp32
  roundings (accumulation over K <= 128, two scale multiplies, bias), ~1e-7; 1e-5 leaves room for
  summation order while a wrong nibble / scale / tile costs >= 1e-3.
- bf16 out: the final rounding alone is up to 2^-8 per element (the interpreter truncates: 2^-7),
  ~2e-3 in norm; limit 1e-2.
Per element: |out - ref| <= rtol * |ref| + 1e-5 * max|ref| (rtol: 1e-5 fp32, 2^-7 + 1e-5 bf16).
GPU (fp8 MMA accumulates with ~14 bits before promotion per BLOCK_K): 1e-3 in norm, 2e-3 * max|ref|.
"""

from __future__ import annotations

import warnings
from types import ModuleType

import pytest
import torch

from lowbit_engine import _dispatch, ops_float
from triton_interp import load_interpreted
from lowbit_engine.errors import ReferenceFallbackWarning
from lowbit_engine.formats import fp8, mxfp4, nvfp4
from lowbit_engine.nn.fp4_linear import FP4Linear
from lowbit_engine.nn.fp8_linear import FP8Linear

FP32, BF16 = torch.float32, torch.bfloat16
REL_LIMIT = {FP32: 1e-5, BF16: 1e-2}
ELEM_RTOL = {FP32: 1e-5, BF16: 2.0**-7 + 1e-5}


@pytest.fixture(scope="module")
def k8() -> ModuleType:
    mod = load_interpreted("fp8_gemm.py")
    if not mod.interpreted():
        pytest.skip("this Triton did not honour TRITON_INTERPRET=1 at decoration time")
    gemm8 = load_interpreted("gemm8.py")  # the GEMM fp8_gemm_triton runs: interpreted too, sharing mod's tiles
    gemm8._tiles = mod
    mod._gemm8 = gemm8
    return mod


@pytest.fixture(scope="module")
def k4(k8) -> ModuleType:
    mod = load_interpreted("fp4_gemm.py")
    mod._fp8 = k8  # its quantizer and config helpers: the interpreted copy
    mod._expand, mod._gemm8 = load_interpreted("w4_expand.py"), k8._gemm8  # the 8-bit path it feeds
    return mod


def _check(out, ref, out_dtype, gpu=False):
    assert out.dtype == out_dtype and out.shape == ref.shape
    assert torch.isfinite(out).all(), "elements not written (NaN poison)"
    o, r = out.double(), ref.double()
    rel = ((o - r).norm() / r.norm()).item()
    limit = 1e-3 if gpu else REL_LIMIT[out_dtype]
    assert rel < limit, f"relative error {rel:.3g} >= {limit}"
    atol = (2e-3 if gpu else 1e-5) * r.abs().max()
    bad = (o - r).abs() > ELEM_RTOL[out_dtype] * r.abs() + atol
    assert not bad.any(), f"{bad.sum().item()} elements off"


def _poisoned(M, N, dtype, device="cpu"):
    return torch.full((M, N), float("nan"), dtype=dtype, device=device)


def _fp8_ref(qa, sa, qw, sw, lora_act=None, lora_up=None, bias=None):
    acc = fp8.dequantize(qa, sa).double() @ fp8.dequantize(qw, sw).double().T
    if lora_act is not None:
        acc += lora_act.double() @ lora_up.double().T
    if bias is not None:
        acc += bias.double()
    return acc


# ------------------------------------------------------------------------------------------- fp8


@pytest.mark.parametrize("dtype", [BF16, torch.float16, FP32])
@pytest.mark.parametrize("K", [64, 1000, 16384])
def test_quantizer_bit_exact(k8, gen, dtype, K):
    M = 7
    x = (torch.randn(M, K, generator=gen) * torch.logspace(-8, 4, M)[:, None]).to(dtype)
    x[2] = 0
    x[3, :6] = torch.tensor([-0.0, 1e-30, -1e-30, 3.0, 448.0, -7.0])
    q, s = k8.quantize_fp8_rowwise_triton(x)
    qr, sr = fp8.quantize(x)
    assert torch.equal(q.view(torch.uint8), qr.view(torch.uint8)) and torch.equal(s, sr)


def test_quantizer_every_e4m3_value_and_tie(k8):
    """Every e4m3 magnitude, the midpoints between neighbours (ties to even) and values just off them."""
    vals = torch.arange(0, 127, dtype=torch.int32).to(torch.uint8).view(fp8.DTYPE).float()
    mids = (vals[1:] + vals[:-1]) / 2
    row = torch.cat([vals, mids, mids * (1 + 2**-20), mids * (1 - 2**-20), -vals, -mids])
    x = torch.cat([row, torch.full((1,), 448.0)]).reshape(1, -1)  # amax 448: scale exactly 1
    x = torch.nn.functional.pad(x, (0, 16 - x.shape[1] % 16))
    q, s = k8.quantize_fp8_rowwise_triton(x)
    qr, sr = fp8.quantize(x)
    assert s.item() == 1.0 and torch.equal(q.view(torch.uint8), qr.view(torch.uint8))


@pytest.mark.parametrize("out_dtype", [FP32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("R,with_bias", [(0, False), (16, True)])
@pytest.mark.parametrize("K", [64, 128])
@pytest.mark.parametrize("N", [32, 48])
@pytest.mark.parametrize("M", [1, 17, 33])
def test_fp8_gemm(k8, gen, M, N, K, R, with_bias, out_dtype):
    qa, sa = fp8.quantize(torch.randn(M, K, generator=gen) * 3)
    qw, sw = fp8.quantize(torch.randn(N, K, generator=gen) * 0.05)
    la = torch.randn(M, R, generator=gen) if R else None
    lu = (torch.randn(N, R, generator=gen) * 0.1).to(BF16) if R else None
    bias = torch.randn(N, generator=gen).to(BF16) if with_bias else None
    out = _poisoned(M, N, out_dtype)
    res = k8.fp8_gemm_triton(qa, sa, qw, sw, la, lu, bias, out_dtype, out=out)
    assert res is out
    _check(out, _fp8_ref(qa, sa, qw, sw, la, lu, bias), out_dtype)


def test_fp8_linear_with_lora(k8, gen):
    """Quantizer + GEMM + low-rank branch end to end, K=96 (not a multiple of the 32-wide K tile)."""
    M, N, K, R = 17, 48, 96, 8
    x = torch.randn(M, K, generator=gen).to(BF16)
    qw, sw = fp8.quantize(torch.randn(N, K, generator=gen))
    ld, lu = torch.randn(R, K, generator=gen).to(BF16), torch.randn(N, R, generator=gen).to(BF16)
    bias = torch.randn(N, generator=gen).to(BF16)
    out = k8.fp8_linear_triton(x, qw, sw, bias, ld, lu, out_dtype=FP32)
    qa, sa = fp8.quantize(x)
    ref = _fp8_ref(qa, sa, qw, sw, x.double() @ ld.double().T, lu, bias)
    _check(out, ref, FP32)
    torch.testing.assert_close(out, ops_float.fp8_linear_torch(x, qw, sw, bias, ld, lu, FP32), rtol=1e-5, atol=1e-4)


def test_choose_config_table_and_disk_cache(k8, tmp_path, monkeypatch):
    assert k8.choose_config(17, 64, 64) == k8.INTERPRETER_CONFIG
    assert k8.m_bucket(1) == 16 and k8.m_bucket(4608) == 2**62
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path))
    cfg = k8.TileConfig(64, 64, 128)
    k8._write_disk(k8._disk_key("fp8_gemm", "H100", 2**62, 3072, 3072), cfg)
    data = k8._read_disk()
    assert k8.TileConfig(**data["H100|fp8_gemm|4611686018427387904|3072|3072"]) == cfg


# ------------------------------------------------------------------------------------------- fp4


def _fp4_weights(fmt, N, K, gen):
    w = torch.randn(N, K, generator=gen) * 0.05
    w[0, :16] *= 40  # one block far larger: exercises the per-row power-of-two scale
    if fmt == "nvfp4":
        packed, bs, ts = nvfp4.quantize(w)
        q8, s8 = nvfp4.dequantize_to_fp8(packed, bs, ts)
        dense = nvfp4.dequantize(packed, bs, ts)
    else:
        (packed, bs), ts = mxfp4.quantize(w), None
        q8, s8 = mxfp4.dequantize_to_fp8(packed, bs)
        dense = mxfp4.dequantize(packed, bs)
    inv, ws8, ws16 = ops_float.fp4_fp8_scales(fmt, packed, bs, ts)
    return dict(packed=packed, bs=bs, inv=inv, ws8=ws8, ws16=ws16, q8=q8, s8=s8, dense=dense)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_fp4_scales_match_dequantize_to_fp8(gen, fmt):
    d = _fp4_weights(fmt, 32, 128, gen)
    assert torch.equal(d["ws8"], d["s8"])  # 2**r * tensor_scale: the scale dequantize_to_fp8 returns
    assert torch.equal(d["inv"] * d["s8"], d["ws16"])  # 2**-r * 2**r * tensor_scale (mxfp4: 1), exact


@pytest.mark.parametrize("out_dtype", [FP32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("act", ["fp8", "bf16"])
@pytest.mark.parametrize("K", [64, 128])
@pytest.mark.parametrize("N", [32, 48])
@pytest.mark.parametrize("M", [1, 17, 33])
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_fp4_gemm(k4, gen, fmt, M, N, K, act, out_dtype):
    """fp8 activations: against the fp8 math of ``dequantize_to_fp8`` (the rounding docs/formats.md
    accepts, <= 1/21 for nvfp4, none for mxfp4). bf16 activations: against the exact dequantized weight."""
    d = _fp4_weights(fmt, N, K, gen)
    x = torch.randn(M, K, generator=gen)
    bias = torch.randn(N, generator=gen).to(BF16)
    out = _poisoned(M, N, out_dtype)
    if act == "fp8":
        qa, sa = fp8.quantize(x)
        k4.fp4_gemm_triton(qa, sa, d["packed"], d["bs"], d["inv"], d["ws8"], fmt, bias, out_dtype, out=out)
        ref = _fp8_ref(qa, sa, d["q8"], d["s8"], bias=bias)
    else:
        xb = x.to(BF16)
        k4.fp4_gemm_triton(xb, None, d["packed"], d["bs"], None, d["ws16"], fmt, bias, out_dtype, out=out)
        ref = xb.double() @ d["dense"].double().T + bias.double()
    _check(out, ref, out_dtype)


@pytest.mark.parametrize("M", [17, 70])  # fp8: the direct small-M kernel, then expand + the 8-bit GEMM
@pytest.mark.parametrize("act", ["fp8", "bf16"])
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_fp4_linear_triton_matches_torch_op(k4, gen, fmt, act, M):
    d = _fp4_weights(fmt, 48, 128, gen)
    x = torch.randn(M, 128, generator=gen).to(BF16)
    bias = torch.randn(48, generator=gen).to(BF16)
    out = k4.fp4_linear_triton(x, d["packed"], d["bs"], d["inv"], d["ws8"], d["ws16"], fmt, act, bias, FP32)
    ref = ops_float.fp4_linear_torch(x, d["packed"], d["bs"], d["inv"], d["ws8"], d["ws16"], bias, fmt, act, FP32)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


# ------------------------------------------------------------------------------------------- modules


def _linear(K=128, N=64, gen=None):
    lin = torch.nn.Linear(K, N)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(N, K, generator=gen) / K**0.5)
        lin.bias.copy_(torch.randn(N, generator=gen) * 0.1)
    return lin.to(BF16)


@pytest.mark.parametrize("kind", ["fp8", "fp8-rank8", "nvfp4-fp8", "nvfp4-bf16", "mxfp4-fp8", "mxfp4-bf16"])
def test_module_cpu_fidelity_config_and_fallback(gen, kind):
    lin = _linear(gen=gen)
    if kind.startswith("fp8"):
        q = FP8Linear.from_linear(lin, rank=8 if "rank" in kind else 0)
        op, cls, limit = "fp8_linear", FP8Linear, 0.06
    else:
        fmt, act = kind.split("-")
        q = FP4Linear.from_linear(lin, fmt=fmt, act=act)
        op, cls, limit = "fp4_linear", FP4Linear, 0.2
    x = torch.randn(2, 9, 128, generator=gen).to(BF16)
    _dispatch._WARNED.discard((op, "no Triton kernel runs on cpu tensors"))
    with pytest.warns(ReferenceFallbackWarning):
        y = q(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        q(x)
    assert _dispatch.last_backend(op) == "torch"
    assert y.shape == (2, 9, 64) and y.dtype == BF16
    ref = lin(x).float()
    rel = ((y.float() - ref).norm() / ref.norm()).item()
    # fp8 e4m3 (3 mantissa bits) on both operands: ~3-4% ; E2M1 weights: ~9-10% (docs/formats.md).
    assert rel < limit, rel
    cfg = q.config()
    empty = cls.from_config(cfg)
    assert empty.config() == cfg
    empty.load_state_dict(q.state_dict())
    assert torch.equal(empty(x), y)
    assert q.nbytes < q.dense_nbytes and "MiB" in repr(q)


def test_module_rejects_bad_config():
    from lowbit_engine.errors import UnknownFormatError

    cfg = FP8Linear(64, 32).config()
    with pytest.raises(UnknownFormatError):
        FP8Linear.from_config({**cfg, "format": "int3"})
    with pytest.raises(ValueError, match="version"):
        FP4Linear.from_config({**FP4Linear(64, 32).config(), "version": 99})
    with pytest.raises(ValueError, match="group_size"):
        FP4Linear.from_config({**FP4Linear(64, 32, fmt="mxfp4").config(), "group_size": 16})


def test_ops_validate_and_compile_fake(gen):
    from lowbit_engine.errors import OpInputError

    qw, sw = fp8.quantize(torch.randn(8, 64, generator=gen))
    with pytest.raises(OpInputError, match="w_scale"):
        ops_float.fp8_linear(torch.randn(3, 64), qw, sw[:4].contiguous())
    with pytest.raises(OpInputError, match="fmt"):
        d = _fp4_weights("nvfp4", 8, 64, gen)
        ops_float.fp4_linear(torch.randn(3, 64), d["packed"], d["bs"], d["inv"], d["ws8"], d["ws16"], fmt="fp4")
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        out = torch.ops.lowbit.fp8_linear(mode.from_tensor(torch.randn(3, 64)), mode.from_tensor(qw),
                                          mode.from_tensor(sw), None, None, None, BF16)
    assert out.shape == (3, 8) and out.dtype == BF16


# ------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["fp8", "nvfp4-fp8", "mxfp4-fp8", "nvfp4-bf16", "mxfp4-bf16"])
def test_gpu_flux_shape(gen, kind):
    """FLUX.1 projection (M=4608, K=N=3072) with the compiled kernels, against float64 on the GPU, and the
    op dispatch must pick Triton."""
    from lowbit_engine.kernels import fp4_gemm, fp8_gemm

    assert not fp8_gemm.interpreted()
    if torch.cuda.get_device_capability() < (8, 9) and not kind.endswith("bf16"):
        pytest.skip("fp8 tensor cores need sm_89+")
    M, K, N = 4608, 3072, 3072
    x = torch.randn(M, K, generator=gen).to(BF16).cuda()
    bias = torch.randn(N, generator=gen).to(BF16).cuda()
    if kind == "fp8":
        qw, sw = fp8.quantize(torch.randn(N, K, generator=gen).cuda())
        out = fp8_gemm.fp8_linear_triton(x, qw, sw, bias, out_dtype=FP32)
        qa, sa = fp8.quantize(x)
        q_ref, s_ref = fp8_gemm.quantize_fp8_rowwise_triton(x)
        assert torch.equal(q_ref.view(torch.uint8), qa.view(torch.uint8)) and torch.equal(s_ref, sa)
        _check(out, _fp8_ref(qa, sa, qw, sw, bias=bias), FP32, gpu=True)
        ops_float.fp8_linear(x, qw, sw, bias)
        assert _dispatch.last_backend("fp8_linear") == "triton"
        return
    fmt, act = kind.split("-")
    d = {k: v.cuda() for k, v in _fp4_weights(fmt, N, K, gen).items()}
    out = fp4_gemm.fp4_linear_triton(x, d["packed"], d["bs"], d["inv"], d["ws8"], d["ws16"], fmt, act, bias, FP32)
    if act == "fp8":
        qa, sa = fp8.quantize(x)
        ref = _fp8_ref(qa, sa, d["q8"], d["s8"], bias=bias)
    else:
        ref = x.double() @ d["dense"].double().T + bias.double()
    _check(out, ref, FP32, gpu=True)
    ops_float.fp4_linear(x, d["packed"], d["bs"], d["inv"], d["ws8"], d["ws16"], bias, fmt=fmt, act=act)
    assert _dispatch.last_backend("fp4_linear") == "triton"
