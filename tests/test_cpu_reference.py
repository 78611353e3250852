"""The C++ CPU references (lowbit_engine._C.cpu_*) against the torch references (lowbit_engine.reference).

What is compared, and how strictly (docs/formats.md):
  - activation quantizer: q and scales BIT-EXACT for int4 / int8 / fp8, with and without smoothing, bf16
    and fp16 inputs; lora_act within the fp32 summation bound |err| <= 2 K 2^-24 sum_k |x_k l_k|.
  - GEMMs: against the float64 reference of the same quantized math, per element
    |out - ref| <= u |ref| + 1e-5 max|ref| (u = 2^-24 fp32, 2^-8 bf16, 2^-11 fp16) and, for fp32 out,
    ||out - ref|| / ||ref|| < 1e-5; bit-exact against the fp32 torch reference when there is no low-rank
    term (same fp32 operations in the same order); EXACT when the math is exactly representable.
  - vq: dequantize bit-exact; vq_gemm within the same limits as the GEMMs.
Outputs are poisoned (NaN, or 0x7F bytes) before each call so that an unwritten element fails.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from lowbit_engine import _C
from lowbit_engine import reference as ref
from lowbit_engine._dtypes import ActQuant, DType, code
from lowbit_engine.formats import int4, vq

MODES = {"int4": ActQuant.INT4_G64, "int8": ActQuant.INT8_TOKEN, "fp8": ActQuant.FP8_TOKEN}
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


# ---- helpers ----------------------------------------------------------------------------------


def _gen(*case: object) -> torch.Generator:
    """A generator seeded from the test case, so every case draws different (reproducible) inputs."""
    return torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))


def _addr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _poison(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A tensor whose every element is garbage: NaN for floats, 0x7F bytes otherwise (NaN in e4m3)."""
    if dtype in (torch.float32, torch.float16, torch.bfloat16):
        return torch.full(shape, float("nan"), dtype=dtype)
    return torch.full(shape, 0x7F, dtype=torch.uint8).view(dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a tensor, so that torch.equal compares bit patterns (NaN, -0.0 included)."""
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def _activations(M: int, K: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Random activations with per-token magnitudes spread over a few decades, and a few outliers."""
    x = torch.randn(M, K, generator=gen) * torch.exp2(torch.randint(-6, 7, (M, 1), generator=gen).float())
    x[:, torch.randint(K, (max(1, K // 50),), generator=gen)] *= 20.0
    return x.to(dtype)


def _smooth(K: int, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(K, generator=gen) * 3.0 + 0.25


def _weight(N: int, K: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed int4 weight [N, K/2] and bf16 group scales [N, K/64], from a random dense weight."""
    q, s = int4.quantize(torch.randn(N, K, generator=gen) * 0.05, scale_dtype=torch.bfloat16)
    return int4.pack(q), s


def c_quantize_act(x, smooth=None, lora_down=None, mode="int4"):
    """Runs _C.cpu_quantize_act on poisoned outputs; returns (q, scales, lora_act | None)."""
    M, K = x.shape
    R = 0 if lora_down is None else lora_down.shape[0]
    if mode == "int4":
        q, s = _poison((M, K // 2), torch.uint8), _poison((M, K // 64), torch.float32)
    else:
        q = _poison((M, K), torch.int8 if mode == "int8" else torch.float8_e4m3fn)
        s = _poison((M,), torch.float32)
    la = _poison((M, R), torch.float32) if R else None
    _C.cpu_quantize_act(x.data_ptr(), code(x.dtype), M, K, _addr(smooth), _addr(lora_down), R,
                        int(MODES[mode]), q.data_ptr(), s.data_ptr(), _addr(la))
    return q, s, la


def _lora_codes(lora_up, bias):
    return (code(lora_up.dtype) if lora_up is not None else 0, code(bias.dtype) if bias is not None else 0)


def c_gemm_w4a4(act, act_scales, w, w_scales, lora_act=None, lora_up=None, bias=None, out_dtype=torch.bfloat16):
    M, N, K = act.shape[0], w.shape[0], w.shape[1] * 2
    R = 0 if lora_act is None else lora_act.shape[1]
    out = _poison((M, N), out_dtype)
    lora_code, bias_code = _lora_codes(lora_up, bias)
    _C.cpu_gemm_w4a4(act.data_ptr(), act_scales.data_ptr(), w.data_ptr(), w_scales.data_ptr(), M, N, K,
                     _addr(lora_act), _addr(lora_up), lora_code, R, _addr(bias), bias_code, out.data_ptr(),
                     code(out_dtype))
    return out


def c_gemm_w4a8(act, act_scales, w, w_scales, lora_act=None, lora_up=None, bias=None, out_dtype=torch.bfloat16):
    M, N, K = act.shape[0], w.shape[0], w.shape[1] * 2
    R = 0 if lora_act is None else lora_act.shape[1]
    out = _poison((M, N), out_dtype)
    lora_code, bias_code = _lora_codes(lora_up, bias)
    _C.cpu_gemm_w4a8(act.data_ptr(), code(act.dtype), act_scales.data_ptr(), w.data_ptr(), w_scales.data_ptr(),
                     M, N, K, _addr(lora_act), _addr(lora_up), lora_code, R, _addr(bias), bias_code,
                     out.data_ptr(), code(out_dtype))
    return out


def c_vq_dequantize(codes, codebook, N, K, index_bits, channel_scale=None, out_dtype=torch.float32):
    k, d = codebook.shape
    out = _poison((N, K), out_dtype)
    _C.cpu_vq_dequantize(codes.data_ptr(), index_bits, codebook.data_ptr(), code(codebook.dtype), k, d,
                         _addr(channel_scale), N, K, out.data_ptr(), code(out_dtype))
    return out


def c_vq_gemm(x, codes, codebook, N, K, index_bits, channel_scale=None, bias=None):
    k, d = codebook.shape
    out = _poison((x.shape[0], N), x.dtype)
    _C.cpu_vq_gemm(x.data_ptr(), code(x.dtype), x.shape[0], codes.data_ptr(), index_bits, codebook.data_ptr(),
                   code(codebook.dtype), k, d, _addr(channel_scale), N, K, _addr(bias),
                   code(bias.dtype) if bias is not None else 0, out.data_ptr())
    return out


def assert_close_to_f64(out: torch.Tensor, ref64: torch.Tensor) -> None:
    """Rounding-level agreement with a float64 reference (limits in the module docstring)."""
    assert not torch.isnan(out).any(), "an output element was not written (still NaN)"
    o = out.double()
    u = UNIT_ROUNDOFF[out.dtype]
    slack = 1e-5 * float(ref64.abs().max())
    bad = (o - ref64).abs() > u * ref64.abs() + slack
    assert not bad.any(), (
        f"{int(bad.sum())} elements off, worst |out - ref| = {float((o - ref64).abs().max()):.3g} "
        f"(max |ref| = {float(ref64.abs().max()):.3g}, dtype {out.dtype})"
    )
    if out.dtype == torch.float32:
        rel = float((o - ref64).norm() / ref64.norm())
        assert rel < 1e-5, f"relative error {rel:.3g} >= 1e-5"


# ---- activation quantizer ---------------------------------------------------------------------

QUANT_SHAPES = [(1, 64, 0), (17, 128, 16), (111, 192, 32), (17, 320, 0), (111, 320, 16), (1, 192, 32)]


@pytest.mark.parametrize("M,K,R", QUANT_SHAPES)
@pytest.mark.parametrize("smooth", [False, True], ids=["plain", "smooth"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("mode", list(MODES))
def test_quantize_act_matches_reference(mode, dtype, smooth, M, K, R):
    gen = _gen(mode, dtype, smooth, M, K, R)
    x = _activations(M, K, dtype, gen)
    sm = _smooth(K, gen) if smooth else None
    down = (torch.randn(R, K, generator=gen) * 0.1).to(dtype) if R else None

    q, s, la = c_quantize_act(x, sm, down, mode)
    q_ref, s_ref, la_ref = ref.quantize_act(x, sm, down, mode)

    assert q.dtype == q_ref.dtype and q.shape == q_ref.shape
    assert torch.equal(_bits(q), _bits(q_ref)), f"{mode} q differs in {int((_bits(q) != _bits(q_ref)).sum())} places"
    assert torch.equal(_bits(s), _bits(s_ref)), "scales differ"
    if R == 0:
        assert la is None and la_ref is None
        return
    # fp32 sums in any order: |err| <= 2 K u sum_k |x_k l_k| (a generous form of gamma_K).
    bound = 2 * K * 2.0**-24 * (x.double().abs() @ down.double().abs().T)
    exact = x.double() @ down.double().T
    assert ((la.double() - exact).abs() <= bound).all()
    assert ((la_ref.double() - exact).abs() <= bound).all()
    assert float((la.double() - exact).norm() / exact.norm()) < 1e-5


def _sweep(dtype: torch.dtype, limit: float) -> torch.Tensor:
    """Every finite value of a 16-bit float dtype with |v| <= limit (both signs), as that dtype."""
    v = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16).view(dtype)
    v = v[torch.isfinite(v.float()) & (v.float().abs() <= limit)]
    return v


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("mode,qmax", [("int4", 7.0), ("int8", 127.0), ("fp8", 448.0)])
def test_quantize_act_exhaustive_values(mode, qmax, dtype):
    """Every bf16/fp16 value in [-qmax, qmax] goes through rint / e4m3 rounding with scale exactly 1.

    Each row (or int4 group) holds a qmax, so scale = qmax / qmax = 1 and q is the rounding of the value
    itself: ties to even, clamping and (for fp8) e4m3 subnormals are all exercised.
    """
    vals = _sweep(dtype, qmax)
    group = 64 if mode == "int4" else 256
    per_row = group - 1
    pad = (-vals.numel()) % per_row
    vals = torch.cat([vals, vals[:pad]]).reshape(-1, per_row)
    x = torch.cat([torch.full((vals.shape[0], 1), qmax, dtype=dtype), vals], dim=1)
    if mode == "int4":  # one group of 64 per row of 64 is fine; make rows of 4 groups
        x = x[: x.shape[0] // 4 * 4].reshape(-1, 256)
    q, s, _ = c_quantize_act(x, mode=mode)
    q_ref, s_ref, _ = ref.quantize_act(x, mode=mode)
    assert torch.equal(s, torch.ones_like(s)) and torch.equal(s_ref, s)
    assert torch.equal(_bits(q), _bits(q_ref))
    # And against an independent spelling of the rounding.
    expected = x.float().round().clamp(-8, 7) if mode == "int4" else x.float().round()
    if mode == "fp8":
        assert torch.equal(_bits(q), _bits(x.float().to(torch.float8_e4m3fn)))
    elif mode == "int8":
        assert torch.equal(q, expected.to(torch.int8))
    else:
        assert torch.equal(int4.unpack(q), expected.to(torch.int8))


def test_quantize_act_ties_to_even_and_zero_groups():
    # Group 0: amax 7 -> scale 1, so +-0.5, 1.5, 2.5, 3.5 are exact ties. Group 1: all zero.
    g0 = torch.tensor([7.0, 0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, -3.5, 6.5] + [0.25] * 54)
    x = torch.cat([g0, torch.zeros(64)])[None].to(torch.bfloat16)
    q, s, _ = c_quantize_act(x, mode="int4")
    assert s.tolist() == [[1.0, 0.0]]
    got = int4.unpack(q)[0].tolist()
    assert got[:10] == [7, 0, 2, 2, 4, 0, -2, -2, -4, 6]
    assert got[64:] == [0] * 64
    for mode in ("int8", "fp8"):
        q8, s8, _ = c_quantize_act(torch.zeros(2, 64, dtype=torch.float16), mode=mode)
        assert s8.tolist() == [0.0, 0.0] and not q8.view(torch.uint8).any()


# ---- GEMMs ------------------------------------------------------------------------------------

# (M, N, K, R, bias dtype or None)
GEMM_CASES = [
    (1, 8, 64, 0, None),
    (17, 40, 128, 16, torch.float32),
    (111, 96, 192, 32, torch.bfloat16),
    (17, 24, 320, 0, torch.float16),
    (111, 8, 320, 16, None),
    (1, 96, 192, 32, torch.float32),
    (111, 33, 64, 16, torch.bfloat16),
]
OUT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _gemm_inputs(M, N, K, R, bias_dtype, mode, gen):
    x = _activations(M, K, torch.bfloat16, gen)
    down = (torch.randn(R, K, generator=gen) * 0.1).to(torch.bfloat16) if R else None
    act, act_scales, lora_act = ref.quantize_act(x, _smooth(K, gen), down, mode)
    w, w_scales = _weight(N, K, gen)
    lora_dtype = torch.float16 if (M + N) % 2 else torch.bfloat16
    lora_up = (torch.randn(N, R, generator=gen) * 0.1).to(lora_dtype) if R else None
    bias = torch.randn(N, generator=gen).to(bias_dtype) if bias_dtype is not None else None
    return act, act_scales, w, w_scales, lora_act, lora_up, bias


@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("M,N,K,R,bias_dtype", GEMM_CASES)
def test_gemm_w4a4_matches_reference(M, N, K, R, bias_dtype, out_dtype):
    args = _gemm_inputs(M, N, K, R, bias_dtype, "int4", _gen("w4a4", M, N, K, R))
    out = c_gemm_w4a4(*args, out_dtype=out_dtype)
    ref64 = ref.gemm_w4a4(*args, out_dtype=torch.float64, accum_dtype=torch.float64)
    assert_close_to_f64(out, ref64)
    ref32 = ref.gemm_w4a4(*args, out_dtype=out_dtype)
    if R == 0:  # the same fp32 operations in the same order: identical bits
        assert torch.equal(_bits(out), _bits(ref32))
    else:
        assert_close_to_f64(ref32, ref64)


@pytest.mark.parametrize("act_mode", ["int8", "fp8"])
@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("M,N,K,R,bias_dtype", GEMM_CASES)
def test_gemm_w4a8_matches_reference(M, N, K, R, bias_dtype, out_dtype, act_mode):
    args = _gemm_inputs(M, N, K, R, bias_dtype, act_mode, _gen("w4a8", act_mode, M, N, K, R))
    out = c_gemm_w4a8(*args, out_dtype=out_dtype)
    ref64 = ref.gemm_w4a8(*args, out_dtype=torch.float64, accum_dtype=torch.float64)
    assert_close_to_f64(out, ref64)
    ref32 = ref.gemm_w4a8(*args, out_dtype=out_dtype)
    if R == 0 and act_mode == "int8":  # fp8 group sums may round differently (order is free)
        assert torch.equal(_bits(out), _bits(ref32))
    else:
        assert_close_to_f64(ref32, ref64)


def _pow2(shape, lo, hi, gen, dtype=torch.float32):
    return torch.exp2(torch.randint(lo, hi + 1, shape, generator=gen).float()).to(dtype)


@pytest.mark.parametrize("K", [64, 128, 192, 320])
@pytest.mark.parametrize("M,N", [(1, 8), (17, 40), (111, 24)])
def test_gemm_integer_part_exact(M, N, K):
    """Power-of-two scales and small integer biases: every result is exact in fp32, so out == ref64.

    The int4 values cover the whole nibble range, -8 included (legal in the layout, never produced by
    the quantizer).
    """
    gen = _gen("exact", M, N, K)
    qa = torch.randint(-8, 8, (M, K), generator=gen, dtype=torch.int8)
    qw = torch.randint(-8, 8, (N, K), generator=gen, dtype=torch.int8)
    qa[0, :64], qw[0, :64] = -8, -8  # the extreme product, a whole group of it
    act, w = int4.pack(qa), int4.pack(qw)
    sa = _pow2((M, K // 64), -2, 2, gen)
    sw = _pow2((N, K // 64), -2, 2, gen, torch.bfloat16)
    bias = torch.randint(-8, 9, (N,), generator=gen).float()

    out = c_gemm_w4a4(act, sa, w, sw, bias=bias, out_dtype=torch.float32)
    ref64 = ref.gemm_w4a4(act, sa, w, sw, bias=bias, out_dtype=torch.float64, accum_dtype=torch.float64)
    dense = int4.dequantize(qa, sa).double() @ int4.dequantize(qw, sw).double().T + bias.double()
    assert torch.equal(ref64, dense)
    assert torch.equal(ref64.float().double(), ref64), "test setup: the result must be exact in fp32"
    assert torch.equal(out.double(), ref64)

    # W4A8, int8 activations over the full int8 range (-128 included).
    q8 = torch.randint(-128, 128, (M, K), generator=gen, dtype=torch.int8)
    s8 = _pow2((M,), -2, 2, gen)
    out8 = c_gemm_w4a8(q8, s8, w, sw, bias=bias, out_dtype=torch.float32)
    dense8 = (q8.double() * s8.double()[:, None]) @ int4.dequantize(qw, sw).double().T + bias.double()
    assert torch.equal(dense8.float().double(), dense8)
    assert torch.equal(out8.double(), dense8)

    # W4A8, e4m3 activations with |v| in [0.25, 15]: group sums and scaled sums stay exact in fp32.
    table = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
    ok = torch.isfinite(table) & (table.abs() >= 0.25) & (table.abs() <= 15)
    choices = torch.arange(256)[ok].to(torch.uint8)
    f8 = choices[torch.randint(len(choices), (M, K), generator=gen)].view(torch.float8_e4m3fn)
    sw1 = _pow2((N, K // 64), -1, 1, gen, torch.bfloat16)
    outf = c_gemm_w4a8(f8, s8, w, sw1, bias=bias, out_dtype=torch.float32)
    densef = (f8.double() * s8.double()[:, None]) @ int4.dequantize(qw, sw1).double().T + bias.double()
    assert torch.equal(densef.float().double(), densef)
    assert torch.equal(outf.double(), densef)


# ---- vq ---------------------------------------------------------------------------------------

# (N, K, k, d, index_bits): odd index counts per row for 12-bit (36/4 = 9, 320/64 = 5).
VQ_CASES = [
    (1, 64, 256, 4, 8),
    (17, 128, 100, 4, 8),
    (40, 320, 4096, 4, 12),
    (17, 36, 3000, 4, 12),
    (9, 320, 512, 64, 12),
    (33, 192, 16, 8, 8),
]


def _vq_inputs(N, K, k, d, bits, cb_dtype, scaled, gen):
    codebook = torch.randn(k, d, generator=gen).to(cb_dtype)
    idx = torch.randint(k, (N, K // d), generator=gen)
    scale = torch.rand(N, generator=gen) + 0.5 if scaled else None
    return vq.pack_indices(idx, bits), codebook, scale


@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("cb_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["cb32", "cb_bf16", "cb16"])
@pytest.mark.parametrize("scaled", [False, True], ids=["noscale", "scale"])
@pytest.mark.parametrize("N,K,k,d,bits", VQ_CASES)
def test_vq_dequantize_exact(N, K, k, d, bits, scaled, cb_dtype, out_dtype):
    codes, cb, scale = _vq_inputs(N, K, k, d, bits, cb_dtype, scaled, _gen("vqdq", N, K, k, d, scaled, cb_dtype))
    out = c_vq_dequantize(codes, cb, N, K, bits, scale, out_dtype)
    expected = ref.vq_dequantize(codes, cb, N, K, bits, scale, out_dtype)
    assert torch.equal(_bits(out), _bits(expected))


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["x32", "bf16", "fp16"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("M", [1, 17, 111])
@pytest.mark.parametrize("N,K,k,d,bits", VQ_CASES[:4])
def test_vq_gemm_matches_reference(N, K, k, d, bits, M, with_bias, x_dtype):
    gen = _gen("vqgemm", N, K, k, d, M, with_bias, x_dtype)
    codes, cb, scale = _vq_inputs(N, K, k, d, bits, torch.bfloat16, M % 2 == 1, gen)
    x = _activations(M, K, x_dtype, gen)
    bias = torch.randn(N, generator=gen).to(torch.bfloat16) if with_bias else None
    out = c_vq_gemm(x, codes, cb, N, K, bits, scale, bias)
    w64 = ref.vq_dequantize(codes, cb, N, K, bits, scale).double()
    ref64 = x.double() @ w64.T + (bias.double() if bias is not None else 0.0)
    assert out.dtype == x_dtype
    assert_close_to_f64(out, ref64)
    assert_close_to_f64(ref.vq_gemm(x, codes, cb, N, K, bits, scale, bias), ref64)


# ---- argument errors --------------------------------------------------------------------------


def test_empty_problems_are_no_ops():
    # Empty torch tensors report address 0; an empty problem must not touch (or check) them.
    _C.cpu_quantize_act(0, code(torch.bfloat16), 0, 64, 0, 0, 0, int(ActQuant.INT4_G64), 0, 0, 0)
    _C.cpu_gemm_w4a4(0, 0, 0, 0, 0, 8, 64, 0, 0, 0, 0, 0, 0, 0, int(DType.F32))
    _C.cpu_gemm_w4a8(0, int(DType.I8), 0, 0, 0, 5, 0, 128, 0, 0, 0, 0, 0, 0, 0, int(DType.BF16))
    _C.cpu_vq_dequantize(0, 8, 0, int(DType.F32), 256, 4, 0, 0, 64, 0, int(DType.F32))


def _w4a4_call(**over):
    """A valid cpu_gemm_w4a4 call (M=2, N=8, K=64) with some arguments replaced."""
    gen = _gen("bad-args")
    act, sa, _ = ref.quantize_act(torch.randn(2, 64, generator=gen).to(torch.bfloat16))
    w, sw = _weight(8, 64, gen)
    out = torch.empty(2, 8)
    la, lu = torch.randn(2, 4, generator=gen), torch.randn(8, 4, generator=gen).to(torch.bfloat16)
    keep = (act, sa, w, sw, out, la, lu)  # noqa: F841  (alive until the call returns)
    kw = dict(act=act.data_ptr(), act_scales=sa.data_ptr(), w=w.data_ptr(), w_scales=sw.data_ptr(), M=2, N=8,
              K=64, lora_act=la.data_ptr(), lora_up=lu.data_ptr(), lora_dtype=int(DType.BF16), R=4, bias=0,
              bias_dtype=0, out=out.data_ptr(), out_dtype=int(DType.F32))
    kw.update(over)
    _C.cpu_gemm_w4a4(*kw.values())
    return out


def test_valid_call_passes():
    assert torch.isfinite(_w4a4_call()).all()


@pytest.mark.parametrize(
    "over,match",
    [
        (dict(K=100), "K must be a positive multiple of 64, got 100"),
        (dict(act=0), "act and act_scales must not be null"),
        (dict(w_scales=0), "w and w_scales must not be null"),
        (dict(out=0), "out is null"),
        (dict(lora_up=0), "both or neither"),
        (dict(lora_act=0, lora_up=0), "R = 4 but lora_act and lora_up are null"),
        (dict(R=-1), "R must be >= 0"),
        (dict(lora_dtype=int(DType.F32)), "lora_up must be float16 or bfloat16"),
        (dict(out_dtype=9), "out dtype must be"),
        (dict(bias=1 << 12, bias_dtype=int(DType.I8)), "bias must be float32, float16 or bfloat16"),
    ],
)
def test_gemm_w4a4_bad_arguments(over, match):
    with pytest.raises(ValueError, match=match):
        _w4a4_call(**over)


def test_gemm_w4a8_bad_act_dtype():
    with pytest.raises(ValueError, match="gemm_w4a8: act must be int8 or float8_e4m3fn"):
        _C.cpu_gemm_w4a8(1, int(DType.U8), 1, 1, 1, 1, 1, 64, 0, 0, 0, 0, 0, 0, 1, int(DType.F32))
    with pytest.raises(ValueError, match="gemm_w4a8: K must be a positive multiple of 64, got 96"):
        _C.cpu_gemm_w4a8(1, int(DType.I8), 1, 1, 1, 1, 1, 96, 0, 0, 0, 0, 0, 0, 1, int(DType.F32))


def test_quantize_act_bad_arguments():
    x = torch.randn(2, 128).to(torch.bfloat16)
    q, s = torch.empty(2, 64, dtype=torch.uint8), torch.empty(2, 2)
    bf16, int4_mode = code(torch.bfloat16), int(ActQuant.INT4_G64)

    def call(x_dtype=bf16, K=128, mode=int4_mode, x_ptr=x.data_ptr(), lora_down=0, R=0, lora_act=0):
        _C.cpu_quantize_act(x_ptr, x_dtype, 2, K, 0, lora_down, R, mode, q.data_ptr(), s.data_ptr(), lora_act)

    call()  # valid
    with pytest.raises(ValueError, match="quantize_act: x must be float16 or bfloat16"):
        call(x_dtype=int(DType.F32))
    with pytest.raises(ValueError, match="quantize_act: unknown mode code 7"):
        call(mode=7)
    with pytest.raises(ValueError, match="quantize_act: K must be a multiple of 64 for int4, got 100"):
        call(K=100)
    with pytest.raises(ValueError, match="quantize_act: x is null"):
        call(x_ptr=0)
    with pytest.raises(ValueError, match="R = 4 but lora_down is null"):
        call(R=4, lora_act=s.data_ptr())
    with pytest.raises(ValueError, match="R = 4 but lora_act_out is null"):
        call(R=4, lora_down=x.data_ptr())


def test_vq_bad_arguments():
    cb = torch.randn(16, 4)
    codes = vq.pack_indices(torch.randint(16, (2, 16)), 8)
    out = torch.empty(2, 64)

    def call(bits=8, k=16, d=4, K=64, codes_ptr=codes.data_ptr(), cb_dtype=int(DType.F32)):
        _C.cpu_vq_dequantize(codes_ptr, bits, cb.data_ptr(), cb_dtype, k, d, 0, 2, K, out.data_ptr(),
                             int(DType.F32))

    call()  # valid
    with pytest.raises(ValueError, match="vq_dequantize: index_bits must be 8 or 12, got 10"):
        call(bits=10)
    with pytest.raises(ValueError, match=r"k must be in \[1, 256\] for 8-bit indices, got 300"):
        call(k=300)
    with pytest.raises(ValueError, match="K must be a non-negative multiple of d=4, got 66"):
        call(K=66)
    with pytest.raises(ValueError, match="codes is null"):
        call(codes_ptr=0)
    with pytest.raises(ValueError, match="codebook must be float32, float16 or bfloat16"):
        call(cb_dtype=int(DType.I8))
    big = vq.pack_indices(torch.full((2, 16), 20), 8)  # index 20 with a 16-entry codebook
    with pytest.raises(ValueError, match="index 20 at row 0, position 0 is not below k=16"):
        call(codes_ptr=big.data_ptr())
    with pytest.raises(ValueError, match="vq_gemm: x must be float32, float16 or bfloat16"):
        _C.cpu_vq_gemm(1, int(DType.I8), 1, codes.data_ptr(), 8, cb.data_ptr(), int(DType.F32), 16, 4, 0, 2, 64,
                       0, 0, out.data_ptr())
