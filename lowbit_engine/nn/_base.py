"""What every quantized linear module shares: memory accounting and the size part of its repr."""

from __future__ import annotations

from torch import nn


class QuantizedLinearBase(nn.Module):
    """Base of SVDQLinear, FP8Linear, FP4Linear and VQLinear (they set in_features, out_features, bias)."""

    in_features: int
    out_features: int

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
