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
