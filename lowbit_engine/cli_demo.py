"""``lowbit-engine demo``: a pipeline in bf16 and quantized, the same seed, one PNG to look at.

Without ``--model`` (or without a GPU) it builds the tiny random-weight FLUX of
:mod:`lowbit_engine.integrations.tiny`: its images are noise-like, and the picture says so.

Example:
    $ lowbit-engine demo --out pictures/            # writes pictures/demo-svdq-int4-r32.png
    $ lowbit-engine demo --model black-forest-labs/FLUX.1-dev --device cuda --steps 20
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from .cli_common import (UserError, check_device, check_model_source, format_arg, format_help, load_pipeline,
                         positive_int)

TINY_NOTE = ("tiny random-weight FLUX built from a config (no --model): the images are noise-like; "
             "what to look at is how closely the quantized one follows bf16")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="quantize a pipeline; save bf16 / quantized / difference as one PNG")
    p.add_argument("--model", default=None, help="a diffusers pipeline folder or hub id (default: a tiny FLUX)")
    p.add_argument("--fmt", type=format_arg, default="svdq-int4", help=format_help())
    p.add_argument("--rank", type=positive_int, default=32)
    p.add_argument("--steps", type=positive_int, default=4)
    p.add_argument("--size", type=positive_int, default=None, help="image height and width (default 64 tiny, 1024)")
    p.add_argument("--prompt", default="a photo of a red fox in the snow, detailed fur")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--out", default=".", help="folder for the PNG (default: the current one)")
    p.set_defaults(func=run)


def _setup(args: argparse.Namespace, device: str) -> tuple[Any, dict[str, Any], dict[str, Any], str | None]:
    """(pipeline, call kwargs, calibration kwargs, note for the picture)."""
    if args.model:
        pipe = load_pipeline(args.model, device)
        return pipe, {"prompt": args.prompt}, {"prompt": "a watercolor of a lighthouse at dusk"}, None
    from .integrations.tiny import tiny_flux_pipeline

    print("(no --model: a tiny FLUX pipeline built from config with random weights; the images are noise-like, "
          "the comparison with bf16 is what matters)")
    pipe, emb = tiny_flux_pipeline(seed=0)
    pipe = pipe.to(device)
    emb = {k: v.to(device) for k, v in emb.items()}
    return pipe, dict(emb, guidance_scale=1.0), {k: v.roll(1, dims=-1) for k, v in emb.items()}, TINY_NOTE


def run(args: argparse.Namespace) -> int:
    """Build (or load) the pipeline, run it in bf16, quantize it with ``load``, run it again, draw and compare."""
    from . import build_info, load, ops
    from .viz import comparison_image, fidelity

    device = check_device(args.device)
    if args.model:
        check_model_source(args.model)  # before the (slow) imports and builds below
    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {args.out}: expected a folder, it is a file")
    print(f"lowbit-engine demo on {device}; build: {build_info()}")
    pipe, call, calib_call, note = _setup(args, device)
    size = args.size or (1024 if args.model else 64)
    call.update(height=size, width=size, num_inference_steps=args.steps, output_type="pt")

    def generate() -> tuple[torch.Tensor, float]:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            image = pipe(**call, generator=torch.Generator(device).manual_seed(0)).images
        if device.startswith("cuda"):
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
        with ops.record_backends() as used:
            image, t_q = generate()

    fid = fidelity(ref, image)
    rank = f"r{args.rank}" if args.fmt.startswith("svdq") else ""  # only SVDQuant has a low-rank branch
    label = f"{args.fmt} {rank}".strip()
    lpips_text = f", LPIPS {fid['lpips']:.4f}" if fid["lpips"] is not None else ""
    fid_text = f"relative L2 {fid['rel_l2']:.4f}, PSNR {fid['psnr_db']:.1f} dB{lpips_text}"
    speed = "CPU: C++ reference kernels, not a speed measurement" if device == "cpu" else \
        f"{t_bf16 * 1e3:.0f} ms bf16, {t_q * 1e3:.0f} ms {args.fmt}"
    title = [f"lowbit-engine demo: {args.model or 'tiny FLUX (random weights)'}, {size}x{size}, {args.steps} steps, "
             f"seed 0, {device}", f"{label} vs bf16: {fid_text}; {speed}"]
    picture = comparison_image(ref[0], image[0], title, labels=("bf16", label), note=note)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"demo-{args.fmt}{'-' + rank if rank else ''}.png"
    picture.save(path)

    print(f"\nimage {tuple(image.shape)}, {args.steps} steps")
    print(f"bf16:            {t_bf16 * 1e3:9.1f} ms per image")
    print(f"{label}: {t_q * 1e3:9.1f} ms per image ({t_bf16 / t_q:.2f}x bf16)"
          + ("  [CPU: C++ reference kernels, not a speed measurement]" if device == "cpu" else ""))
    print(f"fidelity vs bf16: {fid_text}" + ("" if fid["lpips"] is not None else f" ({fid['lpips_note']})"))
    print("backends that ran: " + ", ".join(f"{op}={'/'.join(sorted(b))}" for op, b in sorted(used.items())))
    print(f"wrote {path} ({picture.size[0]}x{picture.size[1]}: bf16 | {label} | difference)")
    return 0
