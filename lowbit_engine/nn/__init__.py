"""Quantized modules that replace ``nn.Linear``.

``QUANTIZED_MODULES`` maps a class name to its class: the checkpoint code stores the name next to each
layer's :meth:`config` and rebuilds the layer with ``QUANTIZED_MODULES[name].from_config(cfg)``. Each new
format's module adds itself here.

Example:
    >>> from lowbit_engine.nn import QUANTIZED_MODULES, SVDQLinear
    >>> QUANTIZED_MODULES["SVDQLinear"] is SVDQLinear
    True
"""

from __future__ import annotations

from torch import nn

from .fp4_linear import FP4Linear
from .fp8_linear import FP8Linear
from .svdq_linear import SVDQLinear
from .vq_linear import VQLinear
from .w4a16_linear import W4A16Linear

QUANTIZED_MODULES: dict[str, type[nn.Module]] = {
    "SVDQLinear": SVDQLinear, "FP8Linear": FP8Linear, "FP4Linear": FP4Linear, "VQLinear": VQLinear,
    "W4A16Linear": W4A16Linear}

__all__ = ["QUANTIZED_MODULES", "SVDQLinear", "FP8Linear", "FP4Linear", "VQLinear", "W4A16Linear"]
