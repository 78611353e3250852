"""What the ``lowbit-engine`` subcommands share: the user-error type and the argument checks.

A :class:`UserError` is a mistake of the person at the shell (a missing path, an unknown format, no GPU
where one was asked for); :func:`lowbit_engine.cli.main` prints it as one line and exits with status 2.
Every check here runs before anything is built, so a bad argument costs no model load.

Example:
    >>> format_arg("svdq-int4")
    'svdq-int4'
    >>> format_arg("int3")
    Traceback (most recent call last):
    ...
    argparse.ArgumentTypeError: unknown format 'int3'; expected one of: fp8, mxfp4, nvfp4, svdq-int4, svdq-w4a8, vq2, vq3, w4a16
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch


class UserError(Exception):
    """An error in what the user asked for; the message is the whole story (no traceback is shown)."""


def format_arg(name: str) -> str:
    """argparse ``type=`` for ``--fmt``: a format that :func:`lowbit_engine.load` builds, checked at parse time."""
    from .quantize import available_formats

    known = available_formats()
    if name not in known:
        raise argparse.ArgumentTypeError(f"unknown format {name!r}; expected one of: {', '.join(sorted(known))}")
    return name


def format_help() -> str:
    """The ``--help`` text of ``--fmt``: the formats, the default."""
    from .quantize import available_formats

    return f"the format: {', '.join(available_formats())} (default svdq-int4)"


def positive_int(text: str) -> int:
    """argparse ``type=`` for counts (ranks, steps, prompts): an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def check_device(device: str | None) -> str:
    """The device to run on: ``device`` if it is usable, else the default (CUDA when available, else CPU).

    Raises UserError for a malformed name or a CUDA device on a machine without one (torch would fail
    later, deep inside a model, with an assertion).
    """
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device: expected cpu, cuda or cuda:N, got {device!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: no CUDA device is available here (torch {torch.__version__}, "
                            f"built for CUDA {torch.version.cuda or 'none'}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type != "cpu":
        raise UserError(f"--device: expected cpu, cuda or cuda:N, got {device!r}")
    return device


def _looks_like_path(text: str) -> bool:
    # A hub id is "name" or "org/name": no leading "/", ".", "~", no second "/", no backslash.
    return text.startswith(("/", ".", "~")) or text.count("/") > 1 or "\\" in text or text.endswith("/")


def check_model_source(model: str) -> str:
    """``model`` checked before anything loads: an existing pipeline folder, or something shaped like a hub id.

    Raises UserError for a path that does not exist or a folder that is no diffusers pipeline
    (diffusers would answer the first with ``HFValidationError: Repo id must use alphanumeric chars``).

    Example:
        >>> check_model_source("black-forest-labs/FLUX.1-dev")
        'black-forest-labs/FLUX.1-dev'
        >>> check_model_source("/nonexistent")
        Traceback (most recent call last):
        ...
        lowbit_engine.cli_common.UserError: model path /nonexistent does not exist (expected a diffusers pipeline folder with a model_index.json, or a hub id such as black-forest-labs/FLUX.1-dev)
    """
    path = Path(os.path.expanduser(model))
    if path.exists():
        if not path.is_dir() or not (path / "model_index.json").is_file():
            raise UserError(f"model path {model} is not a diffusers pipeline folder (expected a folder with a "
                            "model_index.json, as DiffusionPipeline.save_pretrained writes)")
        return str(path)
    if _looks_like_path(model):
        raise UserError(f"model path {model} does not exist (expected a diffusers pipeline folder with a "
                        "model_index.json, or a hub id such as black-forest-labs/FLUX.1-dev)")
    return model


def load_pipeline(model: str, device: str) -> object:
    """A diffusers pipeline in bf16 on ``device`` from a checked folder or hub id.

    A hub id that cannot be fetched (no network, no such repository, gated) becomes one UserError line
    with diffusers' own first line of explanation.
    """
    import diffusers

    source = check_model_source(model)
    try:
        pipe = diffusers.DiffusionPipeline.from_pretrained(source, torch_dtype=torch.bfloat16)
    except (OSError, ValueError) as e:  # huggingface_hub's errors derive from these
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load the pipeline {model!r}: {first}") from e
    return pipe.to(device)
