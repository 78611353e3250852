"""Memory plan of a quantized transformer without its weights: ``lowbit-engine plan --model flux-dev``.

The transformer is built on the meta device from the architecture's public config (hard-coded below: no
network, no download), Q/K/V are fused as :func:`lowbit_engine.load` would fuse them, the architecture's
policy decides every linear, and each layer to quantize is built as its real quantized module, on the meta
device too. The bytes counted are those modules' buffers, i.e. what the layers would actually store:
e.g. ``svdq-w4a8`` in its default ``i8q`` layout holds the packed codes, a uint8 step and a uint8 zero per
64, an fp32 row scale, the fp32 smoothing vector and the rank-32 bf16 low-rank factors; ``w4a16`` holds the
codes, a bf16 step and a uint8 zero per 64. Everything that is not a quantized linear (kept linears, norms,
convolutions, embeddings, tables) counts at its own dtype in bf16.

Example:
    >>> p = plan("flux-dev", "svdq-w4a8")
    >>> round(p.bf16_bytes / 2**30, 2), p.total_bytes / 2**30 < 7.0
    (22.17, True)
"""

from __future__ import annotations

import argparse
import json
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

GIB = 2.0**30
_FLUX = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
             num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
             axes_dims_rope=[16, 56, 56])
_WAN = dict(patch_size=(1, 2, 2), attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
            freq_dim=256, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
# model name -> (diffusers transformer class, its config as published with the model's transformer/config.json)
MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "flux-dev": ("FluxTransformer2DModel", dict(_FLUX, guidance_embeds=True)),
    "flux-schnell": ("FluxTransformer2DModel", dict(_FLUX, guidance_embeds=False)),
    "sd3.5-large": ("SD3Transformer2DModel", dict(
        sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64, num_attention_heads=38,
        joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048, out_channels=16,
        pos_embed_max_size=192, qk_norm="rms_norm")),
    "sd3.5-medium": ("SD3Transformer2DModel", dict(
        sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
        joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
        pos_embed_max_size=384, qk_norm="rms_norm", dual_attention_layers=tuple(range(13)))),
    "pixart-sigma": ("PixArtTransformer2DModel", dict(
        sample_size=128, num_layers=28, patch_size=2, attention_head_dim=72, num_attention_heads=16, in_channels=4,
        out_channels=8, cross_attention_dim=1152, caption_channels=4096, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6, use_additional_conditions=False, interpolation_scale=2)),
    "sana-1600m": ("SanaTransformer2DModel", dict(
        in_channels=32, out_channels=32, num_attention_heads=70, attention_head_dim=32, num_layers=20,
        num_cross_attention_heads=20, cross_attention_head_dim=112, cross_attention_dim=2240, caption_channels=2304,
        mlp_ratio=2.5, sample_size=32, patch_size=1)),
    "wan2.1-14b": ("WanTransformer3DModel", dict(_WAN, num_attention_heads=40, ffn_dim=13824, num_layers=40)),
    "wan2.1-1.3b": ("WanTransformer3DModel", dict(_WAN, num_attention_heads=12, ffn_dim=8960, num_layers=30)),
}
# the GPU the layers are planned for: it decides svdq-int4's weight layout (Hopper: i8q; Ada and older: g64)
GPUS = ("hopper", "ada")


@dataclass
class Group:
    """Layers planned the same way: how many, their parameters (as bf16 weights) and their stored bytes."""

    layers: int = 0
    params: int = 0
    bytes: int = 0


@dataclass
class Plan:
    """The memory plan of one model in one format (see the module docstring)."""

    model: str
    architecture: str
    fmt: str
    gpu: str
    qkv_fused: bool
    quantized: dict[str, Group] = field(default_factory=dict)   # format -> the layers quantized with it
    kept: dict[str, Group] = field(default_factory=dict)        # reason -> the linears kept in bf16
    other_bytes: int = 0                                        # every non-linear parameter and buffer
    bf16_bytes: int = 0                                         # the whole transformer in bf16 (after fusion)

    @property
    def total_bytes(self) -> int:
        return self.other_bytes + sum(g.bytes for g in [*self.quantized.values(), *self.kept.values()])

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(total_bytes=self.total_bytes, total_gib=round(self.total_bytes / GIB, 3),
                 bf16_gib=round(self.bf16_bytes / GIB, 3))
        return d

    def __str__(self) -> str:
        lines = [f"lowbit-engine plan: {self.model} ({self.architecture}), {self.fmt}, planned for {self.gpu}, "
                 f"QKV {'fused' if self.qkv_fused else 'not fused'}"]
        lines.append(f"  {'':<48} {'layers':>6} {'params':>8} {'GiB':>8}")
        for fmt, g in self.quantized.items():
            lines.append(f"  {'quantize ' + fmt:<48} {g.layers:>6} {g.params / 1e9:>7.3f}B {g.bytes / GIB:>8.3f}")
        for reason, g in self.kept.items():
            lines.append(f"  {('keep: ' + reason)[:48]:<48} {g.layers:>6} {g.params / 1e9:>7.3f}B {g.bytes / GIB:>8.3f}")
        lines.append(f"  {'other parameters (norms, embeddings, convs)':<48} {'':>6} {'':>8} {self.other_bytes / GIB:>8.3f}")
        lines.append(f"  total {self.total_bytes / GIB:.2f} GiB vs bf16 {self.bf16_bytes / GIB:.2f} GiB "
                     f"({self.bf16_bytes / self.total_bytes:.2f}x smaller)")
        return "\n".join(lines)


def build_meta(model: str) -> nn.Module:
    """The transformer of ``model`` (a key of :data:`MODELS`) on the meta device, in bf16: shapes, no data."""
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; known: {', '.join(MODELS)}")
    import diffusers

    cls_name, cfg = MODELS[model]
    level = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()  # its note on .to(bf16) concerns loaded weights; there are none
    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            return getattr(diffusers, cls_name)(**cfg).to(torch.bfloat16)
    finally:
        diffusers.utils.logging.set_verbosity(level)


def quantized_module(fmt: str, linear: nn.Linear, rank: int, gpu: str) -> nn.Module:
    """The empty module ``quantize_linear(linear, fmt)`` would return, on the meta device (same buffers)."""
    from .nn import FP4Linear, FP8Linear, SVDQLinear, VQLinear, W4A16Linear

    K, N, bias = linear.in_features, linear.out_features, linear.bias is not None
    r = min(rank, K, N)
    if fmt in ("svdq-int4", "svdq-w4a8"):
        layout = "i8q" if (fmt == "svdq-w4a8" or gpu == "hopper") else "g64"
        return SVDQLinear(K, N, rank=r, fmt=fmt, bias=bias, device="meta", weight_layout=layout)
    if fmt == "w4a16":
        return W4A16Linear(K, N, bias=bias, device="meta")
    if fmt == "fp8":
        return FP8Linear(K, N, bias=bias, device="meta")
    if fmt in ("nvfp4", "mxfp4"):
        return FP4Linear(K, N, fmt=fmt, bias=bias, device="meta")
    if fmt in ("vq2", "vq3"):
        return VQLinear(K, N, fmt=fmt, bias=bias, device="meta")
    raise ValueError(f"plan: no module for format {fmt!r}")


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())


def plan(model: str | nn.Module, fmt: str = "svdq-w4a8", *, rank: int = 32, gpu: str = "hopper",
         fuse: bool = True, skip: dict[str, str] | None = None) -> Plan:
    """The memory plan of ``model`` (a :data:`MODELS` name, or a transformer module, e.g. one on the meta
    device) quantized to ``fmt`` by its architecture's policy. Nothing is allocated: modules are on meta.
    A module passed in is fused and planned in place (pass a copy to keep it)."""
    from .integrations.diffusers import fuse_qkv, plan_layers
    from .integrations.policies import KEEP, policy_for

    if gpu not in GPUS:
        raise ValueError(f"plan: gpu must be one of {GPUS}, got {gpu!r}")
    name = model if isinstance(model, str) else type(model).__name__
    transformer = build_meta(model) if isinstance(model, str) else model
    policy = policy_for(transformer)
    fused = False
    if fuse and policy.fuse_qkv:
        fused, _, _ = fuse_qkv(transformer)
    result = Plan(name, type(transformer).__name__, fmt, gpu, fused,
                  bf16_bytes=_bytes([*transformer.parameters(), *transformer.buffers()]))
    rules = plan_layers(transformer, policy, skip)
    linear_tensors = set()
    for lname, rule in rules.items():
        linear = transformer.get_submodule(lname)
        linear_tensors.update(id(t) for t in linear.parameters())
        params = linear.weight.numel()
        if rule.action == KEEP:
            g = result.kept.setdefault(rule.reason, Group())
            nbytes = _bytes(linear.parameters())
        else:
            lfmt = rule.format_for(fmt)
            g = result.quantized.setdefault(lfmt, Group())
            nbytes = _bytes(quantized_module(lfmt, linear, rank, gpu).buffers())
        g.layers, g.params, g.bytes = g.layers + 1, g.params + params, g.bytes + nbytes
    result.other_bytes = _bytes([t for t in [*transformer.parameters(), *transformer.buffers()]
                                 if id(t) not in linear_tensors])
    return result


# ---- the command ---------------------------------------------------------------------------------


def add_parser(sub: Any) -> None:
    """Register ``plan`` on the ``lowbit-engine`` subcommand parser ``sub`` (cli.py calls this)."""
    p = sub.add_parser("plan", help="memory plan of a quantized transformer from its public config (no weights)")
    p.add_argument("--model", default="flux-dev", choices=list(MODELS))
    p.add_argument("--fmt", default="svdq-w4a8", help="the format of the big layers (default svdq-w4a8)")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--gpu", default="hopper", choices=list(GPUS), help="decides svdq-int4's weight layout")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> int:
    p = plan(args.model, args.fmt, rank=args.rank, gpu=args.gpu)
    print(json.dumps(p.to_dict(), indent=1) if args.json else p)
    return 0


__all__ = ["MODELS", "Plan", "Group", "plan", "build_meta", "quantized_module", "add_parser"]
