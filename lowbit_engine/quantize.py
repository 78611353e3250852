"""One entry to quantize a linear layer into any format's module.

Example:
    >>> import torch
    >>> from lowbit_engine.quantize import quantize_linear
    >>> lin = torch.nn.Linear(256, 128).to(torch.bfloat16)
    >>> calib = torch.randn(64, 256, dtype=torch.bfloat16)          # inputs the layer sees
    >>> q = quantize_linear(lin, "svdq-int4", calib=calib, rank=16)
    >>> type(q).__name__, q(calib).shape
    ('SVDQLinear', torch.Size([64, 128]))
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from .errors import UnknownFormatError
from .formats import FORMATS
from .nn import FP4Linear, FP8Linear, SVDQLinear, VQLinear, W4A16Linear
from .quant.checks import check_calib, check_weight
from .quant.svdquant import svdquant
from .quant.vq import vq_quantize

# format -> builder(linear, calib, rank, **opts). Formats listed in FORMATS but absent here have their
# layout and references but no module yet.
_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "svdq-int4": lambda linear, calib, rank, **opts: SVDQLinear.from_linear(linear, calib, rank, "svdq-int4", **opts),
    "svdq-w4a8": lambda linear, calib, rank, **opts: SVDQLinear.from_linear(linear, calib, rank, "svdq-w4a8", **opts),
    # rank is SVDQuant's branch; the float formats start without a side branch (it carries LoRAs).
    "fp8": lambda linear, calib, rank, **opts: FP8Linear.from_linear(linear, calib, 0, **opts),
    "nvfp4": lambda linear, calib, rank, **opts: FP4Linear.from_linear(linear, calib, 0, fmt="nvfp4", **opts),
    "mxfp4": lambda linear, calib, rank, **opts: FP4Linear.from_linear(linear, calib, 0, fmt="mxfp4", **opts),
    "vq2": lambda linear, calib, rank, **opts: VQLinear.from_linear(linear, calib, fmt="vq2", **opts),
    "vq3": lambda linear, calib, rank, **opts: VQLinear.from_linear(linear, calib, fmt="vq3", **opts),
    # weight-only: no calibration and no low-rank branch (LoRAs go to a side branch)
    "w4a16": lambda linear, calib, rank, **opts: W4A16Linear.from_linear(linear, None, 0, **opts),
}


def _params(fn: Callable[..., Any], minus: tuple[str, ...]) -> frozenset[str]:
    return frozenset(inspect.signature(fn).parameters) - set(minus)


# format -> the option names its builder accepts (what from_linear pops itself, plus what it passes on).
# Read from the signatures, so a new option of svdquant / vq_quantize is accepted without touching this.
_OPTIONS: dict[str, frozenset[str]] = {
    **dict.fromkeys(("svdq-int4", "svdq-w4a8"), frozenset({"act_mode", "weight_layout", "dtype"})
                    | _params(svdquant, ("weight", "calib", "rank", "act_mode", "dtype", "weight_layout"))),
    "fp8": frozenset({"dtype"}),
    **dict.fromkeys(("nvfp4", "mxfp4"), frozenset({"act", "dtype"})),
    **dict.fromkeys(("vq2", "vq3"), frozenset({"dtype"}) | _params(vq_quantize, ("w", "fmt", "calib"))),
    "w4a16": frozenset({"dtype", "search"}),
}


def format_options(fmt: str) -> frozenset[str]:
    """The option names ``quantize_linear(..., fmt, **opts)`` accepts for ``fmt``.

    Example:
        >>> sorted(format_options("nvfp4"))
        ['act', 'dtype']
    """
    _check_buildable(fmt)
    return _OPTIONS[fmt]


def check_options(fmt: str, opts: dict[str, Any], who: str = "quantize_linear") -> None:
    """ValueError naming every option of ``opts`` that format ``fmt``'s quantizer does not take.

    Example:
        >>> check_options("fp8", {"bogus": 1})
        Traceback (most recent call last):
        ...
        ValueError: quantize_linear: unknown option(s) ['bogus'] for format 'fp8'; it takes: dtype
    """
    if not isinstance(opts, dict) or not all(isinstance(k, str) for k in opts):
        raise TypeError(f"{who}: options must be a dict with str keys, got {type(opts).__name__}")
    unknown = sorted(set(opts) - format_options(fmt))
    if unknown:
        raise ValueError(f"{who}: unknown option(s) {unknown} for format {fmt!r}; it takes: "
                         f"{', '.join(sorted(format_options(fmt)))}")


def _check_buildable(fmt: str) -> None:
    if not isinstance(fmt, str):
        raise TypeError(f"format must be a str (one of {', '.join(sorted(FORMATS))}), got {type(fmt).__name__}")
    if fmt not in FORMATS:
        raise UnknownFormatError(f"unknown format {fmt!r}; known formats: {', '.join(sorted(FORMATS))}")
    if fmt not in _BUILDERS:
        raise NotImplementedError(
            f"format {fmt!r} is known (layout and references exist) but its quantized module is not built "
            f"yet; quantize_linear builds: {', '.join(available_formats())}")


def available_formats() -> list[str]:
    """The formats :func:`quantize_linear` can build a module for today."""
    return sorted(_BUILDERS)


def quantize_linear(linear: nn.Linear, fmt: str, *, calib: Tensor | None = None, rank: int = 32,
                    **opts: Any) -> nn.Module:
    """Quantize one ``nn.Linear`` into the module of format ``fmt``.

    Args:
        linear: the float layer (any float dtype; its device is where the quantization runs).
        fmt: a format name (``lowbit_engine.formats.FORMATS``); buildable now: all of them (svdq-int4, svdq-w4a8, fp8,
            nvfp4, mxfp4, vq2, vq3, w4a16).
        calib: activations at the layer's input, ``[..., K]``. SVDQuant uses them to pick the smoothing;
            without them it quantizes with no smoothing and warns (``NoCalibrationWarning``).
        rank: rank of the SVDQuant low-rank branch (0 for none); not used by fp8 / nvfp4 / mxfp4 / vq / w4a16.
        opts: passed to the format's builder; for SVDQuant: ``act_mode`` ("int8" or "fp8" for
            svdq-w4a8), ``dtype``, ``alphas``, ``smoothing``, ``refine_iters``, ``max_eval_tokens``, ``seed``.

    Raises:
        UnknownFormatError: ``fmt`` is not a format name (the message lists the known ones).
        NotImplementedError: ``fmt`` is a known format whose module does not exist yet.
        ValueError: an option the format does not take; a weight on the meta device; calib of the wrong
            width or without tokens.
        NonFiniteError: the weight, bias or calib holds NaN or Inf (every format refuses them, with the same
            words: docs/formats.md, "Non-finite values").

    Example:
        >>> import torch
        >>> lin = torch.nn.Linear(128, 64)
        >>> q = quantize_linear(lin, "svdq-w4a8", calib=torch.randn(32, 128), rank=8, act_mode="fp8")
        >>> q.fmt, q.act_mode
        ('svdq-w4a8', 'fp8')
        >>> quantize_linear(lin, "int3")
        Traceback (most recent call last):
        ...
        lowbit_engine.errors.UnknownFormatError: unknown format 'int3'; known formats: fp8, mxfp4, nvfp4, svdq-int4, svdq-w4a8, vq2, vq3, w4a16
    """
    _check_buildable(fmt)
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"quantize_linear: expected an nn.Linear, got {type(linear).__name__}")
    check_options(fmt, opts)
    # One set of input checks for every format (the builders below used to differ: fp8 stored a NaN weight,
    # mxfp4 rounded it away, vq took any calib).
    who = f"quantize_linear({fmt!r})"
    check_weight(who, linear.weight)
    if linear.bias is not None:
        check_weight(who, linear.bias.detach()[None, :], what="bias")
    if calib is not None:
        check_calib(who, calib, linear.in_features)
    return _BUILDERS[fmt](linear, calib, rank, **opts)


__all__ = ["available_formats", "check_options", "format_options", "quantize_linear"]
