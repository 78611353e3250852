"""``VQLinear``: the quantized linear layer of ``vq2`` and ``vq3`` (VQ4DiT codebook weights).

The forward pass is one op, ``ops.vq_gemm`` (docs/formats.md "VQ GEMM"): the weight is decoded from its
packed indices through the layer's codebook inside the GEMM (C++ reference on the CPU; the Triton
codebook-lookup kernel on CUDA once ``lowbit_engine.kernels.vq_gemm`` is registered). Activations stay in
bf16/fp16.

Example:
    >>> import torch
    >>> from lowbit_engine.nn.vq_linear import VQLinear
    >>> lin = torch.nn.Linear(64, 32).to(torch.bfloat16)
    >>> q = VQLinear.from_linear(lin, fmt="vq2", kmeans_iters=2, iters=10)
    >>> q(torch.randn(2, 3, 64, dtype=torch.bfloat16)).shape
    torch.Size([2, 3, 32])
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .. import ops
from ..errors import UnknownFormatError
from ._base import QuantizedLinearBase
from ..formats import vq as vqf
from ..quant.vq import VQResult, vq_quantize

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
_CONFIG_KEYS = ("format", "version", "in_features", "out_features", "k", "d", "index_bits", "dtype",
                "has_bias", "has_channel_scale")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


class VQLinear(QuantizedLinearBase):
    """A linear layer whose weight is a per-layer codebook plus packed centroid indices.

    Buffers (all in ``state_dict()``): ``codes`` uint8 ``[N, packed_row_bytes(K/d)]``, ``codebook`` fp32
    ``[k, d]``, ``channel_scale`` fp32 ``[N]`` or None, ``bias`` ``[N]`` in ``dtype`` or None.

    Args:
        in_features: K, a multiple of d (4).
        out_features: N.
        fmt: "vq2" (256 centroids, 8-bit indices: 2 bits per weight) or "vq3" (4096, 12-bit: 3 bits).
        bias: whether the layer has a bias.
        channel_scale: whether the layer has a per-output-channel scale.
        dtype: bf16 or fp16: the bias dtype and the compute dtype of inputs of other dtypes.

    Example:
        >>> VQLinear(3072, 3072, fmt="vq3")
        VQLinear(in_features=3072, out_features=3072, fmt=vq3, k=4096, d=4, channel_scale=False, bias=True, 3.4 MiB (bf16: 18.0 MiB))
    """

    FORMAT_VERSION = 1

    def __init__(self, in_features: int, out_features: int, fmt: str = "vq2", bias: bool = True,
                 channel_scale: bool = False, dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str | None = None):
        super().__init__()
        if fmt not in vqf.FORMATS:
            raise UnknownFormatError(f"VQLinear: unknown format {fmt!r}; VQLinear holds {', '.join(vqf.FORMATS)}")
        spec = vqf.FORMATS[fmt]
        if in_features <= 0 or in_features % spec.d:
            raise ValueError(f"VQLinear: in_features must be a positive multiple of d={spec.d}, got {in_features}")
        if out_features <= 0:
            raise ValueError(f"VQLinear: out_features must be positive, got {out_features}")
        if dtype not in _DTYPES.values():
            raise ValueError(f"VQLinear: dtype must be bfloat16 or float16, got {dtype}")
        self.in_features, self.out_features, self.fmt, self.dtype = in_features, out_features, fmt, dtype
        self.k, self.d, self.index_bits = spec.k, spec.d, spec.index_bits
        self.stats: dict | None = None  # how the quantization went (set by from_linear; not checkpointed)
        row = vqf.packed_row_bytes(in_features // spec.d, spec.index_bits)
        self.register_buffer("codes", torch.zeros(out_features, row, dtype=torch.uint8, device=device))
        self.register_buffer("codebook", torch.zeros(spec.k, spec.d, dtype=torch.float32, device=device))
        self.register_buffer("channel_scale", torch.ones(out_features, dtype=torch.float32, device=device)
                             if channel_scale else None)
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    # ---- construction ---------------------------------------------------------------------------

    @classmethod
    def from_linear(cls, linear: nn.Linear, calib: Tensor | None = None, fmt: str = "vq2",
                    **opts: Any) -> VQLinear:
        """Quantize ``linear`` with k-means plus the VQ4DiT calibration (:func:`lowbit_engine.quant.vq.vq_quantize`).

        ``calib``: the layer's input activations ``[..., K]`` (None: zero-data Gaussian calibration).
        ``opts``: ``dtype`` (default: the linear's dtype if bf16/fp16, else bf16), ``channel_scale`` and
        the other options of ``vq_quantize`` (``kmeans_iters``, ``iters``, ``n_candidates``, ``seed``, ...).
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"VQLinear.from_linear: expected an nn.Linear, got {type(linear).__name__}")
        dtype = opts.pop("dtype", None)
        if dtype is None:
            dtype = linear.weight.dtype if linear.weight.dtype in _DTYPES.values() else torch.bfloat16
        cs = bool(opts.get("channel_scale", False))
        mod = cls(linear.in_features, linear.out_features, fmt=fmt, bias=linear.bias is not None,
                  channel_scale=cs, dtype=dtype, device=linear.weight.device)
        res = vq_quantize(linear.weight, fmt, calib, **opts)
        mod.load_result(res, None if linear.bias is None else linear.bias.detach())
        return mod

    @torch.no_grad()
    def load_result(self, res: VQResult, bias: Tensor | None = None) -> None:
        """Copy a :class:`VQResult` (and the float bias) into the buffers."""
        if (res.k, res.d, res.index_bits) != (self.k, self.d, self.index_bits):
            raise ValueError(f"VQLinear.load_result: result has k={res.k}, d={res.d}, {res.index_bits}-bit; "
                             f"the module {self.fmt} has k={self.k}, d={self.d}, {self.index_bits}-bit")
        if (res.channel_scale is None) != (self.channel_scale is None):
            raise ValueError("VQLinear.load_result: channel scale present in only one of result and module")
        self.codes.copy_(res.codes)
        self.codebook.copy_(res.codebook)
        if res.channel_scale is not None:
            self.channel_scale.copy_(res.channel_scale)
        if (bias is None) != (self.bias is None):
            raise ValueError("VQLinear.load_result: bias given for a module without one, or missing")
        if bias is not None:
            self.bias.copy_(bias)
        self.stats = dict(res.stats)

    # ---- config (checkpoint metadata) -------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        """The JSON-serialisable description that :meth:`from_config` rebuilds the (empty) module from.

        Example:
            >>> VQLinear(128, 64, fmt="vq3").config()["index_bits"]
            12
        """
        return {
            "format": self.fmt, "version": self.FORMAT_VERSION, "in_features": self.in_features,
            "out_features": self.out_features, "k": self.k, "d": self.d, "index_bits": self.index_bits,
            "dtype": _dtype_name(self.dtype), "has_bias": self.bias is not None,
            "has_channel_scale": self.channel_scale is not None,
        }

    @classmethod
    def from_config(cls, cfg: dict[str, Any], device: torch.device | str | None = None) -> VQLinear:
        """An empty module with the shapes of ``cfg`` (from :meth:`config`); load a state dict into it.

        Example:
            >>> m = VQLinear(128, 64, fmt="vq2", channel_scale=True)
            >>> VQLinear.from_config(m.config()).config() == m.config()
            True
        """
        missing = [k for k in _CONFIG_KEYS if k not in cfg]
        if missing:
            raise ValueError(f"VQLinear.from_config: missing keys {missing}")
        if cfg["format"] not in vqf.FORMATS:
            raise UnknownFormatError(f"VQLinear.from_config: unknown format {cfg['format']!r}; "
                                     f"expected one of {list(vqf.FORMATS)}")
        if cfg["version"] != cls.FORMAT_VERSION:
            raise ValueError(f"VQLinear.from_config: format version {cfg['version']!r} is not supported "
                             f"(this build reads version {cls.FORMAT_VERSION})")
        spec = vqf.FORMATS[cfg["format"]]
        if (cfg["k"], cfg["d"], cfg["index_bits"]) != (spec.k, spec.d, spec.index_bits):
            raise ValueError(f"VQLinear.from_config: {cfg['format']} is k={spec.k}, d={spec.d}, "
                             f"{spec.index_bits}-bit; got k={cfg['k']}, d={cfg['d']}, {cfg['index_bits']}-bit")
        if cfg["dtype"] not in _DTYPES:
            raise ValueError(f"VQLinear.from_config: dtype must be one of {list(_DTYPES)}, got {cfg['dtype']!r}")
        return cls(int(cfg["in_features"]), int(cfg["out_features"]), fmt=cfg["format"],
                   bias=bool(cfg["has_bias"]), channel_scale=bool(cfg["has_channel_scale"]),
                   dtype=_DTYPES[cfg["dtype"]], device=device)

    # ---- forward ---------------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        """``x [..., K]`` -> ``[..., N]`` in x's dtype (bf16, fp16 and fp32 run as they are; other dtypes
        are cast to the module dtype and back)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"VQLinear: expected input [..., {self.in_features}], got {tuple(x.shape)}")
        in_dtype = x.dtype
        run_dtype = in_dtype if in_dtype in (torch.bfloat16, torch.float16, torch.float32) else self.dtype
        lead = x.shape[:-1]
        x2d = x.to(run_dtype).reshape(-1, self.in_features).contiguous()
        if x2d.shape[0] == 0:
            return x.new_empty(*lead, self.out_features)
        out = ops.vq_gemm(x2d, self.codes, self.codebook, self.out_features, self.in_features, self.index_bits,
                          channel_scale=self.channel_scale, bias=self.bias)
        return out.reshape(*lead, self.out_features).to(in_dtype)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The dense ``[N, K]`` weight the layer computes with."""
        return ops.vq_dequantize(self.codes, self.codebook, self.out_features, self.in_features, self.index_bits,
                                 channel_scale=self.channel_scale, out_dtype=dtype)

    # ---- size and repr ---------------------------------------------------------------------------

    def extra_repr(self) -> str:
        return self._repr(f"fmt={self.fmt}, k={self.k}, d={self.d}, channel_scale={self.channel_scale is not None}")


__all__ = ["VQLinear"]
