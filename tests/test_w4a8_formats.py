"""F8L and I8Q (lowbit_engine.formats.f8l / i8q / w4_layouts), their GEMM references, and the C++ references.

Integer parts are compared exactly (codes, expanded 8-bit operands, int8 GEMM sums); float results against
a float64 reference of the same quantized math with stated limits:
- fp32 out: every product is exact in fp32 (e4m3 x e4m3, int8 x int8 summed exactly in int32); what is
  left is the fp32 summation (fp8), the two scale multiplies, the low-rank dot and the bias: ~1e-7 in norm.
  Limit 1e-5; a wrong nibble, scale or row costs >= 1e-3.
"""

from __future__ import annotations

import pytest
import torch

from lowbit_engine import ops, ops_w4a8, reference
from lowbit_engine._build_info import native
from lowbit_engine.formats import f8l, fp8, i8q, int4, w4_layouts

BF, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
E4M3 = torch.float8_e4m3fn
REL_LIMIT = 1e-5


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def _sqnr(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    return (10 * torch.log10(w.pow(2).sum() / (w - w_hat).pow(2).sum())).item()


# ------------------------------------------------------------------------------------------------ F8L


def test_f8l_table_is_the_rounded_products():
    gs = torch.arange(0, 0x69, dtype=torch.uint8).view(E4M3)  # every e4m3 value in [0, 64]
    lut = f8l.table(gs)
    prod = gs.float()[:, None] * torch.arange(8.0)
    assert lut.shape == (0x69, 8)
    assert torch.equal(lut, prod.to(E4M3).float())
    # RNE in e4m3: every entry within 1/16 of the exact product, monotone in the magnitude
    assert ((lut - prod).abs() <= prod / 16 + 1e-30).all()
    assert (lut[:, 1:] >= lut[:, :-1]).all()


@pytest.mark.parametrize("search", [False, True])
def test_f8l_quantize_properties(gen, search):
    w = torch.randn(37, 192, generator=gen) * torch.rand(37, 1, generator=gen) * 3
    w[5] = 0.0  # a zero row
    w[7, :64] = 0.0  # a zero group
    codes, gs, row = f8l.quantize(w, search=search)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15
    assert gs.dtype == E4M3 and (gs.float() >= 0).all() and (gs.float() <= f8l.GS_MAX).all()
    assert row[5] == 1.0 and (codes[5] == 0).all() and (codes[7, :64] == 0).all()
    assert not (codes == f8l.SIGN).any()  # zero is stored as +0
    w_hat = f8l.dequantize(f8l.pack(codes), gs, row)
    # Each weight is its group's nearest table entry (times the row scale).
    lut = f8l.table(gs).repeat_interleave(64, dim=1).reshape(37, 192, 8) * row[:, None, None]
    nearest = (lut - w.abs()[..., None]).abs().amin(-1)
    assert torch.allclose((w_hat.abs() - w.abs()).abs(), nearest, rtol=1e-6, atol=1e-12)
    assert torch.equal(torch.sign(w_hat[w_hat != 0]), torch.sign(w[w_hat != 0]))


def test_f8l_search_lowers_the_error_and_matches_g64(gen):
    w = torch.randn(256, 1024, generator=gen)
    q, s = int4.quantize(w, scale_dtype=BF)
    g64 = _sqnr(w, int4.dequantize(q, s))
    plain = _sqnr(w, f8l.dequantize(f8l.pack(f8l.quantize(w)[0]), *f8l.quantize(w)[1:]))
    c, gs, r = f8l.quantize(w, search=True)
    searched = _sqnr(w, f8l.dequantize(f8l.pack(c), gs, r))
    assert searched > plain and searched > g64  # measured: g64 19.4, plain 19.2, searched 19.9 dB
    assert plain > g64 - 0.3


def test_f8l_expand_and_dequantize_agree(gen):
    w = torch.randn(9, 128, generator=gen)
    codes, gs, row = f8l.quantize(w)
    packed = f8l.pack(codes)
    assert torch.equal(f8l.unpack(packed), codes)
    w8 = f8l.expand(packed, gs)
    assert w8.dtype == E4M3
    assert torch.equal(w8.float() * row[:, None], f8l.dequantize(packed, gs, row))
    # every 4-bit code, including the -0 (0x8) the quantizer never writes
    all_codes = torch.arange(16, dtype=torch.uint8).repeat(1, 8)
    g = torch.tensor([[1.375, 0.125]]).to(E4M3)
    b = f8l.expand(f8l.pack(all_codes), g).view(torch.uint8)[0].int()
    lut = f8l.table(g)[0].to(E4M3).view(torch.uint8).int()  # [2 groups, 8 entries]
    c = all_codes[0].int()
    for k in range(128):
        assert int(b[k]) == int(lut[k // 64, c[k] & 7]) ^ (int(c[k] >> 3) << 7), k


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_f8l_and_i8q_reject_non_finite_weights(bad):
    w = torch.randn(4, 64)
    w[1, 3] = float(bad)
    for quant in (f8l.quantize, i8q.quantize):
        with pytest.raises(ValueError, match="non-finite"):
            quant(w)


@pytest.mark.parametrize("fn, args, match", [
    (f8l.quantize, (torch.randn(4, 100),), "multiple of 64"),
    (f8l.pack, (torch.full((2, 4), 16, dtype=torch.uint8),), "4-bit"),
    (f8l.table, (torch.ones(3),), "e4m3"),
    (i8q.quantize, (torch.randn(3, 65),), "multiple of 64"),
    (i8q.pack, (torch.full((2, 4), 16, dtype=torch.uint8),), "0..15"),
])
def test_format_argument_errors(fn, args, match):
    with pytest.raises(ValueError, match=match):
        fn(*args)


# ------------------------------------------------------------------------------------------------ I8Q


def test_i8q_zero_range_is_exactly_the_int8_condition():
    for s in range(1, 20):
        lo, hi = i8q.zero_range(torch.tensor([s]))
        ok = [z for z in range(16) if all(-128 <= (q - z) * s <= 127 for q in range(16))]
        assert ok == list(range(int(lo), int(hi) + 1)), s
    assert not ((lambda t: t[0] <= t[1])(i8q.zero_range(torch.tensor([17])))).item()


@pytest.mark.parametrize("search", [False, True])
def test_i8q_quantize_properties(gen, search):
    w = torch.randn(33, 256, generator=gen) * torch.rand(33, 1, generator=gen)
    w[:, 64:128] += 0.5  # a skewed group: the zero point moves
    w[4] = 0.0
    codes, steps, zeros, row = i8q.quantize(w, search=search)
    i8q.check(steps, zeros)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15 and row[4] == 1.0
    w8 = i8q.expand(i8q.pack(codes), steps, zeros)
    assert torch.equal(w8.int(), (codes.int().reshape(33, 4, 64) - zeros.int()[..., None]).reshape(33, 256)
                       * steps.int().repeat_interleave(64, dim=1))
    w_hat = i8q.dequantize(i8q.pack(codes), steps, zeros, row)
    assert _sqnr(w, w_hat) > 15  # measured 17.2 / 19.2 dB (plain / search): rows of all sizes, a skewed group
    assert (w_hat[4] == 0).all()


def test_i8q_beats_g64_on_gaussian_weights(gen):
    w = torch.randn(256, 1024, generator=gen)
    q, s = int4.quantize(w, scale_dtype=BF)
    g64 = _sqnr(w, int4.dequantize(q, s))
    c, st, z, r = i8q.quantize(w)
    plain = _sqnr(w, i8q.dequantize(i8q.pack(c), st, z, r))
    c, st, z, r = i8q.quantize(w, search=True)
    searched = _sqnr(w, i8q.dequantize(i8q.pack(c), st, z, r))
    assert searched > plain > g64 + 0.8  # measured: g64 19.4, plain 20.4, searched 21.0 dB


# ------------------------------------------------------------------------------------------------ layouts


@pytest.mark.parametrize("layout", w4_layouts.LAYOUTS)
def test_layouts_round_trip_and_check(gen, layout):
    w = torch.randn(24, 192, generator=gen)
    bufs = w4_layouts.quantize(w, layout)
    specs = w4_layouts.buffer_specs(layout, 24, 192)
    assert list(bufs) == list(specs)
    for name, (shape, dtype) in specs.items():
        assert tuple(bufs[name].shape) == shape and bufs[name].dtype == dtype
    w4_layouts.check(layout, bufs)
    assert _sqnr(w, w4_layouts.dequantize(layout, bufs)) > 15
    broken = dict(bufs)
    broken["wscales"] = bufs["wscales"][:, :1].contiguous()
    with pytest.raises(ValueError, match="wscales"):
        w4_layouts.check(layout, broken)


def test_convert_between_layouts(gen):
    w = torch.randn(16, 256, generator=gen)
    g64 = w4_layouts.quantize(w, "g64")
    w_g64 = w4_layouts.dequantize("g64", g64)
    for dst in ("f8l", "i8q"):
        out = w4_layouts.convert(g64, "g64", dst)
        w4_layouts.check(dst, out)
        # the nearest dst weight to what g64 held: close to it, closer than to a fresh quantization's error
        assert _sqnr(w_g64, w4_layouts.dequantize(dst, out)) > 20
    assert w4_layouts.convert(g64, "g64", "g64") == g64
    with pytest.raises(ValueError, match="unknown weight layout"):
        w4_layouts.convert(g64, "g64", "nf4")


# ------------------------------------------------------------------------------------------------ GEMM references


def _gemm_inputs(fmt, M, N, K, R, gen, lora_dtype=BF, bias=True):
    x = torch.randn(M, K, generator=gen).to(BF)
    x[0, 5] = 40.0  # an outlier token channel
    mode = "fp8" if fmt == "f8l" else "int8"
    ld = (torch.randn(R, K, generator=gen) * 0.05).to(BF) if R else None
    qa, sa, la = reference.quantize_act(x, lora_down=ld, mode=mode)
    w = torch.randn(N, K, generator=gen) * 0.05
    if fmt == "f8l":
        c, gs, r = f8l.quantize(w)
        wargs = (f8l.pack(c), gs, r)
    else:
        c, s, z, r = i8q.quantize(w)
        wargs = (i8q.pack(c), s, z, r)
    lu = (torch.randn(N, R, generator=gen) * 0.1).to(lora_dtype) if R else None
    b = torch.randn(N, generator=gen).to(BF) if bias else None
    return qa, sa, wargs, la, lu, b


@pytest.mark.parametrize("fmt", ["f8l", "i8q"])
@pytest.mark.parametrize("M, N, K, R", [(1, 8, 64, 0), (17, 45, 192, 16), (111, 33, 320, 8), (5, 64, 1024, 32)])
@pytest.mark.parametrize("out_dtype", [FP32, BF])
def test_cpu_reference_matches_float64(gen, fmt, M, N, K, R, out_dtype):
    qa, sa, wargs, la, lu, b = _gemm_inputs(fmt, M, N, K, R, gen)
    ref_fn = reference.gemm_w4a8_f8l if fmt == "f8l" else reference.gemm_w4a8_i8q
    op = ops_w4a8.gemm_w4a8_f8l if fmt == "f8l" else ops_w4a8.gemm_w4a8_i8q
    ref = ref_fn(qa, sa, *wargs, la, lu, b, torch.float64, torch.float64)
    with ops.record_backends() as used:
        out = op(qa, sa, *wargs, la, lu, b, out_dtype)
    assert used == {f"gemm_w4a8_{fmt}": {"cpu" if native() is not None else "torch"}}
    assert out.dtype == out_dtype and torch.isfinite(out).all()
    limit = REL_LIMIT if out_dtype == FP32 else 1e-2
    assert _rel(out, ref) < limit
    # the torch reference in fp32 (the contract's order) agrees too
    assert _rel(ref_fn(qa, sa, *wargs, la, lu, b, out_dtype), ref) < limit


def test_i8q_gemm_integer_part_is_exact(gen):
    M, N, K = 7, 24, 4096
    a = torch.randint(-127, 128, (M, K), generator=gen, dtype=torch.int8)
    c, s, z, r = i8q.quantize(torch.randn(N, K, generator=gen))
    packed = i8q.pack(c)
    out = ops_w4a8.gemm_w4a8_i8q(a, torch.ones(M), packed, s, z, torch.ones(N), out_dtype=FP32)
    exact = a.double() @ i8q.expand(packed, s, z).double().T  # |sum| < 2^24: exact in fp32 too
    assert torch.equal(out.double(), exact)


def test_f8l_gemm_integer_valued_sums_are_exact(gen):
    # small integer tokens and weights: every partial sum is an integer below 2^24, exact in fp32
    M, N, K = 5, 16, 512
    a = torch.randint(-8, 9, (M, K), generator=gen).float().to(E4M3)
    codes = torch.randint(0, 16, (N, K), generator=gen, dtype=torch.uint8)
    gs = torch.ones(N, K // 64).to(E4M3)
    out = ops_w4a8.gemm_w4a8_f8l(a, torch.ones(M), f8l.pack(codes), gs, torch.ones(N), out_dtype=FP32)
    w = f8l.expand(f8l.pack(codes), gs).float()
    assert torch.equal(out, a.float() @ w.T)


def test_lora_act_is_rounded_to_the_lora_dtype(gen):
    # The contract: the low-rank operands are 16-bit. A lora_act with bits below bf16 shows it.
    qa, sa, wargs, la, lu, b = _gemm_inputs("i8q", 3, 8, 64, 16, gen)
    la = la + 1e-3 * torch.rand_like(la)
    for lora_dtype in (BF, FP16):
        lu16 = lu.to(lora_dtype)
        out = ops_w4a8.gemm_w4a8_i8q(qa, sa, *wargs, la, lu16, b, FP32)
        ref16 = reference.gemm_w4a8_i8q(qa, sa, *wargs, la.to(lora_dtype).float(), lu16, b, torch.float64,
                                        torch.float64)
        assert _rel(out, ref16) < REL_LIMIT


@pytest.mark.skipif(native() is None, reason="needs lowbit_engine._C")
def test_cpp_expand_matches_torch(gen):
    N, K = 13, 256
    w = torch.randn(N, K, generator=gen)
    c, gs, _ = f8l.quantize(w)
    packed = f8l.pack(c)  # held: the native call takes raw addresses
    out = torch.empty(N, K, dtype=torch.uint8)
    native().cpu_expand_f8l(packed.data_ptr(), gs.data_ptr(), N, K, out.data_ptr())
    assert torch.equal(out, f8l.expand(packed, gs).view(torch.uint8))
    c, s, z, _ = i8q.quantize(w)
    packed = i8q.pack(c)
    out8 = torch.empty(N, K, dtype=torch.int8)
    native().cpu_expand_i8q(packed.data_ptr(), s.data_ptr(), z.data_ptr(), N, K, out8.data_ptr())
    assert torch.equal(out8, i8q.expand(packed, s, z))
    # random bytes, every code and scale pattern (NaN scales included): the same bits as torch
    codes = torch.randint(0, 256, (N, K // 2), generator=gen, dtype=torch.uint8)
    scales = torch.randint(0, 256, (N, K // 64), generator=gen, dtype=torch.uint8)
    native().cpu_expand_f8l(codes.data_ptr(), scales.data_ptr(), N, K, out.data_ptr())
    assert torch.equal(out, f8l.expand(codes, scales.view(E4M3)).view(torch.uint8))


@pytest.mark.skipif(native() is None, reason="needs lowbit_engine._C")
def test_cpp_gemm_w8_argument_errors():
    with pytest.raises(ValueError, match="multiple of 64"):
        native().cpu_gemm_w8(1, 3, 1, 1, 1, 1, 1, 100, 64, 0, 0, 0, 0, 0, 0, 1, 0)
    with pytest.raises(ValueError, match="int8 or float8"):
        native().cpu_gemm_w8(1, 0, 1, 1, 1, 1, 1, 64, 64, 0, 0, 0, 0, 0, 0, 1, 0)


@pytest.mark.parametrize("fmt", ["f8l", "i8q"])
def test_op_input_errors(gen, fmt):
    qa, sa, wargs, la, lu, b = _gemm_inputs(fmt, 4, 8, 128, 8, gen)
    op = ops_w4a8.gemm_w4a8_f8l if fmt == "f8l" else ops_w4a8.gemm_w4a8_i8q
    wrong_tokens = qa.view(torch.uint8).view(torch.int8) if fmt == "f8l" else qa.float().to(E4M3)
    with pytest.raises(ValueError, match="act"):
        op(wrong_tokens, sa, *wargs, la, lu, b)
    with pytest.raises(ValueError, match="w_row_scale"):
        op(qa, sa, *wargs[:-1], wargs[-1][:4].contiguous(), la, lu, b)
    with pytest.raises(ValueError, match="lora_act/lora_up"):
        op(qa, sa, *wargs, la, None, b)
    with pytest.raises(ValueError, match="lora_up"):
        op(qa, sa, *wargs, la, lu.float(), b)
