"""``FP4Linear``: the quantized linear layer of ``nvfp4`` and ``mxfp4`` (docs/formats.md).

Weights packed E2M1 ``[N, K/2]`` with block scales (nvfp4: e4m3 per 16 + an fp32 tensor scale; mxfp4:
E8M0 per 32), plus three per-row fp32 constants prepared once (``ops_float.fp4_fp8_scales``). Activations
fp8 per token (``act="fp8"``, the W4A8 kernel) or bf16 (``act="bf16"``, the weight-only kernel for small M).
The forward is one op, ``lowbit::fp4_linear``: Triton on a CUDA GPU, the torch reference elsewhere.

Example:
    >>> import torch
    >>> from lowbit_engine.nn.fp4_linear import FP4Linear
    >>> q = FP4Linear.from_linear(torch.nn.Linear(128, 64), fmt="mxfp4", act="bf16")
    >>> q(torch.randn(3, 128)).shape
    torch.Size([3, 64])
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .. import ops_float
from ..errors import UnknownFormatError
from ._base import QuantizedLinearBase
from ..formats import fp8, mxfp4, nvfp4

GROUPS = {"nvfp4": nvfp4.GROUP_SIZE, "mxfp4": mxfp4.GROUP_SIZE}
ACTS = ("fp8", "bf16")
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
_CONFIG_KEYS = ("format", "version", "in_features", "out_features", "group_size", "act_mode", "dtype", "has_bias")


class FP4Linear(QuantizedLinearBase):
    """``nvfp4`` / ``mxfp4`` linear layer. Buffers: ``qweight uint8 [N, K/2]``, ``block_scales`` (e4m3
    ``[N, K/16]`` or uint8 ``[N, K/32]``), ``tensor_scale`` fp32 ``[]`` (1 for mxfp4), ``w_inv``,
    ``w_scale_fp8``, ``w_scale_bf16`` fp32 ``[N]``, ``bias`` or None.

    Example:
        >>> FP4Linear(3072, 3072, fmt="nvfp4")
        FP4Linear(in_features=3072, out_features=3072, fmt=nvfp4, act=fp8, bias=True, 5.1 MiB (bf16: 18.0 MiB))
    """

    _POSITIVE_BUFFERS = ("tensor_scale",)

    @torch.no_grad()
    def check_buffers(self) -> None:
        """ValueError unless the buffers are a valid layer: finite floats (the base check; for nvfp4 that
        includes the e4m3 block scales), block scales >= 0, and for mxfp4 no E8M0 NaN code (255)."""
        super().check_buffers()
        if self.fmt == "mxfp4":
            if bool((self.block_scales == 255).any()):
                raise ValueError("FP4Linear: mxfp4 block_scales hold the E8M0 NaN code 255")
        elif bool((self.block_scales.float() < 0).any()):
            raise ValueError("FP4Linear: nvfp4 block_scales must be >= 0")

    FORMAT_VERSION = 1

    def __init__(self, in_features: int, out_features: int, fmt: str = "nvfp4", act: str = "fp8",
                 bias: bool = True, dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None):
        super().__init__()
        if fmt not in GROUPS:
            raise UnknownFormatError(f"FP4Linear: unknown format {fmt!r}; FP4Linear holds {', '.join(GROUPS)}")
        if act not in ACTS:
            raise ValueError(f"FP4Linear: act must be one of {ACTS}, got {act!r}")
        g = GROUPS[fmt]
        if in_features <= 0 or in_features % g != 0:
            raise ValueError(f"FP4Linear: in_features must be a positive multiple of {g} for {fmt}, got {in_features}")
        if out_features <= 0:
            raise ValueError(f"FP4Linear: out_features must be positive, got {out_features}")
        if dtype not in _DTYPES.values():
            raise ValueError(f"FP4Linear: dtype must be bfloat16 or float16, got {dtype}")
        self.in_features, self.out_features, self.fmt, self.act, self.dtype = in_features, out_features, fmt, act, dtype
        K, N = in_features, out_features
        bs_dtype = fp8.DTYPE if fmt == "nvfp4" else torch.uint8
        self.register_buffer("qweight", torch.zeros(N, K // 2, dtype=torch.uint8, device=device))
        self.register_buffer("block_scales", torch.zeros(N, K // g, dtype=bs_dtype, device=device))
        self.register_buffer("tensor_scale", torch.ones((), dtype=torch.float32, device=device))
        for name in ("w_inv", "w_scale_fp8", "w_scale_bf16"):
            self.register_buffer(name, torch.ones(N, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(N, dtype=dtype, device=device) if bias else None)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, calib: Tensor | None = None, rank: int = 0, **opts: Any) -> FP4Linear:
        """Quantize ``linear.weight`` with ``formats.nvfp4`` / ``formats.mxfp4``. ``opts``: ``fmt``
        ("nvfp4" default or "mxfp4"), ``act`` ("fp8" default or "bf16"), ``dtype``. ``calib`` is not used;
        ``rank`` must be 0 (FP4Linear has no low-rank branch yet)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"FP4Linear.from_linear: expected an nn.Linear, got {type(linear).__name__}")
        if rank:
            raise ValueError(f"FP4Linear.from_linear: rank must be 0 (no low-rank branch), got {rank}")
        fmt, act, dtype = opts.pop("fmt", "nvfp4"), opts.pop("act", "fp8"), opts.pop("dtype", None)
        if opts:
            raise TypeError(f"FP4Linear.from_linear: unknown options {sorted(opts)}")
        if dtype is None:
            dtype = linear.weight.dtype if linear.weight.dtype in _DTYPES.values() else torch.bfloat16
        mod = cls(linear.in_features, linear.out_features, fmt=fmt, act=act, bias=linear.bias is not None,
                  dtype=dtype, device=linear.weight.device)
        w = linear.weight.detach().float()
        if fmt == "nvfp4":
            packed, bs, ts = nvfp4.quantize(w)
        else:
            (packed, bs), ts = mxfp4.quantize(w), torch.ones((), device=w.device)
        mod.qweight.copy_(packed)
        mod.block_scales.copy_(bs)
        mod.tensor_scale.copy_(ts)
        mod.refresh_scales()
        if linear.bias is not None:
            mod.bias.copy_(linear.bias.detach())
        return mod

    @torch.no_grad()
    def refresh_scales(self) -> None:
        """Recompute ``w_inv`` / ``w_scale_fp8`` / ``w_scale_bf16`` from the weight buffers."""
        ts = self.tensor_scale if self.fmt == "nvfp4" else None
        for buf, val in zip((self.w_inv, self.w_scale_fp8, self.w_scale_bf16),
                            ops_float.fp4_fp8_scales(self.fmt, self.qweight, self.block_scales, ts)):
            buf.copy_(val)

    def config(self) -> dict[str, Any]:
        return {"format": self.fmt, "version": self.FORMAT_VERSION, "in_features": self.in_features,
                "out_features": self.out_features, "group_size": GROUPS[self.fmt], "act_mode": self.act,
                "dtype": str(self.dtype).replace("torch.", ""), "has_bias": self.bias is not None}

    @classmethod
    def from_config(cls, cfg: dict[str, Any], device: torch.device | str | None = None) -> FP4Linear:
        missing = [k for k in _CONFIG_KEYS if k not in cfg]
        if missing:
            raise ValueError(f"FP4Linear.from_config: missing keys {missing}")
        if cfg["format"] not in GROUPS:
            raise UnknownFormatError(f"FP4Linear.from_config: unknown format {cfg['format']!r}; "
                                     f"expected one of {list(GROUPS)}")
        if cfg["version"] != cls.FORMAT_VERSION:
            raise ValueError(f"FP4Linear.from_config: format version {cfg['version']!r} is not supported "
                             f"(this build reads version {cls.FORMAT_VERSION})")
        if cfg["group_size"] != GROUPS[cfg["format"]]:
            raise ValueError(f"FP4Linear.from_config: group_size of {cfg['format']} is {GROUPS[cfg['format']]}, "
                             f"got {cfg['group_size']!r}")
        if cfg["dtype"] not in _DTYPES:
            raise ValueError(f"FP4Linear.from_config: dtype must be one of {list(_DTYPES)}, got {cfg['dtype']!r}")
        return cls(int(cfg["in_features"]), int(cfg["out_features"]), fmt=cfg["format"], act=cfg["act_mode"],
                   bias=bool(cfg["has_bias"]), dtype=_DTYPES[cfg["dtype"]], device=device)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"FP4Linear: expected input [..., {self.in_features}], got {tuple(x.shape)}")
        in_dtype = x.dtype
        op_dtype = in_dtype if in_dtype in (torch.bfloat16, torch.float16, torch.float32) else self.dtype
        lead = x.shape[:-1]
        x2d = x.to(op_dtype).reshape(-1, self.in_features).contiguous()
        if x2d.shape[0] == 0:
            return x.new_empty(*lead, self.out_features)
        out = ops_float.fp4_linear(x2d, self.qweight, self.block_scales, self.w_inv, self.w_scale_fp8,
                                   self.w_scale_bf16, self.bias, fmt=self.fmt, act=self.act, out_dtype=op_dtype)
        return out.reshape(*lead, self.out_features).to(in_dtype)

    def extra_repr(self) -> str:
        return self._repr(f"fmt={self.fmt}, act={self.act}")
