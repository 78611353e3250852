"""engine.load and the fused block forwards (lowbit_engine.integrations.fused), on tiny models from config.

By default FLUX.1 and SD3 / SD3.5 loaded with 8-bit tokens (svdq-w4a8) get the fused forwards, and a
calibrated load also calibrates the MLP exits' static input scales; other architectures and int4 tokens
keep the unfused path. The install is part of load's transaction, survives save / load, LoRA hot-swap and
``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from torch import nn

import lowbit_engine
from lowbit_engine import lora, ops

pytest.importorskip("diffusers")
from lowbit_engine.errors import CalibrationError  # noqa: E402
from lowbit_engine.integrations import fused, fused_blocks  # noqa: E402
from lowbit_engine.integrations.tiny import tiny_flux_pipeline, tiny_sd3_inputs, tiny_sd3_transformer  # noqa: E402
from lowbit_engine.quant.svdquant import NoCalibrationWarning  # noqa: E402

from fused_helpers import compiled_and_eager  # noqa: E402
from test_diffusers_integration import build  # noqa: E402  (tiny PixArt, SANA, Wan)

FUSED_VS_UNFUSED = 1e-2


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _run(model, seed: int = 4):
    with torch.no_grad():
        return model(**tiny_sd3_inputs(seed), return_dict=False)[0]


def _uncalibrated(model, fmt: str = "svdq-w4a8", **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoCalibrationWarning)
        lowbit_engine.load(model, fmt, rank=16, progress=False, **kw)
    return model._lowbit_report


def _instance_forwards(model) -> list[str]:
    return [n for n, m in model.named_modules() if "forward" in m.__dict__]


@pytest.fixture(scope="module")
def sd35m():
    """SD3.5-Medium loaded as a user would: svdq-w4a8, calibrated, everything else default."""
    q = tiny_sd3_transformer(medium=True)
    with torch.no_grad():
        lowbit_engine.load(q, "svdq-w4a8", rank=16, calib=[tiny_sd3_inputs(s) for s in (2, 3)], progress=False,
                           exit_max_loss_db=99.0)  # random tiny weights: static scales lose more than 1 dB
    return q


@pytest.mark.parametrize("arch,blocks", [("flux", 6), ("sd3", 3), ("sd35m", 3)])
def test_fused_forwards_installed_by_default_for_8bit_tokens(arch, blocks):
    model = tiny_flux_pipeline(seed=0)[0].transformer if arch == "flux" else tiny_sd3_transformer(medium=arch == "sd35m")
    report = _uncalibrated(model)
    assert report.fused_blocks == fused.installed(model) == blocks
    assert len(_instance_forwards(model)) == blocks
    assert f"fused block forwards: {blocks} blocks" in str(report)
    assert report.exit_scales is None  # nothing to calibrate them with


@pytest.mark.parametrize("arch", ["pixart", "sana", "wan", "generic"])
def test_other_architectures_keep_the_unfused_path(arch):
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64)).to(torch.bfloat16) if arch == "generic" \
        else build(arch)
    report = _uncalibrated(model)
    assert report.fused_blocks == 0 and not fused.supported(model) and _instance_forwards(model) == []
    assert "fused block forwards" not in str(report)


def test_int4_tokens_are_not_fused_by_default():
    model = tiny_sd3_transformer()
    report = _uncalibrated(model, "svdq-int4")
    assert report.fused_blocks == 0 and _instance_forwards(model) == []
    assert "no 8-bit-token layers" in str(report)


def test_fused_blocks_false_and_true():
    off = tiny_sd3_transformer()
    assert _uncalibrated(off, fused_blocks=False).fused_blocks == 0 and _instance_forwards(off) == []
    on = tiny_sd3_transformer()  # True fuses even int4 layers' blocks (their linears take the unfused input)
    assert _uncalibrated(on, "svdq-int4", fused_blocks=True).fused_blocks == 3


def test_fused_blocks_true_refuses_an_architecture_without_them():
    model = build("pixart")
    before = {n: id(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match="fused_blocks=True.*PixArtTransformer2DModel"):
        lowbit_engine.load(model, "svdq-w4a8", fused_blocks=True, progress=False)
    assert {n: id(m) for n, m in model.named_modules()} == before
    with pytest.raises(TypeError, match="fused_blocks must be"):
        lowbit_engine.load(model, "svdq-w4a8", fused_blocks="yes", progress=False)


def test_calibrated_load_fuses_the_exits_and_says_so(caplog):
    model = tiny_sd3_transformer()
    with caplog.at_level(logging.INFO, logger="lowbit_engine"), torch.no_grad():
        lowbit_engine.load(model, "svdq-w4a8", rank=16, calib=[tiny_sd3_inputs(s) for s in (2, 3)],
                           exit_max_loss_db=99.0)
    report = model._lowbit_report
    assert report.calib_runs == 2 and report.fused_blocks == 3
    fc2s = [b.ff.net[2] for b in model.transformer_blocks] + [b.ff_context.net[2] for b in model.transformer_blocks[:-1]]
    assert report.exit_scales == (5, 5, 99.0) and all(fc2.input_scale for fc2 in fc2s)
    assert "fused block forwards: 3 blocks" in caplog.text and "exit fusion: 5 of 5" in caplog.text


def test_exit_scales_lose_at_most_the_allowed_sqnr():
    """The default 1 dB: on these random tiny weights no static scale is that good, so the exits stay per-token."""
    model = tiny_sd3_transformer()
    with torch.no_grad():
        lowbit_engine.load(model, "svdq-w4a8", rank=16, calib=[tiny_sd3_inputs(2)], progress=False)
    assert model._lowbit_report.exit_scales == (0, 5, 1.0)
    assert all(m.input_scale is None for m in model.modules() if hasattr(m, "input_scale"))


def test_fused_model_matches_the_unfused_one(sd35m):
    with ops.record_backends() as used:
        fused_out = _run(sd35m)
    assert used["norm_modulate_quantize"] == {"cpu"} and used["gemm_w4a8_exit"] == {"cpu"}
    assert fused.remove(sd35m) == 3
    try:
        unfused = _run(sd35m)
    finally:
        fused.install(sd35m)
    assert _rel(fused_out, unfused) < FUSED_VS_UNFUSED


def test_lora_hot_swap_moves_the_fused_output_like_the_unfused_one(sd35m):
    g = torch.Generator().manual_seed(5)
    layers = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_k_proj",
              "transformer_blocks.0.attn2.to_v", "transformer_blocks.1.ff.net.0.proj"]
    sd = {}
    for n in layers:
        k, out = 64, 64 if "ff" not in n else 256
        sd[f"transformer.{n}.lora_A.weight"] = (torch.randn(4, k, generator=g) * 0.15).to(torch.bfloat16)
        sd[f"transformer.{n}.lora_B.weight"] = (torch.randn(out, 4, generator=g) * 0.15).to(torch.bfloat16)

    def both():
        f = _run(sd35m)
        fused.remove(sd35m)
        try:
            return f, _run(sd35m)
        finally:
            fused.install(sd35m)

    base_f, base_u = both()
    lora.load(sd35m, sd, "t", strength=1.0)
    try:
        one_f, one_u = both()
        lora.set_strength(sd35m, "t", 0.5)
        half_f, half_u = both()
        lora.unload(sd35m, "t")
        gone_f, gone_u = both()
    finally:
        lora.release(sd35m)  # the layers get their own buffers (and rank) back
    assert torch.equal(_run(sd35m), base_f)
    assert _rel(one_u, base_u) > 1e-2 and _rel(half_u, base_u) > 5e-3  # the adapter does something
    for f, u in ((one_f, one_u), (half_f, half_u), (gone_f, gone_u)):
        assert _rel(f, u) < FUSED_VS_UNFUSED
    # and the fused output moves as the unfused one does: the two moves differ by the fused-vs-unfused noise
    # (measured 0.2 and 0.38 of the move; a LoRA the fused path ignored would give 1)
    assert _rel(one_f - base_f, one_u - base_u) < 0.5 and _rel(half_f - base_f, half_u - base_u) < 0.6
    assert _rel(gone_f, base_f) < 1e-3


def test_checkpoint_round_trip_keeps_the_fused_output(sd35m, tmp_path):
    path = lowbit_engine.save(sd35m, tmp_path / "sd35m.safetensors")
    fresh = tiny_sd3_transformer(medium=True)
    lowbit_engine.load(fresh, checkpoint=path, progress=False)
    assert fresh._lowbit_report.fused_blocks == 3
    scales = lambda m: {n: x.input_scale for n, x in m.named_modules() if hasattr(x, "input_scale")}  # noqa: E731
    assert scales(fresh) == scales(sd35m) and any(s is not None for s in scales(fresh).values())
    assert torch.equal(_run(fresh), _run(sd35m))


def test_compiles_fullgraph_and_matches_eager(sd35m):
    compiled, eager = compiled_and_eager(sd35m, {**tiny_sd3_inputs(8), "return_dict": False}, fullgraph=True)
    assert torch.equal(compiled, eager)


def _state(model):
    return {n: id(m) for n, m in model.named_modules()}, {k: v.clone() for k, v in model.state_dict().items()}


def _same_as(model, saved) -> bool:
    ids, sd = saved
    now = model.state_dict()
    return ({n: id(m) for n, m in model.named_modules()} == ids and now.keys() == sd.keys()
            and all(torch.equal(now[k], v) for k, v in sd.items()) and _instance_forwards(model) == [])


def test_failed_install_leaves_the_model_as_it_was(monkeypatch):
    model = tiny_sd3_transformer(medium=True)
    saved = _state(model)
    real = fused.install

    def install_then_fail(transformer):
        assert real(transformer) == 3 and _instance_forwards(transformer)
        raise RuntimeError("injected failure after the install")

    monkeypatch.setattr(fused, "install", install_then_fail)
    with pytest.raises(RuntimeError, match="injected failure"):
        _uncalibrated(model)
    assert _same_as(model, saved)


def test_failed_exit_calibration_leaves_the_model_as_it_was():
    model = tiny_sd3_transformer()
    saved = _state(model)
    calls = []

    def calib(transformer):  # the first run (token collection) works; the exit calibration's run fails
        calls.append(1)
        transformer(**tiny_sd3_inputs(2))
        if len(calls) == 2:
            raise RuntimeError("the second run failed")

    with torch.no_grad(), pytest.raises(CalibrationError, match="exit scales"):
        lowbit_engine.load(model, "svdq-w4a8", rank=16, calib=calib, progress=False)
    assert len(calls) == 2 and _same_as(model, saved)
