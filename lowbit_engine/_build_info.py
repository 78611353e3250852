"""What this installation was built with: the native module, CUDA archs, Triton."""

from __future__ import annotations

import functools
import importlib
import importlib.util
from typing import Any


@functools.cache  # asked on every op call by dispatch: import once (and fail once)
def native():
    """The compiled module ``lowbit_engine._C``, or None when it is missing (a source tree never built)."""
    try:
        return importlib.import_module("lowbit_engine._C")
    except ImportError:
        return None


def build_info() -> dict[str, Any]:
    """Report what was compiled and what is usable here.

    Returns a dict with ``cpu_reference`` (the C++ CPU references are importable), ``cuda_built`` and
    ``cuda_archs`` (CUDA kernels compiled into ``_C`` and for which archs), ``cuda_available`` (a CUDA
    device is visible to torch), ``triton`` (Triton importable, and its version), ``torch``.

    Example:
        >>> import lowbit_engine
        >>> sorted(lowbit_engine.build_info())[:3]
        ['cpu_reference', 'cuda_archs', 'cuda_available']
    """
    import torch

    mod = native()
    triton_version = None
    if importlib.util.find_spec("triton") is not None:
        try:
            triton_version = importlib.import_module("triton").__version__
        except Exception:  # a broken triton install is "not present", not a crash of build_info
            triton_version = None
    archs = getattr(mod, "cuda_archs", "") if mod is not None else ""
    return {
        "cpu_reference": mod is not None,
        "cuda_built": bool(getattr(mod, "with_cuda", False)),
        "cuda_archs": [a for a in archs.split(";") if a],
        "cuda_available": torch.cuda.is_available(),
        "triton": triton_version is not None,
        "triton_version": triton_version,
        "torch": torch.__version__,
    }
