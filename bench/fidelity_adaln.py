"""Does quantizing the adaLN linears (w4a16), the final projection and the embedders cost fidelity?

The five architectures as tiny real diffusers transformers (random weights, built from config, the sizes
of tests/test_diffusers_integration.py), quantized by ``engine.load`` (svdq-int4, rank 16, 4 calibration
batches, alpha fixed at 0.5 to keep the CPU run short) in four ways:

- ``adaln-bf16``: the adaLN modulation linears and norm_out kept in bf16 (the policy before issue 18);
- ``adaln-w4a16``: the default policy (adaLN / norm_out in w4a16);
- ``+proj_out``: also the final projection in w4a16;
- ``+embedders``: also every embedder linear in w4a16.

Reported: the transformer output's relative L2 error against the bf16 model on held-out inputs.

Usage:
    python bench/fidelity_adaln.py [--out bench/results/fidelity-adaln-cpu.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import warnings
from pathlib import Path

import torch

import diffusers

import lowbit_engine
from lowbit_engine import benchmark
from lowbit_engine.integrations.policies import ADALN, GENERIC_ADALN, QUANTIZE, W4A16, Policy, Rule, policy_for

BF = torch.bfloat16
diffusers.utils.logging.set_verbosity_error()


def _r(g, *shape):
    return torch.randn(*shape, generator=g).to(BF)


ARCHS = {
    "flux": (lambda: diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=32, num_attention_heads=2,
        joint_attention_dim=64, pooled_projection_dim=64, axes_dims_rope=[4, 14, 14]),
        lambda g: dict(hidden_states=_r(g, 1, 64, 16), encoder_hidden_states=_r(g, 1, 8, 64),
                       pooled_projections=_r(g, 1, 64), timestep=torch.rand(1, generator=g),
                       img_ids=torch.zeros(64, 3), txt_ids=torch.zeros(8, 3))),
    "sd3": (lambda: diffusers.SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=32, num_attention_heads=2,
        joint_attention_dim=64, caption_projection_dim=64, pooled_projection_dim=64, out_channels=4),
        lambda g: dict(hidden_states=_r(g, 1, 4, 16, 16), encoder_hidden_states=_r(g, 1, 8, 64),
                       pooled_projections=_r(g, 1, 64), timestep=torch.rand(1, generator=g) * 1000)),
    "pixart": (lambda: diffusers.PixArtTransformer2DModel(
        sample_size=16, num_layers=2, patch_size=2, attention_head_dim=32, num_attention_heads=2, in_channels=4,
        out_channels=8, cross_attention_dim=64, caption_channels=64),
        lambda g: dict(hidden_states=_r(g, 1, 4, 16, 16), encoder_hidden_states=_r(g, 1, 8, 64),
                       timestep=torch.rand(1, generator=g) * 1000,
                       added_cond_kwargs={"resolution": None, "aspect_ratio": None})),
    "sana": (lambda: diffusers.SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=32, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=32, cross_attention_dim=64, caption_channels=64,
        mlp_ratio=2.5, sample_size=8, patch_size=1),
        lambda g: dict(hidden_states=_r(g, 1, 4, 8, 8), encoder_hidden_states=_r(g, 1, 8, 64),
                       timestep=torch.rand(1, generator=g) * 1000)),
    "wan": (lambda: diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4,
        text_dim=64, freq_dim=64, ffn_dim=128, num_layers=2, rope_max_seq_len=32),
        lambda g: dict(hidden_states=_r(g, 1, 4, 2, 8, 8), encoder_hidden_states=_r(g, 1, 8, 64),
                       timestep=torch.rand(1, generator=g) * 1000)),
}
EMBED_RX = (r"(?:time_text_embed|x_embedder|context_embedder|pos_embed|patch_embed|patch_embedding|caption_projection"
            r"|adaln_single\.emb|time_embed\.emb|condition_embedder)(?:\..*)?")


def _variant(base: Policy, kind: str) -> tuple[Policy, dict | None]:
    if kind == "adaln-bf16":
        rows = tuple(Rule(r.pattern, "keep-bf16", "adaLN kept bf16 (comparison)") if r.fmt == W4A16 else r
                     for r in base.rules)
        return Policy(base.name, rows, base.fuse_qkv), None
    extra = []
    if kind in ("+proj_out", "+embedders"):
        extra.append(Rule(r"proj_out", QUANTIZE, "final projection in w4a16 (comparison)", W4A16))
    if kind == "+embedders":
        extra.append(Rule(EMBED_RX, QUANTIZE, "embedder in w4a16 (comparison)", W4A16))
    return Policy(base.name, tuple(extra) + base.rules, base.fuse_qkv), None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/fidelity-adaln-cpu.json")
    args = ap.parse_args()
    rows = []
    for arch, (build, inputs) in ARCHS.items():
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = build().to(BF).eval()
        g = torch.Generator().manual_seed(100)
        calib = [inputs(g) for _ in range(4)]
        x = inputs(torch.Generator().manual_seed(7))
        with torch.no_grad():
            y_ref = ref(**x, return_dict=False)[0].float()
        for kind in ("adaln-bf16", "adaln-w4a16", "+proj_out", "+embedders"):
            model = copy.deepcopy(ref)
            policy, _ = _variant(policy_for(model), kind)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    lowbit_engine.load(model, "svdq-int4", rank=16, calib=calib, policy=policy, progress=False,
                                       quant_opts={"alphas": (0.5,)})
                rep = lowbit_engine.last_report()
                with torch.no_grad():
                    y = model(**x, return_dict=False)[0].float()
            except Exception as e:  # noqa: BLE001  (e.g. Wan reads its time embedder's parameter dtype)
                rows.append({"arch": arch, "variant": kind, "error": f"{type(e).__name__}: {e}"[:200]})
                print(json.dumps(rows[-1]), flush=True)
                continue
            err = float((y - y_ref).norm() / y_ref.norm())
            rows.append({"arch": arch, "variant": kind, "rel_err": round(err, 4),
                         "w4a16_layers": len(rep.quantized.get("w4a16", [])),
                         "mib_after": round(rep.bytes_after / 2**20, 3)})
            print(json.dumps(rows[-1]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"commit": benchmark._commit(), "device": "cpu", "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
