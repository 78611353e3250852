"""The fused block forwards of every architecture that has them, in one place (for ``engine.load``).

FLUX.1's double and single blocks (:mod:`.fused_blocks`) and SD3 / SD3.5's ``JointTransformerBlock``
(:mod:`.fused_sd3`). ``engine.load`` installs them when the model has such blocks and 8-bit-token layers
(``fused_blocks=None``, the default), always (``True``: an error for another architecture) or never
(``False``).

Example:
    >>> from torch import nn
    >>> supported(nn.Linear(64, 64)), wanted(nn.Linear(64, 64))
    (False, False)
"""

from __future__ import annotations

from types import ModuleType

from torch import nn

from ..nn import SVDQLinear
from . import fused_blocks, fused_sd3
from .fused_blocks import FUSABLE_ACTS

MODULES: tuple[ModuleType, ...] = (fused_blocks, fused_sd3)
ARCHITECTURES = "FLUX.1 (FluxTransformerBlock / FluxSingleTransformerBlock), SD3 / SD3.5 (JointTransformerBlock)"


def _blocks(module: ModuleType, transformer: nn.Module) -> list[nn.Module]:
    try:
        found = list(module._blocks(transformer))
    except ImportError:  # no diffusers: no diffusers blocks
        return []
    return [b[0] if isinstance(b, tuple) else b for b in found]


def supported(transformer: nn.Module) -> bool:
    """Whether the model has blocks with a fused forward."""
    return any(_blocks(m, transformer) for m in MODULES)


def wanted(transformer: nn.Module) -> bool:
    """Whether fusing pays: the model has such blocks and a layer in them with 8-bit tokens."""
    return any(isinstance(layer, SVDQLinear) and layer.act_mode in FUSABLE_ACTS
               for m in MODULES for b in _blocks(m, transformer) for layer in b.modules())


def install(transformer: nn.Module) -> int:
    """Install every architecture's fused forwards the model has blocks for; returns how many blocks."""
    n = sum(m.install(transformer) for m in MODULES if _blocks(m, transformer))
    if not n:
        raise TypeError(f"lowbit_engine: {type(transformer).__name__} has no blocks with a fused forward "
                        f"(they exist for {ARCHITECTURES})")
    return n


def remove(transformer: nn.Module) -> int:
    """Undo :func:`install`; returns how many blocks changed."""
    return sum(m.remove(transformer) for m in MODULES if _blocks(m, transformer))


def installed(transformer: nn.Module) -> int:
    """How many blocks run a fused forward."""
    return sum(1 for m in MODULES for b in _blocks(m, transformer) if getattr(b, fused_blocks.FUSED_ATTR, False))


__all__ = ["supported", "wanted", "install", "remove", "installed", "ARCHITECTURES"]
