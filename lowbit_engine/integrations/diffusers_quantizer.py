"""A ``lowbit`` quantizer backend for diffusers: ``from_pretrained(..., quantization_config=LowbitConfig())``.

diffusers (0.42) picks a quantizer by the ``quant_method`` of a model's ``quantization_config`` (from the
``from_pretrained`` argument, or from ``config.json`` for a saved quantized model) in two dicts of
``diffusers.quantizers.auto``; :func:`register` adds ``"lowbit"`` to both (importing this module does it).
With it:

- ``FluxTransformer2DModel.from_pretrained(float_dir, quantization_config=LowbitConfig("svdq-int4"))``
  loads the float weights and quantizes them (without calibration: for calibrated SVDQuant run
  ``engine.load(pipe, calib=...)`` and save that);
- ``model.save_pretrained(dir)`` on a quantized model (from either path, or from ``engine.load``) writes the
  lowbit folder (:mod:`lowbit_engine.integrations.folder`): ``config.json`` with the quantization config, and
  the full state dict with the lowbit module records in the safetensors header;
- ``from_pretrained(dir)`` of such a folder builds the quantized modules on the meta device, fusing Q/K/V
  first where the folder was fused, and diffusers fills them: every quantized buffer is copied as stored
  (its own dtype; ``torch_dtype=`` casts only the float layers and the modules' float compute parts).
- ``PipelineQuantizationConfig(quant_mapping={"transformer": LowbitConfig(...)})`` works like any backend.

Example:
    >>> cfg = LowbitConfig("svdq-w4a8", rank=16)
    >>> cfg.to_dict()["quant_method"], cfg.fmt, cfg.rank
    ('lowbit', 'svdq-w4a8', 16)
    >>> LowbitConfig("int3")
    Traceback (most recent call last):
    ...
    lowbit_engine.errors.UnknownFormatError: LowbitConfig: unknown format 'int3'; known formats: fp8, mxfp4, nvfp4, svdq-int4, svdq-w4a8, vq2, vq3, w4a16
"""

from __future__ import annotations

import copy
import json
import weakref
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from diffusers.quantizers import auto as _auto
from diffusers.quantizers.base import DiffusersQuantizer
from diffusers.quantizers.quantization_config import QuantizationConfigMixin
from safetensors import safe_open
from torch import nn

from .. import checkpoint as ckpt
from ..errors import CheckpointError, UnknownFormatError
from ..formats import FORMATS
from ..nn._base import QuantizedLinearBase

QUANT_METHOD = "lowbit"
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


class LowbitMethod(str, Enum):
    """diffusers reads ``quant_method.value`` (its own methods are a str Enum); so is ours."""

    LOWBIT = QUANT_METHOD


class LowbitConfig(QuantizationConfigMixin):
    """The quantization config of the ``lowbit`` backend (stored in ``config.json`` as ``quantization_config``).

    Args:
        fmt: the format (``engine.load``'s): "svdq-int4", "svdq-w4a8", "fp8", "nvfp4", "mxfp4", "vq2", "vq3".
        rank: the SVDQuant low-rank branch rank.
        skip: layer-name regexes kept in float, on top of the architecture's policy.
        policy: a policy name ("flux", "sd3", ...) or None (by the transformer's class).
        fuse_qkv_projections: fuse Q/K/V where the policy allows it.
        quant_opts: passed to ``quantize_linear`` (e.g. ``{"act_mode": "fp8"}``).
        compute_dtype: "bfloat16" or "float16": the float dtype the folder was saved in; the default
            ``torch_dtype`` of ``from_pretrained`` for a saved folder.
        qkv_fused: written at save time: whether the saved modules are fused Q/K/V layers.

    Raises UnknownFormatError / ValueError for a bad format, rank or dtype (before any model exists).

    Example:
        >>> LowbitConfig(rank=0)
        Traceback (most recent call last):
        ...
        ValueError: LowbitConfig: rank expected a positive int, got 0
    """

    def __init__(self, fmt: str = "svdq-int4", rank: int = 32, *, skip: list[str] | None = None,
                 policy: str | None = None, fuse_qkv_projections: bool = True,
                 quant_opts: dict[str, Any] | None = None, compute_dtype: str | None = None,
                 qkv_fused: bool | None = None, **kwargs: Any):
        kwargs.pop("quant_method", None)  # from_dict passes the stored one back
        if kwargs:
            raise ValueError(f"LowbitConfig: unexpected arguments {sorted(kwargs)}")
        if fmt not in FORMATS:
            raise UnknownFormatError(f"LowbitConfig: unknown format {fmt!r}; known formats: "
                                     f"{', '.join(sorted(FORMATS))}")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
            raise ValueError(f"LowbitConfig: rank expected a positive int, got {rank!r}")
        if compute_dtype is not None and compute_dtype not in _DTYPES:
            raise ValueError(f"LowbitConfig: compute_dtype expected one of {list(_DTYPES)}, got {compute_dtype!r}")
        if policy is not None and not isinstance(policy, str):
            raise ValueError(f"LowbitConfig: policy expected a policy name (str) or None, got {type(policy).__name__}")
        self.quant_method = LowbitMethod.LOWBIT
        self.fmt, self.rank, self.policy = fmt, rank, policy
        self.skip = list(skip) if skip else None
        self.fuse_qkv_projections = bool(fuse_qkv_projections)
        self.quant_opts = dict(quant_opts) if quant_opts else None
        self.compute_dtype, self.qkv_fused = compute_dtype, qkv_fused

    def to_dict(self) -> dict[str, Any]:
        out = copy.deepcopy(self.__dict__)
        out["quant_method"] = QUANT_METHOD  # a plain str in config.json
        return out

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()


def _header(path: str | Path) -> dict[str, Any]:
    """The lowbit record of a safetensors file's header (CheckpointError if there is none)."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            raw = (f.metadata() or {}).get(ckpt.METADATA_KEY)
    except Exception as e:  # safetensors has its own error types; one answer for all
        raise CheckpointError(f"{path}: cannot read the safetensors header ({type(e).__name__}: {e})") from e
    if raw is None:
        raise CheckpointError(f"{path}: no {ckpt.METADATA_KEY!r} record in the safetensors header: not saved by "
                              f"lowbit-engine's save_pretrained (quantization_config says quant_method 'lowbit')")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: the {ckpt.METADATA_KEY!r} header record is not valid JSON ({e})") from e
    if not isinstance(meta, dict) or meta.get("lowbit_checkpoint_version") != ckpt.CHECKPOINT_VERSION:
        got = meta.get("lowbit_checkpoint_version") if isinstance(meta, dict) else meta
        raise CheckpointError(f"{path}: lowbit_checkpoint_version expected {ckpt.CHECKPOINT_VERSION}, got {got!r}")
    if not isinstance(meta.get("modules"), dict) or not meta["modules"]:
        raise CheckpointError(f"{path}: the header record holds no quantized modules")
    return meta


def header_record(model: nn.Module) -> dict[str, Any]:
    """The JSON record of ``model``'s quantized modules (class, config, tensor dtype/shape/sha256): what
    :func:`lowbit_engine.checkpoint.save` writes in its header, without writing a file.

    Raises ValueError if LoRA capacity is installed (its slots would be saved as the model's own rank).
    """
    from .. import __version__

    if getattr(model.__dict__.get("_lowbit_lora"), "capacity", None) is not None:
        raise ValueError("save_pretrained: LoRA adapters or capacity are installed on this model; call "
                         "lowbit_engine.lora.release(pipe) first (adapters are not part of the quantized folder)")
    modules = {}
    for name, qm in ckpt.quantized_modules(model).items():
        tensors = {}
        for state_name, t in qm.state_dict().items():
            t = t.detach().to("cpu").contiguous()
            tensors[state_name] = {"dtype": ckpt._dtype_name(t.dtype), "shape": list(t.shape), "sha256": ckpt._sha256(t)}
        modules[name] = {"class": type(qm).__name__, "config": qm.config(), "tensors": tensors}
    return {"lowbit_checkpoint_version": ckpt.CHECKPOINT_VERSION, "library_version": __version__, "modules": modules}


class LowbitQuantizer(DiffusersQuantizer):
    """The diffusers quantizer of :class:`LowbitConfig` (see the module docstring for the two paths)."""

    requires_calibration = False
    required_packages = None

    def __init__(self, quantization_config: LowbitConfig, **kwargs: Any):
        super().__init__(quantization_config, **kwargs)
        self.torch_dtype: torch.dtype | None = None
        self.files: list[str] = []
        self.records: dict[str, dict[str, Any]] = {}
        self._model: Any = None  # weakref to the model, for get_state_dict_and_metadata

    # ---- from_pretrained ------------------------------------------------------------------------

    def update_torch_dtype(self, torch_dtype: torch.dtype | None) -> torch.dtype:
        if torch_dtype is None:
            torch_dtype = _DTYPES.get(self.quantization_config.compute_dtype or "bfloat16")
        self.torch_dtype = torch_dtype
        return torch_dtype

    def maybe_update_loaded_keys(self, loaded_keys: list[str], checkpoint_files: list[str]) -> list[str]:
        # The only hook that sees the files before the model skeleton is made: remember them.
        self.files = [str(f) for f in (checkpoint_files or [])]
        return loaded_keys

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> None:
        if not self.pre_quantized:
            return  # float weights: they load as usual and are quantized after loading
        if not self.files:
            raise CheckpointError("lowbit from_pretrained: no safetensors file found for a pre-quantized folder")
        meta = _header(self.files[0])
        self.records = meta["modules"]
        from .folder import build_skeleton

        build_skeleton(model, self.records, bool(self.quantization_config.qkv_fused), where=self.files[0])

    def check_if_quantized_param(self, model: nn.Module, param_value: torch.Tensor, param_name: str,
                                 state_dict: dict[str, Any], **kwargs: Any) -> bool:
        module_name, _, _ = param_name.rpartition(".")
        try:
            return isinstance(model.get_submodule(module_name), QuantizedLinearBase)
        except AttributeError:
            return False

    def create_quantized_param(self, model: nn.Module, param_value: torch.Tensor, param_name: str,
                               target_device: Any, state_dict: dict[str, Any], unexpected_keys: list[str] | None = None,
                               **kwargs: Any) -> None:
        # diffusers has already cast floating tensors to torch_dtype in param_value (an fp32 smoothing
        # vector would lose bits): the quantized buffers come from the file's own tensor instead.
        module_name, _, buf = param_name.rpartition(".")
        module = model.get_submodule(module_name)
        stored = state_dict[param_name]
        want = module._buffers.get(buf)
        if want is None or stored.dtype != want.dtype or stored.shape != want.shape:
            have = None if want is None else f"{ckpt._dtype_name(want.dtype)} {list(want.shape)}"
            raise CheckpointError(f"{self.files[:1]}: tensor {param_name!r} expected {have} from the module config, "
                                  f"got {ckpt._dtype_name(stored.dtype)} {list(stored.shape)}")
        module._buffers[buf] = stored.detach().to(target_device).contiguous()

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        from .folder import finish_loaded, quantize_loaded

        if self.pre_quantized:
            finish_loaded(model, self.records, self.torch_dtype, where=self.files[0] if self.files else "?")
        else:
            quantize_loaded(model, self.quantization_config)
        self.attach(model)
        return model

    def attach(self, model: nn.Module) -> None:
        """Remember ``model`` (weakly) for saving, and record the dtype and fusion in the config."""
        self._model = weakref.ref(model)
        cfg = self.quantization_config
        qms = ckpt.quantized_modules(model)
        dtypes = {getattr(m, "dtype", None) for m in qms.values()}
        if len(dtypes) == 1 and str(next(iter(dtypes))).removeprefix("torch.") in _DTYPES:
            cfg.compute_dtype = str(next(iter(dtypes))).removeprefix("torch.")
        from .diffusers import _FUSED_NAMES

        cfg.qkv_fused = any(n.rpartition(".")[2] in _FUSED_NAMES for n in qms)
        # ModelMixin.to refuses every dtype on an is_quantized model (bitsandbytes or GGUF weights would be
        # destroyed). The lowbit modules keep their quantized buffers through casts (nn/_base.py), so the
        # flag stays off and pipe.to(dtype) works as on an engine.load model; hf_quantizer still marks the
        # model quantized for save_pretrained and the LoRA loaders.
        model.is_quantized = False
        model.quantization_method = LowbitMethod.LOWBIT
        from ..lora.diffusers_api import guard_transformer

        guard_transformer(model)  # diffusers' PEFT LoRA methods cannot wrap quantized layers: exact errors

    # ---- save_pretrained ------------------------------------------------------------------------

    def get_state_dict_and_metadata(self, state_dict: dict[str, Any], safe_serialization: bool = False
                                    ) -> tuple[dict[str, Any], dict[str, Any]]:
        model = self._model() if self._model is not None else None
        if model is None:
            raise ValueError("lowbit save_pretrained: the quantizer lost its model; quantize it again")
        if not safe_serialization:
            raise ValueError("lowbit save_pretrained: only safetensors (safe_serialization=True) keeps the "
                             "quantized module records")
        self.attach(model)  # a cast since loading may have changed the compute dtype
        return state_dict, {ckpt.METADATA_KEY: json.dumps(header_record(model), sort_keys=True)}

    # ---- flags ----------------------------------------------------------------------------------

    @property
    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return True

    @property
    def supports_parallel_loading(self) -> bool:
        return False  # create_quantized_param reads the shard's own state dict, in order


def register() -> None:
    """Add the ``lowbit`` backend to diffusers' quantizer registry (idempotent).

    Example:
        >>> from diffusers.quantizers.auto import AUTO_QUANTIZER_MAPPING
        >>> register(); AUTO_QUANTIZER_MAPPING["lowbit"].__name__
        'LowbitQuantizer'
    """
    _auto.AUTO_QUANTIZER_MAPPING[QUANT_METHOD] = LowbitQuantizer
    _auto.AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] = LowbitConfig


def attach(transformer: nn.Module, fmt: str, rank: int) -> None:
    """Make an ``engine.load``-quantized diffusers model ``save_pretrained``-able (a no-op on other modules)."""
    if not hasattr(transformer, "register_to_config") or not ckpt.quantized_modules(transformer):
        return
    q = getattr(transformer, "hf_quantizer", None)
    if not isinstance(q, LowbitQuantizer):
        q = LowbitQuantizer(LowbitConfig(fmt, rank), pre_quantized=True)
        transformer.hf_quantizer = q
    q.attach(transformer)
    transformer.register_to_config(quantization_config=q.quantization_config)


register()

__all__ = ["LowbitConfig", "LowbitQuantizer", "register", "attach", "header_record", "QUANT_METHOD"]
