"""The memory plan (lowbit_engine/plan.py): real model sizes from public configs on the meta device, and
bytes that match what engine.load actually stores."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
diffusers.utils.logging.set_verbosity_error()

import lowbit_engine
from lowbit_engine import cli
from lowbit_engine.plan import GIB, MODELS, plan


def test_flux_dev_svdq_w4a8_fits_in_7_gib():
    p = plan("flux-dev", "svdq-w4a8")
    assert p.bf16_bytes / GIB == pytest.approx(22.17, abs=0.01)  # 11.9 B parameters
    assert p.total_bytes / GIB <= 7.0, str(p)
    # every adaLN modulation linear is weight-only 4-bit: 19 x 2 double-block + 38 single-block + norm_out
    assert p.quantized["w4a16"].layers == 19 * 2 + 38 + 1
    assert p.quantized["w4a16"].params / 1e9 == pytest.approx(3.25, abs=0.01)
    assert p.qkv_fused and p.quantized["svdq-w4a8"].layers > 0


@pytest.mark.parametrize("model", list(MODELS))
def test_every_model_plans_below_bf16(model):
    p = plan(model, "svdq-int4")
    # SANA's MLP is convolutions (GLUMBConv, 1.4 GiB of its 3 GiB): not linears, so not quantized
    assert 0 < p.total_bytes < p.bf16_bytes / (1.5 if model.startswith("sana") else 2.5), str(p)
    assert "w4a16" in p.quantized, f"{model}: no adaLN layer found for w4a16"


def _tiny_flux():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return diffusers.FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=32,
            num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=64,
            axes_dims_rope=[4, 14, 14]).to(torch.bfloat16).eval()


@pytest.mark.parametrize("fmt", ["svdq-w4a8", "svdq-int4"])
def test_plan_counts_the_bytes_load_stores(fmt):
    model = _tiny_flux()
    planned = plan(copy.deepcopy(model).to("meta"), fmt, rank=16, gpu="ada")  # ada: svdq-int4 keeps g64 (CPU too)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lowbit_engine.load(model, fmt, rank=16, progress=False)
    report = lowbit_engine.last_report()
    assert planned.total_bytes == report.bytes_after
    assert planned.bf16_bytes == report.bytes_before
    for f, names in report.quantized.items():
        assert planned.quantized[f].layers == len(names)


def test_cli_plan_json(capsys):
    assert cli.main(["plan", "--model", "flux-schnell", "--fmt", "svdq-w4a8", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["model"] == "flux-schnell" and d["total_gib"] < 7.0 and d["quantized"]["w4a16"]["layers"] == 77


def test_unknown_model_is_a_value_error():
    with pytest.raises(ValueError, match="unknown model"):
        plan("flux-pro")


def test_skip_mapping_names_its_reason_and_adaln_is_w4a16():
    from lowbit_engine.nn import W4A16Linear

    model = _tiny_flux()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lowbit_engine.load(model, "svdq-w4a8", rank=16, progress=False,
                           skip={r"norm_out\.linear": "A/B test of the final modulation"})
    report = lowbit_engine.last_report()
    assert report.kept["skip= given by the caller: A/B test of the final modulation"] == ["norm_out.linear"]
    assert type(model.norm_out.linear) is torch.nn.Linear
    assert isinstance(model.transformer_blocks[0].norm1.linear, W4A16Linear)
    assert isinstance(model.single_transformer_blocks[0].norm.linear, W4A16Linear)
    assert type(model.proj_out) is torch.nn.Linear  # final projection stays bf16 (docs/fidelity.md)
    assert report.quantize_seconds > 0 and "quantizing took" in str(report)
