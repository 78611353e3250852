"""A quantized tiny FLUX transformer on the GPU: kernels dispatch, fidelity, and CUDA-graph capture
(the forward makes no host syncs). Skipped without CUDA (tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch

import lowbit_engine
from lowbit_engine import ops
from lowbit_engine.nn.svdq_linear import has_int4_tensor_cores

pytestmark = [pytest.mark.gpu, pytest.mark.cuda_build]
pytest.importorskip("diffusers")
pytest.importorskip("transformers")


def _inputs(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(torch.bfloat16).cuda()  # noqa: E731
    ids = torch.zeros(64, 3)
    ids[:, 1], ids[:, 2] = torch.arange(64) // 8, torch.arange(64) % 8
    return dict(hidden_states=r(1, 64, 16), encoder_hidden_states=r(1, 16, 128), pooled_projections=r(1, 128),
                timestep=torch.rand(1, generator=g).to(torch.bfloat16).cuda(), img_ids=ids.cuda(),
                txt_ids=torch.zeros(16, 3).cuda(), return_dict=False)


def test_loaded_transformer_runs_the_gpu_kernels_and_captures_in_a_cuda_graph():
    from lowbit_engine.integrations.tiny import tiny_flux_pipeline

    pipe, _ = tiny_flux_pipeline(seed=0)
    model = pipe.transformer.cuda()
    x = _inputs(1)
    with torch.no_grad():
        ref = model(**x)[0].float()
        lowbit_engine.load(model, "svdq-int4", rank=16, calib=[_inputs(s) for s in (2, 3)], progress=False)
        with ops.record_backends() as used:
            out = model(**x)[0]
    if has_int4_tensor_cores("cuda"):  # W4A4 as asked: int4 tokens on the CUDA kernels
        assert used["quantize_act"] == {"cuda"} and used["gemm_w4a4"] <= {"cuda", "triton"}
    else:  # Hopper: svdq-int4 runs I8Q weights with int8 tokens (docs/usage.md, weight layouts)
        assert used["quantize_act"] == {"triton"} and used["gemm_w4a8_i8q"] == {"triton"}
    assert ((out.float() - ref).norm() / ref.norm()).item() < 0.05

    static = _inputs(4)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        model(**static)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        captured = model(**static)[0]
    for k, v in static.items():  # new inputs into the captured buffers
        if isinstance(v, torch.Tensor):
            v.copy_(x[k])
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, out)
