"""Weight and activation formats: one module per format, each the torch reference of docs/formats.md.

``FORMATS`` maps every format name used by the API, checkpoints and benchmarks to a one-line description;
:func:`check_format` validates a name against it.

Example:
    >>> from lowbit_engine import formats
    >>> formats.check_format("nvfp4")
    'nvfp4'
    >>> sorted(formats.FORMATS)[:3]
    ['fp8', 'mxfp4', 'nvfp4']
"""

from __future__ import annotations

from . import e2m1, fp8, int4, mxfp4, nvfp4, vq, w4a16

FORMATS: dict[str, str] = {
    "svdq-int4": "SVDQuant: int4 g64 weights (bf16 scales) and int4 g64 activations, smoothing, low-rank branch",
    "svdq-w4a8": "SVDQuant: int4 g64 weights and 8-bit per-token activations (int8 or fp8 e4m3), low-rank branch",
    "fp8": "fp8 e4m3 weights per output channel and fp8 e4m3 activations per token",
    "nvfp4": "E2M1 weights in groups of 16 with e4m3 block scales and an fp32 tensor scale",
    "mxfp4": "E2M1 weights in groups of 32 with power-of-two (E8M0) block scales",
    "vq2": "vector quantization: 256 centroids of 4 weights per layer (2 bits per weight)",
    "vq3": "vector quantization: 4096 centroids of 4 weights per layer (3 bits per weight)",
    "w4a16": "weight-only: uint4 weights, bf16 step and integer zero point per 64 along K, 16-bit tokens",
}


def check_format(name: str) -> str:
    """Return ``name`` if it is a known format, else raise ``ValueError`` listing the known names.

    Example:
        >>> check_format("int3")
        Traceback (most recent call last):
        ...
        ValueError: unknown format 'int3'; known formats: fp8, mxfp4, nvfp4, svdq-int4, svdq-w4a8, vq2, vq3, w4a16
    """
    if name not in FORMATS:
        raise ValueError(f"unknown format {name!r}; known formats: {', '.join(sorted(FORMATS))}")
    return name


__all__ = ["FORMATS", "check_format", "e2m1", "fp8", "int4", "mxfp4", "nvfp4", "vq", "w4a16"]
