"""The one exception of :mod:`lowbit_engine.lora`."""

from __future__ import annotations


class LoRAError(ValueError):
    """A LoRA cannot be loaded, swapped or changed: unknown or malformed keys, shapes that do not fit the
    model, NaN/inf values, a rank over the preallocated capacity, or an adapter name that is (not) loaded.

    The message names the key or layer at fault. Raised before anything is written: the model is left
    exactly as it was.
    """
