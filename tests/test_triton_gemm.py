"""Triton W4A4 / W4A8 GEMM (kernels/gemm_w4a4.py) against the float64 reference of the same quantized math.

CPU tests run the kernels in the Triton interpreter. Triton decides between interpreted and compiled
when ``@triton.jit`` runs (it reads ``TRITON_INTERPRET`` at decoration time, not at ``import triton``), so
setting the variable at the top of this module would not be enough once another test module has
imported ``lowbit_engine.ops`` (which imports the kernels), and setting it for the whole process would
turn every kernel decorated later into an interpreted one, including on a GPU machine. Instead the
``interp`` fixture executes a private copy of the kernel module with the variable set only while it
loads, and restores it: order-independent, one process, and the real ``lowbit_engine.kernels`` stays
compiled for the GPU tests.

The GPU test (marked ``gpu``) runs the compiled kernels on a FLUX-sized layer and checks that the op
dispatch picks them.
"""

from __future__ import annotations

from types import ModuleType

import pytest
import torch

from lowbit_engine import ops, reference
from triton_interp import load_interpreted

pytest.importorskip("triton")

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
KINDS = ("w4a4", "w4a8-int8", "w4a8-fp8")

# Limits on ||out - ref|| / ||ref|| against the float64 reference:
# - fp32 out: the integer group sums are exact in both; the kernel only adds fp32 roundings (each
#   promotion, the accumulation over at most a few groups, the fp32 low-rank dot), ~1e-7 in norm.
#   1e-5 leaves room for FMA contraction and summation order, while a wrong nibble, scale, group or tile
#   costs far more than 1e-3.
# - bf16 out: the final rounding to bf16 alone is up to 2^-8 (~3.9e-3) per element, ~2e-3 in norm.
# - fp16 out (one extra case): the same with fp16's 2^-11 (~4.9e-4) per element.
REL_LIMIT = {FP32: 1e-5, BF16: 1e-2, FP16: 1e-3}
# Per element, on top of the norm: |out - ref| <= rtol * |ref| + atol * max|ref|, so one wrong element
# (which a norm over thousands of elements could hide) still fails. rtol is the output format's unit
# roundoff (bf16 2^-8, fp16 2^-11) plus the fp32 slack above; atol covers elements near zero where the
# fp32 error is relative to the size of the summed terms, not to the (cancelled) result.
ELEM_RTOL = {FP32: 1e-5, BF16: 2.0**-8 + 1e-5, FP16: 2.0**-11 + 1e-5}
# The Triton interpreter (3.9) converts fp32 to bf16 by truncation, not round-to-nearest-even as compiled
# code (cvt.rn.bf16.f32) does, so there a bf16 element may be off by a whole ulp (2^-7 relative).
ELEM_RTOL_INTERPRETED = {**ELEM_RTOL, BF16: 2.0**-7 + 1e-5}
ELEM_ATOL = 1e-5
# fp8 activations on Hopper tensor cores: the products are exact but the MMA adds them with reduced
# precision (~14 bits), so each 64-group's sum carries an error of ~1e-4 of the largest partial sums
# before it is promoted into fp32. Measured on an H100: ~3.5e-5 in norm and at most ~5e-5 of max|ref|
# per element at K=3072, hence these limits for the fp8 path on a GPU (the interpreter adds in fp32).
FP8_MMA_REL_LIMIT = 1e-4
FP8_MMA_ATOL = 2e-4



@pytest.fixture(scope="module")
def interp() -> ModuleType:
    import numpy
    import triton

    mod = load_interpreted("gemm_w4a4.py")
    if not mod.interpreted():
        pytest.skip("this Triton did not honour TRITON_INTERPRET=1 at decoration time "
                    "(triton.knobs.runtime.interpret forced off?)")
    # Probe once. The interpreter of Triton 3.6 keeps scalar arguments as 1-element arrays and turns a
    # loop bound into a Python int with int(array), which NumPy >= 2.5 refuses; then no kernel with a
    # runtime loop bound can run in that interpreter (the GPU tests cover the kernels there).
    x = torch.zeros(1, 32, dtype=torch.uint8)
    try:
        mod.gemm_w4a4_triton(x, torch.ones(1, 1), x, torch.ones(1, 1, dtype=BF16))
    except Exception as e:  # noqa: BLE001 (re-raised unless it is exactly that incompatibility)
        if "only 0-dimensional arrays can be converted to Python scalars" in repr(e):
            pytest.skip(f"the Triton {triton.__version__} interpreter cannot run with NumPy {numpy.__version__} "
                        "(scalar loop bounds); use Triton >= 3.7 or NumPy < 2.5 for the CPU tests")
        raise
    return mod


# ------------------------------------------------------------------------------------------------ inputs


def _inputs(kind: str, M: int, N: int, K: int, R: int, with_bias: bool, gen: torch.Generator,
            lora_dtype: torch.dtype = BF16, bias_dtype: torch.dtype = BF16) -> dict:
    """Fresh random operands in the op layouts. Packed int4 bytes are uniform, so every nibble value,
    -8 included (legal in the layout though the quantizer never makes it), appears in both operands.
    Magnitudes keep the low-rank term and the bias comparable to the GEMM, so a wrong epilogue shows."""
    d = {
        "w": torch.randint(0, 256, (N, K // 2), generator=gen, dtype=torch.uint8),
        "w_scales": (torch.rand(N, K // 64, generator=gen) * 0.02 + 0.005).to(BF16),
    }
    if kind == "w4a4":
        d["act"] = torch.randint(0, 256, (M, K // 2), generator=gen, dtype=torch.uint8)
        d["act_scales"] = torch.rand(M, K // 64, generator=gen) * 0.5 + 0.05
    elif kind == "w4a8-int8":
        d["act"] = torch.randint(-128, 128, (M, K), generator=gen, dtype=torch.int8)
        d["act_scales"] = torch.rand(M, generator=gen) * 0.02 + 0.002
    else:
        d["act"] = (torch.randn(M, K, generator=gen) * 64).clamp(-448, 448).to(torch.float8_e4m3fn)
        d["act_scales"] = torch.rand(M, generator=gen) * 0.02 + 0.002
    d["lora_act"] = torch.randn(M, R, generator=gen) if R else None
    d["lora_up"] = (torch.randn(N, R, generator=gen) * 0.25).to(lora_dtype) if R else None
    d["bias"] = torch.randn(N, generator=gen).to(bias_dtype) if with_bias else None
    return d


def _args(d: dict) -> tuple:
    return d["act"], d["act_scales"], d["w"], d["w_scales"], d["lora_act"], d["lora_up"], d["bias"]


def _reference(kind: str, d: dict) -> torch.Tensor:
    """float64 accumulation of the contract's math, rounded once to fp32 (~6e-8, far below the limits)."""
    fn = reference.gemm_w4a4 if kind == "w4a4" else reference.gemm_w4a8
    return fn(*_args(d), out_dtype=FP32, accum_dtype=torch.float64)


def _check(out: torch.Tensor, ref: torch.Tensor, out_dtype: torch.dtype, interpreted: bool = True,
           fp8_mma: bool = False) -> None:
    """Every element written, the norm-wise limit, and the per-element bound. ``fp8_mma``: the fp8 path
    ran on tensor cores (a GPU), whose fp8 accumulation is coarser than fp32."""
    assert out.dtype == out_dtype and out.shape == ref.shape
    assert torch.isfinite(out).all(), f"{(~torch.isfinite(out)).sum().item()} elements not written (NaN poison)"
    o, r = out.double(), ref.double()
    rel = ((o - r).norm() / r.norm()).item()
    limit = max(REL_LIMIT[out_dtype], FP8_MMA_REL_LIMIT) if fp8_mma else REL_LIMIT[out_dtype]
    assert rel < limit, f"relative error {rel:.3g} >= {limit}"
    rtol = (ELEM_RTOL_INTERPRETED if interpreted else ELEM_RTOL)[out_dtype]
    bound = rtol * r.abs() + (FP8_MMA_ATOL if fp8_mma else ELEM_ATOL) * r.abs().max()
    bad = (o - r).abs() > bound
    assert not bad.any(), (f"{bad.sum().item()} elements off, first at {bad.nonzero()[0].tolist()}: "
                           f"{o[bad][0].item()} vs {r[bad][0].item()}")


def _run(mod: ModuleType, kind: str, d: dict, out_dtype: torch.dtype, **kw) -> torch.Tensor:
    """Run the wrapper into an output poisoned with NaN, so an element the kernel skips is caught."""
    M, N = d["act"].shape[0], d["w"].shape[0]
    out = torch.full((M, N), float("nan"), dtype=out_dtype, device=d["act"].device)
    fn = mod.gemm_w4a4_triton if kind == "w4a4" else mod.gemm_w4a8_triton
    res = fn(*_args(d), out_dtype, out=out, **kw)
    assert res is out
    return res


# ------------------------------------------------------------------------------------------------ CPU tests


@pytest.mark.parametrize("out_dtype", [FP32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("R", [0, 16])
@pytest.mark.parametrize("K", [64, 192])
@pytest.mark.parametrize("N", [48, 80])
@pytest.mark.parametrize("M", [1, 17, 111])
@pytest.mark.parametrize("kind", KINDS)
def test_matches_float64_reference(interp, gen, kind, M, N, K, R, with_bias, out_dtype):
    # With the interpreter's 32x32 tiles: M=111 and N=80 span several ragged tiles, M=1 and 17 and N=48
    # end inside one; K=192 walks three scale groups.
    d = _inputs(kind, M, N, K, R, with_bias, gen)
    _check(_run(interp, kind, d, out_dtype), _reference(kind, d), out_dtype)


@pytest.mark.parametrize("kind", KINDS)
def test_rank_chunks_and_other_dtypes(interp, gen, kind):
    """R=40 walks the rank in three 16-wide chunks, the last one masked; fp16 lora_up, fp32 bias and
    fp16 out cover the remaining epilogue dtypes."""
    d = _inputs(kind, 37, 72, 128, 40, True, gen, lora_dtype=FP16, bias_dtype=FP32)
    _check(_run(interp, kind, d, FP16), _reference(kind, d), FP16)


@pytest.mark.parametrize("kind", KINDS)
def test_empty_rank_and_large_tiles(interp, gen, kind):
    """``quantize_act`` without ``lora_down`` returns ``lora_act [M, 0]``: that is no low-rank term. And a
    tile larger than the whole problem (the H100 default) still stores only the valid elements."""
    d = _inputs(kind, 5, 24, 128, 0, True, gen)
    d["lora_act"], d["lora_up"] = torch.empty(5, 0), torch.empty(24, 0, dtype=BF16)
    cfg = interp.TileConfig(block_m=64, block_n=64, group_m=8, num_warps=4, num_stages=2)
    _check(_run(interp, kind, d, BF16, config=cfg), _reference(kind, d), BF16)


def test_from_the_quantizer(interp, gen):
    """End to end with real quantized data: activations from ``quantize_act`` (int4, int8, fp8, with
    smoothing and the low-rank down-projection) and weights from ``int4.quantize``."""
    from lowbit_engine.formats import int4

    M, K, N, R = 9, 256, 40, 16
    x = torch.randn(M, K, generator=gen).to(BF16)
    smooth = torch.rand(K, generator=gen) + 0.5
    lora_down = (torch.randn(R, K, generator=gen) * 0.1).to(BF16)
    qw, sw = int4.quantize(torch.randn(N, K, generator=gen), scale_dtype=BF16)
    w = int4.pack(qw)
    lora_up = (torch.randn(N, R, generator=gen) * 0.1).to(BF16)
    bias = torch.randn(N, generator=gen).to(BF16)
    for mode, kind in (("int4", "w4a4"), ("int8", "w4a8-int8"), ("fp8", "w4a8-fp8")):
        qa, sa, la = reference.quantize_act(x, smooth=smooth, lora_down=lora_down, mode=mode)
        d = {"act": qa, "act_scales": sa, "w": w, "w_scales": sw, "lora_act": la, "lora_up": lora_up,
             "bias": bias}
        _check(_run(interp, kind, d, FP32), _reference(kind, d), FP32)


def test_rejects_bad_input(interp, gen):
    """The public wrappers validate like the ops (one source of truth: the ops' checks)."""
    from lowbit_engine.errors import OpInputError

    d = _inputs("w4a4", 4, 16, 128, 0, False, gen)
    with pytest.raises(OpInputError, match="act_scales"):
        interp.gemm_w4a4_triton(d["act"], d["act_scales"][:, :1].contiguous(), d["w"], d["w_scales"])
    with pytest.raises(ValueError, match="out"):
        interp.gemm_w4a4_triton(d["act"], d["act_scales"], d["w"], d["w_scales"], out=torch.empty(4, 15))


def test_registered_but_not_selected_for_cpu(gen):
    """The Triton backend is registered, and the default dispatch never picks it for CPU tensors (they
    go to the C++ reference, or the torch one without the native module)."""
    assert "triton" in ops.backends("gemm_w4a4") and "triton" in ops.backends("gemm_w4a8")
    for kind in KINDS:
        d = _inputs(kind, 3, 16, 64, 0, False, gen)
        if kind == "w4a4":
            ops.gemm_w4a4(*_args(d))
        else:
            ops.gemm_w4a8(*_args(d))
        op = "gemm_w4a4" if kind == "w4a4" else "gemm_w4a8"
        assert ops.last_backend(op) in ("cpu", "torch"), ops.last_backend(op)


# ------------------------------------------------------------------------------------------------ GPU test


def _compiled() -> ModuleType:
    """The installed kernel module, which must hold compiled (not interpreted) kernels."""
    from lowbit_engine.kernels import gemm_w4a4 as kernels

    assert not kernels.interpreted(), ("TRITON_INTERPRET=1 was set when lowbit_engine.kernels was imported, "
                                       "so a 'GPU' test would run in the interpreter")
    return kernels


def _skip_without_fp8(kind: str) -> None:
    if kind == "w4a8-fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 e4m3 tensor cores need sm_89 or newer")


def _on_cuda(d: dict) -> dict:
    return {k: (v.cuda() if v is not None else None) for k, v in d.items()}


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
def test_gpu_flux_shape_and_dispatch(gen, kind):
    """A FLUX.1 attention projection (M=4608 tokens, K=N=3072, rank 32) on the compiled kernels, against
    the float64 reference on the GPU; then the op dispatch must choose Triton (or a CUDA kernel, which
    outranks it once registered)."""
    kernels = _compiled()
    _skip_without_fp8(kind)
    M, K, N, R = 4608, 3072, 3072, 32
    d = _on_cuda(_inputs(kind, M, N, K, R, True, gen))
    out = _run(kernels, kind, d, BF16)
    ref = _reference(kind, d)
    _check(out, ref, BF16, interpreted=False, fp8_mma=kind == "w4a8-fp8")
    del ref
    # Compiled code rounds fp32 to bf16 to nearest even, as the contract says (the interpreter cannot
    # show this, it truncates): the bf16 output is the fp32 output rounded by torch, bit for bit.
    assert torch.equal(out, _run(kernels, kind, d, FP32).to(BF16))

    op = "gemm_w4a4" if kind == "w4a4" else "gemm_w4a8"
    fn = ops.gemm_w4a4 if kind == "w4a4" else ops.gemm_w4a8
    via_op = fn(*_args(d), out_dtype=BF16)
    # A registered CUDA kernel outranks Triton, but may decline a call (arch, sizes): then Triton runs.
    allowed = ("cuda", "triton") if "cuda" in ops.backends(op) else ("triton",)
    assert ops.last_backend(op) in allowed, (ops.last_backend(op), ops.backends(op))
    if ops.last_backend(op) == "triton":
        assert torch.equal(via_op, out)


@pytest.mark.gpu
@pytest.mark.parametrize("out_dtype", [FP32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", KINDS)
def test_gpu_odd_shapes(gen, kind, out_dtype):
    """The compiled kernels with the H100 tile table on ragged shapes: M=1 and 17 (16-row tiles), 33
    (64-row tiles), 111 and 300 (128-row tiles, several of them), N not a multiple of the tile, R=40."""
    kernels = _compiled()
    _skip_without_fp8(kind)
    for M, N, K, R in ((1, 48, 64, 0), (17, 80, 192, 16), (33, 72, 128, 8), (111, 200, 256, 40),
                       (300, 136, 320, 16)):
        d = _on_cuda(_inputs(kind, M, N, K, R, True, gen))
        _check(_run(kernels, kind, d, out_dtype), _reference(kind, d), out_dtype, interpreted=False,
               fp8_mma=kind == "w4a8-fp8")
