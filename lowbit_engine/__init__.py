"""lowbit-engine: a low-bit inference engine for diffusion transformers.

Formats live in :mod:`lowbit_engine.formats`, the torch references of every kernel in
:mod:`lowbit_engine.reference`, and the dispatching custom ops in :mod:`lowbit_engine.ops`.

Example:
    >>> import lowbit_engine
    >>> info = lowbit_engine.build_info()
    >>> info["cpu_reference"]
    True
"""

from __future__ import annotations

from ._build_info import build_info

__version__ = "0.1.0"
__all__ = ["build_info", "__version__"]
