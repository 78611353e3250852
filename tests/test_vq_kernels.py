"""Triton codebook-lookup GEMM (kernels/vq_gemm.py) against a float64 reference of the same math.

CPU tests run the kernels in the Triton interpreter through a private copy of the module loaded with
``TRITON_INTERPRET=1`` set only while it loads (see tests/test_triton_gemm.py for why). Outputs are
poisoned with NaN so an unwritten element fails. Shapes are small and ragged: M in {1, 5, 33} (the
interpreter tile is 16 x 32 x 32: M=33 spans three row tiles, N=40 two column tiles, K=96 three K steps).

Limits on ||out - ref|| / ||ref||:
- fp32 x: an fp32 ("ieee") dot; only fp32 summation rounding, ~2e-7: limit 1e-5.
- bf16 x: the reference uses the codebook rounded to bf16 (as the kernel feeds the MMA); the rest is the
  final rounding to bf16 (the interpreter truncates: up to 2^-8 per element): limit 8e-3.
- fp8: the reference is the float64 product of the *quantized* operands (e4m3 x times its per-token scale,
  e4m3 codebook times its scale), so only fp32 accumulation differs: limit 1e-5 (fp32 out). Against the
  unquantized math the fp8 path is ~3-5% off (e4m3 has 3 mantissa bits): stated, not tested as a limit.
"""

from __future__ import annotations

from types import ModuleType

import pytest
import torch

from lowbit_engine import ops, reference
from triton_interp import load_interpreted
from lowbit_engine.formats import vq as vqf

pytest.importorskip("triton")

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
REL_LIMIT = {FP32: 1e-5, BF16: 8e-3, FP16: 2e-3}


@pytest.fixture(scope="module")
def interp() -> ModuleType:
    mod = load_interpreted("vq_gemm.py")
    if not mod.interpreted():
        pytest.skip("this Triton did not honour TRITON_INTERPRET=1 at decoration time")
    gemm8 = load_interpreted("gemm8.py")  # the large-M fp8 path: gather into the scratch, then the 8-bit GEMM
    gemm8._tiles = load_interpreted("fp8_gemm.py")
    mod._expand, mod._gemm8 = load_interpreted("w4_expand.py"), gemm8
    return mod


def _inputs(gen, M, N, K, bits, k, dtype, with_cs=True, with_bias=True, cb_dtype=FP32):
    idx = torch.randint(0, k, (N, K // 4), generator=gen)
    return {
        "x": torch.randn(M, K, generator=gen).to(dtype),
        "codes": vqf.pack_indices(idx, bits),
        "codebook": torch.randn(k, 4, generator=gen).to(cb_dtype),
        "channel_scale": torch.rand(N, generator=gen) + 0.5 if with_cs else None,
        "bias": torch.randn(N, generator=gen).to(dtype) if with_bias else None,
        "N": N, "K": K, "bits": bits,
    }


def _reference(d, cb_round: torch.dtype | None = None) -> torch.Tensor:
    cb = d["codebook"] if cb_round is None else d["codebook"].to(cb_round)
    cs = d["channel_scale"]
    bias = d["bias"]
    return reference.vq_gemm(d["x"].double(), d["codes"], cb.double(), d["N"], d["K"], d["bits"],
                             channel_scale=None if cs is None else cs.double(),
                             bias=None if bias is None else bias.double())


def _check(out, ref, dtype, limit=None):
    assert out.dtype == dtype and out.shape == ref.shape
    assert torch.isfinite(out).all(), f"{(~torch.isfinite(out)).sum().item()} elements not written (NaN poison)"
    rel = ((out.double() - ref).norm() / ref.norm()).item()
    limit = REL_LIMIT[dtype] if limit is None else limit
    assert rel < limit, f"relative error {rel:.3g} >= {limit}"


def _poisoned(d, dtype):
    return torch.full((d["x"].shape[0], d["N"]), float("nan"), dtype=dtype)


@pytest.mark.parametrize("dtype", [FP32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bits,k", [(8, 256), (12, 4096)], ids=["vq2", "vq3"])
@pytest.mark.parametrize("M", [1, 5, 33])
def test_matches_float64_reference(interp, gen, M, bits, k, dtype):
    d = _inputs(gen, M, 40, 96, bits, k, dtype)
    out = _poisoned(d, dtype)
    res = interp.vq_gemm_triton(d["x"], d["codes"], d["codebook"], d["N"], d["K"], bits, d["channel_scale"],
                                d["bias"], out=out)
    assert res is out
    _check(out, _reference(d, cb_round=BF16 if dtype == BF16 else None), dtype)


@pytest.mark.parametrize("bits,k", [(8, 256), (12, 4096)], ids=["vq2", "vq3"])
def test_split_k_small_m(interp, gen, bits, k):
    """The GEMV path: one 16-row tile, K split over 3 programs (the last split partial), partial sums
    finished in the wrapper; no scale, no bias, odd number of sub-vectors per row (K=100: 25 indices, the
    12-bit row ends on a half-filled pair)."""
    d = _inputs(gen, 3, 24, 100, bits, k, FP32, with_cs=False, with_bias=False)
    cfg = interp.TileConfig(block_m=16, block_n=32, block_k=32, split_k=3, num_warps=1, num_stages=1)
    out = _poisoned(d, FP32)
    interp.vq_gemm_triton(d["x"], d["codes"], d["codebook"], d["N"], d["K"], bits, out=out, config=cfg)
    _check(out, _reference(d), FP32)


def test_bf16_codebook_and_fp16_input(interp, gen):
    d = _inputs(gen, 17, 40, 64, 8, 256, FP16, cb_dtype=BF16)
    out = _poisoned(d, FP16)
    interp.vq_gemm_triton(d["x"], d["codes"], d["codebook"], d["N"], d["K"], 8, d["channel_scale"], d["bias"],
                          out=out)
    _check(out, _reference(d), FP16)


@pytest.mark.parametrize("bits,k", [(8, 256), (12, 4096)], ids=["vq2", "vq3"])
@pytest.mark.parametrize("M", [1, 33, 70])  # 70: above LARGE_M, the gather + 8-bit GEMM path
def test_fp8_variant(interp, gen, M, bits, k):
    d = _inputs(gen, M, 40, 96, bits, k, FP32)
    cq, cscale = interp.quantize_codebook_fp8(d["codebook"])
    xq, xs = interp.quantize_x_fp8(d["x"])
    out = _poisoned(d, FP32)
    interp.vq_gemm_fp8_triton(d["x"], d["codes"], cq, cscale, d["N"], d["K"], bits, d["channel_scale"], d["bias"],
                              out_dtype=FP32, out=out)
    dq = dict(d, x=(xq.double() * xs.double()[:, None]), codebook=cq.double() * cscale)
    _check(out, _reference(dq), FP32)
    # and against the unquantized math: e4m3 costs a few percent
    _check(out, _reference(d), FP32, limit=0.1)


def test_from_the_quantizer(interp, gen):
    """End to end: a layer quantized by the VQ4DiT quantizer (channel scale on), bf16 input."""
    from lowbit_engine.quant.vq import vq_quantize

    N, K = 40, 64
    r = vq_quantize(torch.randn(N, K, generator=gen), "vq2", channel_scale=True, kmeans_iters=2, iters=20)
    d = {"x": torch.randn(9, K, generator=gen).to(BF16), "codes": r.codes, "codebook": r.codebook,
         "channel_scale": r.channel_scale, "bias": None, "N": N, "K": K, "bits": 8}
    out = _poisoned(d, BF16)
    interp.vq_gemm_triton(d["x"], r.codes, r.codebook, N, K, 8, r.channel_scale, out=out)
    _check(out, _reference(d, cb_round=BF16), BF16)


@pytest.mark.parametrize("out_dtype", [FP32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bits,k", [(8, 256), (12, 4096)], ids=["vq2", "vq3"])
def test_dequantize(interp, gen, bits, k, out_dtype):
    """Dense weight: fp32 out is bit-exact with the reference (same fp32 product); bf16 out within one bf16
    ulp (the interpreter truncates where compiled code rounds to nearest). N=40, K=100: ragged tiles and
    a half-filled last 12-bit pair."""
    d = _inputs(gen, 1, 40, 100, bits, k, FP32)
    out = torch.full((40, 100), float("nan"), dtype=out_dtype)
    interp.vq_dequantize_triton(d["codes"], d["codebook"], 40, 100, bits, d["channel_scale"], out_dtype, out=out)
    ref = reference.vq_dequantize(d["codes"], d["codebook"], 40, 100, bits, channel_scale=d["channel_scale"])
    if out_dtype == FP32:
        assert torch.equal(out, ref)
    else:
        assert torch.isfinite(out).all()
        assert ((out.float() - ref).abs() <= ref.abs() * 2.0 ** -7).all()


def test_rejects_bad_input(interp, gen):
    from lowbit_engine.errors import OpInputError

    d = _inputs(gen, 2, 8, 32, 8, 256, FP32)
    with pytest.raises(OpInputError, match="codes"):
        interp.vq_gemm_triton(d["x"], d["codes"][:, :3].contiguous(), d["codebook"], 8, 32, 8)
    with pytest.raises(ValueError, match="out"):
        interp.vq_gemm_triton(d["x"], d["codes"], d["codebook"], 8, 32, 8, out=torch.empty(2, 7))


def test_cpu_dispatch_never_picks_triton(gen):
    d = _inputs(gen, 3, 16, 64, 8, 256, BF16)
    ops.vq_gemm(d["x"], d["codes"], d["codebook"], 16, 64, 8, d["channel_scale"], d["bias"])
    assert ops.last_backend("vq_gemm") in ("cpu", "torch")


# ------------------------------------------------------------------------------------------------ sm_90 build


@pytest.mark.parametrize("variant", ["bf16-8bit", "fp8-12bit-splitk"])
def test_compiles_for_sm90(variant):
    """Without a GPU, Triton still lowers the compiled kernel down to a cubin for sm_90 (ptxas ships with
    Triton): catches what the lenient interpreter accepts but the compiler rejects (dtypes of the gather,
    fp8 dot, 12-bit decode)."""
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        import triton
    except ImportError as e:  # a Triton without these internals: nothing to check here
        pytest.skip(f"Triton compiler internals not available: {e}")
    from lowbit_engine.kernels import vq_gemm as kernels

    if kernels.interpreted():
        pytest.skip("TRITON_INTERPRET=1 was set when lowbit_engine.kernels was imported")
    fn = kernels._vq_gemm_kernel
    fp8 = variant.startswith("fp8")
    xdt = "fp8e4nv" if fp8 else "bf16"
    const = dict(D=4, INDEX_BITS=12 if fp8 else 8, FP8=fp8, FP32_DOT=False, EMULATE_BF16=False, HAS_CS=True,
                 HAS_BIAS=True, PARTIAL=fp8, BLOCK_M=16 if fp8 else 128, BLOCK_N=64 if fp8 else 128,
                 BLOCK_K=128 if fp8 else 64)
    cbdt = "fp8e4nv" if fp8 else "fp32"
    sig = {"x_ptr": "*" + xdt, "x_scale_ptr": "*fp32", "codes_ptr": "*u8", "cb_ptr": "*" + cbdt,
           "cb_scale": "fp32", "cs_ptr": "*fp32", "bias_ptr": "*bf16", "out_ptr": "*" + ("fp32" if fp8 else "bf16"),
           "M": "i32", "N": "i32", "K": "i32", "ROW_BYTES": "i32", "K_PER_SPLIT": "i32"}
    sig.update({k: "constexpr" for k in const})
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in const.items()})
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 3})
    except Exception as e:  # noqa: BLE001
        if "ptxas" in repr(e) and ("not found" in repr(e) or "No such file" in repr(e)):
            pytest.skip(f"no ptxas: {e!r}")
        raise
    assert "cubin" in compiled.asm


# ------------------------------------------------------------------------------------------------ GPU


def _compiled() -> ModuleType:
    from lowbit_engine.kernels import vq_gemm as kernels

    assert not kernels.interpreted()
    return kernels


def _cuda(d):
    return {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in d.items()}


@pytest.mark.gpu
@pytest.mark.parametrize("bits,k", [(8, 256), (12, 4096)], ids=["vq2", "vq3"])
@pytest.mark.parametrize("M", [1, 5, 33, 4608])
def test_gpu_flux_shape(gen, M, bits, k):
    """FLUX.1 attention projection (K=N=3072), bf16, default tiles (split-K GEMV path for M <= 16)."""
    kernels = _compiled()
    d = _cuda(_inputs(gen, M, 3072, 3072, bits, k, BF16))
    out = torch.full((M, 3072), float("nan"), dtype=BF16, device="cuda")
    kernels.vq_gemm_triton(d["x"], d["codes"], d["codebook"], 3072, 3072, bits, d["channel_scale"], d["bias"],
                           out=out)
    _check(out, _reference(d, cb_round=BF16), BF16, limit=5e-3)
    if torch.cuda.get_device_capability() >= (8, 9):
        cq, cs = kernels.quantize_codebook_fp8(d["codebook"])
        o8 = kernels.vq_gemm_fp8_triton(d["x"], d["codes"], cq, cs, 3072, 3072, bits, d["channel_scale"],
                                        d["bias"], out_dtype=FP32)
        _check(o8, _reference(d), FP32, limit=0.1)


@pytest.mark.gpu
def test_gpu_dispatch_picks_triton(gen):
    d = _cuda(_inputs(gen, 33, 80, 128, 8, 256, BF16))
    if "triton" not in ops.backends("vq_gemm"):
        pytest.skip("kernels/vq_gemm.py is not registered in kernels/__init__.py yet")
    ops.vq_gemm(d["x"], d["codes"], d["codebook"], 80, 128, 8, d["channel_scale"], d["bias"])
    allowed = ("cuda", "triton") if "cuda" in ops.backends("vq_gemm") else ("triton",)
    assert ops.last_backend("vq_gemm") in allowed
    w = ops.vq_dequantize(d["codes"], d["codebook"], 80, 128, 8, d["channel_scale"], out_dtype=FP32)
    assert ops.last_backend("vq_dequantize") in allowed
    ref = reference.vq_dequantize(d["codes"].cpu(), d["codebook"].cpu(), 80, 128, 8,
                                  channel_scale=d["channel_scale"].cpu())
    assert torch.equal(w.cpu(), ref)
