"""What every quantized linear module shares: memory accounting and the size part of its repr."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import NonFiniteError


class QuantizedLinearBase(nn.Module):
    """Base of SVDQLinear, FP8Linear, FP4Linear and VQLinear (they set in_features, out_features, bias)."""

    in_features: int
    out_features: int

    # Buffers that divide or scale: they must be finite and > 0 (subclasses name theirs).
    _POSITIVE_BUFFERS: tuple[str, ...] = ()

    @torch.no_grad()
    def check_buffers(self) -> None:
        """ValueError unless the buffers hold a valid layer of this format; checkpoints run it after loading.

        Here: every float buffer (fp8 included) is finite, and the scale buffers of ``_POSITIVE_BUFFERS`` are
        > 0. Subclasses add their format's own rules (index ranges, layout ranges) and call this.

        Example:
            >>> from lowbit_engine.nn import FP8Linear
            >>> m = FP8Linear(64, 8)
            >>> m.weight_scale[3] = float("nan")
            >>> m.check_buffers()
            Traceback (most recent call last):
            ...
            lowbit_engine.errors.NonFiniteError: FP8Linear: buffer 'weight_scale' has 1 non-finite value(s)
        """
        cls = type(self).__name__
        for name, b in self.named_buffers(recurse=False):
            if b is None or not b.is_floating_point() or b.numel() == 0:
                continue
            bad = int((~torch.isfinite(b.float())).sum())
            if bad:
                raise NonFiniteError(f"{cls}: buffer {name!r} has {bad} non-finite value(s)")
            if name in self._POSITIVE_BUFFERS and not bool((b.float() > 0).all()):
                raise ValueError(f"{cls}: buffer {name!r} must be > 0 everywhere (a scale), got min "
                                 f"{float(b.float().min())}")

    @property
    def nbytes(self) -> int:
        """Bytes of all the buffers (what the layer costs in memory and in a checkpoint)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    @property
    def dense_nbytes(self) -> int:
        """Bytes of the bf16 ``nn.Linear`` this layer replaces (weight and bias), for comparison."""
        return 2 * (self.out_features * self.in_features + (self.out_features if self.bias is not None else 0))

    def _repr(self, details: str) -> str:
        """``extra_repr`` text: the shape, the format ``details``, the bias and the size against bf16."""
        mib = 2.0**20
        return (f"in_features={self.in_features}, out_features={self.out_features}, {details}, "
                f"bias={self.bias is not None}, {self.nbytes / mib:.1f} MiB (bf16: {self.dense_nbytes / mib:.1f} MiB)")
