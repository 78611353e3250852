"""The persistent sm_90a 8-bit GEMM (csrc/cuda/gemm8_sm90.cu, lowbit_engine/ops_gemm8_cuda.py) on a Hopper GPU.
Skipped without CUDA, without the sm_90a build or on another GPU.

Against the torch reference of ``lowbit::gemm_w4a8_f8l`` (docs/formats.md) in float64: the e4m3 products
are exact and the fp8 tensor cores add with fewer bits than fp32, so the limits are the ones measured for
Hopper's fp8 MMA (1e-4 relative in norm; per element 2e-4 of max|ref| plus a bf16 rounding). Random inputs
with outlier channels, odd M (1, 17, 111, 4608), N not a multiple of the 512-row cluster tile, K splits,
poisoned (NaN) outputs so an unwritten element fails.
"""

from __future__ import annotations

import pytest
import torch

from lowbit_engine import _dispatch, ops_gemm8_cuda, ops_w4a8, reference
from lowbit_engine.formats import f8l

pytestmark = [pytest.mark.gpu, pytest.mark.cuda_build]
BF = torch.bfloat16
E4M3 = torch.float8_e4m3fn


@pytest.fixture(autouse=True)
def _hopper():
    if not ops_gemm8_cuda.available():
        pytest.skip("needs the sm_90a build on a Hopper GPU")


def _check(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert torch.isfinite(out).all(), "elements not written or non-finite"
    o, r = out.double(), ref.double()
    rel = ((o - r).norm() / r.norm()).item()
    assert rel < 1e-2, rel  # bf16 output: the rounding dominates; the MMA error is far below it
    bad = (o - r).abs() > 2.0**-8 * r.abs() + 2e-4 * r.abs().max()
    assert not bad.any(), f"{bad.sum().item()} of {bad.numel()} elements off (rel {rel:.2e})"


def _ref(act, s, w, gs, row, la, up, bias):
    """The op's torch reference on the CPU with a float64 accumulator."""
    cpu = lambda t: None if t is None else t.cpu()  # noqa: E731
    return reference.gemm_w4a8_f8l(cpu(act), cpu(s), cpu(w), cpu(gs), cpu(row), cpu(la), cpu(up), cpu(bias),
                                   torch.float64, accum_dtype=torch.float64)


def _problem(M, N, K, R, seed, bias_dtype=BF):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) * (1 + 20 * (torch.rand(K, generator=g) > 0.99))
    q, s = _quantize_fp8(x)
    codes, gs, row = f8l.quantize(torch.randn(N, K, generator=g) * 0.02)
    la = torch.randn(M, R, generator=g) if R else None
    up = (torch.randn(N, R, generator=g) * 0.05).to(BF) if R else None
    bias = (torch.randn(N, generator=g) * 0.1).to(bias_dtype)
    dev = lambda t: None if t is None else t.cuda()  # noqa: E731
    return [dev(t) for t in (q, s, f8l.pack(codes), gs, row, la, up, bias)]


def _quantize_fp8(x: torch.Tensor):
    """Per-row e4m3 with the scale amax / 448 (the kernel takes any e4m3 tokens and fp32 scales)."""
    amax = x.abs().amax(dim=1).clamp_min(1e-12)
    scale = (amax / 448.0).float()
    return (x / scale[:, None]).to(E4M3), scale


@pytest.mark.parametrize("M", [1, 17, 64, 65, 111, 4608])
@pytest.mark.parametrize("N,K,R", [(3072, 3072, 32), (520, 1152, 16), (1032, 384, 64), (3080, 256, 0)])
def test_f8l_matches_reference(M, N, K, R):
    act, s, w, gs, row, la, up, bias = _problem(M, N, K, R, seed=M + N + K)
    out = ops_gemm8_cuda.gemm_w4a8_f8l_sm90(act, s, w, gs, row, la, up, bias, BF)
    torch.cuda.synchronize()
    ref = _ref(act, s, w, gs, row, la, up, bias)
    _check(out.cpu(), ref)
    tok, splits, clusters, stages = ops_gemm8_cuda.last_config
    assert tok == (32 if M <= 64 else 128) and clusters >= 1 and stages >= 3


def test_f8l_gelu_and_fp32_bias():
    act, s, w, gs, row, la, up, bias = _problem(111, 1024, 512, 32, seed=3, bias_dtype=torch.float32)
    out = ops_gemm8_cuda.gemm_w4a8_f8l_sm90(act, s, w, gs, row, la, up, bias, BF, gelu=True)
    _check(out.cpu(), torch.nn.functional.gelu(_ref(act, s, w, gs, row, la, up, bias), approximate="tanh"))


@pytest.mark.parametrize("M", [65, 4608])
def test_plain_fp8_gate(M):
    g = torch.Generator().manual_seed(M)
    K, N = 3072, 3072
    x8, xs = _quantize_fp8(torch.randn(M, K, generator=g))
    w8, ws = _quantize_fp8(torch.randn(N, K, generator=g))
    out = ops_gemm8_cuda.gemm_fp8_sm90(x8.cuda(), xs.cuda(), w8.cuda(), ws.cuda())
    ref = (x8.double() @ w8.double().T) * xs.double()[:, None] * ws.double()[None, :]
    _check(out.cpu(), ref)


def test_repeated_calls_and_poisoned_outputs_are_rewritten():
    act, s, w, gs, row, la, up, bias = _problem(4608, 3072, 3072, 32, seed=9)
    first = ops_gemm8_cuda.gemm_w4a8_f8l_sm90(act, s, w, gs, row, la, up, bias, BF)
    for _ in range(3):  # a persistent kernel with cluster barriers: no state may leak between launches
        again = ops_gemm8_cuda.gemm_w4a8_f8l_sm90(act, s, w, gs, row, la, up, bias, BF)
        assert torch.equal(first, again)


def test_dispatch_runs_it_as_the_cuda_backend(monkeypatch):
    act, s, w, gs, row, la, up, bias = _problem(256, 1024, 512, 32, seed=4)
    monkeypatch.setenv(ops_gemm8_cuda.ENV, "0")
    assert not ops_gemm8_cuda.applies(act, s, w, gs, row, la, up, bias, BF)  # off by default
    monkeypatch.setenv(ops_gemm8_cuda.ENV, "1")
    assert ops_gemm8_cuda.applies(act, s, w, gs, row, la, up, bias, BF)
    assert not ops_gemm8_cuda.applies(act, s, w, gs, row, la, up, bias, torch.float16)
    out = ops_w4a8.gemm_w4a8_f8l(act, s, w, gs, row, la, up, bias, BF)
    assert _dispatch.last_backend("gemm_w4a8_f8l") == "cuda"
    _check(out.cpu(), _ref(act, s, w, gs, row, la, up, bias))
