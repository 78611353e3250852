"""Fidelity of each format on synthetic FLUX.1-shaped layers with realistic outliers (runs on the CPU).

Layers: K=3072 and N in {3072, 12288}. Activations have a few channels 20-100x larger than the rest with a
per-token factor (as in diffusion transformers' activations); weights are heavy-tailed (Student t, df=3).
Calibration and evaluation tokens are drawn separately. Reported: SQNR in dB of the layer output against
the exact (fp64) output of the bf16 layer on the evaluation tokens, for

- naive W4A4: round-to-nearest int4 g64 weights and activations, no smoothing, no low rank;
- W4A4 with smoothing only (SVDQuant with rank 0: the alpha search, no low-rank branch);
- SVDQuant W4A4 at ranks 16, 32 and 64 (lowbit_engine.quantize_linear("svdq-int4"));
- SVDQuant W4A8 at rank 32 (int8 tokens);
- an FP8 reference (e4m3 weights per output channel, e4m3 activations per token);
- the weight layouts of SVDQuant W4A8 r32 (``--layouts``; :func:`evaluate_layouts`): today's g64 (int4, bf16
  scale per 64) with fp8 and with int8 tokens, against the promotion-free F8L (fp8 tokens) and I8Q (int8
  tokens), each quantized from the float residual, and a g64 layer converted to F8L / I8Q after the fact
  (what loading an old checkpoint onto Hopper does). tests/test_fidelity_layouts.py gates these rows.
- the weight-only candidates for the adaLN linears (``--w4a16``; :func:`evaluate_w4a16`): the w4a16 format
  (asymmetric uint4, bf16 step and integer zero per 64, with and without its range search) against F8L's
  layout used weight-only and symmetric int4 g64, all with bf16 tokens.

The quantized layers run through the ops (the C++ CPU references), i.e. the same math as the kernels.

Usage:
    python bench/fidelity.py [--tokens 256] [--n 3072 12288] [--out bench/results/fidelity-cpu.json]
    python bench/fidelity.py --layouts [--n 3072 12288] [--out bench/results/fidelity-layouts-cpu.json]
    python bench/fidelity.py --w4a16 [--n 3072 12288] [--out bench/results/fidelity-w4a16-cpu.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import lowbit_engine
from lowbit_engine import benchmark, ops
from lowbit_engine.formats import f8l, fp8, int4, w4a16


def synthetic_layer(K: int, N: int, tokens: int, seed: int = 0):
    """(linear, calib, eval) with activation outlier channels and heavy-tailed weights."""
    g = torch.Generator().manual_seed(seed)
    outliers = torch.randperm(K, generator=g)[: max(4, K // 256)]
    boost = torch.ones(K)
    boost[outliers] = 20 + 80 * torch.rand(len(outliers), generator=g)  # 20-100x larger channels

    def acts(n: int) -> torch.Tensor:
        x = torch.randn(n, K, generator=g) * boost
        per_token = torch.exp(0.5 * torch.randn(n, 1, generator=g))  # outlier size varies per token
        x[:, outliers] *= per_token
        return x

    t = _student_t(N, K, 3.0, g)
    linear = torch.nn.Linear(K, N, bias=True)
    with torch.no_grad():
        linear.weight.copy_(t * 0.02)
        linear.bias.copy_(torch.randn(N, generator=g) * 0.01)
    return linear.to(torch.bfloat16), acts(tokens).to(torch.bfloat16), acts(tokens).to(torch.bfloat16)


def _student_t(n: int, k: int, df: float, g: torch.Generator) -> torch.Tensor:
    z = torch.randn(n, k, generator=g)
    chi2 = torch.distributions.Gamma(df / 2, 0.5).sample((n, k))  # no generator arg: seeded below
    return z / torch.sqrt(chi2 / df)


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.double(), out.double()
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - out).pow(2).sum()))


def naive_w4a4(linear: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    qw, sw = int4.quantize(linear.weight.float(), scale_dtype=torch.bfloat16)
    qa, sa, _ = ops.quantize_act(x, mode="int4")
    return ops.gemm_w4a4(qa, sa, int4.pack(qw), sw, bias=linear.bias, out_dtype=torch.float32)


def fp8_reference(linear: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    qw, sw = fp8.quantize(linear.weight.float())
    qa, sa = fp8.quantize(x.float())
    return fp8.dequantize(qa, sa) @ fp8.dequantize(qw, sw).T + linear.bias.float()


def evaluate(K: int, N: int, tokens: int, seed: int = 0) -> list[dict]:
    linear, calib, xe = synthetic_layer(K, N, tokens, seed)
    ref = xe.double() @ linear.weight.double().T + linear.bias.double()
    rows = []

    def add(method: str, fn) -> None:
        t0 = time.perf_counter()
        out = fn()
        rows.append({"K": K, "N": N, "method": method, "sqnr_db": round(sqnr_db(ref, out), 2),
                     "seconds": round(time.perf_counter() - t0, 1)})
        print(f"K={K} N={N} {method:<26} {rows[-1]['sqnr_db']:7.2f} dB  ({rows[-1]['seconds']} s)", flush=True)

    def svdq(fmt: str, rank: int):
        def run():
            layer = lowbit_engine.quantize_linear(linear, fmt, calib=calib, rank=rank)
            with torch.no_grad():
                return layer(xe).float()
        return run

    add("fp8 e4m3 W8A8", lambda: fp8_reference(linear, xe))
    add("naive W4A4 (RTN g64)", lambda: naive_w4a4(linear, xe))
    add("W4A4 smoothing only", svdq("svdq-int4", 0))
    for r in (16, 32, 64):
        add(f"SVDQuant W4A4 r{r}", svdq("svdq-int4", r))
    add("SVDQuant W4A8 r32 (int8)", svdq("svdq-w4a8", 32))
    return rows


def evaluate_layouts(K: int, N: int, tokens: int, seed: int = 0, rank: int = 32, verbose: bool = True) -> list[dict]:
    """SQNR of SVDQuant W4A8 layers per weight layout (see the module docstring), on one synthetic layer."""
    linear, calib, xe = synthetic_layer(K, N, tokens, seed)
    ref = xe.double() @ linear.weight.double().T + linear.bias.double()
    rows = []

    def add(name: str, layout: str, act: str, layer) -> None:
        with torch.no_grad():
            out = layer(xe).float()
        rows.append({"K": K, "N": N, "layout": layout, "tokens": act, "method": name,
                     "sqnr_db": round(sqnr_db(ref, out), 2)})
        if verbose:
            print(f"K={K} N={N} {name:<34} {rows[-1]['sqnr_db']:7.2f} dB", flush=True)

    for act in ("fp8", "int8"):
        g64 = lowbit_engine.quantize_linear(linear, "svdq-w4a8", calib=calib, rank=rank, act_mode=act,
                                            weight_layout="g64")
        add(f"g64 ({act} tokens)", "g64", act, g64)
        new = "f8l" if act == "fp8" else "i8q"
        add(f"{new} ({act} tokens)", new, act,
            lowbit_engine.quantize_linear(linear, "svdq-w4a8", calib=calib, rank=rank, act_mode=act,
                                          weight_layout=new))
        add(f"g64 converted to {new} ({act} tokens)", f"g64->{new}", act, g64.convert_layout(new))
    return rows


def evaluate_w4a16(K: int, N: int, tokens: int, seed: int = 0, verbose: bool = True) -> list[dict]:
    """Weight-only 4-bit layouts with bf16 tokens: layer-output SQNR and weight SQNR per layout."""
    linear, _, xe = synthetic_layer(K, N, tokens, seed)
    w = linear.weight.float()
    ref = xe.double() @ linear.weight.double().T + linear.bias.double()
    rows = []

    def add(name: str, w_hat: torch.Tensor, bits: float) -> None:
        out = xe.float() @ w_hat.T + linear.bias.float()
        rows.append({"K": K, "N": N, "method": name, "bits_per_weight": bits,
                     "sqnr_db": round(sqnr_db(ref, out), 2), "weight_sqnr_db": round(sqnr_db(w, w_hat), 2)})
        if verbose:
            print(f"K={K} N={N} {name:<36} {rows[-1]['sqnr_db']:7.2f} dB (weight {rows[-1]['weight_sqnr_db']:.2f} dB)",
                  flush=True)

    for search in (True, False):
        q, s, z = w4a16.quantize(w, search=search)
        add(f"w4a16 (uint4, bf16 step, int zero){' search' if search else ''}",
            w4a16.dequantize(w4a16.pack(q), s, z), 4 + 24 / 64)
    codes, gs, row = f8l.quantize(w, search=True)
    add("F8L weight-only (search)", f8l.dequantize(f8l.pack(codes), gs, row), 4 + 8 / 64 + 32 / K)
    qi, si = int4.quantize(w, scale_dtype=torch.bfloat16)
    add("int4 g64 symmetric, bf16 scale", int4.dequantize(qi, si), 4 + 16 / 64)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=3072)
    parser.add_argument("--n", type=int, nargs="*", default=[3072, 12288])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--out", default=None)
    parser.add_argument("--layouts", action="store_true", help="the weight-layout rows (evaluate_layouts)")
    parser.add_argument("--w4a16", action="store_true", help="the weight-only rows (evaluate_w4a16)")
    args = parser.parse_args()
    kind = "w4a16" if args.w4a16 else "layouts" if args.layouts else None
    if args.out is None:
        args.out = f"bench/results/fidelity-{kind}-cpu.json" if kind else "bench/results/fidelity-cpu.json"
    torch.manual_seed(0)  # the Gamma sampler of the heavy tails draws from the global generator
    with torch.no_grad():
        fn = {"w4a16": evaluate_w4a16, "layouts": evaluate_layouts, None: evaluate}[kind]
        rows = [row for n in args.n for row in fn(args.k, n, args.tokens)]
    report = {"commit": benchmark._commit(), "device": "cpu", "tokens": args.tokens, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
