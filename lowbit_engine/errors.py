"""Exceptions and warnings of lowbit-engine. Every input error is a ValueError subclass."""

from __future__ import annotations


class OpInputError(ValueError):
    """A tensor handed to a ``lowbit::`` op has the wrong dtype, shape, device, layout or alignment.

    The message names the op, the argument, what was expected and what came.
    """


class UnknownFormatError(ValueError):
    """A format name that lowbit-engine does not know; the message lists the known ones."""


class ReferenceFallbackWarning(UserWarning):
    """An op ran the slow torch reference because no CUDA or Triton kernel applied (emitted once per case)."""


class CheckpointError(ValueError):
    """A quantized checkpoint cannot be written or read, or does not fit the model it is loaded into.

    The message names the file, the module, what was expected and what came. Raised before the model is
    touched: a failed load leaves it exactly as it was.
    """


class NonFiniteError(ValueError):
    """A weight, calibration batch or smoothing factor holds NaN or Inf where the format needs finite values.

    Quantizers reject non-finite weights (a NaN would otherwise be stored in a scale or codebook, or be
    rounded away into finite codes); activations are never rejected: their NaN propagates (docs/formats.md,
    "Non-finite values").
    """


class CalibrationError(ValueError):
    """A calibration run of ``engine.load`` failed; the message names the input that failed and why.

    The model is left exactly as it was before the call.
    """
