"""The diffusers-native path (issue 17) on tiny FLUX / SD3.5 models built from config, on the CPU.

- the lowbit folder: ``save_pretrained`` / ``from_pretrained`` (with and without ``quantization_config``),
  ``PipelineQuantizationConfig``, ``torch_dtype=``, and ``engine.load(pipe, checkpoint=DIR)`` reading it;
- casts: ``.to(dtype)`` / ``pipe.to(dtype)`` after quantization keep the quantized buffers bit for bit;
  ``.to(device)`` and both CPU offload modes;
- SD3.5-Medium's dual attention (``attn2``) fused and quantized with the defaults.

Round trips are compared bit for bit. Where a cast changes the compute dtype, the quantized model's output
is compared with the float model by relative L2 error ``||y - y_ref|| / ||y_ref||`` (fp32) under a stated
limit: the tiny layers (K = 64 or 128) put the quantization error near 5-10%, so the limits are 0.25.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("accelerate")  # diffusers loads quantized models with low_cpu_mem_usage, i.e. accelerate
diffusers.utils.logging.set_verbosity_error()

import lowbit_engine as engine
from lowbit_engine.errors import CheckpointError
from lowbit_engine.integrations.diffusers_quantizer import LowbitConfig
from lowbit_engine.nn import FP8Linear, SVDQLinear
from lowbit_engine.nn._base import QuantizedLinearBase

BF16 = torch.bfloat16
RANK = 8
LIMIT = 0.25  # quantized vs float output on the tiny models (measured 0.05-0.12)


def _r(g: torch.Generator, *shape: int, dtype: torch.dtype = BF16) -> torch.Tensor:
    return torch.randn(*shape, generator=g).to(dtype)


def flux(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=32,
        num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=64,
        axes_dims_rope=[4, 14, 14]).to(BF16).eval()


def flux_inputs(seed: int = 3, dtype: torch.dtype = BF16) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=_r(g, 1, 64, 16, dtype=dtype), encoder_hidden_states=_r(g, 1, 8, 64, dtype=dtype),
                pooled_projections=_r(g, 1, 64, dtype=dtype), timestep=torch.rand(1, generator=g),
                img_ids=torch.zeros(64, 3), txt_ids=torch.zeros(8, 3))


def sd35m(seed: int = 0) -> nn.Module:
    """SD3.5-Medium's layout: a second self-attention (``attn2``) in the dual-attention blocks, qk RMSNorm."""
    torch.manual_seed(seed)
    return diffusers.SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=32, num_attention_heads=2,
        joint_attention_dim=64, caption_projection_dim=64, pooled_projection_dim=64, out_channels=4,
        dual_attention_layers=(0,), qk_norm="rms_norm").to(BF16).eval()


def sd3_inputs(seed: int = 3, dtype: torch.dtype = BF16) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=_r(g, 1, 4, 16, 16, dtype=dtype), encoder_hidden_states=_r(g, 1, 8, 64, dtype=dtype),
                pooled_projections=_r(g, 1, 64, dtype=dtype), timestep=torch.rand(1, generator=g) * 1000)


def out(model: nn.Module, kw: dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        return model(**kw, return_dict=False)[0]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def qbuffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every buffer of every quantized module, cloned (the quantized state, compute parts included)."""
    return {f"{n}.{b}": t.detach().clone() for n, m in model.named_modules() if isinstance(m, QuantizedLinearBase)
            for b, t in m.named_buffers(recurse=False)}


def calibrated_flux() -> nn.Module:
    model = flux()
    engine.load(model, "svdq-int4", rank=RANK, calib=[flux_inputs(s) for s in range(4)], progress=False)
    return model


# ---- the folder ---------------------------------------------------------------------------------


def test_save_pretrained_from_pretrained_round_trip(tmp_path):
    """Failed before: from_pretrained of save_pretrained's files -> 'Tensor on device meta'."""
    model = calibrated_flux()
    x = flux_inputs(11)
    y = out(model, x)
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert (cfg["quant_method"], cfg["fmt"], cfg["rank"], cfg["qkv_fused"]) == ("lowbit", "svdq-int4", RANK, True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]

    again = diffusers.FluxTransformer2DModel.from_pretrained(tmp_path, torch_dtype=BF16)
    want, got = qbuffers(model), qbuffers(again)
    assert want.keys() == got.keys() and len(want) > 0
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    assert torch.equal(out(again, x), y)
    # and it saves again: a folder from from_pretrained round-trips too
    again.save_pretrained(tmp_path / "again")
    third = diffusers.FluxTransformer2DModel.from_pretrained(tmp_path / "again")
    assert torch.equal(out(third, x), y)


def test_engine_load_reads_the_folder_without_fmt_or_rank(tmp_path):
    """Failed before: engine.load(checkpoint=DIR) needed a file, a sidecar, and fmt/rank repeated."""
    model = flux()
    engine.load(model, "svdq-w4a8", rank=RANK, calib=[flux_inputs(s) for s in range(2)], progress=False)
    x = flux_inputs(12)
    y = out(model, x)
    engine.save_pretrained(model, tmp_path)
    fresh = flux()
    engine.load(fresh, checkpoint=tmp_path, progress=False)
    assert engine.last_report().fmt == "svdq-w4a8" and engine.last_report().rank == RANK
    assert torch.equal(out(fresh, x), y)
    with pytest.raises(CheckpointError, match="holds fmt 'svdq-w4a8'; load asked for 'svdq-int4'"):
        engine.load(flux(), "svdq-int4", checkpoint=tmp_path, progress=False)


def test_from_pretrained_float_folder_with_quantization_config(tmp_path):
    """Failed before: no lowbit backend in diffusers' registry."""
    ref = flux()
    ref.save_pretrained(tmp_path / "float")
    x = flux_inputs(13)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no calibration: one NoCalibrationWarning
        model = diffusers.FluxTransformer2DModel.from_pretrained(
            tmp_path / "float", quantization_config=LowbitConfig("fp8", rank=RANK), torch_dtype=BF16)
    kinds = {type(m).__name__ for m in model.modules()}
    assert "FP8Linear" in kinds
    assert rel(out(model, x), out(ref, x)) < LIMIT
    model.save_pretrained(tmp_path / "q")
    again = diffusers.FluxTransformer2DModel.from_pretrained(tmp_path / "q")
    assert torch.equal(out(again, x), out(model, x))


def test_pipeline_quantization_config(tmp_path):
    from diffusers import FluxPipeline, PipelineQuantizationConfig

    from lowbit_engine.integrations.tiny import tiny_flux_pipeline

    pipe, emb = tiny_flux_pipeline(layers=1, single_layers=1)
    pipe.save_pretrained(tmp_path / "float")
    none = dict(text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    pq = PipelineQuantizationConfig(quant_mapping={"transformer": LowbitConfig("svdq-int4", rank=RANK)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qpipe = FluxPipeline.from_pretrained(tmp_path / "float", quantization_config=pq, torch_dtype=BF16, **none)
    assert isinstance(qpipe.transformer.transformer_blocks[0].attn.to_qkv, SVDQLinear)
    qpipe.save_pretrained(tmp_path / "q")
    back = FluxPipeline.from_pretrained(tmp_path / "q", torch_dtype=BF16, **none)
    run = dict(**emb, num_inference_steps=2, height=32, width=32, output_type="latent")
    a = qpipe(**run, generator=torch.Generator().manual_seed(0)).images
    b = back(**run, generator=torch.Generator().manual_seed(0)).images
    assert torch.equal(a, b)
    fresh, _ = tiny_flux_pipeline(layers=1, single_layers=1)
    engine.load(fresh, checkpoint=tmp_path / "q", progress=False)  # a pipeline folder: its transformer/
    c = fresh(**run, generator=torch.Generator().manual_seed(0)).images
    assert torch.equal(a, c)


def test_hub_id_is_a_clear_checkpoint_error():
    """Failed before: a FileNotFoundError text inside the CheckpointError, no hint."""
    model = flux()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match="looks like a hub id"):
        engine.load(model, checkpoint="black-forest-labs/FLUX.1-dev", progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(isinstance(m, QuantizedLinearBase) for m in model.modules())


def test_a_float_folder_is_not_a_lowbit_checkpoint(tmp_path):
    flux().save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="quant_method expected 'lowbit', got None"):
        engine.load(flux(), checkpoint=tmp_path, progress=False)


def test_a_folder_of_another_config_is_refused(tmp_path):
    model = calibrated_flux()
    model.save_pretrained(tmp_path)
    other = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=32,
        num_attention_heads=2, joint_attention_dim=128, pooled_projection_dim=64, axes_dims_rope=[4, 14, 14])
    with pytest.raises(CheckpointError, match="another config.*joint_attention_dim"):
        engine.load(other, checkpoint=tmp_path, progress=False)


# ---- casts --------------------------------------------------------------------------------------

LAYERS = [("svdq-int4", {}), ("svdq-w4a8", {}), ("svdq-w4a8", {"act_mode": "fp8"}), ("fp8", {}), ("nvfp4", {}),
          ("mxfp4", {}), ("vq2", {})]


@pytest.mark.parametrize("fmt,opts", LAYERS, ids=[f + "".join(f"-{v}" for v in o.values()) for f, o in LAYERS])
def test_layer_casts_keep_quantized_buffers(fmt, opts):
    """Failed before: .to(bf16/fp16) cast smooth / fp8 weights, .to(fp32) the low-rank factors -> OpInputError."""
    g = torch.Generator().manual_seed(5)
    lin = nn.Linear(128, 64).to(BF16)
    with torch.no_grad():
        lin.weight.copy_(_r(g, 64, 128) * 0.1)
        lin.bias.copy_(_r(g, 64) * 0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = engine.quantize_linear(lin, fmt, calib=_r(g, 64, 128), rank=RANK, **opts)
    x = _r(g, 5, 128, dtype=torch.float32)
    ref = x.double() @ lin.weight.double().T + lin.bias.double()
    base = {k: v.clone() for k, v in q.named_buffers()}
    err0 = rel(q(x.to(BF16)), ref)
    assert err0 < (0.5 if fmt == "vq2" else LIMIT)  # 2 bits per weight on a 128x64 layer: measured 0.37
    compute = BF16
    for dtype in (torch.float16, torch.float32, BF16):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q.to(dtype)
            y = q(x.to(dtype))
        assert y.dtype == dtype
        compute = compute if dtype == torch.float32 else dtype  # fp32 leaves the compute parts as they were
        assert q.dtype == compute
        for k, v in q.named_buffers():
            if k in type(q).COMPUTE_BUFFERS:
                assert v.dtype == compute, (k, v.dtype)
            else:
                assert v.dtype == base[k].dtype and torch.equal(v, base[k]), k  # bit for bit
        assert rel(y, ref) < err0 + 0.02, dtype  # fp16 factors round differently: the same error, give or take


def test_pipe_to_dtype_after_engine_load():
    """Failed before: pipe.to(torch.bfloat16 / float16 / float32) -> OpInputError at the first forward."""
    from lowbit_engine.integrations.tiny import tiny_flux_pipeline

    pipe, emb = tiny_flux_pipeline(layers=1, single_layers=1)
    ref_pipe, _ = tiny_flux_pipeline(layers=1, single_layers=1)
    engine.load(pipe, "svdq-int4", rank=RANK, progress=False,
                calib=[flux_inputs(s) | {"encoder_hidden_states": _r(torch.Generator().manual_seed(s), 1, 8, 128),
                                          "pooled_projections": _r(torch.Generator().manual_seed(s), 1, 128)}
                       for s in range(2)])
    base = qbuffers(pipe.transformer)
    for dtype in (torch.float16, torch.float32, BF16):
        pipe.to(dtype)
        ref_pipe.to(dtype)
        run = dict(prompt_embeds=emb["prompt_embeds"].to(dtype), pooled_prompt_embeds=emb["pooled_prompt_embeds"].to(dtype),
                   num_inference_steps=2, height=32, width=32, output_type="latent")
        y = pipe(**run, generator=torch.Generator().manual_seed(0)).images
        y_ref = ref_pipe(**run, generator=torch.Generator().manual_seed(0)).images
        assert rel(y, y_ref) < LIMIT, dtype
        for k, v in qbuffers(pipe.transformer).items():
            if k.rpartition(".")[2] not in SVDQLinear.COMPUTE_BUFFERS:
                assert v.dtype == base[k].dtype and torch.equal(v, base[k]), (dtype, k)


def test_from_pretrained_model_casts_too(tmp_path):
    model = calibrated_flux()
    model.save_pretrained(tmp_path)
    half = diffusers.FluxTransformer2DModel.from_pretrained(tmp_path, torch_dtype=torch.float16)
    layer = half.transformer_blocks[0].attn.to_qkv
    assert (layer.dtype, layer.lora_up.dtype, layer.smooth.dtype, layer.wscales.dtype) == \
        (torch.float16, torch.float16, torch.float32, BF16)
    x = flux_inputs(14)
    assert rel(out(half, flux_inputs(14, torch.float16)), out(model, x)) < 0.02  # fp16 vs bf16 float parts
    half.to(BF16)  # ModelMixin.to refuses dtypes on is_quantized models; lowbit models cast safely
    assert torch.equal(half.transformer_blocks[0].attn.to_qkv.smooth, model.transformer_blocks[0].attn.to_qkv.smooth)


def test_to_device_and_model_cpu_offload():
    from lowbit_engine.integrations.tiny import tiny_flux_pipeline

    pipe, emb = tiny_flux_pipeline(layers=1, single_layers=1)
    engine.load(pipe, "svdq-int4", rank=RANK, progress=False)
    run = dict(**emb, num_inference_steps=2, height=32, width=32, output_type="latent")
    a = pipe(**run, generator=torch.Generator().manual_seed(0)).images
    pipe.to("cpu")
    pipe.transformer.to(torch.device("cpu"))
    assert torch.equal(pipe(**run, generator=torch.Generator().manual_seed(0)).images, a)
    pipe.enable_model_cpu_offload(device="cpu")
    assert torch.equal(pipe(**run, generator=torch.Generator().manual_seed(0)).images, a)


def test_accelerate_per_tensor_offload_of_quantized_layers():
    """What enable_sequential_cpu_offload does to each layer: accelerate's hooks put every buffer on the
    meta device between calls and bring it back from a CPU copy for the forward; dtypes must survive.

    (diffusers' enable_sequential_cpu_offload with a CPU execution device fails inside accelerate for plain
    nn.Linear layers too, a tied-pointer shortcut that stores a Tensor as a Parameter; it needs a GPU.)"""
    from accelerate import cpu_offload

    g = torch.Generator().manual_seed(6)
    lins = [nn.Linear(128, 128).to(BF16) for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = nn.Sequential(engine.quantize_linear(lins[0], "svdq-int4", calib=_r(g, 32, 128), rank=RANK),
                              nn.GELU(), engine.quantize_linear(lins[1], "fp8"))
    x = _r(g, 3, 128)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y = model(x)
        dtypes = {k: v.dtype for k, v in model.state_dict().items()}
        cpu_offload(model, execution_device="cpu", offload_buffers=True)
        assert all(b.device.type == "meta" for b in model.buffers())
        assert torch.equal(model(x), y)
    assert {k: v.dtype for k, v in model.state_dict().items()} == dtypes


# ---- SD3.5-Medium ---------------------------------------------------------------------------------


def test_sd35_medium_dual_attention_fuses_and_quantizes_with_the_defaults(tmp_path):
    """Failed before: fused attn2 -> AttributeError: 'NoneType' object has no attribute 'ndim'."""
    ref = sd35m()
    model = sd35m()
    x = sd3_inputs(21)
    engine.load(model, calib=[sd3_inputs(s) for s in range(3)], rank=RANK, progress=False)
    report = engine.last_report()
    assert report.qkv_fused and isinstance(model.transformer_blocks[0].attn2.to_qkv, SVDQLinear)
    assert "transformer_blocks.0.attn2.to_q" in report.removed
    assert rel(out(model, x), out(ref, x)) < LIMIT
    model.save_pretrained(tmp_path)  # and the folder round trip of the dual-attention layout
    again = diffusers.SD3Transformer2DModel.from_pretrained(tmp_path)
    assert torch.equal(out(again, x), out(model, x))


def test_device_map_and_lora_release_after_a_cast(tmp_path):
    model = calibrated_flux()
    model.save_pretrained(tmp_path)
    x = flux_inputs(15)
    again = diffusers.FluxTransformer2DModel.from_pretrained(tmp_path, device_map={"": "cpu"})
    assert torch.equal(out(again, x), out(model, x))
    # a LoRA loaded, the model cast to fp16, then every adapter released: the layer runs in fp16 as before
    g = torch.Generator().manual_seed(16)
    sd = {"transformer.proj_out.lora_A.weight": _r(g, 4, 64), "transformer.proj_out.lora_B.weight": _r(g, 16, 4)}
    engine.lora.load(again, sd, "a")
    again.to(torch.float16)
    engine.lora.release(again)
    layer = again.transformer_blocks[0].attn.to_qkv
    assert layer.lora_down.dtype == layer.lora_up.dtype == torch.float16 == layer.dtype
    assert rel(out(again, flux_inputs(15, torch.float16)), out(model, x)) < 0.02
