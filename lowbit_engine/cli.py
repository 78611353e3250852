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

import torch


def _info(_: argparse.Namespace) -> int:
    from . import build_info

    print(json.dumps(build_info(), indent=1))
    return 0


def _demo(args: argparse.Namespace) -> int:
    """Quantize one FLUX-shaped linear layer to svdq-int4 / w4a8 through the ops and report fidelity."""
    from . import build_info, ops
    from .formats import int4

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    M, K, N = (args.tokens, 3072, 3072) if device == "cuda" else (args.tokens, 512, 512)
    info = build_info()
    print(f"lowbit-engine demo on {device}: build {info}")
    if device == "cpu":
        print(f"(no GPU: a {K}x{N} layer on the C++ CPU reference; on a GPU the layer is FLUX.1's 3072x3072)")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(M, K, generator=gen) * (1 + 30 * (torch.rand(K, generator=gen) > 0.99))
    w = torch.randn(N, K, generator=gen) * 0.02
    ref = x @ w.t()
    qw, sw = int4.quantize(w, scale_dtype=torch.bfloat16)
    xb, w4 = x.to(torch.bfloat16).to(device), int4.pack(qw).to(device)
    sw = sw.to(device)

    def sqnr(out: torch.Tensor) -> float:
        err = (out.float().cpu() - ref).pow(2).sum()
        return float(10 * torch.log10(ref.pow(2).sum() / err))

    with ops.record_backends() as used:
        qa, sa, _ = ops.quantize_act(xb, mode="int4")
        out4 = ops.gemm_w4a4(qa, sa, w4, sw)
        q8, s8, _ = ops.quantize_act(xb, mode="int8")
        out8 = ops.gemm_w4a8(q8, s8, w4, sw)
    print(f"W4A4 (int4 g64, no smoothing/low-rank yet) SQNR vs fp32: {sqnr(out4):6.2f} dB")
    print(f"W4A8 (int4 g64 weights, int8 tokens)        SQNR vs fp32: {sqnr(out8):6.2f} dB")
    print(f"bf16 matmul                                  SQNR vs fp32: {sqnr(xb.float().cpu() @ w.t().bfloat16().float()):6.2f} dB")
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
