"""torch.compile over quantized models: no graph breaks inside quantized linears, same outputs as eager."""

from __future__ import annotations

import pytest
import torch

import lowbit_engine
from lowbit_engine import ops

pytest.importorskip("diffusers")
pytest.importorskip("transformers")


def _inputs(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(torch.bfloat16)  # noqa: E731
    ids = torch.zeros(64, 3)
    ids[:, 1], ids[:, 2] = torch.arange(64) // 8, torch.arange(64) % 8
    return dict(hidden_states=r(1, 64, 16), encoder_hidden_states=r(1, 16, 128), pooled_projections=r(1, 128),
                timestep=torch.rand(1, generator=g).to(torch.bfloat16), img_ids=ids, txt_ids=torch.zeros(16, 3),
                return_dict=False)


@pytest.fixture(scope="module")
def loaded():
    from lowbit_engine.integrations.tiny import tiny_flux_pipeline

    pipe, _ = tiny_flux_pipeline(seed=0)
    transformer = pipe.transformer
    lowbit_engine.load(transformer, "svdq-int4", rank=16, calib=[_inputs(s) for s in (1, 2)], progress=False)
    return transformer


def test_no_graph_break_inside_quantized_linears(loaded):
    torch._dynamo.reset()
    with torch.no_grad():
        explanation = torch._dynamo.explain(loaded)(**_inputs(3))
    inside = [r for r in explanation.break_reasons
              if any("lowbit_engine" in frame.filename for frame in getattr(r, "user_stack", []))]
    assert inside == [], [r.reason for r in inside]
    assert explanation.graph_count >= 1


def test_compiled_loaded_transformer_matches_eager(loaded):
    torch._dynamo.reset()
    x = _inputs(4)
    with torch.no_grad():
        eager = loaded(**x)[0]
        compiled = torch.compile(loaded, backend="aot_eager")
        with ops.record_backends() as used:
            out = compiled(**x)[0]
    assert used == {"quantize_act": {"cpu"}, "gemm_w4a4": {"cpu"}, "w4a16_linear": {"cpu"}}  # adaLN in w4a16
    assert torch.equal(out, eager)


def test_quantized_linear_compiles_with_fullgraph(loaded):
    torch._dynamo.reset()
    layer = loaded.transformer_blocks[0].attn.to_qkv
    x = torch.randn(3, 5, layer.in_features).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(torch.compile(layer, fullgraph=True, backend="aot_eager")(x), layer(x))
