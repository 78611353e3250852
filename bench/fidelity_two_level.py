"""Fidelity cost of two-level int4 scales (per-row scale x per-group power of two), a candidate format.

Why: with a group scale that is the row scale times 2^e, q * 2^e is exact in e4m3, so a Hopper kernel can
fold the group scaling into the fp8 operand and accumulate a whole row in the wgmma accumulator (no
per-group promotion; docs/kernels.md, "CUDA wgmma W4 GEMM"). The price is a coarser grid: a group's step
is its ideal amax/7 rounded UP to the row scale times a power of two (up to 2x coarser).

Method: the synthetic FLUX-shaped layers of bench/fidelity.py, quantized with SVDQuant (rank 32). The
int4 residual of each layer (W * lambda minus the stored low-rank branch) is requantized with the
standard bf16 group-64 scales and with two-level scales; for W4A4 the tokens are quantized either way
too. The output SQNR against the exact fp64 layer output is compared on held-out tokens (CPU, float64
products of the dequantized operands: the same math as the kernels up to summation order).

Usage:
    python bench/fidelity_two_level.py [--n 3072 12288] [--out bench/results/fidelity-two-level-cpu.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import lowbit_engine
from lowbit_engine import benchmark
from lowbit_engine.formats import int4
from lowbit_engine.quant.svdquant import fake_quantize_act

sys.path.insert(0, str(Path(__file__).parent))
from fidelity import sqnr_db, synthetic_layer  # noqa: E402

E_MIN = -9  # e4m3 represents q * 2^e exactly for |q| <= 8 down to 2^-9 (subnormals)


def two_level_quantize(x: torch.Tensor, group: int = 64) -> torch.Tensor:
    """Dequantized ``x [..., K]`` after int4 quantization with a row scale times per-group powers of two."""
    xf = x.double().reshape(*x.shape[:-1], x.shape[-1] // group, group)
    amax = xf.abs().amax(dim=-1, keepdim=True)                       # [..., G, 1]
    row = (amax.amax(dim=-2, keepdim=True) / int4.QMAX).clamp_min(1e-30)  # [..., 1, 1]
    ratio = (amax / int4.QMAX / row).clamp_min(2.0**E_MIN)
    e = torch.ceil(torch.log2(ratio)).clamp(E_MIN, 0)                # group step = row * 2^e >= amax / 7
    step = row * torch.pow(2.0, e)
    q = torch.clamp(torch.round(xf / step), -8, 7)
    return (q * step).reshape(x.shape)


def standard_quantize(x: torch.Tensor) -> torch.Tensor:
    q, s = int4.quantize(x.float(), scale_dtype=torch.bfloat16)
    return int4.dequantize(q, s).double()


def evaluate(K: int, N: int, tokens: int = 256, seed: int = 0) -> list[dict]:
    linear, calib, xe = synthetic_layer(K, N, tokens, seed)
    ref = xe.double() @ linear.weight.double().T + linear.bias.double()
    rows = []
    for fmt, act_mode in (("svdq-w4a8", "fp8"), ("svdq-int4", "int4")):
        layer = lowbit_engine.quantize_linear(linear, fmt, calib=calib, rank=32, act_mode=act_mode)
        smooth = layer.smooth.double()
        low = (layer.lora_up.double() @ layer.lora_down.double()) * smooth[None, :]
        residual = linear.weight.double() * smooth[None, :] - low        # what the int4 weights encode
        branch = xe.double() @ (layer.lora_up.double() @ layer.lora_down.double()).T + layer.bias.double()
        for name, wq in (("bf16 group scales", standard_quantize), ("row scale x 2^e per group", two_level_quantize)):
            w_hat = wq(residual)
            if act_mode == "int4":
                xs = xe.double() / smooth[None, :]
                x_hat = standard_quantize(xs) if wq is standard_quantize else two_level_quantize(xs)
            else:
                x_hat = fake_quantize_act(xe, layer.smooth, act_mode).double()
            out = x_hat @ w_hat.T + branch
            rows.append({"K": K, "N": N, "format": f"{fmt} ({act_mode} tokens)", "scales": name,
                         "sqnr_db": round(sqnr_db(ref, out), 2)})
            print(f"K={K} N={N} {rows[-1]['format']:<26} {name:<28} {rows[-1]['sqnr_db']:6.2f} dB", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[3072, 12288])
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--out", default="bench/results/fidelity-two-level-cpu.json")
    args = ap.parse_args()
    torch.manual_seed(0)  # as bench/fidelity.py: the Gamma sampler of the heavy tails uses the global generator
    rows = [r for n in args.n for r in evaluate(3072, n, args.tokens)]
    report = {"what": "SQNR of SVDQuant r32 layers with standard vs two-level int4 scales", "results": rows,
              "commit": benchmark._commit()}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
