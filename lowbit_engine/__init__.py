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
from .integrations.folder import save_pretrained
from . import lora  # engine.lora.load / set_strength / swap / unload
from .nn import SVDQLinear
from .nn.svdq_linear import convert_weight_layouts
from .quantize import quantize_linear

__all__ = ["build_info", "load", "save", "save_pretrained", "LowbitConfig", "last_report", "lora", "quantize_linear",
           "load_checkpoint", "SVDQLinear", "convert_weight_layouts", "load_nunchaku", "__version__"]


def __getattr__(name: str):
    # LowbitConfig needs diffusers (its quantizer registry): imported, and the backend registered, when asked
    # for, or right away below when diffusers is already imported (from_pretrained of a lowbit folder then
    # finds the backend without any further import).
    if name == "LowbitConfig":
        from .integrations.diffusers_quantizer import LowbitConfig

        return LowbitConfig
    raise AttributeError(f"module 'lowbit_engine' has no attribute {name!r}")


def _register_if_diffusers_loaded() -> None:
    import sys

    if "diffusers" in sys.modules:
        try:
            from .integrations import diffusers_quantizer  # noqa: F401  (registers "lowbit")
        except ImportError:  # a diffusers without the quantizer registry: from_pretrained support is off
            pass


_register_if_diffusers_loaded()
