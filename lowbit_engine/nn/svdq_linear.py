"""``SVDQLinear``: the quantized linear layer of ``svdq-int4`` and ``svdq-w4a8``.

The forward pass is two ops (docs/formats.md):

1. ``ops.quantize_act(x, smooth, lora_down, act_mode)``: ``x / smooth`` quantized per token (int4 group 64,
   int8 or fp8) and, fused, ``lora_act = x @ lora_down^T`` on the raw x;
2. the GEMM of the weight layout: ``ops.gemm_w4a4`` / ``ops.gemm_w4a8`` (``g64``: int4 with a bf16 scale per
   64, promoted every group) or ``ops_w4a8.gemm_w4a8_f8l`` / ``gemm_w4a8_i8q`` (the promotion-free layouts
   of the 8-bit GEMM), plus ``lora_act @ lora_up^T`` plus bias.

Which layout and which tokens (docs/usage.md, "Weight layouts"): ``weight_layout="auto"`` (the default of
:meth:`SVDQLinear.from_linear`) gives ``i8q`` with int8 tokens for ``svdq-w4a8``; for ``svdq-int4`` it keeps
W4A4 (``g64``, int4 tokens) except on GPUs without 4-bit tensor cores (Hopper and later), where the 4-bit
tokens would save nothing (the MMAs are 8-bit either way) and it runs ``i8q`` with int8 tokens. An
explicit ``act_mode`` picks the layout made for it (int4 -> g64, int8 -> i8q, fp8 -> f8l); an explicit
``weight_layout`` wins over both.

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

import math
from typing import Any

import torch
from torch import Tensor, nn

from .. import ops, ops_w4a8
from ..errors import UnknownFormatError
from ._base import QuantizedLinearBase
from ..formats import int4, w4_layouts
from ..quant.svdquant import SVDQuantResult, svdquant

GROUP = int4.GROUP_SIZE
# (format, weight layout) -> the activation modes its GEMM takes; the first is the default.
ACT_MODES: dict[str, tuple[str, ...]] = {"svdq-int4": ("int4",), "svdq-w4a8": ("int8", "fp8")}
LAYOUT_ACTS: dict[tuple[str, str], tuple[str, ...]] = {
    ("svdq-int4", "g64"): ("int4",), ("svdq-int4", "i8q"): ("int8",), ("svdq-int4", "f8l"): ("fp8",),
    ("svdq-w4a8", "g64"): ("int8", "fp8"), ("svdq-w4a8", "i8q"): ("int8",), ("svdq-w4a8", "f8l"): ("fp8",),
}
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
_CONFIG_KEYS = ("format", "version", "in_features", "out_features", "rank", "group_size", "act_mode", "dtype",
                "has_bias")


def has_int4_tensor_cores(device: torch.device | str | None) -> bool:
    """Whether ``device`` is a CUDA GPU with 4-bit integer tensor cores (Turing to Ada, sm_75..sm_89).

    Hopper (sm_90) and later have none (int4 ``mma.sync`` is emulated there, 13x slower than bf16). A CPU
    (or no device) answers True: the format's own semantics run there (the references).
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type != "cuda" or not torch.cuda.is_available():
        return True
    return torch.cuda.get_device_capability(dev) < (9, 0)


def resolve_layout(fmt: str, act_mode: str | None, weight_layout: str = "auto",
                   device: torch.device | str | None = None) -> tuple[str, str]:
    """``(weight_layout, act_mode)`` for a layer of ``fmt``: the rules of the module docstring.

    Raises ValueError for a combination no GEMM takes (e.g. f8l weights with int8 tokens).

    Example:
        >>> resolve_layout("svdq-w4a8", None)
        ('i8q', 'int8')
        >>> resolve_layout("svdq-w4a8", "fp8")
        ('f8l', 'fp8')
        >>> resolve_layout("svdq-int4", None, device="cpu")
        ('g64', 'int4')
    """
    if fmt not in ACT_MODES:
        raise UnknownFormatError(f"SVDQLinear: unknown format {fmt!r}; SVDQLinear holds {', '.join(ACT_MODES)}")
    if weight_layout == "auto":
        if act_mode is not None:
            if fmt == "svdq-int4" and act_mode != "int4":
                raise ValueError(f"SVDQLinear: act_mode {act_mode!r} does not go with {fmt} (W4A4: int4 tokens; "
                                 f"8-bit tokens are svdq-w4a8, or svdq-int4 with weight_layout 'i8q'/'f8l')")
            weight_layout = w4_layouts.FOR_ACT.get(act_mode, "g64")
        elif fmt == "svdq-w4a8" or not has_int4_tensor_cores(device):
            weight_layout = "i8q"
        else:
            weight_layout = "g64"
    w4_layouts.check_layout(weight_layout)
    allowed = LAYOUT_ACTS[(fmt, weight_layout)]
    act_mode = allowed[0] if act_mode is None else act_mode
    if act_mode not in allowed:
        raise ValueError(f"SVDQLinear: act_mode {act_mode!r} does not go with {fmt} in weight layout "
                         f"{weight_layout!r}; expected one of {allowed}")
    return weight_layout, act_mode


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


class SVDQLinear(QuantizedLinearBase):
    """A linear layer quantized with SVDQuant: int4 residual weights, 4- or 8-bit activations, and a
    16-bit low-rank branch that carries the weights' outliers.

    Buffers (all in ``state_dict()``): the weight layout's (``qweight`` uint8 ``[N, K/2]``, ``wscales``
    ``[N, K/64]`` and, for f8l / i8q, ``wrow`` fp32 ``[N]`` and i8q's ``wzeros``; see
    :func:`lowbit_engine.formats.w4_layouts.buffer_specs`), ``smooth`` fp32 ``[K]``, ``lora_down`` ``[R, K]``
    and ``lora_up`` ``[N, R]`` in ``dtype``, ``bias`` ``[N]`` in ``dtype`` or None.

    Args:
        in_features: K, a multiple of 64.
        out_features: N.
        rank: R, the rank of the low-rank branch (0 for none).
        fmt: "svdq-int4" (int4 activations) or "svdq-w4a8" (8-bit activations).
        act_mode: the token quantization ("int4", "int8", "fp8"); None: the layout's default.
        bias: whether the layer has a bias.
        dtype: bf16 or fp16, the dtype of the low-rank factors and the bias, and of the input the
            quantizer sees (other inputs are cast to it).
        weight_layout: "g64", "f8l", "i8q" or "auto" (:func:`resolve_layout`, for ``device``).

    Example:
        >>> m = SVDQLinear(3072, 3072)
        >>> m
        SVDQLinear(in_features=3072, out_features=3072, fmt=svdq-int4, act=int4, layout=g64, rank=32, bias=True, 5.2 MiB (bf16: 18.0 MiB))
        >>> SVDQLinear(3072, 3072, fmt="svdq-w4a8").weight_layout
        'i8q'
    """

    _POSITIVE_BUFFERS = ("smooth",)  # the quantizer divides x by it

    FORMAT_VERSION = 2  # 2: the weight layout is in the config (a version-1 config is a g64 layer)

    def __init__(self, in_features: int, out_features: int, rank: int = 32, fmt: str = "svdq-int4",
                 act_mode: str | None = None, bias: bool = True, dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str | None = None, weight_layout: str = "auto"):
        super().__init__()
        weight_layout, act_mode = resolve_layout(fmt, act_mode, weight_layout, device)
        if in_features <= 0 or in_features % GROUP != 0:
            raise ValueError(f"SVDQLinear: in_features must be a positive multiple of {GROUP}, got {in_features}")
        if out_features <= 0:
            raise ValueError(f"SVDQLinear: out_features must be positive, got {out_features}")
        if not 0 <= rank <= min(in_features, out_features):
            raise ValueError(f"SVDQLinear: rank must be in [0, {min(in_features, out_features)}], got {rank}")
        if dtype not in _DTYPES.values():
            raise ValueError(f"SVDQLinear: dtype must be bfloat16 or float16, got {dtype}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.fmt, self.act_mode, self.dtype, self.weight_layout = fmt, act_mode, dtype, weight_layout
        # How the calibration went (set by from_linear; not part of the checkpoint).
        self.alpha: float | None = None
        self.calib_error: float | None = None
        # Static per-tensor scale of this layer's 8-bit input, for a fused producer that quantizes it
        # (fused_blocks.calibrate_exit_scales; saved in the config). The layer's own forward keeps per-token.
        self.input_scale: float | None = None

        K, N = in_features, out_features
        for name, (shape, buf_dtype) in w4_layouts.buffer_specs(weight_layout, N, K).items():
            self.register_buffer(name, torch.zeros(shape, dtype=buf_dtype, device=device))
        self.register_buffer("smooth", torch.ones(K, dtype=torch.float32, device=device))
        self.register_buffer("lora_down", torch.zeros(rank, K, dtype=dtype, device=device))
        self.register_buffer("lora_up", torch.zeros(N, rank, dtype=dtype, device=device))
        self.register_buffer("bias", torch.zeros(N, dtype=dtype, device=device) if bias else None)

    # ---- construction ---------------------------------------------------------------------------

    @classmethod
    def from_linear(cls, linear: nn.Linear, calib: Tensor | None = None, rank: int = 32,
                    fmt: str = "svdq-int4", **opts: Any) -> SVDQLinear:
        """Quantize ``linear`` with SVDQuant (:func:`lowbit_engine.quant.svdquant`).

        ``calib`` holds activations at the layer's input, ``[..., K]``. ``opts``: ``act_mode``,
        ``weight_layout`` (default "auto": :func:`resolve_layout` for the linear's device), ``dtype``
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
        weight_layout = opts.pop("weight_layout", "auto")
        dtype = opts.pop("dtype", None)
        if dtype is None:
            dtype = linear.weight.dtype if linear.weight.dtype in _DTYPES.values() else torch.bfloat16
        mod = cls(linear.in_features, linear.out_features, rank=rank, fmt=fmt, act_mode=act_mode,
                  bias=linear.bias is not None, dtype=dtype, device=linear.weight.device, weight_layout=weight_layout)
        res = svdquant(linear.weight, calib, rank=rank, act_mode=mod.act_mode, dtype=dtype,
                       weight_layout=mod.weight_layout, **opts)
        mod.load_result(res, None if linear.bias is None else linear.bias.detach())
        return mod

    @torch.no_grad()
    def load_result(self, res: SVDQuantResult, bias: Tensor | None = None) -> None:
        """Copy an :class:`SVDQuantResult` (and the float bias) into the buffers."""
        if res.rank != self.rank or res.act_mode != self.act_mode or res.weight_layout != self.weight_layout:
            raise ValueError(f"SVDQLinear.load_result: result has rank {res.rank}, act {res.act_mode}, layout "
                             f"{res.weight_layout}; the module rank {self.rank}, act {self.act_mode}, layout "
                             f"{self.weight_layout}")
        for name, t in res.weight.items():
            getattr(self, name).copy_(t)
        for name in ("smooth", "lora_down", "lora_up"):
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
            "weight_layout": self.weight_layout,
            **({"input_scale": self.input_scale} if self.input_scale is not None else {}),
        }

    @classmethod
    def from_config(cls, cfg: dict[str, Any], device: torch.device | str | None = None) -> SVDQLinear:
        """An empty module with the shapes of ``cfg`` (from :meth:`config`); load a state dict into it.

        Raises ValueError on missing keys, an unknown format, version, group size, dtype or weight layout.
        A version-1 config (written before the weight layouts existed) is a ``g64`` layer.

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
        if cfg["version"] not in (1, cls.FORMAT_VERSION):
            raise ValueError(f"SVDQLinear.from_config: format version {cfg['version']!r} is not supported "
                             f"(this build reads versions 1 and {cls.FORMAT_VERSION})")
        layout = cfg.get("weight_layout", "g64") if cfg["version"] == 1 else cfg.get("weight_layout")
        if layout not in w4_layouts.LAYOUTS:
            raise ValueError(f"SVDQLinear.from_config: weight_layout must be one of {list(w4_layouts.LAYOUTS)}, "
                             f"got {layout!r}")
        if cfg["group_size"] != GROUP:
            raise ValueError(f"SVDQLinear.from_config: group_size must be {GROUP}, got {cfg['group_size']!r}")
        if cfg["dtype"] not in _DTYPES:
            raise ValueError(f"SVDQLinear.from_config: dtype must be one of {list(_DTYPES)}, got {cfg['dtype']!r}")
        scale = cfg.get("input_scale")
        if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"SVDQLinear.from_config: input_scale must be a finite number > 0 or absent, got {scale!r}")
        m = cls(int(cfg["in_features"]), int(cfg["out_features"]), rank=int(cfg["rank"]), fmt=cfg["format"],
                act_mode=cfg["act_mode"], bias=bool(cfg["has_bias"]), dtype=_DTYPES[cfg["dtype"]],
                device=device, weight_layout=layout)
        m.input_scale = None if scale is None else float(scale)
        return m

    # ---- weight layout ---------------------------------------------------------------------------

    def weight_buffers(self) -> dict[str, Tensor]:
        """The weight layout's buffers by name (``qweight``, ``wscales``, and ``wrow`` / ``wzeros``)."""
        return {name: getattr(self, name) for name in w4_layouts.buffer_specs(self.weight_layout, self.out_features,
                                                                               self.in_features)}

    def check_buffers(self) -> None:
        """ValueError unless the weight buffers hold a valid weight of the layout (checkpoints call this
        after loading: e.g. an i8q group outside the int8 range would make the kernels disagree), or if a
        float buffer is non-finite or a smoothing factor is not > 0 (x / 0 would give Inf scales)."""
        super().check_buffers()
        w4_layouts.check(self.weight_layout, self.weight_buffers())

    @torch.no_grad()
    def convert_layout(self, weight_layout: str, act_mode: str | None = None) -> SVDQLinear:
        """Requantize this layer's weight into another layout, in place (e.g. a ``g64`` checkpoint onto F8L
        or I8Q for Hopper); returns ``self``. The smoothing and the low-rank branch are kept; the 4-bit
        residual is dequantized exactly and quantized again with the layout's scale search
        (:func:`lowbit_engine.formats.w4_layouts.convert`). ``act_mode`` defaults to the layout's.

        Example:
            >>> m = SVDQLinear(128, 64, rank=8)
            >>> m.convert_layout("f8l").weight_layout, m.act_mode, m.wscales.dtype
            ('f8l', 'fp8', torch.float8_e4m3fn)
        """
        layout, act = resolve_layout(self.fmt, act_mode, weight_layout, self.qweight.device)
        bufs = w4_layouts.convert(self.weight_buffers(), self.weight_layout, layout)
        for name in w4_layouts.buffer_specs(self.weight_layout, self.out_features, self.in_features):
            delattr(self, name)
        for name, t in bufs.items():
            self.register_buffer(name, t.contiguous())
        self.weight_layout, self.act_mode = layout, act
        return self

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
        out = self.gemm(act, act_scales, lora_act, out_dtype)
        return out.reshape(*lead, self.out_features).to(in_dtype)

    def gemm(self, act: Tensor, act_scales: Tensor, lora_act: Tensor | None, out_dtype: torch.dtype) -> Tensor:
        """The layer's GEMM on activations already quantized its way (``act_mode``, divided by ``smooth``) and
        ``lora_act = x @ lora_down^T`` of the raw input: what a fused producer (e.g.
        ``ops_fused.norm_modulate_quantize``) hands over instead of x. Returns ``[M, N]`` in ``out_dtype``."""
        lora = (lora_act, self.lora_up) if self.rank else (None, None)
        if self.weight_layout == "f8l":
            return ops_w4a8.gemm_w4a8_f8l(act, act_scales, self.qweight, self.wscales, self.wrow, *lora, self.bias,
                                          out_dtype)
        if self.weight_layout == "i8q":
            return ops_w4a8.gemm_w4a8_i8q(act, act_scales, self.qweight, self.wscales, self.wzeros, self.wrow, *lora,
                                          self.bias, out_dtype)
        gemm = ops.gemm_w4a4 if self.act_mode == "int4" else ops.gemm_w4a8
        return gemm(act, act_scales, self.qweight, self.wscales, *lora, self.bias, out_dtype)

    # ---- size and repr ---------------------------------------------------------------------------

    def extra_repr(self) -> str:
        return self._repr(f"fmt={self.fmt}, act={self.act_mode}, layout={self.weight_layout}, rank={self.rank}")


def convert_weight_layouts(model: nn.Module, weight_layout: str = "auto") -> dict[str, str]:
    """Move every ``g64`` :class:`SVDQLinear` of ``model`` to a promotion-free layout, in place.

    ``weight_layout="auto"`` converts only where the layer's device has no 4-bit tensor cores (Hopper and
    later), to ``f8l`` with fp8 tokens: the conversion that keeps the most fidelity (about -0.1 dB on the
    synthetic layers; ``i8q`` costs dB, docs/fidelity.md). ``"f8l"`` / ``"i8q"`` convert every g64 layer.
    Returns ``{name: new layout}`` for the layers it changed. The checkpoint on disk is not touched: save
    again to keep the converted weights.

    Example:
        >>> model = nn.Sequential(SVDQLinear(128, 64, rank=8))
        >>> convert_weight_layouts(model, "f8l")
        {'0': 'f8l'}
    """
    if weight_layout not in ("auto", "f8l", "i8q"):
        raise ValueError(f"convert_weight_layouts: weight_layout must be 'auto', 'f8l' or 'i8q', got {weight_layout!r}")
    changed = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, SVDQLinear) or mod.weight_layout != "g64":
            continue
        if weight_layout == "auto":
            if has_int4_tensor_cores(mod.qweight.device):
                continue
            target = "f8l"
        else:
            target = weight_layout
        mod.convert_layout(target)
        changed[name] = target
    return changed
