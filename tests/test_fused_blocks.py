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
        lowbit_engine.load(q, "svdq-w4a8", rank=16, calib=[_inputs(s) for s in (2, 3)], progress=False,
                           fused_blocks=False)  # the tests install and remove the fused forwards themselves
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


def _fused_compiled_and_eager(q, fullgraph: bool = False):
    """The fused model's output eager and under ``torch.compile`` (aot_eager), on the same inputs."""
    torch._dynamo.reset()
    x = _inputs(8)
    fused_blocks.install(q)
    try:
        with torch.no_grad():
            eager = q(**x)[0]
            compiled = torch.compile(q, backend="aot_eager", fullgraph=fullgraph)(**x)[0]
    finally:
        fused_blocks.remove(q)
        torch._dynamo.reset()
    return compiled, eager


def test_compiles_and_matches_eager(models):
    compiled, eager = _fused_compiled_and_eager(models[1])
    assert torch.equal(compiled, eager)


def test_install_refuses_other_architectures():
    with pytest.raises(TypeError, match="no FLUX.1 blocks"):
        fused_blocks.install(torch.nn.Sequential(torch.nn.Linear(4, 4)))


# ------------------------------------------------------------------------------------------------ exit linears


def _mlp_fc2s(q):
    return [m for b in q.transformer_blocks for m in (b.ff.net[-1], b.ff_context.net[-1])] + [
        b.proj_out for b in q.single_transformer_blocks]


def _attn_outs(q):
    """The double blocks' attention output projections (image stream, text stream)."""
    return [m for b in q.transformer_blocks for m in (b.attn.to_out[0], b.attn.to_add_out)]


def _exit_linears(q):
    return _mlp_fc2s(q) + _attn_outs(q)


@pytest.fixture
def calibrated(models):
    """The quantized model with static exit input scales (MLP fc2, single-block proj_out, the double blocks'
    attention output projections) calibrated over two unfused forwards (reset after)."""
    _, q = models
    with torch.no_grad():
        report = fused_blocks.calibrate_exit_scales(q, lambda: [q(**_inputs(s)) for s in (2, 3)], max_loss_db=99.0)
    yield q, report
    for fc2 in _exit_linears(q):
        fc2.input_scale = None


def test_calibration_sets_a_static_scale_per_exit_linear(calibrated):
    q, report = calibrated
    names = {f"transformer_blocks.{i}.{ff}.net.2" for i in range(2) for ff in ("ff", "ff_context")}
    names |= {f"single_transformer_blocks.{i}.proj_out" for i in range(4)}
    names |= {f"transformer_blocks.{i}.attn.{out}" for i in range(2) for out in ("to_out.0", "to_add_out")}
    assert set(report) == names
    for name, r in report.items():
        fc2 = q.get_submodule(name)
        assert r["used"] and fc2.input_scale == r["scale"] > 0
        # the static scale spends its codes on the worst token: never better than per-token
        assert r["static_db"] <= r["token_db"] + 0.1


def test_calibration_keeps_per_token_where_the_static_scale_loses(models):
    _, q = models
    with torch.no_grad():
        report = fused_blocks.calibrate_exit_scales(q, lambda: q(**_inputs(2)), max_loss_db=-1.0)
    assert len(report) == 12 and all(not r["used"] for r in report.values())
    assert all(fc2.input_scale is None for fc2 in _exit_linears(q))


def test_exit_fused_mlp_equals_its_unfused_static_composition(calibrated):
    """feed_forward with the exit epilogue against the same math op by op: fc1 (entry-fused), GELU-tanh,
    the static quantizer, fc2's GEMM. Only fp32 summation orders differ."""
    q, _ = calibrated
    from lowbit_engine import ops_exit, ops_fused, reference

    block = q.transformer_blocks[0]
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 64, 128, generator=g).to(torch.bfloat16)
    shift, scale = ((torch.randn(2, 128, generator=g) * 0.3).to(torch.bfloat16) for _ in range(2))
    fc1, fc2 = block.ff.net[0].proj, block.ff.net[2]
    with torch.no_grad(), ops.record_backends() as used:
        fused = fused_blocks.feed_forward(block.ff, x, shift, scale, block.norm2)
    assert used["gemm_w4a8_exit"] == {"cpu"} and "quantize_act" not in used
    with torch.no_grad():
        qa, sa, la = ops_fused.norm_modulate_quantize(x.reshape(128, 128), shift, scale, block.norm2.eps, fc1.smooth,
                                                      fc1.lora_down, fc1.act_mode, 64)
        h = reference.exit_activation(fc1.gemm(qa, sa, la, torch.bfloat16), "gelu_tanh")
        q2, s2, la2 = ops_exit.quantize_act_static(h, fc2.input_scale, fc2.smooth, fc2.lora_down, fc2.act_mode)
        ref = fc2.gemm(q2, s2, la2, torch.bfloat16).reshape(2, 64, -1)
    assert _rel(fused, ref) < 1e-3


def test_exit_fused_model_matches_the_unfused_one(calibrated, monkeypatch):
    q, _ = calibrated
    x = _inputs(4)
    scales = []
    real = fused_blocks.ops_exit.quantize_act_static

    def counting(x, scale, *a, **k):
        scales.append(scale)
        return real(x, scale, *a, **k)

    with torch.no_grad():
        unfused = q(**x)[0]
        monkeypatch.setattr(fused_blocks.ops_exit, "quantize_act_static", counting)
        fused_blocks.install(q)
        try:
            with ops.record_backends() as used:
                fused = q(**x)[0]
        finally:
            fused_blocks.remove(q)
    assert used["gemm_w4a8_exit"] == {"cpu"} and used["quantize_act_static"] == {"cpu"}
    # the light passes: per double block to_out.0 and to_add_out, per single block proj_out's attention part
    want = [m.input_scale for b in q.transformer_blocks for m in (b.attn.to_out[0], b.attn.to_add_out)]
    want += [b.proj_out.input_scale for b in q.single_transformer_blocks]
    assert scales == want and None not in want
    assert _rel(fused, unfused) < FUSED_VS_UNFUSED


def test_attention_output_takes_one_light_static_pass(calibrated):
    """A double block's output projection on a split (non-contiguous, B = 2) attention output: the static
    quantizer, then the layer's GEMM, exactly; without a calibrated scale, the layer's own forward."""
    q, _ = calibrated
    from lowbit_engine import ops_exit

    layer = q.transformer_blocks[1].attn.to_add_out
    g = torch.Generator().manual_seed(13)
    joint = torch.randn(2, 80, layer.in_features, generator=g) * layer.smooth
    qmax = 127.0 if layer.act_mode == "int8" else 448.0
    joint = (joint * (0.8 * layer.input_scale * qmax / float((joint / layer.smooth).abs().amax()))).to(torch.bfloat16)
    x = joint.split_with_sizes([16, 64], dim=1)[0]
    assert not x.is_contiguous() and fused_blocks.static_fusable(layer, x)
    with torch.no_grad(), ops.record_backends() as used:
        got = fused_blocks.attention_output_linear(layer, x)
    assert used["quantize_act_static"] == {"cpu"} and "quantize_act" not in used
    with torch.no_grad():
        qa, sa, la = ops_exit.quantize_act_static(x.reshape(32, -1).contiguous(), layer.input_scale, layer.smooth,
                                                  layer.lora_down, layer.act_mode)
        want = layer.gemm(qa, sa, la, torch.bfloat16).reshape(2, 16, -1)
        own = layer(x.contiguous())
    assert torch.equal(got, want)
    assert 0 < _rel(got, own) < 2e-2  # static vs per-token scales: close, not the same
    scale, layer.input_scale = layer.input_scale, None
    try:
        with torch.no_grad(), ops.record_backends() as used:
            plain = fused_blocks.attention_output_linear(layer, x)
    finally:
        layer.input_scale = scale
    assert "quantize_act_static" not in used and torch.equal(plain, own)


def test_single_block_reads_proj_outs_lora_down_in_place(calibrated, monkeypatch):
    """The single block's two producers (attention's light pass, proj_mlp's exit GEMM) get column slices of
    proj_out's lora_down as views of the buffer itself, not per-call copies."""
    q, _ = calibrated
    po = q.single_transformer_blocks[0].proj_out
    seen = []

    def spy(real, arg):
        def call(*a, **k):
            ld = k[arg] if arg in k else a[3]
            if ld is not None and ld.shape[1] < po.in_features:
                seen.append((ld.untyped_storage().data_ptr() == po.lora_down.untyped_storage().data_ptr(),
                             ld.is_contiguous()))
            return real(*a, **k)
        return call

    monkeypatch.setattr(fused_blocks.ops_exit, "quantize_act_static",
                        spy(fused_blocks.ops_exit.quantize_act_static, "lora_down"))
    monkeypatch.setattr(fused_blocks.ops_exit, "gemm_w4a8_exit",
                        spy(fused_blocks.ops_exit.gemm_w4a8_exit, "next_lora_down"))
    fused_blocks.install(q)
    try:
        with torch.no_grad():
            fused_blocks.single_block_forward(q.single_transformer_blocks[0], *_block_inputs(q))
    finally:
        fused_blocks.remove(q)
    assert len(seen) == 2 and all(same for same, _ in seen)
    assert [contiguous for _, contiguous in seen] == [False, False]  # both slices are narrower row views


def _block_inputs(q):
    g = torch.Generator().manual_seed(12)
    D = q.single_transformer_blocks[0].proj_out.out_features
    return ((torch.randn(2, 64, D, generator=g) * 0.5).to(torch.bfloat16),
            (torch.randn(2, 16, D, generator=g) * 0.5).to(torch.bfloat16),
            (torch.randn(2, D, generator=g)).to(torch.bfloat16))


def test_static_scales_travel_in_the_checkpoint(calibrated, tmp_path):
    q, _ = calibrated
    path = lowbit_engine.save(q, tmp_path / "q.safetensors")
    fresh, _ = tiny_flux_pipeline(seed=0)
    t = fresh.transformer
    lowbit_engine.load(t, checkpoint=path)  # fmt and rank from the checkpoint (an earlier LoRA may have grown it)
    for a, b in zip(_exit_linears(q), _exit_linears(t)):
        assert b.input_scale == a.input_scale is not None


def test_exit_fused_model_compiles_and_matches_eager(calibrated):
    compiled, eager = _fused_compiled_and_eager(calibrated[0], fullgraph=True)
    assert torch.equal(compiled, eager)


def test_failed_calibration_leaves_the_scales_as_they_were(calibrated):
    q, _ = calibrated
    scales = [fc2.input_scale for fc2 in _exit_linears(q)]

    def broken():
        q(**_inputs(2))
        raise RuntimeError("the pipeline failed")

    with torch.no_grad(), pytest.raises(RuntimeError, match="the pipeline failed"):
        fused_blocks.calibrate_exit_scales(q, broken)
    assert [fc2.input_scale for fc2 in _exit_linears(q)] == scales and all(s is not None for s in scales)
