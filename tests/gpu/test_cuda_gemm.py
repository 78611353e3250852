"""The CUDA W4A4 / W4A8 GEMMs (csrc/cuda/gemm_w4.cu: mma.sync; csrc/cuda/gemm_w4_sm90.cu: wgmma) against
the references. Every W4A4 case runs on both kernels (LOWBIT_GEMM_W4_KERNEL=mma / wgmma; wgmma only on a
Hopper GPU); W4A8 runs int8 tokens (mma.sync) and fp8 e4m3 tokens (wgmma). The wgmma cases run with both
consumer schedules of its 128-token tiles (LOWBIT_GEMM_W4_SM90_SCHEDULE=group / split; M > 256).

* Integer parts: with unit scales and no epilogue the fp32 output is an exact integer sum, compared
  exactly with an int64 matmul of the unpacked values.
* Float parts: relative error against the float64 reference of the same quantized math below 1e-3
  (observed far lower; fp32 output so the output rounding does not hide anything).
* Odd M (1, 17, 111, 4608), N not a multiple of the tile (and odd), an odd number of K groups, ranks 8..256,
  every output element written (outputs land on NaN-poisoned memory).
Skipped without CUDA (tests/conftest.py).
"""

from __future__ import annotations

import pytest
import torch

from lowbit_engine import ops, reference
from lowbit_engine.errors import OpInputError
from lowbit_engine.formats import int4

pytestmark = [pytest.mark.gpu, pytest.mark.cuda_build]
BF = torch.bfloat16
FP8 = torch.float8_e4m3fn

# (format, activation encoding, kernel): the combinations the dispatch can run.
CASES = [("w4a4", "int4", "mma"), ("w4a4", "int4", "wgmma"), ("w4a4", "int4", "wgmma-split"),
         ("w4a8", "int8", "mma"), ("w4a8", "fp8", "wgmma"), ("w4a8", "fp8", "wgmma-split")]
CASE_IDS = ["-".join(c) for c in CASES]


def _wgmma_supported() -> bool:
    from lowbit_engine._build_info import native

    mod = native()
    return mod is not None and hasattr(mod, "cuda_gemm_w4_fp8_supported") and mod.cuda_gemm_w4_fp8_supported()


@pytest.fixture(params=CASES, ids=CASE_IDS)
def case(request, monkeypatch):
    fmt, enc, kernel = request.param
    if kernel.startswith("wgmma") and not _wgmma_supported():
        pytest.skip("the wgmma kernel needs a Hopper GPU and an sm_90a build")
    monkeypatch.setenv("LOWBIT_GEMM_W4_KERNEL", kernel.split("-")[0])
    monkeypatch.setenv("LOWBIT_GEMM_W4_SM90_SCHEDULE", "split" if kernel.endswith("split") else "group")
    return fmt, enc


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _poison_allocator(nbytes: int) -> None:
    """Leave a freed block of NaN bytes in torch's caching allocator so the next output lands on it."""
    junk = torch.full((nbytes // 4 + 1024,), float("nan"), device="cuda")
    del junk


def _weights(N: int, K: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    q = torch.randint(-8, 8, (N, K), generator=g, dtype=torch.int8)
    sw = (torch.rand(N, K // 64, generator=g) * 0.02 + 0.001).to(BF)
    return int4.pack(q), sw


def _acts(enc: str, M: int, K: int, g: torch.Generator, integer: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Random activations of one encoding; fp8 ones are small integers (exact) when `integer`."""
    if enc == "int4":
        return int4.pack(torch.randint(-8, 8, (M, K), generator=g, dtype=torch.int8)), \
            torch.rand(M, K // 64, generator=g) * 0.5 + 0.01
    scales = torch.rand(M, generator=g) * 0.05 + 1e-3
    if enc == "int8":
        return torch.randint(-127, 128, (M, K), generator=g, dtype=torch.int8), scales
    if integer:
        return torch.randint(-16, 17, (M, K), generator=g).to(FP8), scales
    return (torch.randn(M, K, generator=g) * 40).clamp(-448, 448).to(FP8), scales


def _int_dot(enc: str, act: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    a = int4.unpack(act).double() if enc == "int4" else act.double()
    return a @ int4.unpack(w).double().T


def _gemm(mode: str):
    return ops.gemm_w4a4 if mode == "w4a4" else ops.gemm_w4a8


@pytest.mark.parametrize("M,N,K", [(1, 128, 128), (17, 136, 192), (111, 73, 320), (4608, 256, 3072),
                                   (300, 384, 15360), (257, 1000, 448), (300, 128, 64), (260, 128, 128)])
def test_integer_part_is_exact(case, M, N, K):
    mode, enc = case
    g = _gen(M * 7 + K)
    w, _ = _weights(N, K, g)
    act, _ = _acts(enc, M, K, g, integer=True)
    sa = torch.ones(M, K // 64) if mode == "w4a4" else torch.ones(M)
    sw = torch.ones(N, K // 64, dtype=BF)
    expect = _int_dot(enc, act, w)
    assert expect.abs().max() < 2**24  # exactly representable in the fp32 output
    _poison_allocator(M * N * 4)
    with ops.record_backends() as used:
        out = _gemm(mode)(act.cuda(), sa.cuda(), w.cuda(), sw.cuda(), out_dtype=torch.float32)
        torch.cuda.synchronize()
    assert used == {f"gemm_{mode}": {"cuda"}}
    assert torch.equal(out.cpu().double(), expect)


@pytest.mark.parametrize("M,N,K,R", [(1, 128, 256, 32), (17, 200, 192, 16), (111, 131, 640, 8),
                                     (4608, 384, 3072, 32), (64, 256, 1024, 256), (33, 256, 512, 0),
                                     (300, 136, 704, 16)])
@pytest.mark.parametrize("up_dtype", [torch.bfloat16, torch.float16])
def test_float_parts_within_1e3_of_float64(case, M, N, K, R, up_dtype):
    mode, enc = case
    g = _gen(M + N + K + R)
    w, sw = _weights(N, K, g)
    act, sa = _acts(enc, M, K, g)
    lora_act = torch.randn(M, R, generator=g) * 3 if R else None
    lora_up = (torch.randn(N, R, generator=g) * 0.05).to(up_dtype) if R else None
    bias = torch.randn(N, generator=g).to(up_dtype)
    ref_fn = reference.gemm_w4a4 if mode == "w4a4" else reference.gemm_w4a8
    ref = ref_fn(act, sa, w, sw, lora_act=lora_act, lora_up=lora_up, bias=bias, out_dtype=torch.float64,
                 accum_dtype=torch.float64)
    cuda = lambda t: None if t is None else t.cuda()  # noqa: E731
    _poison_allocator(M * N * 4)
    out = _gemm(mode)(cuda(act), cuda(sa), cuda(w), cuda(sw), cuda(lora_act), cuda(lora_up), cuda(bias),
                      torch.float32)
    assert ops.last_backend(f"gemm_{mode}") == "cuda"
    out = out.cpu().double()
    assert torch.isfinite(out).all()
    err = ((out - ref).norm() / ref.norm()).item()
    worst = ((out - ref).abs().max() / ref.abs().max()).item()
    assert err < 1e-3 and worst < 1e-3, (err, worst)
    # What the kernels achieve: integer group sums are exact, then fp32 sums of once-rounded group products.
    # fp8 tokens are not integers: the fp8 tensor cores round their fp32 partial sums more coarsely
    # (measured 2.5e-5 .. 3.7e-5 on the H100).
    assert err < (1e-4 if enc == "fp8" else 1e-5), err


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_16bit_outputs_round_the_fp32_result(out_dtype):
    M, N, K, R = 77, 264, 512, 16
    g = _gen(5)
    w, sw = _weights(N, K, g)
    act, sa = _acts("int4", M, K, g)
    la, up = torch.randn(M, R, generator=g), (torch.randn(N, R, generator=g) * 0.05).to(BF)
    args = [t.cuda() for t in (act, sa, w, sw, la, up)]
    f32 = ops.gemm_w4a4(*args, None, torch.float32)
    _poison_allocator(M * N * 2)
    low = ops.gemm_w4a4(*args, None, out_dtype)
    assert low.dtype == out_dtype and torch.isfinite(low).all()
    torch.testing.assert_close(low, f32.to(out_dtype), rtol=0, atol=0)


def test_fp8_tokens_go_to_cuda_only_where_the_wgmma_kernel_runs_and_odd_ranks_never():
    g = _gen(9)
    M, N, K = 32, 128, 256
    w, sw = _weights(N, K, g)
    x = torch.randn(M, K, generator=g).to(FP8)
    out = ops.gemm_w4a8(x.cuda(), torch.ones(M).cuda(), w.cuda(), sw.cuda(), out_dtype=torch.float32)
    assert (ops.last_backend("gemm_w4a8") == "cuda") == _wgmma_supported() and out.shape == (M, N)
    act, sa = _acts("int4", M, K, g)
    la, up = torch.randn(M, 12, generator=g), torch.randn(N, 12, generator=g).to(BF)
    ops.gemm_w4a4(act.cuda(), sa.cuda(), w.cuda(), sw.cuda(), la.cuda(), up.cuda(), None, torch.float32)
    assert ops.last_backend("gemm_w4a4") != "cuda"


def test_misaligned_activation_view_is_a_clear_error():
    g = _gen(3)
    M, N, K = 16, 128, 128
    w, sw = _weights(N, K, g)
    act, sa = _acts("int8", M + 1, K, g)
    view = act.cuda().view(-1)[K // 2 + 8: K // 2 + 8 + M * K].view(M, K)  # contiguous, 8-byte offset
    with pytest.raises(OpInputError, match="aligned"):
        ops.gemm_w4a8(view, sa[:M].cuda(), w.cuda(), sw.cuda())


@pytest.mark.parametrize("fmt", ["svdq-int4", "svdq-w4a8"])
def test_svdq_linear_runs_the_cuda_kernels(fmt, monkeypatch):
    """The g64 layout on the CUDA kernels: its GEMMs, and the CUDA quantizer (the Triton one is the
    default for 8-bit tokens; tests/gpu/test_w4a8_gpu.py covers it)."""
    import lowbit_engine as engine

    monkeypatch.setenv("LOWBIT_QUANTIZE_ACT_KERNEL", "cuda")
    torch.manual_seed(0)
    lin = torch.nn.Linear(512, 384, dtype=BF)
    calib = torch.randn(64, 512, dtype=BF)
    q = engine.quantize_linear(lin, fmt, calib=calib, rank=32, weight_layout="g64").cuda()
    x = torch.randn(3, 41, 512, dtype=BF)
    with ops.record_backends() as used:
        y = q(x.cuda())
        torch.cuda.synchronize()
    assert used["quantize_act"] == {"cuda"}
    assert used["gemm_w4a4" if fmt == "svdq-int4" else "gemm_w4a8"] == {"cuda"}
    with ops.use_backend("torch"):
        y_ref = q(x.cuda())
    assert ((y.float() - y_ref.float()).norm() / y_ref.float().norm()).item() < 1e-2


def test_unknown_kernel_choice_is_a_clear_error(monkeypatch):
    g = _gen(4)
    M, N, K = 8, 128, 128
    w, sw = _weights(N, K, g)
    act, sa = _acts("int4", M, K, g)
    monkeypatch.setenv("LOWBIT_GEMM_W4_KERNEL", "fastest")
    with pytest.raises(ValueError, match="LOWBIT_GEMM_W4_KERNEL must be auto, wgmma or mma, got fastest"):
        ops.gemm_w4a4(act.cuda(), sa.cuda(), w.cuda(), sw.cuda())


def test_unknown_sm90_schedule_is_a_clear_error(monkeypatch):
    if not _wgmma_supported():
        pytest.skip("the wgmma kernel needs a Hopper GPU and an sm_90a build")
    g = _gen(5)
    M, N, K = 8, 128, 128
    w, sw = _weights(N, K, g)
    act, sa = _acts("fp8", M, K, g)
    monkeypatch.setenv("LOWBIT_GEMM_W4_SM90_SCHEDULE", "pingpong")
    with pytest.raises(ValueError, match="LOWBIT_GEMM_W4_SM90_SCHEDULE must be group or split, got pingpong"):
        ops.gemm_w4a8(act.cuda(), sa.cuda(), w.cuda(), sw.cuda())
