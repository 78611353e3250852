"""Bad input and faults (issue 19): every public entry refuses bad input with the documented class and a
message naming what was expected and what came, and a failed call leaves the model exactly as it was.

The tables are the spec: a new format is one row of ``FORMATS``, a new op one entry of ``OP_CASES``, a new
architecture one row of ``ARCHS``, a new fault one row of its table. "Unchanged" means the same module
objects under the same names and a bit-identical state dict (compared as raw bytes, so NaN weights count).
"""

from __future__ import annotations

import inspect
import json
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import lowbit_engine
from lowbit_engine import checkpoint as ckpt
from lowbit_engine import lora, ops, ops_exit, ops_float, ops_fused, ops_w4a8, ops_w4a16
from lowbit_engine.errors import CalibrationError, CheckpointError, NonFiniteError, OpInputError
from lowbit_engine.formats import f8l, i8q, int4
from lowbit_engine.lora import LoRAError
from lowbit_engine.nn import FP4Linear, W4A16Linear
from lowbit_engine.quantize import available_formats, quantize_linear
from triton_interp import load_interpreted

BF16 = torch.bfloat16
FAST = {"alphas": (0.5,), "refine_iters": 0}  # quant_opts for the successful loads: the faults are the point


# ---- "unchanged" -------------------------------------------------------------------------------


def snapshot(model: nn.Module) -> tuple[dict[str, int], dict[str, bytes]]:
    """Module ids by name and the raw bytes of every state tensor."""
    ids = {n: id(m) for n, m in model.named_modules()}
    state = {k: _bytes(v) for k, v in model.state_dict().items()}
    return ids, state


def _bytes(t: torch.Tensor) -> bytes:
    if t.is_meta:  # no data: the device, dtype and shape are all there is to compare
        return repr(("meta", t.dtype, tuple(t.shape))).encode()
    t = t.detach().cpu().contiguous()
    return bytes(t.reshape(-1).view(torch.uint8).numpy()) + repr((t.dtype, tuple(t.shape))).encode()


def assert_unchanged(model: nn.Module, snap: tuple[dict[str, int], dict[str, bytes]]) -> None:
    ids, state = snap
    assert {n: id(m) for n, m in model.named_modules()} == ids, "module objects or names changed"
    now = model.state_dict()
    assert list(now) == list(state), "state dict keys changed"
    changed = [k for k, v in now.items() if _bytes(v) != state[k]]
    assert not changed, f"tensors changed: {changed[:5]}"


# ---- tiny architectures (random weights, built from config) -----------------------------------


def _r(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g).to(BF16)


def _diffusers():
    diffusers = pytest.importorskip("diffusers")
    diffusers.utils.logging.set_verbosity_error()
    return diffusers


def _flux() -> nn.Module:
    return _diffusers().FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=32,
        num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=64, axes_dims_rope=[4, 14, 14])


def _flux_in(g):
    return dict(hidden_states=_r(g, 1, 64, 16), encoder_hidden_states=_r(g, 1, 8, 64),
                pooled_projections=_r(g, 1, 64), timestep=torch.rand(1, generator=g),
                img_ids=torch.zeros(64, 3), txt_ids=torch.zeros(8, 3))


def _sd3(dual: tuple[int, ...] = ()) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        extra = dict(dual_attention_layers=dual, qk_norm="rms_norm") if dual else {}
        return _diffusers().SD3Transformer2DModel(
            sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=32, num_attention_heads=2,
            joint_attention_dim=64, caption_projection_dim=64, pooled_projection_dim=64, out_channels=4, **extra)
    return build


def _sd3_in(g):
    return dict(hidden_states=_r(g, 1, 4, 16, 16), encoder_hidden_states=_r(g, 1, 8, 64),
                pooled_projections=_r(g, 1, 64), timestep=torch.rand(1, generator=g) * 1000)


def _pixart() -> nn.Module:
    return _diffusers().PixArtTransformer2DModel(
        sample_size=16, num_layers=2, patch_size=2, attention_head_dim=32, num_attention_heads=2, in_channels=4,
        out_channels=8, cross_attention_dim=64, caption_channels=64)


def _pixart_in(g):
    return dict(hidden_states=_r(g, 1, 4, 16, 16), encoder_hidden_states=_r(g, 1, 8, 64),
                timestep=torch.rand(1, generator=g) * 1000,
                added_cond_kwargs={"resolution": None, "aspect_ratio": None})


def _sana() -> nn.Module:
    return _diffusers().SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=32, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=32, cross_attention_dim=64, caption_channels=64,
        mlp_ratio=2.5, sample_size=8, patch_size=1)


def _sana_in(g):
    return dict(hidden_states=_r(g, 1, 4, 8, 8), encoder_hidden_states=_r(g, 1, 8, 64),
                timestep=torch.rand(1, generator=g) * 1000)


def _wan() -> nn.Module:
    return _diffusers().WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4,
        text_dim=64, freq_dim=64, ffn_dim=128, num_layers=2, rope_max_seq_len=32)


def _wan_in(g):
    return dict(hidden_states=_r(g, 1, 4, 2, 8, 8), encoder_hidden_states=_r(g, 1, 8, 64),
                timestep=torch.rand(1, generator=g) * 1000)


def _generic() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64), nn.Linear(64, 64))


def _generic_in(g):
    return dict(input=_r(g, 16, 64))


# name -> (builder, inputs, the kwarg whose last dim is the model's input width for the "wrong width" fault)
ARCHS: dict[str, tuple[Callable[[], nn.Module], Callable[[torch.Generator], dict], str]] = {
    "flux": (_flux, _flux_in, "encoder_hidden_states"),
    "sd3": (_sd3(), _sd3_in, "encoder_hidden_states"),
    "sd35-medium": (_sd3(dual=(0,)), _sd3_in, "encoder_hidden_states"),  # dual attention: attn2
    "pixart": (_pixart, _pixart_in, "encoder_hidden_states"),
    "sana": (_sana, _sana_in, "encoder_hidden_states"),
    "wan": (_wan, _wan_in, "encoder_hidden_states"),
    "generic": (_generic, _generic_in, "input"),
}


def build(arch: str) -> nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ARCHS[arch][0]().to(BF16).eval()


def calib_item(arch: str) -> dict[str, Any]:
    return ARCHS[arch][1](torch.Generator().manual_seed(3))


def _wrong_width(arch: str) -> list[dict[str, Any]]:
    item = calib_item(arch)
    key = ARCHS[arch][2]
    item[key] = torch.randn(*item[key].shape[:-1], item[key].shape[-1] + 8).to(BF16)
    return [item]


def _raising_callable(obj: Any) -> None:
    raise RuntimeError("my calibration loop broke")


def _nan_in_last_layer(model: nn.Module) -> dict[str, Any]:
    """A layer the quantizer refuses, late in the loop: the layers before it were already replaced."""
    from lowbit_engine.integrations.diffusers import plan_layers
    from lowbit_engine.integrations.policies import KEEP, policy_for

    plan = plan_layers(model, policy_for(model))
    name = [n for n, r in plan.items() if r.action != KEEP and not re.search(r"\.(to_[qkv]|add_[qkv]_proj)$", n)][-1]
    last = model.get_submodule(name)
    with torch.no_grad():
        last.weight[0, 0] = float("nan")
    return dict(calib=None, skip=None, _note=name)


# fault -> (load kwargs given the arch and model, error class, message regex). Each of the first six is a
# case of the sweep that left the model fused; the others cover the rest of the staged path.
LOAD_FAULTS: dict[str, tuple[Callable[[str, nn.Module], dict[str, Any]], type[Exception], str]] = {
    "skip regex": (lambda a, m: dict(skip=["(unclosed"], calib=[calib_item(a)]), ValueError,
                   r"skip pattern '\(unclosed' is not a valid regex"),
    "rank -1": (lambda a, m: dict(rank=-1, calib=[calib_item(a)]), ValueError, r"rank must be an int >= 0, got -1"),
    "quant_opts key": (lambda a, m: dict(quant_opts={"bogus": 1}, calib=[calib_item(a)]), ValueError,
                       r"quant_opts: unknown option\(s\) \['bogus'\] for format 'svdq-int4'; it takes: act_mode"),
    "calib kwargs the model rejects": (lambda a, m: dict(calib=[{**calib_item(a), "bogus": 1}]), CalibrationError,
                                       r"calibration input 0 \(a dict of transformer kwargs\) failed: TypeError"),
    "calib of the wrong width": (lambda a, m: dict(calib=_wrong_width(a)), CalibrationError,
                                 r"calibration input 0 .* failed: RuntimeError"),
    "calib callable raises": (lambda a, m: dict(calib=_raising_callable), CalibrationError,
                              r"the calib callable raised RuntimeError: my calibration loop broke"),
    "NaN weight in the last layer": (lambda a, m: {k: v for k, v in _nan_in_last_layer(m).items() if k != "_note"},
                                     NonFiniteError, r"weight has non-finite values \(1 of"),
    "missing checkpoint": (lambda a, m: dict(checkpoint="/nonexistent/x.safetensors"), CheckpointError,
                           r"no such file or folder"),
    "empty calib": (lambda a, m: dict(calib=[]), ValueError, r"calib is empty"),
    "skip not a str": (lambda a, m: dict(skip=[3]), TypeError, r"skip patterns must be str regexes, got int"),
    "calib_steps 0": (lambda a, m: dict(calib_steps=0), ValueError, r"calib_steps must be an int >= 1, got 0"),
}


@pytest.mark.parametrize("fault", list(LOAD_FAULTS))
@pytest.mark.parametrize("arch", list(ARCHS))
def test_failed_load_leaves_the_model_unchanged(arch, fault):
    model = build(arch)
    make, cls, msg = LOAD_FAULTS[fault]
    kwargs = make(arch, model)  # (may poison a weight: the snapshot is taken after)
    snap = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(cls, match=msg):
            lowbit_engine.integrations.diffusers.load(model, "svdq-int4", **{"rank": 8, "progress": False, **kwargs})
    assert_unchanged(model, snap)
    assert not any(getattr(m, "fused_projections", False) for m in model.modules())


def test_load_rejects_a_format_that_is_not_a_str():
    model = build("generic")
    snap = snapshot(model)
    with pytest.raises(TypeError, match=r"fmt must be a format name \(str\), got list"):
        lowbit_engine.integrations.diffusers.load(model, ["svdq-int4"], progress=False)
    assert_unchanged(model, snap)


def test_the_same_model_then_loads():
    """After a rolled-back failure the model is usable: the same call without the fault quantizes it."""
    model = build("flux")
    with pytest.raises(CalibrationError):
        lowbit_engine.integrations.diffusers.load(model, "svdq-int4", rank=8, calib=_raising_callable, progress=False)
    lowbit_engine.integrations.diffusers.load(model, "svdq-int4", rank=8, calib=[calib_item("flux")], progress=False,
                                              quant_opts=FAST)
    assert lowbit_engine.integrations.diffusers.last_report().num_quantized > 0
    with torch.no_grad():
        assert model(**calib_item("flux"), return_dict=False)[0].isfinite().all()


def test_prompt_calib_kwargs_the_pipeline_rejects():
    model = build("flux")

    class Pipe:
        text_encoder = object()

        def __init__(self):
            self.transformer = model

        def __call__(self, prompt, num_inference_steps=4, output_type="pil", height=None):
            raise AssertionError("must not run: the kwargs are checked first")

    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"calib_kwargs \['guidance'\] are not arguments of Pipe.__call__"):
        lowbit_engine.integrations.diffusers.load(Pipe(), "svdq-int4", calib=["a cat"], calib_kwargs={"guidance": 3},
                                                  progress=False)
    assert_unchanged(model, snap)


# ---- quantize_linear: every format x every fault -------------------------------------------------

FORMATS = available_formats()  # a new format is covered here by being buildable


def _linear() -> nn.Linear:
    torch.manual_seed(1)
    return nn.Linear(128, 64).to(BF16)


def _poison(where: str, value: float) -> Callable[[nn.Linear], dict[str, Any]]:
    def make(lin: nn.Linear) -> dict[str, Any]:
        with torch.no_grad():
            getattr(lin, where).view(-1)[5] = value
        return {}
    return make


def _meta(lin: nn.Linear) -> dict[str, Any]:
    lin.to("meta")
    return {}


def _calib(shape: tuple[int, ...], value: float | None = None) -> Callable[[nn.Linear], dict[str, Any]]:
    def make(lin: nn.Linear) -> dict[str, Any]:
        c = torch.randn(*shape).to(BF16)
        if value is not None:
            c.view(-1)[3] = value
        return {"calib": c}
    return make


QUANT_FAULTS: dict[str, tuple[Callable[[nn.Linear], dict[str, Any]], type[Exception], str]] = {
    "NaN weight": (_poison("weight", float("nan")), NonFiniteError, r"weight has non-finite values \(1 of 8192"),
    "Inf weight": (_poison("weight", float("inf")), NonFiniteError, r"weight has non-finite values \(1 of 8192"),
    "NaN bias": (_poison("bias", float("nan")), NonFiniteError, r"bias has non-finite values \(1 of 64"),
    "meta device": (_meta, ValueError, r"weight is on the meta device"),
    "calib of the wrong width": (_calib((16, 96)), ValueError,
                                 r"calib must be \[\.\.\., K=128\], got shape \(16, 96\)"),
    "NaN calib": (_calib((16, 128), float("nan")), NonFiniteError, r"calib has non-finite values \(1 of 2048"),
    "Inf calib": (_calib((16, 128), float("-inf")), NonFiniteError, r"calib has non-finite values \(1 of 2048"),
    "empty calib": (_calib((0, 128)), ValueError, r"calib has no tokens"),
    "unknown option": (lambda lin: {"bogus": 1}, ValueError, r"unknown option\(s\) \['bogus'\] for format"),
}


@pytest.mark.parametrize("fault", list(QUANT_FAULTS))
@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_linear_refuses(fmt, fault):
    lin = _linear()
    make, cls, msg = QUANT_FAULTS[fault]
    kwargs = make(lin)
    snap = snapshot(lin)
    with pytest.raises(cls, match=msg) as info:
        quantize_linear(lin, fmt, rank=8, **kwargs)
    assert fmt in str(info.value) or fault == "unknown option" and f"'{fmt}'" in str(info.value)
    assert_unchanged(lin, snap)


@pytest.mark.parametrize("fault", ["wrong width", "NaN", "Inf", "empty"])
def test_vq_quantize_checks_calib_like_svdquant(fault):
    from lowbit_engine.quant.svdquant import svdquant
    from lowbit_engine.quant.vq import vq_quantize

    w = torch.randn(32, 64)
    calib = {"wrong width": torch.randn(8, 60), "NaN": torch.randn(8, 64), "Inf": torch.randn(8, 64),
             "empty": torch.randn(0, 64)}[fault]
    if fault in ("NaN", "Inf"):
        calib[2, 2] = float(fault.lower())
    for fn in (lambda: svdquant(w, calib, rank=4), lambda: vq_quantize(w, "vq2", calib, kmeans_iters=1)):
        with pytest.raises(ValueError, match="calib"):
            fn()


# ---- the custom ops: every op x every argument x every fault --------------------------------------


def _valid_op_args() -> dict[str, tuple[Callable[..., Any], dict[str, Any]]]:
    """op -> (public wrapper, valid kwargs named as in the op's schema)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 128, generator=g).to(BF16)
    smooth = torch.rand(128, generator=g) + 0.5
    down = torch.randn(4, 128, generator=g).to(BF16)
    qa4, sa4, la = ops.quantize_act(x, smooth, down, "int4")
    qa8, sa8, _ = ops.quantize_act(x, mode="int8")
    qf8, sf8, _ = ops.quantize_act(x, mode="fp8")
    qw, sw = int4.quantize(torch.randn(8, 128, generator=g) * 0.1, scale_dtype=BF16)
    up = torch.randn(8, 4, generator=g).to(BF16)
    bias = torch.randn(8, generator=g).to(BF16)
    epi = dict(lora_act=la, lora_up=up, bias=bias, out_dtype=BF16)
    codes, gs, row = f8l.quantize(torch.randn(8, 128, generator=g))
    icodes, steps, zeros, irow = i8q.quantize(torch.randn(8, 128, generator=g))
    fp4 = FP4Linear.from_linear(nn.Linear(128, 8).to(BF16))
    w_fp8 = torch.randn(8, 128, generator=g).to(torch.float8_e4m3fn)
    w16 = W4A16Linear.from_linear(nn.Linear(128, 8).to(BF16))
    return {
        "quantize_act": (ops.quantize_act, dict(x=x, smooth=smooth, lora_down=down, mode="int4")),
        "gemm_w4a4": (ops.gemm_w4a4, dict(act=qa4, act_scales=sa4, w=int4.pack(qw), w_scales=sw, **epi)),
        "gemm_w4a8": (ops.gemm_w4a8, dict(act=qa8, act_scales=sa8, w=int4.pack(qw), w_scales=sw, **epi)),
        "gemm_w4a8_f8l": (ops_w4a8.gemm_w4a8_f8l, dict(act=qf8, act_scales=sf8, w=f8l.pack(codes), w_gscales=gs,
                                                      w_row_scale=row, **epi)),
        "gemm_w4a8_i8q": (ops_w4a8.gemm_w4a8_i8q, dict(act=qa8, act_scales=sa8, w=i8q.pack(icodes), w_steps=steps,
                                                      w_zeros=zeros, w_row_scale=irow, **epi)),
        "vq_dequantize": (ops.vq_dequantize, dict(codes=torch.randint(0, 256, (8, 32), dtype=torch.uint8),
                                                  codebook=torch.randn(256, 4), channel_scale=torch.rand(8) + 0.5,
                                                  N=8, K=128, index_bits=8, out_dtype=BF16)),
        "vq_gemm": (ops.vq_gemm, dict(x=x, codes=torch.randint(0, 256, (8, 32), dtype=torch.uint8),
                                      codebook=torch.randn(256, 4), channel_scale=torch.rand(8) + 0.5, bias=bias,
                                      N=8, K=128, index_bits=8)),
        "fp8_linear": (ops_float.fp8_linear, dict(x=x, w_q=w_fp8, w_scale=torch.rand(8) + 0.1, bias=bias,
                                                  lora_down=down, lora_up=up, out_dtype=BF16)),
        "fp4_linear": (ops_float.fp4_linear, dict(x=x, w_packed=fp4.qweight, w_block_scales=fp4.block_scales,
                                                  w_inv=fp4.w_inv, w_scale_fp8=fp4.w_scale_fp8,
                                                  w_scale_bf16=fp4.w_scale_bf16, bias=bias, fmt="nvfp4", act="fp8",
                                                  out_dtype=BF16)),
        "w4a16_linear": (ops_w4a16.w4a16_linear, dict(x=x, w=w16.qweight, scales=w16.scales, zeros=w16.zeros,
                                                      bias=bias, out_dtype=BF16)),
        # the exit ops' lora-downs are column slices of wider ones (row-strided views, read in place)
        "quantize_act_static": (ops_exit.quantize_act_static, dict(x=x, scale=0.02, smooth=smooth,
                                                                   lora_down=torch.cat([down, down], 1)[:, 128:],
                                                                   mode="fp8")),
        "gemm_w4a8_exit": (ops_exit.gemm_w4a8_exit, dict(
            fmt="f8l", act=qf8, act_scales=sf8, w=f8l.pack(codes), s1=gs, s2=None, row=row, lora_act=la,
            lora_up=up, bias=bias, h_dtype=BF16, activation="gelu_tanh", next_scale=0.02,
            next_smooth=torch.rand(8, generator=g) + 0.5,
            next_lora_down=torch.randn(4, 24, generator=g).to(BF16)[:, 8:16],
            next_mode="int8")),
        "norm_modulate_quantize": (ops_fused.norm_modulate_quantize,
                                   dict(x=torch.randn(4, 128, generator=g).to(BF16), shift=_r(g, 2, 128),
                                        scale=_r(g, 2, 128), eps=1e-6, smooth=smooth, lora_down=down, mode="int8",
                                        tokens_per_sample=2)),
    }


OP_CASES = _valid_op_args()


def _schema(op: str) -> list[tuple[str, str]]:
    return [(a.name, str(a.type)) for a in getattr(torch.ops.lowbit, op).default._schema.arguments]


# schema type -> the wrong values to try, and the words the error must use for what was expected
_WRONG = {
    "Tensor": ([[1.0, 2.0], None, "x"], "a torch.Tensor"),
    "Optional[Tensor]": ([[1.0, 2.0], "x"], "a torch.Tensor or None"),
    "str": ([None, 4, ["int4"]], "a str"),
    "int": ([None, "bf16", 2.5], "an int or torch.dtype"),
    "float": ([None, "1e-6"], "a float"),
}


def _op_faults() -> list[tuple[str, str, Any]]:
    out = []
    for op, (fn, kwargs) in OP_CASES.items():
        defaults = inspect.signature(fn).parameters
        for name, typ in _schema(op):
            for bad in _WRONG[typ][0]:
                if bad is None and defaults[name].default is None:
                    continue  # None there means "the default" (e.g. out_dtype = x's dtype): not a fault
                out.append((op, name, bad))
    return out


def test_every_op_and_argument_is_covered():
    assert set(OP_CASES) == {n for n in dir(torch.ops.lowbit) if n != "name" and not n.startswith("_")}
    for op, (fn, kwargs) in OP_CASES.items():
        assert set(kwargs) == {n for n, _ in _schema(op)}, op
        fn(**kwargs)  # the valid call runs: each fault below is the only thing wrong


@pytest.mark.parametrize("op,arg,bad", _op_faults(), ids=lambda v: repr(v)[:20])
def test_op_rejects_a_wrong_python_type(op, arg, bad):
    fn, kwargs = OP_CASES[op]
    typ = dict(_schema(op))[arg]
    with pytest.raises(OpInputError, match=rf"^lowbit::{op}: argument '{arg}' expected {_WRONG[typ][1]}"):
        fn(**{**kwargs, arg: bad})


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf")])
@pytest.mark.parametrize("op", ["quantize_act", "norm_modulate_quantize"])
def test_smooth_must_be_positive_and_finite(op, value):
    fn, kwargs = OP_CASES[op]
    smooth = kwargs["smooth"].clone()
    smooth[17] = value
    with pytest.raises(OpInputError, match=rf"argument 'smooth' expected finite values > 0 .*at index 17"):
        fn(**{**kwargs, "smooth": smooth})


_NOT_ROW_VIEWS = {  # [R, K] tensors whose element (r, k) is not at r * row_stride + k with row_stride >= K
    "column stride 2": lambda R, K: torch.ones(R, 2 * K, dtype=BF16)[:, ::2],
    "overlapping rows": lambda R, K: torch.ones(R * K, dtype=BF16).as_strided((R, K), (K // 2, 1)),
    "transposed": lambda R, K: torch.ones(K, R, dtype=BF16).t(),
    "broadcast rows": lambda R, K: torch.ones(1, K, dtype=BF16).expand(R, K),
}


@pytest.mark.parametrize("layout", list(_NOT_ROW_VIEWS))
@pytest.mark.parametrize("op, arg", [("quantize_act_static", "lora_down"), ("gemm_w4a8_exit", "next_lora_down")])
def test_exit_ops_take_row_strided_lora_downs_only(op, arg, layout):
    """The exit ops read a lora-down in place when its rows are a fixed stride (>= its width) apart; any other
    layout is refused before a kernel could read the wrong elements."""
    fn, kwargs = OP_CASES[op]
    R, K = kwargs[arg].shape
    assert not kwargs[arg].is_contiguous()  # the valid call (test_every_op_and_argument_is_covered) is a view
    with pytest.raises(OpInputError, match=rf"^lowbit::{op}: argument '{arg}' expected a contiguous tensor or a "
                                           r"row-strided view .*got strides"):
        fn(**{**kwargs, arg: _NOT_ROW_VIEWS[layout](R, K)})


@pytest.mark.parametrize("op, arg", [("quantize_act_static", "smooth"), ("gemm_w4a8_exit", "next_smooth")])
def test_exit_ops_take_a_unit_stride_smooth(op, arg):
    fn, kwargs = OP_CASES[op]
    wide = torch.ones(2 * kwargs[arg].shape[0])
    with pytest.raises(OpInputError, match=rf"^lowbit::{op}: argument '{arg}' expected a contiguous tensor"):
        fn(**{**kwargs, arg: wide[::2]})


# ---- non-finite activations propagate, identically on every backend -------------------------------


def _nan_rows_x() -> torch.Tensor:
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(9)).to(BF16)
    x[1, 7], x[3, 100], x[4, 3] = float("nan"), float("inf"), float("-inf")
    return x


BAD_ROWS = [1, 3, 4]


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical codes (viewed as bytes), or equal scales with NaN in the same places."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point() and a.element_size() > 1:
        return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("mode", ["int4", "int8", "fp8"])
def test_quantize_act_non_finite_rows(mode):
    """The torch reference, the C++ reference and the Triton quantizer (interpreter) agree bit for bit: the
    rows holding NaN / Inf get NaN scales and zero codes; the other rows are untouched by them."""
    x = _nan_rows_x()
    with ops.use_backend("torch"):
        qt, st, _ = ops.quantize_act(x, mode=mode)
    with ops.use_backend("cpu"):
        qc, sc, _ = ops.quantize_act(x, mode=mode)
    assert _same(qc, qt) and _same(sc, st)
    bad_scale = st.reshape(5, -1).isnan().any(1)
    assert bad_scale.tolist() == [i in BAD_ROWS for i in range(5)]
    if mode != "int4":
        assert not qt.view(torch.uint8)[BAD_ROWS].any()
        q8 = load_interpreted("quant8.py")
        qi, si, _ = q8.quantize_8bit_triton(x, None, None, mode)
        assert _same(qi, qt) and _same(si, st)


@pytest.mark.parametrize("op", ["gemm_w4a4", "gemm_w4a8", "gemm_w4a8_f8l", "gemm_w4a8_i8q"])
def test_gemm_output_rows_are_nan(op):
    """A token holding NaN / Inf gives a NaN output row (not a finite one) on every CPU backend."""
    fn, kwargs = OP_CASES[op]
    mode = {"gemm_w4a4": "int4", "gemm_w4a8": "int8", "gemm_w4a8_f8l": "fp8", "gemm_w4a8_i8q": "int8"}[op]
    act, scales, _ = ops.quantize_act(_nan_rows_x(), mode=mode)
    args = {**kwargs, "act": act, "act_scales": scales, "lora_act": None, "lora_up": None}
    for backend in [b for b in ops.backends(op) if b in ("cpu", "torch")]:
        with ops.use_backend(backend, op):
            y = fn(**args)
        assert y.isnan().any(1).tolist() == [i in BAD_ROWS for i in range(5)], backend


@pytest.mark.parametrize("kernel", ["gemm_w4a4", "gemm_w4a8", "gemm8"])
def test_triton_gemm_output_rows_are_nan(kernel):
    """The Triton GEMMs (under the interpreter) on the quantizer's NaN-scaled rows: NaN rows, like the CPU."""
    if kernel == "gemm8":
        mod = load_interpreted("gemm8.py")
        mod._tiles = load_interpreted("fp8_gemm.py")  # its helpers, interpreted too (as test_w4a8_triton wires it)
        act, scales, _ = ops.quantize_act(_nan_rows_x(), mode="int8")
        codes, steps, zeros, row = i8q.quantize(torch.randn(8, 128, generator=torch.Generator().manual_seed(2)))
        w8 = i8q.expand(i8q.pack(codes), steps, zeros)  # the int8 weight the 8-bit GEMM multiplies (exact)
        run = lambda: mod.gemm8_triton(act, scales, w8, row, out_dtype=torch.float32)
    else:
        mod = load_interpreted("gemm_w4a4.py")
        if not mod.interpreted():
            pytest.skip("this Triton did not honour TRITON_INTERPRET=1 at decoration time")
        _, kwargs = OP_CASES[kernel]
        act, scales, _ = ops.quantize_act(_nan_rows_x(), mode="int4" if kernel == "gemm_w4a4" else "int8")
        fn = mod.gemm_w4a4_triton if kernel == "gemm_w4a4" else mod.gemm_w4a8_triton
        run = lambda: fn(act, scales, kwargs["w"], kwargs["w_scales"], out_dtype=torch.float32)
    try:
        y = run()
    except Exception as e:  # noqa: BLE001 (the interpreter incompatibility test_triton_gemm skips on too)
        if "only 0-dimensional arrays can be converted to Python scalars" in repr(e):
            pytest.skip("this Triton interpreter cannot run with this NumPy (scalar loop bounds)")
        raise
    assert y.isnan().any(1).tolist() == [i in BAD_ROWS for i in range(5)]
    assert y[[0, 2]].isfinite().all()


@pytest.mark.parametrize("op", ["fp8_linear", "fp4_linear", "vq_gemm"])
def test_float_op_output_rows_are_nan(op):
    fn, kwargs = OP_CASES[op]
    args = {**kwargs, "x": _nan_rows_x()}
    for backend in [b for b in ops.backends(op) if b in ("cpu", "torch")]:
        with ops.use_backend(backend, op):
            y = fn(**args)
        assert y.isnan().any(1).tolist()[:3] == [False, True, False], backend
        assert all(y[i].isnan().any() or y[i].isinf().any() for i in BAD_ROWS), backend


# ---- checkpoints ------------------------------------------------------------------------------------


def _quantized(fmt: str) -> nn.Sequential:
    lin = _linear()
    opts = dict(calibrate=False, kmeans_iters=1) if fmt.startswith("vq") else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return nn.Sequential(quantize_linear(lin, fmt, rank=8 if fmt.startswith("svdq") else 0, **opts))


def _rewrite(path: Path, edit: Callable[[dict[str, torch.Tensor], dict[str, Any]], None]) -> None:
    """Rewrite a checkpoint with its tensors and metadata edited in place by ``edit``."""
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k).clone() for k in f.keys()}
        meta = json.loads(f.metadata()[ckpt.METADATA_KEY])
    edit(tensors, meta)
    save_file(tensors, str(path), metadata={ckpt.METADATA_KEY: json.dumps(meta)})


def _strip_digests_and_flip(t, meta):
    for rec in meta["modules"].values():
        for r in rec["tensors"].values():
            r.pop("sha256")
    key = next(k for k, v in t.items() if v.numel() > 0 and v.dtype == torch.uint8)
    t[key].view(-1)[0] ^= 0x5A


def _reverse_shape(t, meta):
    rec = meta["modules"]["0"]["tensors"]
    name = next(n for n, r in rec.items() if len(r["shape"]) == 2 and r["shape"][0] != r["shape"][1])
    rec[name]["shape"] = rec[name]["shape"][::-1]


def _int8_for_uint8(t, meta):
    rec = meta["modules"]["0"]["tensors"]
    name = next(n for n, r in rec.items() if r["dtype"] == "uint8")
    rec[name]["dtype"] = "int8"


def _with_digest(t, meta, name, value):
    """Write ``value`` into tensor ``0.<name>`` and record its honest digest (only the buffer check can tell)."""
    t[f"0.{name}"].view(-1)[0] = value
    meta["modules"]["0"]["tensors"][name]["sha256"] = ckpt._sha256(t[f"0.{name}"])


CKPT_FAULTS: dict[str, tuple[str, Callable[..., None], str]] = {
    # fault -> (format, edit, message)
    "digests stripped, data changed": ("svdq-int4", _strip_digests_and_flip, r"has no sha256 .* trusted=True"),
    "reversed shape in the metadata": ("svdq-int4", _reverse_shape,
                                       r"the metadata records shape .* the file is corrupt"),
    "int8 recorded for uint8": ("svdq-w4a8", _int8_for_uint8, r"records dtype 'int8', the tensor is 'uint8'"),
    "NaN weight scale": ("fp8", lambda t, m: _with_digest(t, m, "weight_scale", float("nan")),
                         r"not hold a valid FP8Linear: FP8Linear: buffer 'weight_scale' has 1 non-finite"),
    "zero smoothing factor": ("svdq-int4", lambda t, m: _with_digest(t, m, "smooth", 0.0),
                              r"buffer 'smooth' must be > 0"),
    "NaN codebook entry": ("vq2", lambda t, m: _with_digest(t, m, "codebook", float("nan")),
                           r"buffer 'codebook' has 1 non-finite"),
    "mxfp4 NaN scale code": ("mxfp4", lambda t, m: _with_digest(t, m, "block_scales", 255), r"E8M0 NaN code 255"),
}


@pytest.mark.parametrize("fault", list(CKPT_FAULTS))
def test_corrupt_checkpoint_is_refused(fault, tmp_path):
    fmt, edit, msg = CKPT_FAULTS[fault]
    path = ckpt.save(_quantized(fmt), tmp_path / "m.safetensors")
    _rewrite(path, edit)
    target = nn.Sequential(_linear())
    snap = snapshot(target)
    with pytest.raises(CheckpointError, match=msg):
        ckpt.load_checkpoint(path, target)
    assert_unchanged(target, snap)


def test_trusted_opts_out_of_digests(tmp_path):
    path = ckpt.save(_quantized("svdq-int4"), tmp_path / "m.safetensors")
    _rewrite(path, lambda t, meta: [r.pop("sha256") for rec in meta["modules"].values()
                                    for r in rec["tensors"].values()])
    with pytest.raises(CheckpointError, match="no sha256"):
        ckpt.load_checkpoint(path)
    assert isinstance(ckpt.load_checkpoint(path, trusted=True)["0"], nn.Module)


@pytest.mark.parametrize("fmt", FORMATS)
def test_torch_save_of_a_loaded_model(fmt, tmp_path):
    path = ckpt.save(_quantized(fmt), tmp_path / "m.safetensors")
    model = ckpt.load_checkpoint(path, nn.Sequential(_linear()))
    torch.save(model.state_dict(), tmp_path / "state.pt")  # raised for fp8: buffers aliasing one storage
    again = torch.load(tmp_path / "state.pt")
    assert all(_bytes(again[k]) == _bytes(v) for k, v in model.state_dict().items())


def test_save_into_a_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match=r"cannot save: the directory .*nowhere.* does not exist"):
        ckpt.save(_quantized("fp8"), tmp_path / "nowhere" / "m.safetensors")


def test_corrupt_sidecar(tmp_path):
    model = _generic().to(BF16)
    lowbit_engine.integrations.diffusers.load(model, "svdq-int4", rank=8, calib=[calib_item("generic")], progress=False,
                                              quant_opts=FAST)
    path = lowbit_engine.integrations.diffusers.save(model, tmp_path / "m.safetensors")
    lowbit_engine.integrations.diffusers.sidecar_path(path).write_text("{not json")
    fresh = _generic().to(BF16)
    snap = snapshot(fresh)
    with pytest.raises(CheckpointError, match=r"sidecar is not valid JSON"):
        lowbit_engine.integrations.diffusers.load(fresh, "svdq-int4", rank=8, checkpoint=path, progress=False)
    assert_unchanged(fresh, snap)


# ---- LoRA -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_model() -> nn.Module:
    model = build("flux")
    lowbit_engine.integrations.diffusers.load(model, "svdq-int4", rank=8, calib=[calib_item("flux")], progress=False,
                                              quant_opts=FAST)
    return model


def _lora_file(tmp_path: Path, config: str | None) -> Path:
    g = torch.Generator().manual_seed(0)
    n = "transformer_blocks.0.attn.to_out.0"
    sd = {f"transformer.{n}.lora_A.weight": _r(g, 4, 64), f"transformer.{n}.lora_B.weight": _r(g, 64, 4)}
    path = tmp_path / "adapter_model.safetensors"
    save_file(sd, str(path))
    if config is not None:
        (tmp_path / "adapter_config.json").write_text(config)
    return path


LORA_FAULTS: dict[str, tuple[str | None, dict[str, Any], type[Exception], str]] = {
    # fault -> (adapter_config.json text, load kwargs, class, message)
    "corrupt adapter_config.json": ("{'r': 4,", {}, LoRAError, r"adapter_config.json' is not valid JSON"),
    "lora_alpha 'big'": (json.dumps({"r": 4, "lora_alpha": "big"}), {}, LoRAError,
                         r"lora_alpha must be a finite number, got 'big'"),
    "strength 'strong'": (None, {"strength": "strong"}, LoRAError, r"strength must be a finite number .*'strong'"),
    "strength None": (None, {"strength": None}, LoRAError, r"strength must be a finite number .*None"),
}


@pytest.mark.parametrize("fault", list(LORA_FAULTS))
def test_lora_load_refuses(lora_model, fault, tmp_path):
    config, kwargs, cls, msg = LORA_FAULTS[fault]
    path = _lora_file(tmp_path, config)
    snap = snapshot(lora_model)
    with pytest.raises(cls, match=msg):
        lora.load(lora_model, path, "style", **kwargs)
    assert_unchanged(lora_model, snap)


def test_lora_load_names_itself():
    with pytest.raises(TypeError, match=r"^lowbit_engine\.lora\.load: expected a diffusers pipeline"):
        lora.load(object(), "x.safetensors", "style")
    with pytest.raises(TypeError, match=r"^lowbit_engine\.lora\.set_strength: "):
        lora.set_strength(object(), "style", 0.5)
