"""Input checks every quantizer shares: one wording, one error class per fault, for every format.

The non-finite policy (docs/formats.md, "Non-finite values"): a quantizer refuses a weight or calibration
batch holding NaN or Inf (:class:`~lowbit_engine.errors.NonFiniteError`), because each format would
otherwise store it somewhere different (an fp8 weight, an nvfp4 block scale, a vq codebook) or, worse,
round it away into finite codes.

Example:
    >>> import torch
    >>> check_weight("vq_quantize", torch.tensor([[1.0, float("nan")]]))
    Traceback (most recent call last):
    ...
    lowbit_engine.errors.NonFiniteError: vq_quantize: weight has non-finite values (1 of 2 elements)
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import NonFiniteError


def _count_bad(t: Tensor) -> int:
    return int((~torch.isfinite(t)).sum())


def check_weight(who: str, weight: Tensor, what: str = "weight") -> None:
    """A float ``[N, K]`` weight (or bias, as ``[1, N]``) on a real device (not meta), finite values only."""
    if not isinstance(weight, Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        got = f"{weight.dtype} {tuple(weight.shape)}" if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"{who}: {what} must be a float 2-d tensor, got {got}")
    if weight.is_meta:
        raise ValueError(f"{who}: {what} is on the meta device (no data to quantize); load or materialize the "
                         f"layer first (e.g. model.to_empty(device=...) and load its weights)")
    bad = _count_bad(weight.detach())
    if bad:
        raise NonFiniteError(f"{who}: {what} has non-finite values ({bad} of {weight.numel()} elements)")


def check_calib(who: str, calib: Tensor, K: int) -> None:
    """Calibration activations ``[..., K]``: a tensor of the right width, at least one token, all finite."""
    if not isinstance(calib, Tensor):
        raise TypeError(f"{who}: calib must be a torch.Tensor [..., K={K}] or None, got {type(calib).__name__}")
    if calib.dim() == 0 or calib.shape[-1] != K:
        raise ValueError(f"{who}: calib must be [..., K={K}], got shape {tuple(calib.shape)}")
    if calib.numel() == 0:
        raise ValueError(f"{who}: calib has no tokens (shape {tuple(calib.shape)})")
    if not calib.is_floating_point():
        raise ValueError(f"{who}: calib must be a float tensor, got {calib.dtype}")
    bad = _count_bad(calib.detach())
    if bad:
        raise NonFiniteError(f"{who}: calib has non-finite values ({bad} of {calib.numel()} elements)")


__all__ = ["check_weight", "check_calib"]
