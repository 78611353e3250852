"""``FP8Linear``: the quantized linear layer of the ``fp8`` format (docs/formats.md, "fp8 e4m3, per row").

Weights e4m3 ``[N, K]`` with one fp32 scale per output channel; activations quantized per token to e4m3
on the fly; optional low-rank side branch ``(x @ lora_down^T) @ lora_up^T`` (rank 0 by default) and bias.
The forward is one op, ``lowbit::fp8_linear`` (:mod:`lowbit_engine.ops_float`): the Triton kernels on a
CUDA GPU with fp8 tensor cores, the torch reference elsewhere (it warns once and records ``torch``).

Example:
    >>> import torch
    >>> from lowbit_engine.nn.fp8_linear import FP8Linear
    >>> q = FP8Linear.from_linear(torch.nn.Linear(128, 64))
    >>> q(torch.randn(2, 5, 128)).shape
    torch.Size([2, 5, 64])
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .. import ops_float
from ..errors import UnknownFormatError
from ._base import QuantizedLinearBase
from ..formats import fp8

FORMAT = "fp8"
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
_CONFIG_KEYS = ("format", "version", "in_features", "out_features", "rank", "dtype", "has_bias")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


class FP8Linear(QuantizedLinearBase):
    """``fp8`` linear layer. Buffers: ``weight`` e4m3 ``[N, K]``, ``weight_scale`` fp32 ``[N]``, ``bias``
    (module dtype) or None, ``lora_down [rank, K]`` and ``lora_up [N, rank]`` (module dtype).

    Example:
        >>> FP8Linear(3072, 3072)
        FP8Linear(in_features=3072, out_features=3072, fmt=fp8, rank=0, bias=True, 9.0 MiB (bf16: 18.0 MiB))
    """

    _POSITIVE_BUFFERS = ("weight_scale",)

    FORMAT_VERSION = 1

    def __init__(self, in_features: int, out_features: int, rank: int = 0, bias: bool = True,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None):
        super().__init__()
        if in_features <= 0 or in_features % 16 != 0:
            raise ValueError(f"FP8Linear: in_features must be a positive multiple of 16, got {in_features}")
        if out_features <= 0:
            raise ValueError(f"FP8Linear: out_features must be positive, got {out_features}")
        if not 0 <= rank <= min(in_features, out_features):
            raise ValueError(f"FP8Linear: rank must be in [0, {min(in_features, out_features)}], got {rank}")
        if dtype not in _DTYPES.values():
            raise ValueError(f"FP8Linear: dtype must be bfloat16 or float16, got {dtype}")
        self.in_features, self.out_features, self.rank, self.dtype = in_features, out_features, rank, dtype
        K, N = in_features, out_features
        self.register_buffer("weight", torch.zeros(N, K, dtype=fp8.DTYPE, device=device))
        self.register_buffer("weight_scale", torch.ones(N, dtype=torch.float32, device=device))
        self.register_buffer("lora_down", torch.zeros(rank, K, dtype=dtype, device=device))
        self.register_buffer("lora_up", torch.zeros(N, rank, dtype=dtype, device=device))
        self.register_buffer("bias", torch.zeros(N, dtype=dtype, device=device) if bias else None)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, calib: Tensor | None = None, rank: int = 0, **opts: Any) -> FP8Linear:
        """Quantize ``linear.weight`` per output channel (``formats.fp8.quantize``).

        ``calib`` is not needed (the activations are quantized dynamically) and is ignored. With
        ``rank > 0`` the low-rank branch holds the top-``rank`` SVD of the weight and the fp8 weight holds
        the residual. ``opts``: ``dtype`` (default: the linear's dtype if bf16/fp16, else bf16).
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"FP8Linear.from_linear: expected an nn.Linear, got {type(linear).__name__}")
        dtype = opts.pop("dtype", None)
        if opts:
            raise TypeError(f"FP8Linear.from_linear: unknown options {sorted(opts)}")
        if dtype is None:
            dtype = linear.weight.dtype if linear.weight.dtype in _DTYPES.values() else torch.bfloat16
        mod = cls(linear.in_features, linear.out_features, rank=rank, bias=linear.bias is not None, dtype=dtype,
                  device=linear.weight.device)
        w = linear.weight.detach().float()
        if rank:
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            up = (u[:, :rank] * s[:rank]).to(dtype)
            down = vh[:rank].to(dtype)
            mod.lora_up.copy_(up)
            mod.lora_down.copy_(down)
            w = w - up.float() @ down.float()  # the residual of what the branch really computes
        q, scale = fp8.quantize(w)
        mod.weight.copy_(q)
        mod.weight_scale.copy_(scale)
        if linear.bias is not None:
            mod.bias.copy_(linear.bias.detach())
        return mod

    def config(self) -> dict[str, Any]:
        """JSON-serialisable description that :meth:`from_config` rebuilds the (empty) module from."""
        return {"format": FORMAT, "version": self.FORMAT_VERSION, "in_features": self.in_features,
                "out_features": self.out_features, "rank": self.rank, "dtype": _dtype_name(self.dtype),
                "has_bias": self.bias is not None}

    @classmethod
    def from_config(cls, cfg: dict[str, Any], device: torch.device | str | None = None) -> FP8Linear:
        missing = [k for k in _CONFIG_KEYS if k not in cfg]
        if missing:
            raise ValueError(f"FP8Linear.from_config: missing keys {missing}")
        if cfg["format"] != FORMAT:
            raise UnknownFormatError(f"FP8Linear.from_config: unknown format {cfg['format']!r}; expected 'fp8'")
        if cfg["version"] != cls.FORMAT_VERSION:
            raise ValueError(f"FP8Linear.from_config: format version {cfg['version']!r} is not supported "
                             f"(this build reads version {cls.FORMAT_VERSION})")
        if cfg["dtype"] not in _DTYPES:
            raise ValueError(f"FP8Linear.from_config: dtype must be one of {list(_DTYPES)}, got {cfg['dtype']!r}")
        return cls(int(cfg["in_features"]), int(cfg["out_features"]), rank=int(cfg["rank"]),
                   bias=bool(cfg["has_bias"]), dtype=_DTYPES[cfg["dtype"]], device=device)

    def forward(self, x: Tensor) -> Tensor:
        """``x [..., K]`` -> ``[..., N]`` in x's dtype (bf16/fp16/fp32 go straight to the op)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"FP8Linear: expected input [..., {self.in_features}], got {tuple(x.shape)}")
        in_dtype = x.dtype
        op_dtype = in_dtype if in_dtype in (torch.bfloat16, torch.float16, torch.float32) else self.dtype
        lead = x.shape[:-1]
        x2d = x.to(op_dtype).reshape(-1, self.in_features).contiguous()
        if x2d.shape[0] == 0:
            return x.new_empty(*lead, self.out_features)
        lora = (self.lora_down, self.lora_up) if self.rank else (None, None)
        out = ops_float.fp8_linear(x2d, self.weight, self.weight_scale, self.bias, *lora, out_dtype=op_dtype)
        return out.reshape(*lead, self.out_features).to(in_dtype)

    def extra_repr(self) -> str:
        return self._repr(f"fmt={FORMAT}, rank={self.rank}")
