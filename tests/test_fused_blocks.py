"""Fused FLUX block forwards (lowbit_engine.integrations.fused_blocks) on a tiny FLUX from config, on the CPU.

Without a fusable layer the fused forward must be diffusers' own, bit for bit (the orchestration is the
same computation in the same order). With 8-bit SVDQuant layers the entry linears take their input from
``lowbit::norm_modulate_quantize``; the model must stay within 1e-2 (relative L2) of the unfused quantized
model (measured: 3.5e-3; the difference is diffusers' bf16 rounding of the modulation, which the fused op
does in fp32), and about as close to bf16 as the unfused one.
"""

from __future__ import annotations

import pytest
import torch

import lowbit_engine
from lowbit_engine import ops

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
from lowbit_engine.integrations import fused_blocks  # noqa: E402
from lowbit_engine.integrations.tiny import tiny_flux_pipeline  # noqa: E402

FUSED_VS_UNFUSED = 1e-2


def _inputs(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(torch.bfloat16)  # noqa: E731
    ids = torch.zeros(64, 3)
    ids[:, 1], ids[:, 2] = torch.arange(64) // 8, torch.arange(64) % 8
    return dict(hidden_states=r(2, 64, 16), encoder_hidden_states=r(2, 16, 128), pooled_projections=r(2, 128),
                timestep=torch.rand(2, generator=g).to(torch.bfloat16), img_ids=ids, txt_ids=torch.zeros(16, 3),
                return_dict=False)


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def models():
    pipe, _ = tiny_flux_pipeline(seed=0)
    bf16 = pipe.transformer
    quant, _ = tiny_flux_pipeline(seed=0)
    q = quant.transformer
    with torch.no_grad():
        lowbit_engine.load(q, "svdq-w4a8", rank=16, calib=[_inputs(s) for s in (2, 3)], progress=False)
    return bf16, q


def test_without_fusable_layers_the_fused_forward_is_diffusers_own(models):
    bf16, _ = models
    x = _inputs(1)
    with torch.no_grad():
        ref = bf16(**x)[0]
        assert fused_blocks.install(bf16) == 6 and fused_blocks.installed(bf16)
        out = bf16(**x)[0]
        assert fused_blocks.remove(bf16) == 6 and not fused_blocks.installed(bf16)
        again = bf16(**x)[0]
    assert torch.equal(out, ref) and torch.equal(again, ref)


def test_fused_quantized_model_matches_the_unfused_one(models):
    bf16, q = models
    x = _inputs(4)
    with torch.no_grad():
        ref = bf16(**x)[0]
        unfused = q(**x)[0]
        fused_blocks.install(q)
        try:
            with ops.record_backends() as used:
                fused = q(**x)[0]
        finally:
            fused_blocks.remove(q)
    # entry linears fused (QKV of both streams, fc1 of both, the single blocks' QKV and proj_mlp); the exit
    # linears (attention out, fc2, proj_out) still quantize their own input
    assert used["norm_modulate_quantize"] == {"cpu"} and "quantize_act" in used
    assert _rel(fused, unfused) < FUSED_VS_UNFUSED
    assert _rel(fused, ref) < 1.5 * _rel(unfused, ref) + 1e-3


def test_every_entry_linear_is_fused(models, monkeypatch):
    """Count the fused calls: per double block 4 (two QKV, two fc1), per single block 2 (QKV, proj_mlp)."""
    _, q = models
    calls = []
    real = fused_blocks.ops_fused.norm_modulate_quantize

    def counting(*a, **k):
        calls.append(a[0].shape)
        return real(*a, **k)

    monkeypatch.setattr(fused_blocks.ops_fused, "norm_modulate_quantize", counting)
    fused_blocks.install(q)
    try:
        with torch.no_grad():
            q(**_inputs(5))
    finally:
        fused_blocks.remove(q)
    assert len(calls) == 2 * 4 + 4 * 2


def test_lora_on_the_fused_model(models):
    """A LoRA lives in the SVDQLinear's low-rank branch, so the fused entry computes it too: loading one
    moves the fused output as much as the unfused one."""
    _, q = models
    x = _inputs(6)
    layer = q.transformer_blocks[0].attn.to_qkv
    g = torch.Generator().manual_seed(7)
    sd = {"transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, layer.in_features, generator=g) * 0.3,
          "transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(64 * 2, 4, generator=g) * 0.3}
    with torch.no_grad():
        base_unfused = q(**x)[0]
        lowbit_engine.lora.load(q, sd, name="t", strength=1.0)
        try:
            lora_unfused = q(**x)[0]
            fused_blocks.install(q)
            lora_fused = q(**x)[0]
        finally:
            fused_blocks.remove(q)
            lowbit_engine.lora.unload(q, "t")
    assert _rel(lora_unfused, base_unfused) > 1e-2  # the adapter does something
    assert _rel(lora_fused, lora_unfused) < FUSED_VS_UNFUSED


def test_compiles_and_matches_eager(models):
    _, q = models
    torch._dynamo.reset()
    x = _inputs(8)
    fused_blocks.install(q)
    try:
        with torch.no_grad():
            eager = q(**x)[0]
            compiled = torch.compile(q, backend="aot_eager")(**x)[0]
    finally:
        fused_blocks.remove(q)
        torch._dynamo.reset()
    assert torch.equal(compiled, eager)


def test_install_refuses_other_architectures():
    with pytest.raises(TypeError, match="no FLUX.1 blocks"):
        fused_blocks.install(torch.nn.Sequential(torch.nn.Linear(4, 4)))
