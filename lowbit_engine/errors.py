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
    """A quantized checkpoint cannot be read or does not fit the model it is loaded into.

    The message names the file, the module, what was expected and what came. Raised before the model is
    touched: a failed load leaves it exactly as it was.
    """
