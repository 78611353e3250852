"""Fused SD3 / SD3.5 block forwards (lowbit_engine.integrations.fused_sd3) on tiny transformers from config.

As for FLUX (tests/test_fused_blocks.py): without a fusable layer the fused forward is diffusers' own, bit
for bit, for every processor it follows; with 8-bit SVDQuant layers the model stays within 1e-2 (relative
L2) of the unfused quantized one (measured 3.6e-3 / 3.8e-3 for SD3 / SD3.5-Medium).
"""

from __future__ import annotations

import pytest
import torch

import lowbit_engine
from lowbit_engine import ops

pytest.importorskip("diffusers")
from lowbit_engine.integrations import fused_blocks, fused_sd3  # noqa: E402
from lowbit_engine.integrations.diffusers import fuse_qkv  # noqa: E402
from lowbit_engine.integrations.tiny import tiny_sd3_inputs, tiny_sd3_transformer  # noqa: E402

FUSED_VS_UNFUSED = 1e-2
ARCHS = {"sd3": False, "sd35m": True}  # name -> SD3.5-Medium (qk norms, attn2)


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _run(model, seed: int):
    with torch.no_grad():
        return model(**tiny_sd3_inputs(seed), return_dict=False)[0]


def _quantized(medium: bool):
    q = tiny_sd3_transformer(medium=medium)
    with torch.no_grad():
        lowbit_engine.load(q, "svdq-w4a8", rank=16, calib=[tiny_sd3_inputs(s) for s in (2, 3)], progress=False,
                           fused_blocks=False)
    return q


@pytest.fixture(scope="module", params=list(ARCHS))
def models(request):
    """(bf16 reference, the same model quantized svdq-w4a8 with its blocks unfused), per architecture."""
    medium = ARCHS[request.param]
    return tiny_sd3_transformer(medium=medium), _quantized(medium)


def test_qk_norms_survive_qkv_fusion():
    """diffusers' fused joint processor drops the qk norms; after lowbit's fusion the model computes what it
    computed unfused, bit for bit."""
    t = tiny_sd3_transformer(medium=True)
    ref = _run(t, 1)
    fused, _, _ = fuse_qkv(t)
    assert fused and type(t.transformer_blocks[0].attn.processor).__name__ == "FusedJointQKNormAttnProcessor"
    assert torch.equal(_run(t, 1), ref)


@pytest.mark.parametrize("medium", list(ARCHS.values()), ids=list(ARCHS))
@pytest.mark.parametrize("fuse", [False, True], ids=["separate-qkv", "fused-qkv"])
def test_without_fusable_layers_the_fused_forward_is_diffusers_own(medium, fuse):
    t = tiny_sd3_transformer(medium=medium)
    if fuse:
        assert fuse_qkv(t)[0]
    ref = _run(t, 1)
    assert fused_sd3.install(t) == 3 and fused_sd3.installed(t)
    # the fused path really runs (not the fallback to diffusers' forward)
    assert all(fused_sd3._plan(b) is not None for b in t.transformer_blocks)
    out = _run(t, 1)
    assert fused_sd3.remove(t) == 3 and not fused_sd3.installed(t)
    assert torch.equal(out, ref) and torch.equal(_run(t, 1), ref)


def test_diffusers_own_fused_processor_without_qk_norms_is_followed():
    """SD3 without qk norms keeps diffusers' FusedJointAttnProcessor2_0: the fused forward follows it."""
    t = tiny_sd3_transformer()
    fuse_qkv(t)
    assert type(t.transformer_blocks[0].attn.processor).__name__ == "FusedJointAttnProcessor2_0"
    assert fused_sd3._plan(t.transformer_blocks[0]) == ("fused", None)


def test_fused_quantized_model_matches_the_unfused_one(models):
    bf16, q = models
    with torch.no_grad():
        ref, unfused = _run(bf16, 4), _run(q, 4)
        fused_sd3.install(q)
        try:
            with ops.record_backends() as used:
                fused = _run(q, 4)
        finally:
            fused_sd3.remove(q)
    assert used["norm_modulate_quantize"] == {"cpu"} and "quantize_act" in used  # exits quantize their input
    assert _rel(fused, unfused) < FUSED_VS_UNFUSED
    assert _rel(fused, ref) < 1.5 * _rel(unfused, ref) + 1e-3


def test_every_entry_linear_is_fused(models, monkeypatch):
    """Per block: image QKV, text QKV, the two fc1 (one in the context_pre_only last block), and attn2's QKV
    in SD3.5-Medium's dual-attention blocks."""
    _, q = models
    calls = []
    real = fused_blocks.ops_fused.norm_modulate_quantize

    def counting(*a, **k):
        calls.append(a[0].shape)
        return real(*a, **k)

    monkeypatch.setattr(fused_blocks.ops_fused, "norm_modulate_quantize", counting)
    fused_sd3.install(q)
    try:
        _run(q, 5)
    finally:
        fused_sd3.remove(q)
    dual = sum(1 for b in q.transformer_blocks if b.use_dual_attention)
    assert len(calls) == 4 + 4 + 3 + dual
    assert dual == (2 if q.transformer_blocks[0].use_dual_attention else 0)


def test_unusual_calls_run_diffusers_forward(models, monkeypatch):
    """joint_attention_kwargs or a chunked feed-forward: the block runs diffusers' own forward."""
    _, q = models
    block = q.transformer_blocks[0]
    g = torch.Generator().manual_seed(9)
    x, c, temb = (torch.randn(*s, generator=g).to(torch.bfloat16) for s in ((2, 64, 64), (2, 8, 64), (2, 64)))

    def broken(*a, **k):
        raise AssertionError("the fused op ran")

    fused_sd3.install(q)
    try:
        with torch.no_grad():
            ref = type(block).forward(block, x, c, temb)
            monkeypatch.setattr(fused_blocks.ops_fused, "norm_modulate_quantize", broken)
            with pytest.raises(AssertionError, match="the fused op ran"):
                block(x, c, temb)  # a plain call takes the fused path
            with_kwargs = block(x, c, temb, joint_attention_kwargs={"attention_mask": None})
            block.set_chunk_feed_forward(8, dim=1)
            chunked = block(x, c, temb)
            chunked_ref = type(block).forward(block, x, c, temb)
    finally:
        block.set_chunk_feed_forward(None)
        fused_sd3.remove(q)
    assert all(torch.equal(a, b) for a, b in zip(with_kwargs, ref))
    assert all(torch.equal(a, b) for a, b in zip(chunked, chunked_ref))


def test_exit_fused_model_matches_the_unfused_one(models):
    _, q = models
    fc2s = [m for b in q.transformer_blocks for m in (b.ff.net[-1], *(b.ff_context.net[-1:] if b.ff_context else ()))]
    with torch.no_grad():
        report = fused_blocks.calibrate_exit_scales(q, lambda: [_run(q, s) for s in (2, 3)], max_loss_db=99.0)
    try:
        assert len(report) == len(fc2s) == 5 and all(fc2.input_scale for fc2 in fc2s)
        unfused = _run(q, 4)
        fused_sd3.install(q)
        with ops.record_backends() as used:
            fused = _run(q, 4)
    finally:
        fused_sd3.remove(q)
        for fc2 in fc2s:
            fc2.input_scale = None
    assert used["gemm_w4a8_exit"] == {"cpu"}
    assert _rel(fused, unfused) < FUSED_VS_UNFUSED


def test_install_refuses_other_architectures():
    with pytest.raises(TypeError, match="no SD3"):
        fused_sd3.install(torch.nn.Sequential(torch.nn.Linear(4, 4)))
