"""Property tests for the format references in lowbit_engine/formats (contract: docs/formats.md).

Every format is checked for: pack/unpack round trips on arbitrary codes, an elementwise error bound of half
a quantization step, exact round trips of representable values, idempotence where the format guarantees
it, zero rows/blocks, and clear ValueErrors on bad shapes. Roundings are compared with brute-force
nearest-even references written here from the value tables, not with the code under test.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lowbit_engine import formats
from lowbit_engine.formats import e2m1, fp8, int4, mxfp4, nvfp4

# Small tensors and a bounded number of examples keep the file at a few seconds on 2 cores.
FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

F32_EPS = 2.0**-23


# ----------------------------------------------------------------------------------------------------------
# Brute-force references
# ----------------------------------------------------------------------------------------------------------

E2M1_TABLE = torch.tensor(e2m1.MAGNITUDES, dtype=torch.float64)


def _e4m3_table() -> torch.Tensor:
    """The 127 non-negative finite e4m3fn values, indexed by their code (0x7F is NaN)."""
    vals = []
    for code in range(127):
        exp, man = code >> 3, code & 7
        vals.append(man * 2.0**-9 if exp == 0 else (1 + man / 8) * 2.0 ** (exp - 7))
    return torch.tensor(vals, dtype=torch.float64)


E4M3_TABLE = _e4m3_table()


def nearest_even_index(a: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index of the table entry nearest to each ``a >= 0`` (float64); ties go to the even index, and
    values beyond the table saturate to its last entry. For E2M1 and e4m3 the even index is the even
    code, i.e. round-half-to-even."""
    a = torch.clamp(a, max=float(table[-1]))
    hi = torch.clamp(torch.searchsorted(table, a), max=len(table) - 1)
    lo = torch.clamp(hi - 1, min=0)
    d_lo, d_hi = a - table[lo], table[hi] - a
    tie = torch.where(lo % 2 == 0, lo, hi)
    return torch.where(d_lo < d_hi, lo, torch.where(d_hi < d_lo, hi, tie))


def ref_e2m1_code(v: torch.Tensor) -> torch.Tensor:
    mag = nearest_even_index(v.double().abs(), E2M1_TABLE)
    return (mag | torch.where((v < 0) & (mag > 0), 8, 0)).to(torch.uint8)


def ref_e4m3(v: torch.Tensor) -> torch.Tensor:
    """RNE to e4m3 of values already within [-448, 448], as float64."""
    v = v.double()
    return torch.sign(v) * E4M3_TABLE[nearest_even_index(v.abs(), E4M3_TABLE)]


def e2m1_half_step(a: torch.Tensor) -> torch.Tensor:
    """Half the E2M1 grid spacing around magnitudes ``a`` in [0, 6]."""
    return torch.where(a < 2, 0.25, torch.where(a < 4, 0.5, 1.0)).double()


def e4m3_half_ulp(y: torch.Tensor) -> torch.Tensor:
    """Half the e4m3 spacing at ``y``: 2**(floor(log2|y|) - 4) in the normal range, 2**-10 below 2**-6."""
    _, e = torch.frexp(y.double().abs())
    return torch.pow(2.0, (torch.clamp(e - 1, min=-6) - 4).double())


def odd_part(n: int) -> int:
    while n and n % 2 == 0:
        n //= 2
    return n


# ----------------------------------------------------------------------------------------------------------
# Strategies: odd leading dims, K a few groups, heavy-tailed values, some all-zero groups
# ----------------------------------------------------------------------------------------------------------


def shapes(group: int, max_groups: int = 4) -> st.SearchStrategy[tuple[int, ...]]:
    lead = st.lists(st.sampled_from([1, 3, 5, 7]), min_size=0, max_size=2)
    return st.tuples(lead, st.integers(1, max_groups)).map(lambda t: (*t[0], t[1] * group))


def heavy(shape: tuple[int, ...], seed: int, tail: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * torch.exp(torch.randn(shape, generator=g) * tail)


@st.composite
def weights(draw: st.DrawFn, group: int, max_groups: int = 4) -> torch.Tensor:
    shape = draw(shapes(group, max_groups))
    seed = draw(st.integers(0, 2**32 - 1))
    x = heavy(shape, seed, draw(st.sampled_from([0.0, 1.0, 2.0, 3.0])))
    if draw(st.booleans()):  # zero some whole groups (the zero-scale paths)
        keep = torch.rand(x.numel() // group, generator=torch.Generator().manual_seed(seed + 1)) > 0.3
        x = (x.reshape(-1, group) * keep[:, None]).reshape(shape)
    return x


def per_group(s: torch.Tensor, group: int) -> torch.Tensor:
    return s.double().repeat_interleave(group, dim=-1)


# ----------------------------------------------------------------------------------------------------------
# int4
# ----------------------------------------------------------------------------------------------------------


@FAST
@given(shape=shapes(2, 8).map(lambda s: (*s[:-1], s[-1] * 4)), seed=st.integers(0, 2**32 - 1))
def test_int4_pack_roundtrip(shape: tuple[int, ...], seed: int) -> None:
    q = torch.randint(-8, 8, shape, dtype=torch.int8, generator=torch.Generator().manual_seed(seed))
    for signed in (True, False):
        packed = int4.pack(q, signed=signed)
        assert packed.dtype == torch.uint8 and packed.shape == (*shape[:-1], shape[-1] // 2)
        assert torch.equal(int4.unpack(packed, signed=signed), q)
    # layout: even k in the low nibble; signed = two's complement nibble, unsigned = q + 8
    lo, hi = q[..., 0::2].to(torch.int16), q[..., 1::2].to(torch.int16)
    assert torch.equal(int4.pack(q).to(torch.int16), (lo & 0xF) | ((hi & 0xF) << 4))
    assert torch.equal(int4.pack(q, signed=False).to(torch.int16), (lo + 8) | ((hi + 8) << 4))


@FAST
@given(x=weights(64), scale_dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_int4_error_bound(x: torch.Tensor, scale_dtype: torch.dtype) -> None:
    q, s = int4.quantize(x, scale_dtype=scale_dtype)
    assert q.dtype == torch.int8 and int(q.abs().max()) <= 7 and s.dtype == scale_dtype
    deq = int4.dequantize(q, s).double()
    # |x - q*s| <= s/2: the quotient is rounded to the nearest integer; the slack covers the fp32
    # rounding of x / s and q * s.
    err = (x.double() - deq).abs()
    assert (err <= per_group(s, 64) / 2 + 2 * F32_EPS * x.double().abs()).all()
    zero = s == 0  # all-zero groups: scale 0, codes 0
    assert torch.equal(zero, x.reshape(*s.shape, 64).abs().amax(-1) == 0)
    assert (q.reshape(*s.shape, 64)[zero] == 0).all()


@FAST
@given(shape=shapes(64), seed=st.integers(0, 2**32 - 1), scale_dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_int4_representable_roundtrip(shape: tuple[int, ...], seed: int, scale_dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-7, 8, shape, dtype=torch.int8, generator=g).reshape(-1, 64)
    q[:, 0] = 7 * (1 - 2 * torch.randint(0, 2, (q.shape[0],), generator=g)).to(torch.int8)  # amax = 7 * s
    s = torch.exp(torch.randn(q.shape[0], generator=g) * 4).to(torch.bfloat16)  # few bits: 7 * s is exact
    x = (q.float() * s.float()[:, None]).reshape(shape)
    q2, s2 = int4.quantize(x, scale_dtype=scale_dtype)
    assert torch.equal(q2, q.reshape(shape))
    assert torch.equal(s2.float().reshape(-1), s.float())
    assert torch.equal(int4.dequantize(q2, s2), x)


@FAST
@given(x=weights(64), scale_dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_int4_idempotent(x: torch.Tensor, scale_dtype: torch.dtype) -> None:
    q, s = int4.quantize(x, scale_dtype=scale_dtype)
    q2, s2 = int4.quantize(int4.dequantize(q, s), scale_dtype=scale_dtype)
    assert torch.equal(q2, q)
    if scale_dtype == torch.bfloat16:
        assert torch.equal(s2, s)
    else:  # fl(fl(7 s) / 7) != s for about 10% of fp32 s: the scale may move by one ulp, the codes never
        assert torch.allclose(s2, s, rtol=F32_EPS, atol=0)


def test_int4_bad_shapes() -> None:
    for k in (63, 100, 1):
        with pytest.raises(ValueError, match="multiple of the group size 64"):
            int4.quantize(torch.randn(3, k))
    with pytest.raises(ValueError, match="even"):
        int4.pack(torch.zeros(3, 5, dtype=torch.int8))


# ----------------------------------------------------------------------------------------------------------
# E2M1
# ----------------------------------------------------------------------------------------------------------

# docs/formats.md: nearest magnitude, ties to the even code, saturating at 6, -0 stored as code 0.
E2M1_CASES = [
    (0.25, 0), (0.75, 2), (1.25, 2), (1.75, 4), (2.5, 4), (3.5, 6), (5.0, 6),  # the listed ties
    (-0.25, 0), (-0.75, 10), (-1.25, 10), (-1.75, 12), (-2.5, 12), (-3.5, 14), (-5.0, 14),
    (0.0, 0), (-0.0, 0), (-0.1, 0), (1e-45, 0), (-1e-45, 0),
    (0.5, 1), (1.0, 2), (1.5, 3), (2.0, 4), (3.0, 5), (4.0, 6), (6.0, 7), (-6.0, 15), (-0.5, 9),
    (6.5, 7), (100.0, 7), (3e38, 7), (math.inf, 7), (-math.inf, 15),
]


@pytest.mark.parametrize("v, code", E2M1_CASES)
def test_e2m1_listed_cases(v: float, code: int) -> None:
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        if math.isfinite(v) and abs(v) > 1 and float(torch.tensor(v, dtype=dtype)) != v:
            continue  # bf16 cannot hold 3e38 exactly; irrelevant here
        assert int(e2m1.round_to_code(torch.tensor([v], dtype=dtype))) == code, (v, dtype)


@pytest.mark.parametrize("mid", [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
def test_e2m1_neighbours_of_ties(mid: float) -> None:
    m = torch.tensor(mid, dtype=torch.float32)
    below, above = torch.nextafter(m, torch.tensor(0.0)), torch.nextafter(m, torch.tensor(10.0))
    idx = E2M1_TABLE.tolist().index(max(t for t in e2m1.MAGNITUDES if t < mid))
    assert e2m1.round_to_code(below[None]).item() == idx
    assert e2m1.round_to_code(above[None]).item() == idx + 1


def test_e2m1_nan_maps_to_zero() -> None:
    assert e2m1.round_to_code(torch.tensor([math.nan, -math.nan])).tolist() == [0, 0]


finite32 = st.floats(width=32, allow_nan=False)
near_grid = st.floats(-7.0, 7.0, width=32)
on_ties = st.sampled_from([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5.0])


@FAST
@given(vals=st.lists(st.one_of(near_grid, finite32, on_ties), min_size=1, max_size=64))
def test_e2m1_matches_bruteforce(vals: list[float]) -> None:
    v = torch.tensor(vals, dtype=torch.float32)
    codes = e2m1.round_to_code(v)
    assert codes.dtype == torch.uint8
    assert torch.equal(codes, ref_e2m1_code(v))
    # half a step: within the grid the error is at most half the local spacing, beyond it saturates at 6
    a = v.double().abs()
    err = (v.double() - e2m1.code_to_value(codes).double()).abs()
    inside = a <= 6
    assert (err[inside] <= e2m1_half_step(a[inside])).all()
    assert (e2m1.code_to_value(codes)[~inside].abs() == 6).all()
    # bf16 input rounds like its fp32 value
    vb = v.to(torch.bfloat16)
    assert torch.equal(e2m1.round_to_code(vb), ref_e2m1_code(vb.float()))


def test_e2m1_codes_roundtrip_and_idempotent() -> None:
    codes = torch.arange(16, dtype=torch.uint8)
    values = e2m1.code_to_value(codes)
    assert values.tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6]
    back = e2m1.round_to_code(values)
    assert torch.equal(back, torch.where(codes == 8, 0, codes).to(torch.uint8))  # -0 becomes +0
    assert torch.equal(e2m1.round_to_code(e2m1.code_to_value(back)), back)


@FAST
@given(shape=shapes(2, 8), seed=st.integers(0, 2**32 - 1))
def test_e2m1_pack_roundtrip(shape: tuple[int, ...], seed: int) -> None:
    codes = torch.randint(0, 16, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    packed = e2m1.pack(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (*shape[:-1], shape[-1] // 2)
    assert torch.equal(packed, codes[..., 0::2] | (codes[..., 1::2] << 4))  # even k in the low nibble
    assert torch.equal(e2m1.unpack(packed), codes)
    assert torch.equal(e2m1.pack(codes.to(torch.int64)), packed)


def test_e2m1_bad_inputs() -> None:
    with pytest.raises(ValueError, match="even"):
        e2m1.pack(torch.zeros(3, 7, dtype=torch.uint8))
    with pytest.raises(ValueError, match="0..15"):
        e2m1.pack(torch.full((2,), 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="0..15"):
        e2m1.code_to_value(torch.tensor([-1]))
    with pytest.raises(ValueError, match="uint8"):
        e2m1.unpack(torch.zeros(4, dtype=torch.int8))
    with pytest.raises(ValueError, match="floating"):
        e2m1.round_to_code(torch.zeros(4, dtype=torch.int32))


# ----------------------------------------------------------------------------------------------------------
# fp8 e4m3 per row
# ----------------------------------------------------------------------------------------------------------


def test_e4m3_table_matches_torch() -> None:
    bits = torch.arange(127, dtype=torch.uint8).view(torch.float8_e4m3fn)
    assert torch.equal(bits.double(), E4M3_TABLE)


@FAST
@given(x=weights(1, 96), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_fp8_quantize(x: torch.Tensor, dtype: torch.dtype) -> None:
    x = x.to(dtype)
    q, scale = fp8.quantize(x)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape
    assert scale.dtype == torch.float32 and scale.shape == x.shape[:-1]
    xf = x.float()
    amax = xf.abs().amax(-1)
    assert torch.equal(scale, torch.where(amax > 0, amax / 448, 1.0))  # zero rows get scale 1
    assert (q.float()[amax == 0] == 0).all()
    y = torch.clamp(xf / scale[..., None], -448, 448)
    assert torch.equal(q.double(), ref_e4m3(y))  # the cast is RNE, checked against the value table
    # error: half an e4m3 step at x / scale, plus the fp32 roundings of the division and product
    deq = fp8.dequantize(q, scale).double()
    bound = scale.double()[..., None] * e4m3_half_ulp(y) + 2 * F32_EPS * (xf.double().abs() + deq.abs())
    assert ((xf.double() - deq).abs() <= bound).all()


@FAST
@given(shape=shapes(1, 64), seed=st.integers(0, 2**32 - 1), k=st.integers(-60, 60))
def test_fp8_representable_roundtrip(shape: tuple[int, ...], seed: int, k: int) -> None:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 255, shape, dtype=torch.uint8, generator=g)
    codes = torch.where((codes & 0x7F) == 0x7F, 0, codes)  # no NaN
    q = codes.view(torch.float8_e4m3fn).reshape(-1, shape[-1]).clone()
    q[:, 0] = 448.0  # amax = 448 * 2**k, so scale = 2**k exactly
    x = q.float() * 2.0**k
    q2, s2 = fp8.quantize(x)
    assert torch.equal(s2, torch.full_like(s2, 2.0**k))
    assert torch.equal(q2.float(), q.float())
    assert torch.equal(fp8.dequantize(q2, s2), x)


@FAST
@given(x=weights(1, 96))
def test_fp8_idempotent(x: torch.Tensor) -> None:
    q, s = fp8.quantize(x)
    q2, s2 = fp8.quantize(fp8.dequantize(q, s))
    assert torch.equal(q2.float(), q.float())
    assert torch.allclose(s2, s, rtol=F32_EPS, atol=0)  # fl(fl(448 s) / 448) may move s by one ulp


def test_fp8_zero_and_bad_inputs() -> None:
    q, s = fp8.quantize(torch.zeros(3, 5, 7))
    assert torch.equal(s, torch.ones(3, 5)) and (q.float() == 0).all()
    with pytest.raises(ValueError, match="K >= 1"):
        fp8.quantize(torch.zeros(3, 0))
    with pytest.raises(ValueError, match="floating"):
        fp8.quantize(torch.zeros(3, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="scale shape"):
        fp8.dequantize(q, torch.ones(3))


def test_fp8_quantize_pow2_boundaries() -> None:
    # 1e-30 needs 2**-108; 1e-40 would need 2**-142 and is clamped to the smallest normal 2**-126
    x = torch.tensor([[448.0], [449.0], [224.0], [224.00002], [1e-30], [1e-40], [0.0]])
    _, s = fp8.quantize_pow2(x)
    assert s.tolist() == [1.0, 2.0, 0.5, 1.0, 2.0**-108, 2.0**-126, 1.0]


def test_pow2_exact() -> None:
    e = torch.arange(-149, 128)
    assert fp8.pow2(e).tolist() == [2.0**i for i in range(-149, 128)]
    with pytest.raises(ValueError, match="-149, 127"):
        fp8.pow2(torch.tensor([128]))


@FAST
@given(x=weights(1, 96))
def test_fp8_quantize_pow2(x: torch.Tensor) -> None:
    q, s = fp8.quantize_pow2(x)
    amax = x.abs().amax(-1).double()
    m, _ = torch.frexp(s)
    assert (m == 0.5).all()  # a power of two
    nz = amax > 0
    assert (amax[nz] <= 448 * s.double()[nz]).all() and (amax[nz] > 224 * s.double()[nz]).all()  # smallest
    assert (s[~nz] == 1).all()
    y = x.double() / s.double()[..., None]
    assert torch.equal(q.double(), ref_e4m3(y))
    exact = torch.isin(y.abs(), E4M3_TABLE)
    deq = fp8.dequantize(q, s)
    assert torch.equal(deq[exact], x[exact])  # representable values pass unchanged


# ----------------------------------------------------------------------------------------------------------
# nvfp4
# ----------------------------------------------------------------------------------------------------------


def nvfp4_reference(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """docs/formats.md, op by op in fp32, with the brute-force roundings: (codes, block_scales f64, ts)."""
    wf = w.float()
    ts = wf.abs().max() / torch.tensor(6 * 448.0)
    ts = ts if ts > 0 else torch.tensor(1.0)
    blocks = wf.reshape(-1, 16)
    bs = ref_e4m3(torch.clamp(blocks.abs().amax(1) / 6.0 / ts, 0, 448))
    eff = bs.float() * ts
    safe = torch.where(eff > 0, eff, 1.0)
    codes = torch.where(eff[:, None] > 0, ref_e2m1_code(blocks / safe[:, None]), 0).to(torch.uint8)
    return codes.reshape(w.shape), bs.reshape(*w.shape[:-1], -1), ts


@FAST
@given(w=weights(16, 6))
def test_nvfp4_quantize(w: torch.Tensor) -> None:
    t = nvfp4.quantize(w)
    k = w.shape[-1]
    assert t.packed.shape == (*w.shape[:-1], k // 2) and t.packed.dtype == torch.uint8
    assert t.block_scales.shape == (*w.shape[:-1], k // 16) and t.block_scales.dtype == torch.float8_e4m3fn
    assert t.tensor_scale.shape == () and t.tensor_scale.dtype == torch.float32
    codes, bs, ts = nvfp4_reference(w)
    assert torch.equal(t.tensor_scale, ts)
    assert torch.equal(t.block_scales.double(), bs)
    assert torch.equal(e2m1.unpack(t.packed), codes)

    # dequantization is (value * block_scale) * tensor_scale: an exact product, then one fp32 rounding
    exact_product = e2m1.code_to_value(codes).double() * per_group(bs, 16)
    assert torch.equal(nvfp4.dequantize(*t), exact_product.float() * ts)

    # error bound: half an E2M1 step of eff inside the grid; past 6 the excess saturates
    deq = nvfp4.dequantize(*t).double()
    eff = per_group(t.block_scales.float() * t.tensor_scale, 16)
    y = (w.double() / eff).abs()
    y = torch.where(eff > 0, y, 0.0)
    bound = eff * (e2m1_half_step(torch.clamp(y, max=6)) + torch.clamp(y - 6, min=0))
    err = (w.double() - deq).abs()
    zero_block = per_group(t.block_scales.float(), 16) == 0
    assert (err[~zero_block] <= bound[~zero_block] + 2 * F32_EPS * (w.double().abs() + deq.abs())[~zero_block]).all()
    # a block stored as zero had amax / 6 / ts round to 0 in e4m3 (below 2**-10)
    blk_amax = w.float().reshape(*t.block_scales.shape, 16).abs().amax(-1)
    assert (blk_amax[t.block_scales.float() == 0] / 6 / t.tensor_scale <= 2.0**-10).all()
    # docs: "relative error at most 2^-4" for the saturated largest value -- holds where the block
    # scale is a normal e4m3 (>= 2**-6); subnormal block scales round more coarsely
    normal = per_group(t.block_scales.float(), 16) >= 2.0**-6
    over = normal & (y > 6)
    assert (err[over] <= 2.0**-4 * w.double().abs()[over] * (1 + 4 * F32_EPS)).all()


def nudge(x: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """Move each fp32 element ``steps`` (in -2..2) ulps up or down."""
    for i in (1, 2):
        up = torch.nextafter(x, torch.tensor(math.inf))
        down = torch.nextafter(x, torch.tensor(-math.inf))
        x = torch.where(steps >= i, up, torch.where(steps <= -i, down, x))
    return x


E4M3_MIDPOINTS = ((E4M3_TABLE[1:] + E4M3_TABLE[:-1]) / 2).float()  # each exact in fp32
E2M1_MIDPOINTS = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])


@FAST
@given(w=weights(16, 6), seed=st.integers(0, 2**32 - 1))
def test_nvfp4_near_ties(w: torch.Tensor, seed: int) -> None:
    """Block maxima and elements placed within 2 ulps of the e4m3 and E2M1 rounding ties, so that any
    change in the order of the fp32 operations of docs/formats.md shows up as a different code."""
    g = torch.Generator().manual_seed(seed)
    blocks = w.float().reshape(-1, 16).clone()
    ts = blocks.abs().max() / torch.tensor(2688.0)
    if ts == 0:
        return
    keep = blocks.abs().amax(1) == blocks.abs().max()  # the block holding the amax fixes the tensor scale
    n = blocks.shape[0]
    mid8 = E4M3_MIDPOINTS[torch.randint(0, len(E4M3_MIDPOINTS), (n,), generator=g)]
    target = nudge((mid8 * 6.0) * ts, torch.randint(-2, 3, (n,), generator=g))
    bs = ref_e4m3(torch.clamp(target / 6.0 / ts, 0, 448)).float()
    eff = bs * ts
    mid = E2M1_MIDPOINTS[torch.randint(0, 7, (n, 15), generator=g)]
    sign = 1 - 2 * torch.randint(0, 2, (n, 15), generator=g)
    elems = nudge(sign * mid * eff[:, None], torch.randint(-2, 3, (n, 15), generator=g))
    blocks = torch.where(keep[:, None], blocks, torch.cat([target[:, None], elems], 1))
    w = blocks.reshape(w.shape)
    t = nvfp4.quantize(w)
    codes, bs_ref, ts_ref = nvfp4_reference(w)
    assert torch.equal(t.tensor_scale, ts_ref)
    assert torch.equal(t.block_scales.double(), bs_ref)
    assert torch.equal(e2m1.unpack(t.packed), codes)


@FAST
@given(shape=shapes(16, 6), seed=st.integers(0, 2**32 - 1), k=st.integers(-20, 10))
def test_nvfp4_representable_roundtrip(shape: tuple[int, ...], seed: int, k: int) -> None:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, shape, dtype=torch.uint8, generator=g).reshape(-1, 16)
    codes[:, 3] = torch.where(torch.rand(codes.shape[0], generator=g) < 0.5, 7, 15)  # each block reaches 6
    bs = E4M3_TABLE[torch.randint(48, 127, (codes.shape[0],), generator=g)]  # normal e4m3: >= 2**-6
    bs[0] = 448.0  # the block holding the amax: 6 * 448 * 2**k, so tensor_scale = 2**k exactly
    zero = torch.rand(codes.shape[0], generator=g) < 0.2
    zero[0] = False
    codes[zero] = 0
    bs[zero] = 0.0
    w = (e2m1.code_to_value(codes).double() * bs[:, None] * 2.0**k).float().reshape(shape)
    t = nvfp4.quantize(w)
    assert float(t.tensor_scale) == 2.0**k
    assert torch.equal(t.block_scales.double().reshape(-1), bs)
    canonical = torch.where(codes == 8, 0, codes).to(torch.uint8)
    assert torch.equal(e2m1.unpack(t.packed), canonical.reshape(shape))
    assert torch.equal(nvfp4.dequantize(*t), w)


@FAST
@given(w=weights(16, 6))
def test_nvfp4_idempotent(w: torch.Tensor) -> None:
    t = nvfp4.quantize(w)
    t2 = nvfp4.quantize(nvfp4.dequantize(*t))
    assert torch.allclose(t2.tensor_scale, t.tensor_scale, rtol=F32_EPS, atol=0)
    # Guaranteed where the block scale is a normal e4m3: the block's largest code is then 6, so the
    # requantized block finds the same scale. A subnormal block scale can requantize differently.
    normal = t.block_scales.float() >= 2.0**-6
    assert torch.equal(t2.block_scales.float()[normal], t.block_scales.float()[normal])
    c1 = e2m1.unpack(t.packed).reshape(*normal.shape, 16)
    c2 = e2m1.unpack(t2.packed).reshape(*normal.shape, 16)
    assert torch.equal(c2[normal], c1[normal])


def test_nvfp4_zero() -> None:
    t = nvfp4.quantize(torch.zeros(3, 5, 32))
    assert float(t.tensor_scale) == 1.0
    assert (t.block_scales.float() == 0).all() and (t.packed == 0).all()
    assert (nvfp4.dequantize(*t) == 0).all()
    w = torch.randn(3, 48)
    w[1, 16:32] = 0
    t = nvfp4.quantize(w)
    assert float(t.block_scales[1, 1].float()) == 0 and (t.packed[1, 8:16] == 0).all()


def test_nvfp4_bad_shapes() -> None:
    for k in (24, 8, 100):
        with pytest.raises(ValueError, match="multiple of the group size 16"):
            nvfp4.quantize(torch.randn(3, k))
    t = nvfp4.quantize(torch.randn(3, 32))
    with pytest.raises(ValueError, match="block_scales shape"):
        nvfp4.dequantize(t.packed, t.block_scales[:, :1], t.tensor_scale)
    with pytest.raises(ValueError, match="0-d"):
        nvfp4.dequantize(t.packed, t.block_scales, t.tensor_scale[None])
    with pytest.raises(ValueError, match="multiple of the group size 16"):
        nvfp4.dequantize(t.packed[:, :4], t.block_scales, t.tensor_scale)


def test_nvfp4_to_fp8_exhaustive() -> None:
    """Every (E2M1 code, positive e4m3 block scale) pair: the product is exact in e4m3 iff its odd part
    fits 4 bits, and the worst relative error is exactly 1/21 (block scale significand 1.75)."""
    bs = E4M3_TABLE[1:]  # all 126 positive block scales, one row (one block) each
    codes = torch.arange(16, dtype=torch.uint8).expand(len(bs), 16)
    packed = e2m1.pack(codes)
    q, s = nvfp4.dequantize_to_fp8(packed, bs.to(torch.float8_e4m3fn)[:, None], torch.tensor(1.0))
    got = fp8.dequantize(q, s).double()
    exact = nvfp4.dequantize(packed, bs.to(torch.float8_e4m3fn)[:, None], torch.tensor(1.0)).double()
    assert torch.equal(exact, e2m1.code_to_value(codes).double() * bs[:, None])  # v * bs is exact in fp32
    rel = torch.where(exact != 0, (got - exact).abs() / exact.abs(), 0.0)
    predicted_exact = torch.tensor(
        [[odd_part(int(abs(v) * 2)) * odd_part(int(b * 2**9)) <= 15 for v in e2m1.MAGNITUDES * 2] for b in bs.tolist()]
    )
    assert torch.equal(rel == 0, predicted_exact)
    assert rel.max().item() == pytest.approx(1 / 21, rel=1e-12)
    worst = rel == rel.max()
    # the worst case: block scale significand 1.75 (odd part 7) times a value 1.5, 3 or 6
    for i, j in worst.nonzero().tolist():
        assert odd_part(int(bs[i] * 2**9)) == 7 and abs(e2m1.MAGNITUDES[j % 8]) in (1.5, 3.0, 6.0)
    print(f"nvfp4 -> e4m3: {int((rel > 0).sum())} of {int((exact != 0).sum())} nonzero products rounded")


@FAST
@given(w=weights(16, 6))
def test_nvfp4_to_fp8_bound(w: torch.Tensor) -> None:
    t = nvfp4.quantize(w)
    q, s = nvfp4.dequantize_to_fp8(*t)
    assert q.shape == w.shape and s.shape == w.shape[:-1]
    ref = nvfp4.dequantize(*t).double()
    got = fp8.dequantize(q, s).double()
    slack = 2 * F32_EPS * (ref.abs() + got.abs())
    assert ((got - ref).abs() <= ref.abs() / 21 + 2.0**-10 * s.double()[..., None] + slack).all()
    if (ref != 0).any():  # the tensor's amax always sits in a block of scale 448 and shrinks by 1/21
        i = ref.abs().argmax()
        assert (ref.reshape(-1)[i] - got.reshape(-1)[i]).abs().item() == pytest.approx(
            ref.abs().reshape(-1)[i].item() / 21, rel=1e-5
        )


def test_nvfp4_to_fp8_exact_when_representable() -> None:
    # block scales that are powers of two keep every product at <= 2 significant bits
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (5, 64), dtype=torch.uint8, generator=g)
    bs = torch.pow(2.0, torch.randint(-6, 9, (5, 4), generator=g).double()).to(torch.float8_e4m3fn)
    ts = torch.tensor(0.0123)
    t = (e2m1.pack(codes), bs, ts)
    q, s = nvfp4.dequantize_to_fp8(*t)
    assert torch.equal(fp8.dequantize(q, s), nvfp4.dequantize(*t))


# ----------------------------------------------------------------------------------------------------------
# mxfp4
# ----------------------------------------------------------------------------------------------------------


@FAST
@given(vals=st.lists(st.floats(min_value=0.0, width=32, allow_infinity=False), min_size=1, max_size=32))
def test_mxfp4_block_exponent(vals: list[float]) -> None:
    e = mxfp4.block_exponent(torch.tensor(vals, dtype=torch.float32)).tolist()
    for a, ei in zip(vals, e):
        if a == 0:
            assert ei == -127
        else:  # smallest e with 6 * 2**e >= a, clamped below at -127 (exact in float64)
            assert 6 * 2.0**ei >= a
            assert ei == -127 or 6 * 2.0 ** (ei - 1) < a


@FAST
@given(w=weights(32, 3), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_mxfp4_quantize(w: torch.Tensor, dtype: torch.dtype) -> None:
    w = w.to(dtype)
    t = mxfp4.quantize(w)
    k = w.shape[-1]
    assert t.packed.shape == (*w.shape[:-1], k // 2) and t.scales.shape == (*w.shape[:-1], k // 32)
    assert t.scales.dtype == torch.uint8 and int(t.scales.max()) < 255
    e = t.scales.to(torch.int64) - 127
    amax = w.float().reshape(*e.shape, 32).abs().amax(-1)
    assert torch.equal(e, mxfp4.block_exponent(amax).to(torch.int64))
    assert (e[amax == 0] == -127).all()
    scale = torch.pow(2.0, per_group(e, 32))
    y = w.double() / scale  # exact in float64
    codes = e2m1.unpack(t.packed)
    assert torch.equal(codes, ref_e2m1_code(y))
    assert (y.abs() <= 6).all()  # the scale rounds up: nothing saturates
    # error: at most half an E2M1 step times the block scale (no fp32 rounding anywhere)
    deq = mxfp4.dequantize(*t).double()
    assert ((w.double() - deq).abs() <= scale * e2m1_half_step(y.abs())).all()


@FAST
@given(shape=shapes(32, 3), seed=st.integers(0, 2**32 - 1))
def test_mxfp4_representable_roundtrip(shape: tuple[int, ...], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, shape, dtype=torch.uint8, generator=g).reshape(-1, 32)
    e = torch.randint(-120, 121, (codes.shape[0], 1), generator=g)
    w = (e2m1.code_to_value(codes).double() * torch.pow(2.0, e.double())).float().reshape(shape)
    # any E2M1 value times a power of two survives, even when the block's amax is below 4 * 2**e
    assert torch.equal(mxfp4.dequantize(*mxfp4.quantize(w)), w)


@FAST
@given(w=weights(32, 3))
def test_mxfp4_idempotent(w: torch.Tensor) -> None:
    deq = mxfp4.dequantize(*mxfp4.quantize(w))
    assert torch.equal(mxfp4.dequantize(*mxfp4.quantize(deq)), deq)


def test_mxfp4_codes_not_idempotent() -> None:
    # amax / 2**e in (3, 3.5) rounds to 3, so the requantized block picks e - 1: same values, other codes
    w = torch.zeros(1, 32)
    w[0, 0] = 3.2
    t = mxfp4.quantize(w)
    t2 = mxfp4.quantize(mxfp4.dequantize(*t))
    assert t.scales.item() == 127 and t2.scales.item() == 126
    assert torch.equal(mxfp4.dequantize(*t2), mxfp4.dequantize(*t))


def test_mxfp4_zero_and_tiny_blocks() -> None:
    w = torch.zeros(3, 96)
    w[0, :32] = torch.randn(32)
    w[2, 64] = 1e-45  # below 6 * 2**-127: e clamps at -127 and the value rounds to 0
    t = mxfp4.quantize(w)
    assert t.scales[1].tolist() == [0, 0, 0] and t.scales[2, 2].item() == 0
    assert (t.packed[1:] == 0).all()


def test_mxfp4_bad_shapes() -> None:
    for k in (48, 16, 100):
        with pytest.raises(ValueError, match="multiple of the group size 32"):
            mxfp4.quantize(torch.randn(3, k))
    t = mxfp4.quantize(torch.randn(3, 64))
    with pytest.raises(ValueError, match="scales shape"):
        mxfp4.dequantize(t.packed, t.scales[:, :1])
    with pytest.raises(ValueError, match="NaN"):
        mxfp4.dequantize(t.packed, torch.full_like(t.scales, 255))


@FAST
@given(w=weights(32, 3))
def test_mxfp4_to_fp8(w: torch.Tensor) -> None:
    t = mxfp4.quantize(w)
    q, s = mxfp4.dequantize_to_fp8(*t)
    ref = mxfp4.dequantize(*t)
    got = fp8.dequantize(q, s)
    # exact on every row whose nonzero blocks are within 2**14 of its largest block scale
    e = t.scales.to(torch.int64) - 127
    nonzero = (e2m1.unpack(t.packed).reshape(*e.shape, 32) & 7).amax(-1) > 0
    e_max = torch.where(nonzero, e, -1000).amax(-1)
    e_min = torch.where(nonzero, e, 1000).amin(-1)
    in_range = ~nonzero.any(-1) | (e_max - e_min <= 14)
    assert torch.equal(got[in_range], ref[in_range])
    # elsewhere only e4m3 subnormals round: at most 2**-10 of the row scale
    assert ((got - ref).abs().double() <= 2.0**-10 * s.double()[..., None]).all()


def test_mxfp4_to_fp8_out_of_range_rounds() -> None:
    w = torch.zeros(1, 64)
    w[0, 0] = 6.0  # e = 0
    w[0, 32] = 0.5 * 2.0**-20  # e = -23: 2**-21 / 2**-6 is below half the smallest e4m3 subnormal
    t = mxfp4.quantize(w)
    q, s = mxfp4.dequantize_to_fp8(*t)
    assert fp8.dequantize(q, s)[0, 32].item() == 0.0 and mxfp4.dequantize(*t)[0, 32].item() == w[0, 32].item()


# ----------------------------------------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------------------------------------


def test_format_registry() -> None:
    assert set(formats.FORMATS) == {"svdq-int4", "svdq-w4a8", "fp8", "nvfp4", "mxfp4", "vq2", "vq3", "w4a16"}
    for name in formats.FORMATS:
        assert formats.check_format(name) == name
    with pytest.raises(ValueError, match="unknown format 'int3'.*svdq-int4.*vq3"):
        formats.check_format("int3")
