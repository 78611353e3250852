"""The ops layer on a GPU: dispatch to the CUDA/Triton kernels, agreement with the CPU references,
fallback warnings, alignment errors and CUDA-graph capture. Skipped without CUDA (tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch

from lowbit_engine import _dispatch, ops
from lowbit_engine.errors import OpInputError, ReferenceFallbackWarning
from lowbit_engine.formats import int4, vq

pytestmark = [pytest.mark.gpu, pytest.mark.cuda_build]
BF = torch.bfloat16


def _layer(M, K, N, R, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(M, K, generator=g) * (1 + 30 * (torch.rand(K, generator=g) > 0.98))).to(BF)
    qw, sw = int4.quantize(torch.randn(N, K, generator=g) * 0.02, scale_dtype=BF)
    return {
        "x": x, "smooth": torch.rand(K, generator=g) + 0.5, "w": int4.pack(qw), "w_scales": sw,
        "lora_down": (torch.randn(R, K, generator=g) / K**0.5).to(BF),
        "lora_up": (torch.randn(N, R, generator=g) * 0.02).to(BF), "bias": torch.randn(N, generator=g).to(BF),
    }


def _to(d, device):
    return {k: v.to(device) for k, v in d.items()}


@pytest.mark.parametrize("M", [1, 17, 111, 4608])
@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_svdq_linear_on_cuda_matches_the_cpu_reference(M, mode):
    K, N, R = 3072, 768, 32
    cpu = _layer(M, K, N, R, seed=M)
    gpu = _to(cpu, "cuda")
    gemm = ops.gemm_w4a4 if mode == "int4" else ops.gemm_w4a8
    with ops.record_backends() as used:
        q, s, la = ops.quantize_act(gpu["x"], gpu["smooth"], gpu["lora_down"], mode)
        out = gemm(q, s, gpu["w"], gpu["w_scales"], la, gpu["lora_up"], gpu["bias"], torch.float32)
        torch.cuda.synchronize()
    assert used["quantize_act"] == {"cuda"}
    assert used[f"gemm_w4a{4 if mode == 'int4' else 8}"] <= {"cuda", "triton"}
    q_ref, s_ref, la_ref = ops.quantize_act(cpu["x"], cpu["smooth"], cpu["lora_down"], mode)
    assert torch.equal(q.cpu(), q_ref) and torch.equal(s.cpu(), s_ref)  # integer parts and scales: exact
    assert (la.cpu() - la_ref).norm() / la_ref.norm() < 1e-5
    ref = gemm(q_ref, s_ref, cpu["w"], cpu["w_scales"], la_ref, cpu["lora_up"], cpu["bias"], torch.float32)
    assert torch.isfinite(out).all()
    assert ((out.cpu() - ref).norm() / ref.norm()).item() < 1e-4  # fp32 out, different summation orders


def test_cuda_tensors_without_a_kernel_fall_back_once_with_a_warning(monkeypatch):
    monkeypatch.setattr(_dispatch, "_WARNED", set())
    k, d, N, K = 256, 4, 64, 256
    cb = torch.randn(k, d)
    codes = vq.pack_indices(torch.randint(0, k, (N, K // d)), 8)
    x = torch.randn(5, K)
    ref = ops.vq_gemm(x, codes, cb, N, K, 8)
    if "cuda" in ops.backends("vq_gemm") or "triton" in ops.backends("vq_gemm"):
        pytest.skip("vq_gemm has a GPU kernel now")
    with pytest.warns(ReferenceFallbackWarning, match="lowbit::vq_gemm: no CUDA or Triton kernel"):
        out = ops.vq_gemm(x.cuda(), codes.cuda(), cb.cuda(), N, K, 8)
    assert ops.last_backend("vq_gemm") == "torch"
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-4, atol=1e-4)


def test_misaligned_cuda_input_is_a_clear_error():
    buf = torch.randn(64 * 128 + 1, device="cuda").to(BF)
    x = buf[1:].view(64, 128)  # contiguous, but 2 bytes past an aligned address
    with pytest.raises(OpInputError, match="'x' expected a 16-byte aligned data pointer"):
        ops.quantize_act(x)


def test_quantizer_and_gemm_capture_in_a_cuda_graph():
    d = _to(_layer(256, 3072, 3072, 32), "cuda")
    run = lambda: ops.gemm_w4a4(*ops.quantize_act(d["x"], d["smooth"], d["lora_down"], "int4")[:2],  # noqa: E731
                                d["w"], d["w_scales"], None, None, d["bias"])
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        eager = run()  # warm-up outside the capture (Triton compiles here)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()
    d["x"].copy_(torch.randn_like(d["x"]))
    expected = run()
    graph.replay()
    torch.cuda.synchronize()
    assert not torch.equal(expected, eager)
    assert torch.equal(captured, expected)
