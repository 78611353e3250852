"""Load a private copy of a Triton kernel module whose kernels run under the Triton interpreter.

Triton decides between compiled and interpreted when ``@triton.jit`` decorates a function, and the real
``lowbit_engine.kernels`` modules are imported (compiled mode) as soon as ``lowbit_engine.ops`` is. So
the CPU tests execute a second copy of the kernel file with ``TRITON_INTERPRET=1`` set only while it
loads; the rest of the process, the real kernels included, is unaffected.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

KERNELS = Path(__file__).resolve().parents[1] / "kernels"


def load_interpreted(file: str) -> ModuleType:
    """The interpreted copy of ``kernels/<file>`` (loaded once per process, cached in sys.modules)."""
    name = f"_lowbit_test_{Path(file).stem}_interpreted"
    if name in sys.modules:
        return sys.modules[name]
    path = KERNELS / file
    if not path.exists():  # tests run against an installed (non-editable) package
        path = Path(importlib.util.find_spec(f"lowbit_engine.kernels.{Path(file).stem}").origin)
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod  # dataclasses in the module look it up here while it executes
        try:
            spec.loader.exec_module(mod)
        except BaseException:
            del sys.modules[name]
            raise
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous
    return mod
