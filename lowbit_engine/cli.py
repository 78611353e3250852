"""The ``lowbit-engine`` command: ``info``, ``demo`` and ``bench kernels``.

Example:
    $ lowbit-engine info
    $ lowbit-engine demo
    $ lowbit-engine bench kernels --out bench/results/kernels.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def _info(_: argparse.Namespace) -> int:
    from . import build_info

    print(json.dumps(build_info(), indent=1))
    return 0


def _demo(args: argparse.Namespace) -> int:
    """Quantize one FLUX-shaped linear layer with outliers: naive W4A4 vs SVDQuant W4A4 / W4A8."""
    import warnings

    from . import build_info, ops, quantize_linear
    from .formats import int4

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    K = N = 3072 if device == "cuda" else 1024
    print(f"lowbit-engine demo on {device}; build: {build_info()}")
    if device == "cpu":
        print(f"(no GPU: a {K}x{N} layer on the C++ CPU references; on a GPU it is FLUX.1's 3072x3072)")
    gen = torch.Generator().manual_seed(0)
    boost = 1 + 60 * (torch.rand(K, generator=gen) > 0.995).float()  # a few outlier channels

    def tokens(n: int) -> torch.Tensor:
        return (torch.randn(n, K, generator=gen) * boost).to(torch.bfloat16)

    linear = torch.nn.Linear(K, N).to(torch.bfloat16)
    calib, x = tokens(256), tokens(args.tokens)
    ref = (x.double() @ linear.weight.double().T + linear.bias.double()).detach()

    def sqnr(out: torch.Tensor) -> float:
        out = out.detach().double().cpu()
        return float(10 * torch.log10(ref.pow(2).sum() / (ref - out).pow(2).sum()))

    qw, sw = int4.quantize(linear.weight.float(), scale_dtype=torch.bfloat16)
    xd = x.to(device)
    with ops.record_backends() as used, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fallbacks are reported below through the backend record
        qa, sa, _ = ops.quantize_act(xd)
        naive = ops.gemm_w4a4(qa, sa, int4.pack(qw).to(device), sw.to(device), bias=linear.bias.to(device))
        rows = [("naive W4A4 (int4 g64 round to nearest)", naive, None)]
        for fmt in ("svdq-int4", "svdq-w4a8"):
            t0 = time.perf_counter()
            layer = quantize_linear(linear, fmt, calib=calib, rank=32).to(device)
            seconds = time.perf_counter() - t0
            rows.append((f"SVDQuant {fmt} r32 (quantized in {seconds:.1f} s)", layer(xd), layer))
    for name, out, layer in rows:
        size = f", {layer.nbytes / 2**20:.1f} MiB vs bf16 {layer.dense_nbytes / 2**20:.1f} MiB" if layer else ""
        print(f"{name:<48} SQNR vs bf16 layer: {sqnr(out):6.2f} dB{size}")
    print("backends that ran: " + ", ".join(f"{op}={'/'.join(sorted(b))}" for op, b in sorted(used.items())))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from . import benchmark

    if args.what != "kernels":
        print(f"unknown benchmark {args.what!r}; expected 'kernels'", file=sys.stderr)
        return 2
    shapes = None
    if args.m:
        shapes = [(m, k, n) for m in args.m for (k, n) in benchmark.FLUX_KN]
    report = benchmark.run(device=args.device, shapes=shapes, repeat=args.repeat,
                           include_reference=args.include_reference, kernels=args.kernels, verbose=args.verbose)
    print(benchmark.format_table(report))
    if args.out:
        print(f"wrote {benchmark.save(report, args.out)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lowbit-engine", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print what was built").set_defaults(func=_info)
    demo = sub.add_parser("demo", help="quantize a layer and report fidelity and the backends that ran")
    demo.add_argument("--device", default=None)
    demo.add_argument("--tokens", type=int, default=256)
    demo.set_defaults(func=_demo)
    bench = sub.add_parser("bench", help="benchmarks")
    bench.add_argument("what", choices=["kernels"])
    bench.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    bench.add_argument("--m", type=int, nargs="*", help="token counts (default 4608 256 16 on a GPU)")
    bench.add_argument("--repeat", type=int, default=50)
    bench.add_argument("--kernels", nargs="*", help="only kernels whose name contains one of these")
    bench.add_argument("--include-reference", action="store_true", help="also time torch-reference fallbacks")
    bench.add_argument("--out", help="write the JSON report here")
    bench.add_argument("--verbose", action="store_true")
    bench.set_defaults(func=_bench)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
