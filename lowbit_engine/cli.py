"""The ``lowbit-engine`` command: ``info``, ``demo``, ``bench kernels`` and ``plan`` (lowbit_engine/plan.py).

Example:
    $ lowbit-engine info
    $ lowbit-engine demo
    $ lowbit-engine bench kernels --out bench/results/kernels.json
    $ lowbit-engine plan --model flux-dev --fmt svdq-w4a8
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch


def _info(_: argparse.Namespace) -> int:
    from . import build_info

    print(json.dumps(build_info(), indent=1))
    return 0


def _demo(args: argparse.Namespace) -> int:
    """Build (or load) a FLUX pipeline, run it in bf16, quantize it with ``load``, run it again, compare."""
    import warnings

    from . import build_info, load

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"lowbit-engine demo on {device}; build: {build_info()}")
    if args.model:
        import diffusers

        pipe = diffusers.DiffusionPipeline.from_pretrained(args.model, torch_dtype=torch.bfloat16).to(device)
        size = args.size or 1024
        call: dict = {"prompt": args.prompt}
        calib_call: dict = {"prompt": "a watercolor of a lighthouse at dusk"}
    else:
        from .integrations.tiny import tiny_flux_pipeline

        why = "no GPU" if device == "cpu" else "no --model given"
        print(f"({why}: a tiny FLUX pipeline built from config with random weights; the images are noise-like, "
              "the comparison with bf16 is what matters)")
        pipe, emb = tiny_flux_pipeline(seed=0)
        pipe = pipe.to(device)
        size = args.size or 64
        emb = {k: v.to(device) for k, v in emb.items()}
        call, calib_call = dict(emb, guidance_scale=1.0), {k: v.roll(1, dims=-1) for k, v in emb.items()}
    call.update(height=size, width=size, num_inference_steps=args.steps, output_type="pt")

    def generate(**extra) -> tuple[torch.Tensor, float]:
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            image = pipe(**{**call, **extra}, generator=torch.Generator(device).manual_seed(0)).images
        if device == "cuda":
            torch.cuda.synchronize()
        return image.float().cpu(), time.perf_counter() - t0

    generate()  # warm-up (allocations, first-call setup), not timed
    ref, t_bf16 = generate()
    calib_steps = max(1, min(2, args.steps))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=UserWarning)  # the report below says what fell back
        load(pipe, args.fmt, rank=args.rank, progress=True,
             calib=lambda p: p(**{**call, **calib_call, "num_inference_steps": calib_steps, "output_type": "latent"},
                               generator=torch.Generator(device).manual_seed(1)))
        generate()
        from . import ops

        with ops.record_backends() as used:
            image, t_q = generate()
    err = float((image - ref).norm() / ref.norm())
    mse = float((image - ref).pow(2).mean())
    psnr = 10 * math.log10(float(ref.max() - ref.min()) ** 2 / mse) if mse > 0 else float("inf")
    print(f"\nimage {tuple(image.shape)}, {args.steps} steps")
    print(f"bf16:            {t_bf16 * 1e3:9.1f} ms per image")
    print(f"{args.fmt} r{args.rank}: {t_q * 1e3:9.1f} ms per image ({t_bf16 / t_q:.2f}x bf16)"
          + ("  [CPU: C++ reference kernels, not a speed measurement]" if device == "cpu" else ""))
    print(f"fidelity vs bf16: relative L2 {err:.4f}, PSNR {psnr:.1f} dB")
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
    demo = sub.add_parser("demo", help="quantize a FLUX pipeline; report speed and fidelity against bf16")
    demo.add_argument("--model", default=None, help="a diffusers pipeline path or hub id (default: tiny config)")
    demo.add_argument("--fmt", default="svdq-int4")
    demo.add_argument("--rank", type=int, default=32)
    demo.add_argument("--steps", type=int, default=4)
    demo.add_argument("--size", type=int, default=None, help="image height and width (default 64 tiny, 1024)")
    demo.add_argument("--prompt", default="a photo of a red fox in the snow, detailed fur")
    demo.add_argument("--device", default=None)
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
    from . import plan  # the plan subcommand lives with its code

    plan.add_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
