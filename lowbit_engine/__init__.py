"""lowbit-engine: a low-bit inference engine for diffusion transformers.

``load(pipe)`` quantizes a diffusers pipeline's transformer in place (or loads a saved checkpoint into it);
``quantize_linear(linear, "svdq-int4", calib=x)`` turns one ``nn.Linear`` into an :class:`SVDQLinear`;
``save`` / ``load_checkpoint`` store and restore quantized modules. Formats live in
:mod:`lowbit_engine.formats`, the torch references of every kernel in
:mod:`lowbit_engine.reference`, and the dispatching custom ops in :mod:`lowbit_engine.ops`.

Example:
    >>> import lowbit_engine
    >>> info = lowbit_engine.build_info()
    >>> info["cpu_reference"]
    True
"""

from __future__ import annotations

__version__ = "0.1.0"  # before the imports below: checkpoints record it

from ._build_info import build_info
from .checkpoint import load_checkpoint
from .integrations import last_report, load, save
from .integrations.nunchaku import load_nunchaku
from . import lora  # engine.lora.load / set_strength / swap / unload
from .nn import SVDQLinear
from .nn.svdq_linear import convert_weight_layouts
from .quantize import quantize_linear

__all__ = ["build_info", "load", "save", "last_report", "lora", "quantize_linear", "load_checkpoint", "SVDQLinear",
           "convert_weight_layouts", "load_nunchaku", "__version__"]
