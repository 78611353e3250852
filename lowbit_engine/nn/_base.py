"""What every quantized linear module shares: casts that keep the quantized buffers, memory accounting and the
size part of its repr."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..errors import NonFiniteError

# The float dtypes the ops take for a module's compute parts (bias, low-rank factors): a cast to one of
# these moves them; any other target (fp32, fp8, ...) leaves them as they are.
COMPUTE_DTYPES = (torch.bfloat16, torch.float16)


class QuantizedLinearBase(nn.Module):
    """Base of SVDQLinear, FP8Linear, FP4Linear and VQLinear (they set in_features, out_features, bias)."""

    in_features: int
    out_features: int
    dtype: torch.dtype
    # Buffers in the module dtype that the ops take in bf16 or fp16: the ones a dtype cast may move.
    COMPUTE_BUFFERS: tuple[str, ...] = ("bias", "lora_down", "lora_up")

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> nn.Module:
        """``nn.Module._apply`` (behind ``.to``, ``.half``, ``.cuda``, ``to_empty``, ...) that never changes the
        dtype of a quantized buffer.

        A dtype cast by ``fn`` is found on an empty probe of each buffer; a buffer whose dtype it would
        change is moved to the probe's device only, except the compute parts (``COMPUTE_BUFFERS``) when the
        new dtype is bf16 or fp16: those are cast, and ``self.dtype`` follows. So ``pipe.to(torch.float16)``
        runs the layer with fp16 factors and bias, and ``pipe.to(torch.float32)`` keeps them as they were
        (the forward casts fp32 inputs to the module dtype and the output back). Buffers fn leaves in their
        dtype (device moves, ``share_memory_``, ``to_empty``) go through fn as usual.

        Example:
            >>> from lowbit_engine.nn import SVDQLinear
            >>> m = SVDQLinear(64, 32, rank=8).to(torch.float16)
            >>> m.dtype, m.lora_up.dtype, m.smooth.dtype, m.wscales.dtype
            (torch.float16, torch.float16, torch.float32, torch.bfloat16)
            >>> m.to(torch.float32).lora_up.dtype
            torch.float16
        """
        moved: dict[str, Tensor] = {}
        new_dtype = None
        for name, buf in self._buffers.items():
            if buf is None:
                continue
            probe = fn(buf.new_empty(0))
            if probe.dtype == buf.dtype:
                continue
            if name in self.COMPUTE_BUFFERS and probe.dtype in COMPUTE_DTYPES:
                moved[name] = buf.to(device=probe.device, dtype=probe.dtype)
                new_dtype = probe.dtype
            else:
                moved[name] = buf.to(device=probe.device)
        for name in moved:
            self._buffers[name] = None  # nn.Module._apply skips None buffers; these are done
        super()._apply(fn, recurse)
        self._buffers.update(moved)
        if new_dtype is not None:
            self.dtype = new_dtype
        return self

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
