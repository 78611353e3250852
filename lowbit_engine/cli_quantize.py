"""``lowbit-engine quantize MODEL --fmt ... --out DIR``: calibrate a pipeline on prompts, quantize, keep it.

Calibration runs the pipeline's own denoising (``--steps`` steps per prompt, latents out, no VAE decode)
with a progress bar over the steps; then every layer the policy picks is quantized (a second bar). The
folder it writes loads back with one call (:func:`lowbit_engine.integrations.folder.load_pipeline`).

Example:
    $ lowbit-engine quantize black-forest-labs/FLUX.1-dev --fmt svdq-int4 --calib prompts.txt --out flux-int4
    $ python -c "from lowbit_engine.integrations.folder import load_pipeline; pipe = load_pipeline('flux-int4')"
"""

from __future__ import annotations

import argparse
import inspect
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .cli_common import (UserError, check_device, check_model_source, format_arg, format_help, load_pipeline,
                         positive_int)

# Varied subjects, styles and compositions: the calibration sees the activation ranges of real use.
PROMPTS = [
    "a photo of a red fox in the snow, detailed fur",
    "a watercolor of a lighthouse at dusk",
    "a city street at night in the rain, neon signs, reflections",
    "a close-up portrait of an old fisherman, dramatic lighting",
    "an isometric illustration of a cozy library with plants",
    "a bowl of ramen on a wooden table, studio photograph",
    "a mountain lake at sunrise, mist over the water",
    "a poster with the words 'LOW BIT' in bold letters",
    "a cat astronaut floating in a space station, digital art",
    "a medieval castle on a cliff, oil painting",
    "macro photograph of a dragonfly on a leaf, morning dew",
    "a minimalist living room, Scandinavian design, soft daylight",
    "a crowded market in Marrakech, vivid colours",
    "a robot playing chess with a child in a park",
    "a pencil sketch of a sailing ship in a storm",
    "an aerial view of terraced rice fields",
]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="calibrate and quantize a pipeline; write a folder that loads back")
    p.add_argument("model", help="a diffusers pipeline folder or hub id")
    p.add_argument("--fmt", type=format_arg, default="svdq-int4", help=format_help())
    p.add_argument("--rank", type=positive_int, default=32, help="SVDQuant low-rank branch rank (default 32)")
    calib = p.add_mutually_exclusive_group()
    calib.add_argument("--calib", metavar="PROMPTS.txt", help="calibration prompts, one per line (# comments)")
    calib.add_argument("--calib-prompts", type=positive_int, metavar="N", default=None,
                       help=f"the first N of {len(PROMPTS)} built-in prompts (default 4)")
    p.add_argument("--steps", type=positive_int, default=4, help="denoising steps per calibration prompt")
    p.add_argument("--size", type=positive_int, default=None, help="calibration image height and width "
                                                                   "(default: the pipeline's)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--out", required=True, help="the folder to write (must not exist or be empty)")
    p.set_defaults(func=run)


def read_prompts(args: argparse.Namespace) -> list[str]:
    """The calibration prompts ``--calib FILE`` or ``--calib-prompts N`` asks for (default: 4 built-in)."""
    if args.calib:
        path = Path(args.calib)
        if not path.is_file():
            raise UserError(f"--calib {args.calib}: no such file (expected a text file, one prompt per line)")
        prompts = [line.strip() for line in path.read_text().splitlines()]
        prompts = [p for p in prompts if p and not p.startswith("#")]
        if not prompts:
            raise UserError(f"--calib {args.calib}: no prompts in it (one per line; blank and # lines are skipped)")
        return prompts
    n = args.calib_prompts or 4
    if n > len(PROMPTS):
        raise UserError(f"--calib-prompts {n}: there are {len(PROMPTS)} built-in prompts; pass more with --calib")
    return PROMPTS[:n]


def _check_out(out: str) -> Path:
    path = Path(out)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UserError(f"--out {out}: already exists and is not an empty folder (expected a new folder)")
    return path


def calibration(prompts: list[str], steps: int, size: int | None, device: str) -> Callable[[Any], None]:
    """A ``calib=`` callable for :func:`lowbit_engine.load`: each prompt through the pipeline, one bar over all steps."""

    def run(pipe: Any) -> None:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(prompts) * steps, desc="lowbit-engine: calibrating", unit="step")
        # A per-step bar where the pipeline has step callbacks (FLUX, SD3, ...), else per prompt.
        per_step = "callback_on_step_end" in inspect.signature(pipe.__call__).parameters

        def on_step(_pipe: Any, _i: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            bar.update()
            return kwargs

        extra: dict[str, Any] = {"callback_on_step_end": on_step} if per_step else {}
        if size:
            extra.update(height=size, width=size)
        pipe.set_progress_bar_config(disable=True)  # diffusers' own bar per call would interleave with ours
        try:
            for i, prompt in enumerate(prompts):
                pipe(prompt=prompt, num_inference_steps=steps, output_type="latent",
                     generator=torch.Generator(device).manual_seed(i), **extra)
                if not per_step:
                    bar.update(steps)
        finally:
            bar.close()
            pipe.set_progress_bar_config(disable=False)

    return run


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.2f} MiB"


def _folder_bytes(path: Path, pattern: str = "**/*") -> int:
    return sum(f.stat().st_size for f in path.glob(pattern) if f.is_file())


def quantize_to_folder(model: str, fmt: str, rank: int, prompts: list[str], *, steps: int, size: int | None,
                       device: str, out: Path) -> Any:
    """Load ``model``, calibrate on ``prompts``, quantize to ``fmt`` and write ``out``; returns the quantized pipe.

    The folder is written under ``<out>.partial`` and renamed when complete, so a failed or interrupted
    run leaves no half-written folder under the final name.
    """
    from . import load
    from .integrations import folder

    pipe = load_pipeline(model, device)
    if getattr(pipe, "text_encoder", True) is None:
        raise UserError(f"{model}: the pipeline has no text encoder; quantize calibrates by running prompts "
                        "through it (use lowbit_engine.load(pipe, calib=...) with transformer inputs instead)")
    stage = out.with_name(out.name + ".partial")
    if stage.exists():
        shutil.rmtree(stage)  # a previous interrupted run of this command
    try:
        load(pipe, fmt, rank=rank, calib=calibration(prompts, steps, size, device), progress=True)
        folder.save_pipeline(pipe, stage)
        if out.exists():
            out.rmdir()  # checked empty before anything ran
        stage.rename(out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return pipe


def run(args: argparse.Namespace) -> int:
    # Every argument is checked before the model loads (which can take minutes for a real one).
    device = check_device(args.device)
    check_model_source(args.model)
    out = _check_out(args.out)
    prompts = read_prompts(args)
    print(f"lowbit-engine quantize: {args.model} -> {out} as {args.fmt} rank {args.rank} on {device}; "
          f"calibration: {len(prompts)} prompt(s) x {args.steps} steps")
    pipe = quantize_to_folder(args.model, args.fmt, args.rank, prompts, steps=args.steps, size=args.size,
                              device=device, out=out)
    report = pipe.transformer._lowbit_report
    print(f"size: transformer in memory {_mib(report.bytes_before)} (bf16) -> {_mib(report.bytes_after)} ({args.fmt}); "
          f"on disk: transformer {_mib(_folder_bytes(out / 'transformer'))}, whole folder {_mib(_folder_bytes(out))}")
    print(f"wrote {out}; load it with: lowbit_engine.integrations.folder.load_pipeline({str(out)!r}) "
          f"(or diffusers.DiffusionPipeline.from_pretrained after importing lowbit_engine)")
    return 0
