"""``SVDQLinear``: the quantized linear layer of ``svdq-int4`` and ``svdq-w4a8``.

The forward pass is two ops (docs/formats.md):

1. ``ops.quantize_act(x, smooth, lora_down, act_mode)``: ``x / smooth`` quantized per token (int4 group 64,
   int8 or fp8) and, fused, ``lora_act = x @ lora_down^T`` on the raw x;
2. ``ops.gemm_w4a4`` / ``ops.gemm_w4a8``: the int4 residual GEMM plus ``lora_act @ lora_up^T`` plus bias.

All tensors are buffers prepared once (by :meth:`SVDQLinear.from_linear` or a checkpoint); nothing is
re-packed or synchronised per call.

Example:
    >>> import torch
    >>> from lowbit_engine.nn import SVDQLinear
    >>> lin = torch.nn.Linear(128, 64).to(torch.bfloat16)
    >>> calib = torch.randn(32, 128, dtype=torch.bfloat16)
    >>> q = SVDQLinear.from_linear(lin, calib, rank=8, alphas=(0.5,))
    >>> q(torch.randn(2, 5, 128, dtype=torch.bfloat16)).shape
    torch.Size([2, 5, 64])
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .. import ops
from ..errors import UnknownFormatError
from ._base import QuantizedLinearBase
from ..formats import int4
from ..quant.svdquant import SVDQuantResult, svdquant

GROUP = int4.GROUP_SIZE
# format -> the activation modes its GEMM takes; the first is the default.
ACT_MODES: dict[str, tuple[str, ...]] = {"svdq-int4": ("int4",), "svdq-w4a8": ("int8", "fp8")}
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
_CONFIG_KEYS = ("format", "version", "in_features", "out_features", "rank", "group_size", "act_mode", "dtype",
                "has_bias")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


class SVDQLinear(QuantizedLinearBase):
    """A linear layer quantized with SVDQuant: int4 residual weights, 4- or 8-bit activations, and a
    16-bit low-rank branch that carries the weights' outliers.

    Buffers (all in ``state_dict()``): ``qweight`` uint8 ``[N, K/2]``, ``wscales`` bf16 ``[N, K/64]``,
    ``smooth`` fp32 ``[K]``, ``lora_down`` ``[R, K]`` and ``lora_up`` ``[N, R]`` in ``dtype``, ``bias``
    ``[N]`` in ``dtype`` or None.

    Args:
        in_features: K, a multiple of 64.
        out_features: N.
        rank: R, the rank of the low-rank branch (0 for none).
        fmt: "svdq-int4" (int4 activations) or "svdq-w4a8" (8-bit activations).
        act_mode: "int4" for svdq-int4; "int8" (default) or "fp8" for svdq-w4a8.
        bias: whether the layer has a bias.
        dtype: bf16 or fp16, the dtype of the low-rank factors and the bias, and of the input the
            quantizer sees (other inputs are cast to it).

    Example:
        >>> m = SVDQLinear(3072, 3072)
        >>> m
        SVDQLinear(in_features=3072, out_features=3072, fmt=svdq-int4, act=int4, rank=32, bias=True, 5.2 MiB (bf16: 18.0 MiB))
    """

    FORMAT_VERSION = 1

    def __init__(self, in_features: int, out_features: int, rank: int = 32, fmt: str = "svdq-int4",
                 act_mode: str | None = None, bias: bool = True, dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str | None = None):
        super().__init__()
        if fmt not in ACT_MODES:
            raise UnknownFormatError(f"SVDQLinear: unknown format {fmt!r}; SVDQLinear holds {', '.join(ACT_MODES)}")
        act_mode = ACT_MODES[fmt][0] if act_mode is None else act_mode
        if act_mode not in ACT_MODES[fmt]:
            raise ValueError(f"SVDQLinear: act_mode {act_mode!r} does not go with {fmt}; "
                             f"expected one of {ACT_MODES[fmt]}")
        if in_features <= 0 or in_features % GROUP != 0:
            raise ValueError(f"SVDQLinear: in_features must be a positive multiple of {GROUP}, got {in_features}")
        if out_features <= 0:
            raise ValueError(f"SVDQLinear: out_features must be positive, got {out_features}")
        if not 0 <= rank <= min(in_features, out_features):
            raise ValueError(f"SVDQLinear: rank must be in [0, {min(in_features, out_features)}], got {rank}")
        if dtype not in _DTYPES.values():
            raise ValueError(f"SVDQLinear: dtype must be bfloat16 or float16, got {dtype}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.fmt, self.act_mode, self.dtype = fmt, act_mode, dtype
        # How the calibration went (set by from_linear; not part of the checkpoint).
        self.alpha: float | None = None
        self.calib_error: float | None = None

        K, N = in_features, out_features
        self.register_buffer("qweight", torch.zeros(N, K // 2, dtype=torch.uint8, device=device))
        self.register_buffer("wscales", torch.zeros(N, K // GROUP, dtype=torch.bfloat16, device=device))
        self.register_buffer("smooth", torch.ones(K, dtype=torch.float32, device=device))
        self.register_buffer("lora_down", torch.zeros(rank, K, dtype=dtype, device=device))
        self.register_buffer("lora_up", torch.zeros(N, rank, dtype=dtype, device=device))
        self.register_buffer("bias", torch.zeros(N, dtype=dtype, device=device) if bias else None)

    # ---- construction ---------------------------------------------------------------------------

    @classmethod
    def from_linear(cls, linear: nn.Linear, calib: Tensor | None = None, rank: int = 32,
                    fmt: str = "svdq-int4", **opts: Any) -> SVDQLinear:
        """Quantize ``linear`` with SVDQuant (:func:`lowbit_engine.quant.svdquant`).

        ``calib`` holds activations at the layer's input, ``[..., K]``. ``opts``: ``act_mode``, ``dtype``
        (default: the linear's dtype if bf16/fp16, else bf16) and the options of ``svdquant``
        (``alphas``, ``smoothing``, ``refine_iters``, ``max_eval_tokens``, ``seed``).

        Example:
            >>> lin = torch.nn.Linear(128, 32)
            >>> q = SVDQLinear.from_linear(lin, torch.randn(16, 128), rank=4, fmt="svdq-w4a8", act_mode="fp8")
            >>> q.act_mode, q.lora_up.shape
            ('fp8', torch.Size([32, 4]))
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"SVDQLinear.from_linear: expected an nn.Linear, got {type(linear).__name__}")
        act_mode = opts.pop("act_mode", None)
        dtype = opts.pop("dtype", None)
        if dtype is None:
            dtype = linear.weight.dtype if linear.weight.dtype in _DTYPES.values() else torch.bfloat16
        mod = cls(linear.in_features, linear.out_features, rank=rank, fmt=fmt, act_mode=act_mode,
                  bias=linear.bias is not None, dtype=dtype, device=linear.weight.device)
        res = svdquant(linear.weight, calib, rank=rank, act_mode=mod.act_mode, dtype=dtype, **opts)
        mod.load_result(res, None if linear.bias is None else linear.bias.detach())
        return mod

    @torch.no_grad()
    def load_result(self, res: SVDQuantResult, bias: Tensor | None = None) -> None:
        """Copy an :class:`SVDQuantResult` (and the float bias) into the buffers."""
        if res.rank != self.rank or res.act_mode != self.act_mode:
            raise ValueError(f"SVDQLinear.load_result: result has rank {res.rank}, act {res.act_mode}; "
                             f"the module rank {self.rank}, act {self.act_mode}")
        for name in ("qweight", "wscales", "smooth", "lora_down", "lora_up"):
            getattr(self, name).copy_(getattr(res, name))
        if (bias is None) != (self.bias is None):
            raise ValueError("SVDQLinear.load_result: bias given for a module without one, or missing")
        if bias is not None:
            self.bias.copy_(bias)
        self.alpha, self.calib_error = res.alpha, res.calib_error

    # ---- config (checkpoint metadata) -------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        """The JSON-serialisable description that :meth:`from_config` rebuilds the (empty) module from.

        Example:
            >>> SVDQLinear(128, 64, rank=8).config()["dtype"]
            'bfloat16'
        """
        return {
            "format": self.fmt, "version": self.FORMAT_VERSION, "in_features": self.in_features,
            "out_features": self.out_features, "rank": self.rank, "group_size": GROUP,
            "act_mode": self.act_mode, "dtype": _dtype_name(self.dtype), "has_bias": self.bias is not None,
        }

    @classmethod
    def from_config(cls, cfg: dict[str, Any], device: torch.device | str | None = None) -> SVDQLinear:
        """An empty module with the shapes of ``cfg`` (from :meth:`config`); load a state dict into it.

        Raises ValueError on missing keys, an unknown format, version, group size or dtype.

        Example:
            >>> m = SVDQLinear(128, 64, rank=8, fmt="svdq-w4a8")
            >>> SVDQLinear.from_config(m.config()).config() == m.config()
            True
        """
        missing = [k for k in _CONFIG_KEYS if k not in cfg]
        if missing:
            raise ValueError(f"SVDQLinear.from_config: missing keys {missing}")
        if cfg["format"] not in ACT_MODES:
            raise UnknownFormatError(f"SVDQLinear.from_config: unknown format {cfg['format']!r}; "
                                     f"expected one of {list(ACT_MODES)}")
        if cfg["version"] != cls.FORMAT_VERSION:
            raise ValueError(f"SVDQLinear.from_config: format version {cfg['version']!r} is not supported "
                             f"(this build reads version {cls.FORMAT_VERSION})")
        if cfg["group_size"] != GROUP:
            raise ValueError(f"SVDQLinear.from_config: group_size must be {GROUP}, got {cfg['group_size']!r}")
        if cfg["dtype"] not in _DTYPES:
            raise ValueError(f"SVDQLinear.from_config: dtype must be one of {list(_DTYPES)}, got {cfg['dtype']!r}")
        return cls(int(cfg["in_features"]), int(cfg["out_features"]), rank=int(cfg["rank"]), fmt=cfg["format"],
                   act_mode=cfg["act_mode"], bias=bool(cfg["has_bias"]), dtype=_DTYPES[cfg["dtype"]],
                   device=device)

    # ---- forward ---------------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        """``x [..., K]`` -> ``[..., N]`` in x's dtype.

        The quantizer needs x in the module dtype (``lora_down`` has that dtype), so any other float input
        is cast to it on the way in; the GEMM writes the output directly in x's dtype when it can
        (bf16, fp16, fp32), else the result is cast back.
        """
        if x.shape[-1] != self.in_features:
            raise ValueError(f"SVDQLinear: expected input [..., {self.in_features}], got {tuple(x.shape)}")
        in_dtype = x.dtype
        out_dtype = in_dtype if in_dtype in (torch.bfloat16, torch.float16, torch.float32) else self.dtype
        lead = x.shape[:-1]
        x2d = x.to(self.dtype).reshape(-1, self.in_features).contiguous()
        if x2d.shape[0] == 0:  # the ops need M >= 1; an empty batch is a shape question, no kernel
            return x.new_empty(*lead, self.out_features)
        lora_down = self.lora_down if self.rank else None
        act, act_scales, lora_act = ops.quantize_act(x2d, self.smooth, lora_down, self.act_mode)
        gemm = ops.gemm_w4a4 if self.act_mode == "int4" else ops.gemm_w4a8
        out = gemm(act, act_scales, self.qweight, self.wscales,
                   lora_act if self.rank else None, self.lora_up if self.rank else None, self.bias, out_dtype)
        return out.reshape(*lead, self.out_features).to(in_dtype)

    # ---- size and repr ---------------------------------------------------------------------------

    def extra_repr(self) -> str:
        return self._repr(f"fmt={self.fmt}, act={self.act_mode}, rank={self.rank}")
