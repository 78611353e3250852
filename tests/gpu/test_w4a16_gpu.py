"""The w4a16 GEMV compiled on a GPU (kernels/w4a16_gemv.py) through ``lowbit::w4a16_linear``. Skipped
without CUDA.

What compiled code adds to the interpreter tests (tests/test_w4a16.py): the bit-pattern decode of q - z in
bf16 / fp16 and the 16-bit tensor-core dot (products exact, fp32 accumulate: the same limits, fp32 out
1e-5; bf16 out 1e-2 for the final rounding), and the dispatch picking Triton.
"""

from __future__ import annotations

import pytest
import torch

from lowbit_engine import ops, ops_w4a16
from lowbit_engine.formats import w4a16
from lowbit_engine.nn import W4A16Linear

pytestmark = pytest.mark.gpu
BF, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


def _weights(N, K, dev):
    w = torch.randn(N, K, device=dev) * 0.02
    q, s, z = w4a16.quantize(w)
    return w4a16.pack(q), s, z


@pytest.mark.parametrize("M", [1, 2, 16, 17, 111])
@pytest.mark.parametrize("N,K", [(18432, 3072), (9216, 3072), (333, 192)])
@pytest.mark.parametrize("x_dtype", [BF, FP16])
def test_w4a16_gemv_on_gpu(M, N, K, x_dtype):
    dev = "cuda"
    p, s, z = _weights(N, K, dev)
    x = torch.randn(M, K, device=dev).to(x_dtype)
    bias = torch.randn(N, device=dev).to(BF)
    ref = x.double() @ w4a16.dequantize(p, s, z).double().t() + bias.double()
    for out_dtype, lim in ((FP32, 1e-5), (BF, 1e-2)):
        out = ops_w4a16.w4a16_linear(x, p, s, z, bias, out_dtype)
        assert ops.last_backend("w4a16_linear") == "triton"
        assert torch.isfinite(out).all()
        rel = ((out.double() - ref).norm() / ref.norm()).item()
        assert rel < lim, (out_dtype, rel)


def test_w4a16_module_on_gpu():
    lin = torch.nn.Linear(3072, 9216, device="cuda").to(BF)
    q = W4A16Linear.from_linear(lin)
    x = torch.randn(2, 3072, device="cuda").to(BF)
    ref = x.double() @ q.dequantize().double().t() + lin.bias.double()
    assert ((q(x).double() - ref).norm() / ref.norm()).item() < 1e-2
