"""engine.load on tiny REAL diffusers transformers (FLUX, SD3, PixArt, SANA, Wan) built from config, on the CPU.

Fidelity metric: relative L2 error ``||y_q - y|| / ||y||`` (fp32) of the transformer output against the same
bf16 model, on inputs the calibration did not see (calibration: 8 batches of the same kind of random inputs). The limits sit above the measured errors with a margin
(measured values in the comments of ``ARCHS``). Layers are tiny (K = 64 or 256: one to four int4 groups),
so these numbers say the swap is wired right, not what W4A4 costs on a real FLUX.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch
from torch import nn

diffusers = pytest.importorskip("diffusers")
diffusers.utils.logging.set_verbosity_error()  # "should be kept in float32" notes on every tiny build

import lowbit_engine
from lowbit_engine.errors import CheckpointError, UnknownFormatError
from lowbit_engine.integrations import diffusers as integ
from lowbit_engine.integrations.policies import KEEP, QUANTIZE, policy_for
from lowbit_engine.nn import SVDQLinear, W4A16Linear
from lowbit_engine.quant.svdquant import NoCalibrationWarning

RANK = 16
BF16 = torch.bfloat16


def _r(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g).to(BF16)


def _flux() -> nn.Module:
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=32,
        num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=64, axes_dims_rope=[4, 14, 14])


def _flux_inputs(g: torch.Generator) -> dict[str, Any]:
    return dict(hidden_states=_r(g, 1, 64, 16), encoder_hidden_states=_r(g, 1, 8, 64),
                pooled_projections=_r(g, 1, 64), timestep=torch.rand(1, generator=g),
                img_ids=torch.zeros(64, 3), txt_ids=torch.zeros(8, 3))


def _sd3() -> nn.Module:
    return diffusers.SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=32, num_attention_heads=2,
        joint_attention_dim=64, caption_projection_dim=64, pooled_projection_dim=64, out_channels=4)


def _sd3_inputs(g: torch.Generator) -> dict[str, Any]:
    return dict(hidden_states=_r(g, 1, 4, 16, 16), encoder_hidden_states=_r(g, 1, 8, 64),
                pooled_projections=_r(g, 1, 64), timestep=torch.rand(1, generator=g) * 1000)


def _pixart() -> nn.Module:
    return diffusers.PixArtTransformer2DModel(
        sample_size=16, num_layers=2, patch_size=2, attention_head_dim=32, num_attention_heads=2, in_channels=4,
        out_channels=8, cross_attention_dim=64, caption_channels=64)


def _pixart_inputs(g: torch.Generator) -> dict[str, Any]:
    return dict(hidden_states=_r(g, 1, 4, 16, 16), encoder_hidden_states=_r(g, 1, 8, 64),
                timestep=torch.rand(1, generator=g) * 1000, added_cond_kwargs={"resolution": None, "aspect_ratio": None})


def _sana() -> nn.Module:
    return diffusers.SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=32, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=32, cross_attention_dim=64, caption_channels=64,
        mlp_ratio=2.5, sample_size=8, patch_size=1)


def _sana_inputs(g: torch.Generator) -> dict[str, Any]:
    return dict(hidden_states=_r(g, 1, 4, 8, 8), encoder_hidden_states=_r(g, 1, 8, 64),
                timestep=torch.rand(1, generator=g) * 1000)


def _wan() -> nn.Module:
    return diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4,
        text_dim=64, freq_dim=64, ffn_dim=128, num_layers=2, rope_max_seq_len=32)


def _wan_inputs(g: torch.Generator) -> dict[str, Any]:
    return dict(hidden_states=_r(g, 1, 4, 2, 8, 8), encoder_hidden_states=_r(g, 1, 8, 64),
                timestep=torch.rand(1, generator=g) * 1000)


@dataclass
class Arch:
    build: Callable[[], nn.Module]
    inputs: Callable[[torch.Generator], dict[str, Any]]
    fuses: bool          # diffusers' fuse_qkv_projections works (and is used) in 0.42.1
    fused_names: tuple[str, ...]
    max_rel_err: float   # fidelity limit (measured value in the comment)


ARCHS = {
    # limits: about 2.5x the measured error with 8 calibration batches (uncalibrated in brackets)
    "flux": Arch(_flux, _flux_inputs, True, ("to_qkv", "to_added_qkv"), 0.025),    # 0.0091 (0.0096)
    "sd3": Arch(_sd3, _sd3_inputs, True, ("to_qkv", "to_added_qkv"), 0.02),       # 0.0081 (0.0088)
    "pixart": Arch(_pixart, _pixart_inputs, True, ("to_qkv", "to_kv"), 0.035),    # 0.0127 (0.0162)
    # SANA's cross-attention K/V see only 8 text tokens per call: with 2 batches the alpha search overfit
    # them (0.109, worse than uncalibrated); 8 batches give 0.031.
    "sana": Arch(_sana, _sana_inputs, False, (), 0.08),                           # 0.0313 (0.0570)
    "wan": Arch(_wan, _wan_inputs, True, ("to_qkv", "to_kv"), 0.055),             # 0.0216 (0.0232)
}


def build(arch: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ARCHS[arch].build().to(BF16).eval()


def run(model: nn.Module, kwargs: dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        return model(**kwargs, return_dict=False)[0].float()


def calib_set(arch: str, n: int = 8) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(100)
    return [ARCHS[arch].inputs(g) for _ in range(n)]


def eval_inputs(arch: str) -> dict[str, Any]:
    return ARCHS[arch].inputs(torch.Generator().manual_seed(7))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def quantized() -> dict[str, tuple[nn.Module, nn.Module, integ.LoadReport]]:
    """Each architecture once: (bf16 reference, quantized model, report); shared by the tests below."""
    out = {}
    for arch in ARCHS:
        ref, model = build(arch), build(arch)
        before = dict(model.named_modules())
        assert integ.load(model, "svdq-int4", rank=RANK, calib=calib_set(arch), progress=False) is model
        out[arch] = (ref, model, model._lowbit_report, before)
    return out


@pytest.mark.parametrize("arch", list(ARCHS))
def test_fidelity(quantized, arch):
    ref, model, _, _ = quantized[arch]
    x = eval_inputs(arch)
    err = rel_err(run(model, x), run(ref, x))
    print(f"{arch}: relative L2 error {err:.4f}")
    assert err < ARCHS[arch].max_rel_err


@pytest.mark.parametrize("arch", list(ARCHS))
def test_swap_follows_policy_table(quantized, arch):
    ref, model, report, before = quantized[arch]
    policy = policy_for(model)
    assert report.policy == policy.name == arch
    linears = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, SVDQLinear, W4A16Linear))}
    rules = {n: policy.decide(n, m.in_features) for n, m in linears.items()}
    decisions = {n: r.action for n, r in rules.items()}
    assert QUANTIZE in decisions.values() and KEEP in decisions.values()
    # the adaLN modulation linears are weight-only w4a16 by the policy, whatever the load format
    assert any(r.fmt == "w4a16" for r in rules.values())
    ref_mods = dict(ref.named_modules())
    for name, action in decisions.items():
        mod = linears[name]
        if action == QUANTIZE and rules[name].fmt == "w4a16":
            assert isinstance(mod, W4A16Linear), name
        elif action == QUANTIZE:
            assert isinstance(mod, SVDQLinear), name
            assert mod.calib_error is not None, f"{name} was not calibrated"
        else:  # untouched: the same object, the same weights as the bf16 model
            assert type(mod) is nn.Linear and mod is before[name], name
            assert torch.equal(mod.weight, ref_mods[name].weight), name
    assert sorted(report.quantized["svdq-int4"]) == sorted(n for n, r in rules.items()
                                                           if r.action == QUANTIZE and r.fmt is None)
    assert sorted(report.quantized["w4a16"]) == sorted(n for n, r in rules.items() if r.fmt == "w4a16")
    assert report.uncalibrated == []


@pytest.mark.parametrize("arch", list(ARCHS))
def test_qkv_fusion(quantized, arch):
    _, model, report, _ = quantized[arch]
    names = dict(model.named_modules())
    assert report.qkv_fused == ARCHS[arch].fuses, report.qkv_note
    if not ARCHS[arch].fuses:
        assert "created no fused projection" in report.qkv_note and report.removed == []
        return
    for fused in ARCHS[arch].fused_names:
        hits = [n for n in names if n.endswith("." + fused)]
        assert hits and all(isinstance(names[n], SVDQLinear) for n in hits), fused
    # The separate projections the fused ones replace are gone (no dead bf16 weights left behind).
    assert report.removed and not any(n in names for n in report.removed)
    assert not any(n.endswith((".to_k", ".to_v")) for n in names)


@pytest.mark.parametrize("arch", ["flux", "sana"])
def test_report_counts_and_memory(quantized, arch):
    ref, model, report, _ = quantized[arch]

    def nbytes(m: nn.Module) -> int:  # independent of the engine's helper: the state dict, tensors once each
        seen = {t.data_ptr(): t for t in m.state_dict().values()}
        return sum(t.numel() * t.element_size() for t in seen.values())

    assert report.bytes_before == nbytes(ref)
    assert report.bytes_after == nbytes(model) < report.bytes_before
    assert report.num_quantized == sum(isinstance(m, (SVDQLinear, W4A16Linear)) for m in model.modules())
    assert report.num_kept == sum(type(m) is nn.Linear for m in model.modules())
    assert report.source == "calibrated" and report.calib_runs == 8 and report.seconds > 0
    text = str(report)
    assert f"quantized svdq-int4: {len(report.quantized['svdq-int4'])} layers" in text and "MiB" in text
    assert f"quantized w4a16: {len(report.quantized['w4a16'])} layers" in text and "quantizing took" in text


def test_generic_fallback_on_sequential():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64), nn.Linear(64, 40),
                          nn.Linear(40, 64)).to(BF16)
    odd = model[4]
    with pytest.warns(NoCalibrationWarning, match="3 of 3 layers"):
        integ.load(model, "svdq-int4", rank=8, progress=False)
    report = integ.last_report()
    assert report.policy == "generic" and report.source == "uncalibrated" and not report.qkv_fused
    assert [type(m).__name__ for m in model] == ["SVDQLinear", "GELU", "SVDQLinear", "SVDQLinear", "Linear"]
    assert model[4] is odd and report.kept == {"in_features not a multiple of 64: kept bf16": ["4"]}
    assert model(torch.randn(3, 64, dtype=BF16)).shape == (3, 64)


def test_bad_format_and_object_leave_the_model_alone():
    model = build("flux")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnknownFormatError, match="unknown format 'int3'"):
        integ.load(model, "int3", calib=calib_set("flux"))
    with pytest.raises(TypeError, match="calib items"):
        integ.load(model, "svdq-int4", calib=[42])
    with pytest.raises(TypeError, match="pipeline"):
        integ.load(42, "svdq-int4")
    assert not any(isinstance(m, SVDQLinear) for m in model.modules())
    assert state.keys() == model.state_dict().keys()


def _snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, type]]:
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: type(m) for n, m in model.named_modules()})


def _assert_unchanged(model: nn.Module, snap) -> None:
    state, types = snap
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], v) for k, v in state.items())
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert not getattr(model.get_submodule(_first_attn(model)), "fused_projections", False)


def _first_attn(model: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if hasattr(m, "to_q"))


@pytest.mark.parametrize("arch", ["flux", "pixart", "sana"])
def test_checkpoint_round_trip(quantized, arch, tmp_path):
    _, model, _, _ = quantized[arch]
    path = integ.save(model, tmp_path / f"{arch}.safetensors")
    fresh = build(arch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NoCalibrationWarning)  # no calibration
        integ.load(fresh, "svdq-int4", rank=RANK, checkpoint=path, progress=False)
    report = fresh._lowbit_report
    assert report.source == "checkpoint" and report.qkv_fused == ARCHS[arch].fuses
    assert report.num_quantized == model._lowbit_report.num_quantized
    x = eval_inputs(arch)
    assert torch.equal(run(fresh, x), run(model, x))


def test_checkpoint_of_another_model_raises_and_leaves_it_untouched(quantized, tmp_path):
    path = integ.save(quantized["flux"][1], tmp_path / "flux.safetensors")
    for other in (build("sd3"), build("pixart")):  # another architecture (with and without the sidecar)
        snap = _snapshot(other)
        with pytest.raises(CheckpointError, match="saved from a FluxTransformer2DModel"):
            integ.load(other, checkpoint=path, rank=RANK, progress=False)
        _assert_unchanged(other, snap)
    integ.sidecar_path(path).rename(tmp_path / "aside.json")
    other = build("sd3")
    snap = _snapshot(other)
    with pytest.raises(CheckpointError, match="no nn.Linear of that name|in the model"):
        integ.load(other, checkpoint=path, rank=RANK, progress=False)
    _assert_unchanged(other, snap)
    (tmp_path / "aside.json").rename(integ.sidecar_path(path))

    # Same architecture, another config: the sidecar names the differing keys.
    torch.manual_seed(0)
    wider = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=32,
        num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=64, axes_dims_rope=[4, 14, 14]).to(BF16)
    snap = _snapshot(wider)
    with pytest.raises(CheckpointError, match="num_attention_heads"):
        integ.load(wider, checkpoint=path, rank=RANK, progress=False)
    _assert_unchanged(wider, snap)


def test_failed_load_after_fusion_is_undone(quantized, tmp_path):
    """A corrupt tensor is only found by load_checkpoint, after QKV fusion: the fusion must be rolled back."""
    path = integ.save(quantized["flux"][1], tmp_path / "flux.safetensors")
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF  # a byte of the last tensor's data: its sha256 no longer matches
    path.write_bytes(bytes(raw))
    fresh = build("flux")
    snap = _snapshot(fresh)
    with pytest.raises(CheckpointError, match="sha256"):
        integ.load(fresh, checkpoint=path, rank=RANK, progress=False)
    _assert_unchanged(fresh, snap)
    x = eval_inputs("flux")
    assert torch.equal(run(fresh, x), run(build("flux"), x))  # and it still runs, unfused


def test_prompt_calibration_drives_the_pipeline():
    """calib=[prompts] runs the pipeline itself for calib_steps steps (a stand-in pipeline records the call)."""
    transformer = build("flux")

    class Pipe:
        text_encoder = object()

        def __init__(self):
            self.transformer, self.calls = transformer, []

        def __call__(self, **kw):
            self.calls.append(kw)
            for _ in range(kw["num_inference_steps"]):
                self.transformer(**_flux_inputs(torch.Generator().manual_seed(len(self.calls))))

    pipe = Pipe()
    assert integ.load(pipe, rank=RANK, calib=["a cat", "a dog"], calib_steps=2, calib_kwargs={"height": 64},
                      progress=False) is pipe
    assert [c["prompt"] for c in pipe.calls] == ["a cat", "a dog"]
    assert all(c["num_inference_steps"] == 2 and c["output_type"] == "latent" and c["height"] == 64
               for c in pipe.calls)
    assert pipe._lowbit_report.calib_runs == 2 and pipe._lowbit_report.uncalibrated == []


def _tiny_vae() -> nn.Module:
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[32, 32], layers_per_block=1,
        latent_channels=4, norm_num_groups=32, sample_size=32, shift_factor=0.0, scaling_factor=1.0).to(BF16).eval()


def _denoise(transformer: nn.Module, vae: nn.Module, emb: dict[str, torch.Tensor], steps: int = 2) -> torch.Tensor:
    """FluxPipeline's loop, written out: 2x2-packed latents, flow-matching Euler steps, VAE decode -> image."""
    sched = diffusers.FlowMatchEulerDiscreteScheduler()
    sched.set_timesteps(steps)
    lat = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)).to(BF16)
    packed = lat.view(1, 4, 8, 2, 8, 2).permute(0, 2, 4, 1, 3, 5).reshape(1, 64, 16)
    ids = torch.zeros(8, 8, 3)
    ids[..., 1], ids[..., 2] = torch.arange(8)[:, None], torch.arange(8)[None, :]
    with torch.no_grad():
        for t in sched.timesteps:
            v = transformer(hidden_states=packed, timestep=(t / 1000).expand(1).to(BF16), img_ids=ids.reshape(64, 3),
                            txt_ids=torch.zeros(8, 3), return_dict=False, **emb)[0]
            packed = sched.step(v, t, packed, return_dict=False)[0]
        lat = packed.view(1, 8, 8, 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(1, 4, 16, 16)
        return vae.decode(lat, return_dict=False)[0].float()


def _embeddings() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return dict(encoder_hidden_states=_r(g, 1, 8, 64), pooled_projections=_r(g, 1, 64))


def test_flux_denoising_loop_end_to_end():
    """The FluxPipeline denoising loop (written out: the pipeline class needs `transformers`) after load."""
    vae, transformer = _tiny_vae(), build("flux")
    emb = _embeddings()
    ref = _denoise(transformer, vae, emb)
    integ.load(transformer, rank=RANK, calib=lambda t: _denoise(t, vae, _embeddings(), steps=3), progress=False)
    assert transformer._lowbit_report.uncalibrated == [] and transformer._lowbit_report.calib_runs == 1
    image = _denoise(transformer, vae, emb)
    assert image.shape == ref.shape == (1, 3, 32, 32) and torch.isfinite(image).all()
    assert rel_err(image, ref) < 0.1
    print(f"denoising loop: image relative L2 error {rel_err(image, ref):.4f}")


def test_flux_pipeline_end_to_end():
    pytest.importorskip("transformers", reason="diffusers' FluxPipeline class needs the transformers package")
    pipe = diffusers.FluxPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=_tiny_vae(), text_encoder=None,
        tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=build("flux"))
    pipe.set_progress_bar_config(disable=True)
    emb = _embeddings()
    call = dict(height=32, width=32, num_inference_steps=2, guidance_scale=1.0, output_type="pt",
                prompt_embeds=emb["encoder_hidden_states"], pooled_prompt_embeds=emb["pooled_projections"])

    with pytest.raises(ValueError, match="text encoders"):
        integ.load(pipe, calib=["a prompt"], progress=False)  # checked before the model is touched
    assert not any(isinstance(m, SVDQLinear) for m in pipe.transformer.modules())

    ref = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    integ.load(pipe, rank=RANK, calib=lambda p: p(**call, generator=torch.Generator().manual_seed(1)),
               progress=False)
    assert pipe._lowbit_report.uncalibrated == [] and pipe._lowbit_report.calib_runs == 1
    assert isinstance(pipe.transformer.transformer_blocks[0].attn.to_qkv, SVDQLinear)
    image = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    assert image.shape == ref.shape == (1, 3, 32, 32)
    assert torch.isfinite(image).all()
    assert rel_err(image.float(), ref.float()) < 0.1
