"""``W4A16Linear``: the weight-only 4-bit linear layer of the ``w4a16`` format (docs/formats.md).

For layers that run on very few tokens, where the time is the weight read and activation quantization
would buy nothing: the adaLN modulation linears of FLUX, SD3, PixArt, SANA and Wan (one token per image,
the time embedding) and ``norm_out``. Weights asymmetric uint4, a bf16 step and an integer zero point per
group of 64 (:mod:`lowbit_engine.formats.w4a16`); tokens stay 16-bit. The forward is one op,
``lowbit::w4a16_linear``: the split-K Triton GEMV on a CUDA GPU, the C++ reference on the CPU.

LoRA: :mod:`lowbit_engine.lora` treats this layer like a bf16 ``nn.Linear``: a side branch in a forward
hook over non-persistent buffers; the 4-bit weights are never written.

Example:
    >>> import torch
    >>> from lowbit_engine.nn.w4a16_linear import W4A16Linear
    >>> lin = torch.nn.Linear(128, 64).to(torch.bfloat16)
    >>> q = W4A16Linear.from_linear(lin)
    >>> q(torch.randn(2, 128, dtype=torch.bfloat16)).shape
    torch.Size([2, 64])
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .. import ops_w4a16
from ..errors import UnknownFormatError
from ..formats import w4a16
from ._base import QuantizedLinearBase

FORMAT = "w4a16"
GROUP = w4a16.GROUP_SIZE
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
_CONFIG_KEYS = ("format", "version", "in_features", "out_features", "group_size", "dtype", "has_bias")


class W4A16Linear(QuantizedLinearBase):
    """Weight-only 4-bit linear. Buffers: ``qweight uint8 [N, K/2]``, ``scales bf16 [N, K/64]``,
    ``zeros uint8 [N, K/64]``, ``bias [N]`` in ``dtype`` or None.

    Args:
        in_features: K, a positive multiple of 64.
        out_features: N.
        bias: whether the layer has a bias.
        dtype: bf16 or fp16: the dtype of the bias and of the tokens the op sees (other inputs are cast).

    Example:
        >>> W4A16Linear(3072, 18432)
        W4A16Linear(in_features=3072, out_features=18432, fmt=w4a16, group=64, bias=True, 29.6 MiB (bf16: 108.0 MiB))
    """

    FORMAT_VERSION = 1

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str | None = None):
        super().__init__()
        if in_features <= 0 or in_features % GROUP:
            raise ValueError(f"W4A16Linear: in_features must be a positive multiple of {GROUP}, got {in_features}")
        if out_features <= 0:
            raise ValueError(f"W4A16Linear: out_features must be positive, got {out_features}")
        if dtype not in _DTYPES.values():
            raise ValueError(f"W4A16Linear: dtype must be bfloat16 or float16, got {dtype}")
        self.in_features, self.out_features, self.dtype, self.fmt = in_features, out_features, dtype, FORMAT
        K, N = in_features, out_features
        self.register_buffer("qweight", torch.zeros(N, K // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(N, K // GROUP, dtype=torch.bfloat16, device=device))
        self.register_buffer("zeros", torch.zeros(N, K // GROUP, dtype=torch.uint8, device=device))
        self.register_buffer("bias", torch.zeros(N, dtype=dtype, device=device) if bias else None)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, calib: Tensor | None = None, rank: int = 0, **opts: Any) -> W4A16Linear:
        """Quantize ``linear.weight`` with :func:`lowbit_engine.formats.w4a16.quantize` on its device.
        ``opts``: ``dtype`` (default: the linear's if bf16/fp16, else bf16), ``search`` (default True).
        ``calib`` is not used (weight-only, no smoothing); ``rank`` must be 0 (no low-rank branch)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"W4A16Linear.from_linear: expected an nn.Linear, got {type(linear).__name__}")
        if rank:
            raise ValueError(f"W4A16Linear.from_linear: rank must be 0 (no low-rank branch), got {rank}")
        dtype, search = opts.pop("dtype", None), opts.pop("search", True)
        if opts:
            raise TypeError(f"W4A16Linear.from_linear: unknown options {sorted(opts)}")
        if dtype is None:
            dtype = linear.weight.dtype if linear.weight.dtype in _DTYPES.values() else torch.bfloat16
        mod = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, dtype=dtype,
                  device=linear.weight.device)
        q, s, z = w4a16.quantize(linear.weight, search=search)
        mod.qweight.copy_(w4a16.pack(q))
        mod.scales.copy_(s)
        mod.zeros.copy_(z)
        if linear.bias is not None:
            mod.bias.copy_(linear.bias.detach())
        return mod

    def config(self) -> dict[str, Any]:
        """JSON-serialisable description that :meth:`from_config` rebuilds the (empty) module from."""
        return {"format": FORMAT, "version": self.FORMAT_VERSION, "in_features": self.in_features,
                "out_features": self.out_features, "group_size": GROUP,
                "dtype": str(self.dtype).replace("torch.", ""), "has_bias": self.bias is not None}

    @classmethod
    def from_config(cls, cfg: dict[str, Any], device: torch.device | str | None = None) -> W4A16Linear:
        """An empty module with the shapes of ``cfg``. ValueError on missing keys, another format, version,
        group size or dtype.

        Example:
            >>> m = W4A16Linear(128, 64)
            >>> W4A16Linear.from_config(m.config()).config() == m.config()
            True
        """
        missing = [k for k in _CONFIG_KEYS if k not in cfg]
        if missing:
            raise ValueError(f"W4A16Linear.from_config: missing keys {missing}")
        if cfg["format"] != FORMAT:
            raise UnknownFormatError(f"W4A16Linear.from_config: format must be {FORMAT!r}, got {cfg['format']!r}")
        if cfg["version"] != cls.FORMAT_VERSION:
            raise ValueError(f"W4A16Linear.from_config: format version {cfg['version']!r} is not supported "
                             f"(this build reads version {cls.FORMAT_VERSION})")
        if cfg["group_size"] != GROUP:
            raise ValueError(f"W4A16Linear.from_config: group_size must be {GROUP}, got {cfg['group_size']!r}")
        if cfg["dtype"] not in _DTYPES:
            raise ValueError(f"W4A16Linear.from_config: dtype must be one of {list(_DTYPES)}, got {cfg['dtype']!r}")
        return cls(int(cfg["in_features"]), int(cfg["out_features"]), bias=bool(cfg["has_bias"]),
                   dtype=_DTYPES[cfg["dtype"]], device=device)

    def check_buffers(self) -> None:
        """ValueError unless the buffers hold a valid w4a16 weight (zero points <= 15, finite positive
        steps). Call it after loading a checkpoint from an untrusted source (``load_checkpoint`` checks
        shapes, dtypes and checksums, not the values)."""
        w4a16.check(self.qweight, self.scales, self.zeros)

    def dequantize(self) -> Tensor:
        """The fp32 ``[N, K]`` weight this layer multiplies by (exact)."""
        return w4a16.dequantize(self.qweight, self.scales, self.zeros)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"W4A16Linear: expected input [..., {self.in_features}], got {tuple(x.shape)}")
        in_dtype = x.dtype
        out_dtype = in_dtype if in_dtype in (torch.bfloat16, torch.float16, torch.float32) else self.dtype
        lead = x.shape[:-1]
        x2d = x.to(self.dtype).reshape(-1, self.in_features).contiguous()
        if x2d.shape[0] == 0:
            return x.new_empty(*lead, self.out_features)
        out = ops_w4a16.w4a16_linear(x2d, self.qweight, self.scales, self.zeros, self.bias, out_dtype)
        return out.reshape(*lead, self.out_features).to(in_dtype)

    def extra_repr(self) -> str:
        return self._repr(f"fmt={FORMAT}, group={GROUP}")
