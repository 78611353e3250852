"""Quantization algorithms: they turn a float weight (and calibration activations) into a format's tensors.

:func:`svdquant` is SVDQuant (smoothing, a 16-bit low-rank branch, an int4 residual) for ``svdq-int4`` and
``svdq-w4a8``; the modules in :mod:`lowbit_engine.nn` hold its results.

Example:
    >>> import torch
    >>> from lowbit_engine.quant import svdquant
    >>> res = svdquant(torch.randn(64, 128), torch.randn(16, 128), rank=4, alphas=(0.5,))
    >>> res.qweight.dtype, res.wscales.dtype
    (torch.uint8, torch.bfloat16)
"""

from __future__ import annotations

from .svdquant import (
    ALPHAS,
    NoCalibrationWarning,
    SVDQuantResult,
    fake_quantize_act,
    lowrank_residual,
    smoothing_factors,
    svdquant,
    top_r_svd,
)

__all__ = [
    "ALPHAS", "NoCalibrationWarning", "SVDQuantResult", "fake_quantize_act", "lowrank_residual",
    "smoothing_factors", "svdquant", "top_r_svd",
]
