"""The Triton kernels of the promotion-free W4A8 path under the interpreter: the 8-bit quantizer
(kernels/quant8.py), the expand and direct kernels (kernels/w4_expand.py) and the 8-bit GEMM
(kernels/gemm8.py), against the references (tests/triton_interp.py explains the private interpreted copies).

Exact: the quantizer's q and scales, every expanded 8-bit weight, int8 GEMM sums. Limits otherwise
(relative Frobenius error against a float64 reference of the same quantized math):
- fp32 out: e4m3 and int8 products are exact in fp32; the kernels add fp32 roundings only (the K sum for
  fp8, two scale multiplies, the 16-bit low-rank dot, the bias): ~1e-7. Limit 1e-5.
- bf16 out: the final rounding, up to 2^-8 per element (the interpreter truncates: 2^-7). Limit 1e-2.
- lora_act (the quantizer's fp32 down-projection, order free): 1e-5.
Outputs are poisoned with NaN (q with 0x5A) so an element a kernel skips shows.
"""

from __future__ import annotations

from types import ModuleType

import pytest
import torch

from lowbit_engine import reference
from lowbit_engine.formats import f8l, fp8, i8q, mxfp4, nvfp4
from lowbit_engine.ops_float import fp4_fp8_scales
from triton_interp import load_interpreted

pytest.importorskip("triton")

BF, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
E4M3 = torch.float8_e4m3fn
REL = {FP32: 1e-5, BF: 1e-2, FP16: 1e-3}


@pytest.fixture(scope="module")
def k():
    """Interpreted copies of the three kernel modules, wired to each other (and to fp8_gemm's helpers)."""
    tiles = load_interpreted("fp8_gemm.py")
    mods = {"gemm8": load_interpreted("gemm8.py"), "expand": load_interpreted("w4_expand.py"),
            "quant8": load_interpreted("quant8.py")}
    mods["gemm8"]._tiles = tiles
    for m in mods.values():
        if not m.interpreted():
            pytest.skip("this Triton did not honour TRITON_INTERPRET=1 at decoration time")
    return type("Kernels", (), mods)


def _rel(out, ref) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def _check(out, ref, out_dtype):
    assert out.dtype == out_dtype and out.shape == ref.shape
    assert torch.isfinite(out).all(), f"{(~torch.isfinite(out)).sum().item()} elements not written (NaN poison)"
    rel = _rel(out, ref)
    assert rel < REL[out_dtype], f"relative error {rel:.3g} >= {REL[out_dtype]}"


# ------------------------------------------------------------------------------------------------ quantizer


def _x(gen, M, K, dtype=BF):
    x = torch.randn(M, K, generator=gen) * (1 + 20 * (torch.rand(K, generator=gen) > 0.97))
    return x.to(dtype)


@pytest.mark.parametrize("mode", ["int8", "fp8"])
@pytest.mark.parametrize("M, K, R", [(1, 64, 0), (17, 192, 16), (111, 320, 40), (33, 1024, 32)])
@pytest.mark.parametrize("smooth", [False, True])
def test_quantizer_matches_the_reference(k, gen, mode, M, K, R, smooth):
    x = _x(gen, M, K)
    x[M // 2] = 0.0  # a zero row: scale 0, q 0
    sm = torch.rand(K, generator=gen) + 0.5 if smooth else None
    ld = (torch.randn(R, K, generator=gen) * 0.1).to(BF) if R else None
    q = torch.full((M, K), 0x5A, dtype=torch.uint8).view(E4M3 if mode == "fp8" else torch.int8)
    out = (q, torch.full((M,), float("nan")), torch.full((M, R), float("nan")))
    q, s, la = k.quant8.quantize_8bit_triton(x, sm, ld, mode, out=out)
    qr, sr, lar = reference.quantize_act(x, smooth=sm, lora_down=ld, mode=mode)
    assert torch.equal(q.view(torch.uint8), qr.view(torch.uint8))
    assert torch.equal(s, sr)
    if R:
        assert _rel(la, lar) < 1e-5
    else:
        assert la.shape == (M, 0)


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_quantizer_rounding_edges_and_fp16(k, gen, mode):
    qmax = 127.0 if mode == "int8" else 448.0
    x = torch.randn(6, 128, generator=gen).to(FP16)
    x[0, :4] = torch.tensor([1.0, -0.0, 0.5, -0.5])  # with amax 1: ties at +-63.5 (int8) / signed zero
    x[0, 4:] = 0.25
    x[1] = torch.linspace(-3, 3, 128).to(FP16)
    q, s, _ = k.quant8.quantize_8bit_triton(x, None, None, mode)
    qr, sr, _ = reference.quantize_act(x, mode=mode)
    assert torch.equal(q.view(torch.uint8), qr.view(torch.uint8)) and torch.equal(s, sr)
    assert float(s[0]) == float(torch.tensor(1.0) / torch.tensor(qmax))  # fp32 division


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_quantizer_non_finite_rows_get_a_nan_scale(k, gen, mode):
    """docs/formats.md, non-finite values: a NaN in a row gives that row a NaN scale and q = 0 (the GEMM
    then writes NaN for the token); the other rows are untouched."""
    x = torch.randn(4, 128, generator=gen).to(BF)
    x[1, 7] = float("nan")
    q, s, _ = k.quant8.quantize_8bit_triton(x, None, None, mode)
    qr, sr, _ = reference.quantize_act(x, mode=mode)
    assert torch.isnan(s[1]) and (q[1].view(torch.uint8) == 0).all()
    assert torch.equal(s[[0, 2, 3]], sr[[0, 2, 3]])
    assert torch.equal(q.view(torch.uint8)[[0, 2, 3]], qr.view(torch.uint8)[[0, 2, 3]])


# ------------------------------------------------------------------------------------------------ expand


def _fp4(fmt, gen, N, K):
    w = torch.randn(N, K, generator=gen)
    if fmt == "nvfp4":
        packed, bs, ts = nvfp4.quantize(w)
    else:
        (packed, bs), ts = mxfp4.quantize(w), None
    w_inv, w_scale_fp8, _ = fp4_fp8_scales(fmt, packed, bs, ts)
    return packed, bs, ts, w_inv, w_scale_fp8


@pytest.mark.parametrize("N, K", [(1, 64), (37, 192), (50, 320)])
def test_expand_is_exact(k, gen, N, K):
    w = torch.randn(N, K, generator=gen) * torch.rand(N, 1, generator=gen)
    c, gs, _ = f8l.quantize(w)
    p = f8l.pack(c)
    out = torch.full((N, K), 0x5A, dtype=torch.uint8).view(E4M3)
    assert torch.equal(k.expand.expand_triton("f8l", p, gs, out=out).view(torch.uint8),
                       f8l.expand(p, gs).view(torch.uint8))
    c, s, z, _ = i8q.quantize(w)
    p = i8q.pack(c)
    assert torch.equal(k.expand.expand_triton("i8q", p, s, z), i8q.expand(p, s, z))
    for fmt in ("nvfp4", "mxfp4"):
        packed, bs, ts, w_inv, w_s8 = _fp4(fmt, gen, N, K)
        got = k.expand.expand_triton(fmt, packed, bs, row_inv=w_inv)
        # what the fp4 reference multiplies (ops_float.fp4_linear_torch) and dequantize_to_fp8's bytes
        q_ref, row = (nvfp4.dequantize_to_fp8(packed, bs, ts) if fmt == "nvfp4"
                      else mxfp4.dequantize_to_fp8(packed, bs))
        assert torch.equal(got.view(torch.uint8), q_ref.view(torch.uint8)), fmt
        assert torch.equal(row, w_s8)


def test_expand_f8l_every_code_and_scale_byte(k, gen):
    """Random code bytes and random scale bytes (subnormal, negative and saturating ones included): the
    kernel's e4m3 conversion written out on the bit pattern gives the reference's bytes everywhere. NaN
    scale bytes are left out: no valid layout holds one (the quantizer and ``check_buffers`` refuse them),
    and the interpreter reads e4m3 0x7F as a finite number (the GPU reads NaN, as the reference does)."""
    N, K = 64, 256
    codes = torch.randint(0, 256, (N, K // 2), generator=gen, dtype=torch.uint8)
    scales = torch.randint(0, 256, (N, K // 64), generator=gen, dtype=torch.uint8)
    scales[(scales & 0x7F) == 0x7F] = 0x7E
    scales = scales.view(E4M3)
    assert torch.equal(k.expand.expand_triton("f8l", codes, scales).view(torch.uint8),
                       f8l.expand(codes, scales).view(torch.uint8))


# ------------------------------------------------------------------------------------------------ gemm8


def _w8_inputs(fmt, gen, M, N, K, R, lora_dtype=BF, bias_dtype=BF):
    x = _x(gen, M, K)
    ld = (torch.randn(R, K, generator=gen) * 0.05).to(BF) if R else None
    qa, sa, la = reference.quantize_act(x, lora_down=ld, mode="fp8" if fmt == "f8l" else "int8")
    w = torch.randn(N, K, generator=gen) * 0.05
    if fmt == "f8l":
        c, gs, row = f8l.quantize(w)
        p = f8l.pack(c)
        wargs, w8 = (p, gs, None), f8l.expand(p, gs)
    else:
        c, s, z, row = i8q.quantize(w)
        p = i8q.pack(c)
        wargs, w8 = (p, s, z), i8q.expand(p, s, z)
    lu = (torch.randn(N, R, generator=gen) * 0.1).to(lora_dtype) if R else None
    bias = (torch.randn(N, generator=gen)).to(bias_dtype)
    return dict(qa=qa, sa=sa, wargs=wargs, w8=w8, row=row, la=la, lu=lu, bias=bias)


def _ref(fmt, d):
    fn = reference.gemm_w4a8_f8l if fmt == "f8l" else reference.gemm_w4a8_i8q
    wargs = d["wargs"][:2] if fmt == "f8l" else d["wargs"]
    return fn(d["qa"], d["sa"], *wargs, d["row"], d["la"], d["lu"], d["bias"], torch.float64, torch.float64)


@pytest.mark.parametrize("fmt", ["f8l", "i8q"])
@pytest.mark.parametrize("M, N, K, R", [(1, 48, 64, 0), (17, 33, 128, 8), (65, 48, 64, 0), (111, 80, 192, 16),
                                        (70, 33, 320, 40)])
@pytest.mark.parametrize("out_dtype", [FP32, BF])
def test_gemm8_matches_float64(k, gen, fmt, M, N, K, R, out_dtype):
    d = _w8_inputs(fmt, gen, M, N, K, R)
    out = torch.full((M, N), float("nan"), dtype=out_dtype)
    res = k.gemm8.gemm8_triton(d["qa"], d["sa"], d["w8"], d["row"], d["la"], d["lu"], d["bias"], out_dtype, out=out)
    assert res is out
    _check(out, _ref(fmt, d), out_dtype)


def test_gemm8_fp16_lora_fp32_bias_fp16_out_and_uneven_k(k, gen):
    d = _w8_inputs("i8q", gen, 40, 24, 128, 24, lora_dtype=FP16, bias_dtype=FP32)
    out = k.gemm8.gemm8_triton(d["qa"], d["sa"], d["w8"], d["row"], d["la"], d["lu"], d["bias"], FP16)
    _check(out, _ref("i8q", d), FP16)
    # K = 96 with a 64-wide K tile: the masked last step (the plain GEMM takes any K that is a multiple of 16)
    a = torch.randint(-128, 128, (9, 96), generator=gen, dtype=torch.int8)
    w = torch.randint(-128, 128, (16, 96), generator=gen, dtype=torch.int8)
    cfg = k.gemm8.TileConfig(16, 16, 64, group_m=1, num_warps=1, num_stages=1)
    out = k.gemm8.gemm8_triton(a, torch.ones(9), w, torch.ones(16), out_dtype=FP32, config=cfg)
    assert torch.equal(out.double(), a.double() @ w.double().T)
    e = (torch.randn(9, 96, generator=gen) * 8).to(E4M3)
    f = (torch.randn(16, 96, generator=gen) * 8).to(E4M3)
    out = k.gemm8.gemm8_triton(e, torch.ones(9), f, torch.ones(16), out_dtype=FP32, config=cfg)
    assert _rel(out, e.double() @ f.double().T) < 1e-6


def test_gemm8_int8_sum_is_exact(k, gen):
    M, N, K = 33, 40, 512
    a = torch.randint(-128, 128, (M, K), generator=gen, dtype=torch.int8)
    w = torch.randint(-128, 128, (N, K), generator=gen, dtype=torch.int8)
    out = k.gemm8.gemm8_triton(a, torch.ones(M), w, torch.ones(N), out_dtype=FP32)
    assert torch.equal(out.double(), a.double() @ w.double().T)


def test_gemm8_fp32_lora_contract_of_fp8_linear(k, gen):
    """``lora_16bit=False``: lora_act is not rounded (fp8_linear's fp32 low-rank contract)."""
    d = _w8_inputs("f8l", gen, 20, 16, 128, 16)
    la = d["la"] + 1e-3 * torch.rand_like(d["la"])
    lu = d["lu"].float()
    out = k.gemm8.gemm8_triton(d["qa"], d["sa"], d["w8"], d["row"], la, lu, None, FP32, lora_16bit=False)
    ref = reference.gemm_w8(d["qa"], d["sa"], d["w8"], d["row"], None, None, None, torch.float64, torch.float64)
    ref = ref + la.double() @ lu.double().T
    assert _rel(out, ref) < 1e-5


def test_gemm8_rejects_bad_input(k, gen):
    d = _w8_inputs("i8q", gen, 4, 8, 64, 0)
    with pytest.raises(ValueError, match="w8"):
        k.gemm8.gemm8_triton(d["qa"], d["sa"], d["w8"].view(torch.uint8).view(E4M3), d["row"])
    with pytest.raises(ValueError, match="sw"):
        k.gemm8.gemm8_triton(d["qa"], d["sa"], d["w8"], d["row"][:3].contiguous())


# ------------------------------------------------------------------------------------------------ direct (small M)


@pytest.mark.parametrize("fmt", ["f8l", "i8q"])
@pytest.mark.parametrize("M, N, K, R, splits", [(1, 48, 64, 0, 1), (17, 70, 320, 16, 5), (64, 33, 384, 40, 3),
                                                (5, 40, 1024, 32, None),
                                                (16, 64, 512, 16, 2)])  # whole tiles: the unmasked path
@pytest.mark.parametrize("out_dtype", [FP32, BF])
def test_direct_matches_float64(k, gen, fmt, M, N, K, R, splits, out_dtype):
    d = _w8_inputs(fmt, gen, M, N, K, R)
    s1, s2 = d["wargs"][1], d["wargs"][2]
    out = torch.full((M, N), float("nan"), dtype=out_dtype)
    k.expand.direct_triton(fmt, d["qa"], d["sa"], d["wargs"][0], s1, s2, None, d["row"], d["la"], d["lu"],
                           d["bias"], out_dtype, splits=splits, out=out)
    _check(out, _ref(fmt, d), out_dtype)


def test_direct_i8q_split_sums_are_exact_integers(k, gen):
    M, N, K = 3, 24, 1024
    a = torch.randint(-127, 128, (M, K), generator=gen, dtype=torch.int8)
    c, s, z, _ = i8q.quantize(torch.randn(N, K, generator=gen))
    p = i8q.pack(c)
    exact = a.double() @ i8q.expand(p, s, z).double().T
    for splits in (1, 2, 4, 8):
        out = k.expand.direct_triton("i8q", a, torch.ones(M), p, s, z, None, torch.ones(N), out_dtype=FP32,
                                     splits=splits)
        assert torch.equal(out.double(), exact), splits


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_direct_fp4_matches_the_fp4_reference(k, gen, fmt):
    M, N, K = 7, 40, 256
    x = _x(gen, M, K)
    qa, sa = fp8.quantize(x)
    packed, bs, ts, w_inv, w_s8 = _fp4(fmt, gen, N, K)
    out = k.expand.direct_triton(fmt, qa, sa, packed, bs, None, w_inv, w_s8, out_dtype=FP32, splits=2)
    w8 = k.expand.expand_triton(fmt, packed, bs, row_inv=w_inv)
    ref = reference.gemm_w8(qa, sa, w8, w_s8, out_dtype=torch.float64, accum_dtype=torch.float64)
    assert _rel(out, ref) < 1e-5


def test_split_k_choice():
    split = load_interpreted("w4_expand.py").split_k_for
    assert split(48, 3072, 128) == 6      # 3072 -> 3072 at N/64 = 48 tiles: 6 splits fill two waves
    assert split(288, 3072, 128) == 1     # 18432 columns: enough tiles already
    assert split(1, 128, 128) == 1        # too short to split
    for n_tiles, K in ((48, 15360), (12, 3072), (3, 12288)):
        s = split(n_tiles, K, 128)
        assert (K // 64) % s == 0 and K // s >= 256


def test_direct_rejects_large_m_and_bad_splits(k, gen):
    d = _w8_inputs("i8q", gen, 65, 8, 128, 0)
    with pytest.raises(ValueError, match="SMALL_M"):
        k.expand.direct_triton("i8q", d["qa"], d["sa"], *d["wargs"], None, d["row"])
    d = _w8_inputs("i8q", gen, 4, 8, 128, 0)
    with pytest.raises(ValueError, match="splits"):
        k.expand.direct_triton("i8q", d["qa"], d["sa"], *d["wargs"], None, d["row"], splits=3)
