"""The lowbit folder: one directory that ``from_pretrained`` loads, ``save_pretrained`` writes and
``engine.load(pipe, checkpoint=DIR)`` reads.

Layout (a diffusers model folder; for a pipeline folder, its ``transformer/`` subfolder)::

    DIR/config.json                          the transformer's diffusers config, plus
        "quantization_config": {"quant_method": "lowbit", "fmt": "svdq-int4", "rank": 32,
                                "qkv_fused": true, "compute_dtype": "bfloat16", ...}
    DIR/diffusion_pytorch_model.safetensors  the whole state dict: every quantized module's buffers under
        "<module>.<buffer>" and the float layers it kept; header metadata "lowbit_engine": the JSON of
        lowbit_engine.checkpoint (version, and per module: class, config, dtype/shape/sha256 per tensor)

So a folder's safetensors file is a lowbit checkpoint file that also carries the float layers; nothing else
travels with it (no sidecar), and fmt/rank are read from it.

API:

- write: ``engine.save_pretrained(pipe_or_transformer, DIR)`` (same as ``pipe.transformer.save_pretrained``
  after ``engine.load``, or on a model from ``from_pretrained(..., quantization_config=LowbitConfig())``);
- read: ``FluxTransformer2DModel.from_pretrained(DIR)`` (the config says lowbit; ``torch_dtype=`` casts the
  float parts), or ``engine.load(pipe, checkpoint=DIR)`` into a pipeline loaded in float.

Example:
    >>> import tempfile, torch
    >>> from torch import nn
    >>> d = tempfile.mkdtemp()
    >>> resolve_checkpoint(d + "/missing-org/missing-model")
    Traceback (most recent call last):
    ...
    lowbit_engine.errors.CheckpointError: ...missing-model: no such file or folder (lowbit-engine reads local paths only)
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import checkpoint as ckpt
from ..errors import CheckpointError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


@dataclass
class Resolved:
    """What ``checkpoint=`` points at: the safetensors ``file``, and for a folder its ``config`` (the
    diffusers config.json as a dict) and the format, rank and fusion recorded in it."""

    file: Path
    config: dict[str, Any] | None = None
    fmt: str | None = None
    rank: int | None = None
    qkv_fused: bool | None = None

    @property
    def is_folder(self) -> bool:
        return self.config is not None


def resolve_checkpoint(path: str | os.PathLike[str]) -> Resolved:
    """``path`` (a checkpoint file, a lowbit model folder, or a pipeline folder with ``transformer/``) resolved.

    Raises CheckpointError for a path that does not exist (a hub id is not downloaded), a folder without a
    lowbit config.json, or a sharded folder (one file only: ``save_pretrained(max_shard_size=...)`` larger).
    """
    p = Path(path)
    if not p.exists():
        hint = ""
        if "/" in str(path) and not str(path).startswith((".", "/", "~")) and len(Path(path).parts) == 2:
            hint = (f"; {str(path)!r} looks like a hub id: download it first (huggingface_hub.snapshot_download) "
                    f"or load it with from_pretrained(..., quantization_config=...)")
        raise CheckpointError(f"{path}: no such file or folder (lowbit-engine reads local paths only){hint}")
    if p.is_file():
        return Resolved(p)
    if not (p / CONFIG_NAME).is_file() and (p / "transformer" / CONFIG_NAME).is_file():
        p = p / "transformer"
    cfg_path = p / CONFIG_NAME
    if not cfg_path.is_file():
        raise CheckpointError(f"{p}: a folder without {CONFIG_NAME}: expected a lowbit folder written by "
                              f"save_pretrained (or a pipeline folder with transformer/{CONFIG_NAME})")
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: cannot read it as JSON ({e})") from e
    qc = config.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != "lowbit":
        got = qc.get("quant_method") if isinstance(qc, dict) else qc
        raise CheckpointError(f"{cfg_path}: quantization_config.quant_method expected 'lowbit', got {got!r} "
                              f"(a float model folder: quantize it with engine.load, then save_pretrained)")
    file = p / WEIGHTS_NAME
    if not file.is_file():
        if (p / (WEIGHTS_NAME + ".index.json")).is_file():
            raise CheckpointError(f"{p}: a sharded folder; engine.load(checkpoint=) reads one file: load it with "
                                  f"from_pretrained, or save it again with a larger max_shard_size")
        raise CheckpointError(f"{p}: {WEIGHTS_NAME} is missing")
    return Resolved(file, config, qc.get("fmt"), qc.get("rank"), qc.get("qkv_fused"))


def check_config(res: Resolved, transformer: nn.Module) -> None:
    """The folder's architecture and diffusers config must be the model's (CheckpointError otherwise)."""
    arch = type(transformer).__name__
    saved = res.config.get("_class_name")
    if saved is not None and saved != arch:
        raise CheckpointError(f"{res.file.parent}: saved from a {saved}, the model is a {arch}")
    live = getattr(transformer, "config", None)
    if live is None:
        return
    live = dict(live)
    diff = {k: (v, live.get(k)) for k, v in res.config.items()
            if not k.startswith("_") and k != "quantization_config" and k in live
            and json.loads(json.dumps(live[k], default=str)) != v}
    if diff:
        raise CheckpointError(f"{res.file.parent}: the {arch} has another config; (folder, model): {diff}")


def checkpoint_format(res: Resolved, transformer: nn.Module, fmt: str | None,
                      rank: int | None) -> tuple[str | None, int | None]:
    """``(fmt, rank)`` for ``engine.load(checkpoint=)``: what the folder (or the file) records; a given
    ``fmt``/``rank`` must agree with a folder's. A plain file without metadata leaves them to ``load``."""
    if res.is_folder:
        check_config(res, transformer)
        for what, given, saved in (("fmt", fmt, res.fmt), ("rank", rank, res.rank)):
            if given is not None and saved is not None and given != saved:
                raise CheckpointError(f"{res.file.parent}: holds {what} {saved!r}; load asked for {given!r} "
                                      f"(leave {what} out to load what the folder holds)")
        return (fmt or res.fmt), (rank or res.rank)
    from .diffusers import _checkpoint_modules, sidecar_path

    if fmt is None:
        from .diffusers import _POLICY_FORMATS

        formats = sorted({str((r.get("config") or {}).get("format")) for r in _checkpoint_modules(res.file).values()})
        if len(formats) > 1:  # the layers a policy row puts in its own format (w4a16 adaLN) beside the main one
            formats = [f for f in formats if f not in _POLICY_FORMATS] or formats
        if len(formats) != 1:
            raise CheckpointError(f"{res.file}: holds layers of formats {formats}; engine.load takes one format")
        fmt = formats[0]
    side = sidecar_path(res.file)
    if rank is None and side.exists():  # an older save with a sidecar: its rank is what the checks expect
        ranks = json.loads(side.read_text()).get("ranks") or []
        rank = ranks[0] if len(ranks) == 1 else None
    return fmt, rank


# ---- from_pretrained of a folder (called by the quantizer) --------------------------------------


def build_skeleton(model: nn.Module, records: dict[str, dict[str, Any]], fused: bool, where: Any) -> None:
    """On the meta-device model diffusers made: fuse Q/K/V if the folder was fused, then put an empty
    quantized module of each record's class and config where its ``nn.Linear`` is."""
    from ..nn import QUANTIZED_MODULES
    from .diffusers import fuse_qkv

    if fused:
        ok, note, _ = fuse_qkv(model)
        if not ok:
            raise CheckpointError(f"{where}: holds fused Q/K/V layers but this model cannot fuse: {note}")
    for name, rec in records.items():
        cls = QUANTIZED_MODULES.get(rec.get("class"))
        if cls is None:
            raise CheckpointError(f"{where}: module {name!r}: class expected one of {sorted(QUANTIZED_MODULES)}, "
                                  f"got {rec.get('class')!r}")
        try:
            target = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{where}: module {name!r}: no such layer in the {type(model).__name__}") from None
        cfg = rec.get("config", {})
        want = (cfg.get("in_features"), cfg.get("out_features"), cfg.get("has_bias"))
        have = (getattr(target, "in_features", None), getattr(target, "out_features", None),
                getattr(target, "bias", None) is not None)
        if not isinstance(target, nn.Linear) or want != have:
            raise CheckpointError(f"{where}: module {name!r}: (in, out, bias) {want} in the folder, the model has "
                                  f"a {type(target).__name__} {have}")
        try:
            module = cls.from_config(cfg, device="meta")
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{where}: module {name!r}: {cls.__name__}.from_config rejected the stored "
                                  f"config: {e}") from e
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, module)


def finish_loaded(model: nn.Module, records: dict[str, dict[str, Any]], dtype: torch.dtype | None,
                  where: Any) -> None:
    """After diffusers filled the skeleton: every quantized buffer loaded and matching its sha256, each
    module's own checks, and the float compute parts cast to ``dtype`` (the quantized buffers keep theirs)."""
    for name, rec in records.items():
        module = model.get_submodule(name)
        stored = rec.get("tensors", {})
        for buf, t in module.state_dict().items():
            if t.device.type == "meta":
                raise CheckpointError(f"{where}: tensor {name}.{buf} is missing from the folder's weights")
            digest = (stored.get(buf) or {}).get("sha256")
            if digest is not None and ckpt._sha256(t) != digest:
                raise CheckpointError(f"{where}: tensor {name}.{buf} does not match the sha256 in the header: "
                                      f"the file is corrupt")
        check = getattr(module, "check_buffers", None)
        if check is not None:
            try:
                check()
            except ValueError as e:
                raise CheckpointError(f"{where}: module {name!r}: {e}") from e
        if dtype is not None:
            module.to(dtype)  # the safe cast of QuantizedLinearBase: only bias / low-rank factors move


def quantize_loaded(model: nn.Module, cfg: Any) -> None:
    """``from_pretrained`` of float weights with a LowbitConfig: quantize them now (no calibration data)."""
    from .diffusers import load

    with warnings.catch_warnings():
        load(model, cfg.fmt, rank=cfg.rank, skip=cfg.skip, policy=cfg.policy,
             fuse_qkv_projections=cfg.fuse_qkv_projections, quant_opts=cfg.quant_opts or {}, progress=False)


# ---- writing ------------------------------------------------------------------------------------


def save_pretrained(obj: Any, directory: str | os.PathLike[str], **kwargs: Any) -> Path:
    """Write the lowbit folder of a quantized diffusers transformer (or a pipeline's) to ``directory``.

    ``kwargs`` go to diffusers' ``save_pretrained`` (e.g. ``max_shard_size``). Returns the folder.

    Example:
        >>> import lowbit_engine as engine                          # doctest: +SKIP
        >>> engine.load(pipe, "svdq-int4", calib=prompts)           # doctest: +SKIP
        >>> engine.save_pretrained(pipe, "flux-svdq-int4")          # doctest: +SKIP
        >>> FluxTransformer2DModel.from_pretrained("flux-svdq-int4")  # doctest: +SKIP
    """
    from .diffusers import resolve_transformer

    transformer = resolve_transformer(obj)
    if not hasattr(transformer, "save_pretrained"):
        raise TypeError(f"save_pretrained: a diffusers model is needed, got {type(transformer).__name__}; "
                        f"use lowbit_engine.save(model, file) for other modules")
    _ensure_lowbit_quantizer(transformer)
    transformer.save_pretrained(str(directory), safe_serialization=True, **kwargs)
    return Path(directory)


def save_pipeline(pipe: Any, directory: str | os.PathLike[str]) -> Path:
    """Write a whole quantized pipeline: diffusers' ``pipe.save_pretrained`` with the transformer as a
    lowbit folder (``transformer/``) and the other components as diffusers writes them. Returns the folder;
    :func:`load_pipeline` (or ``DiffusionPipeline.from_pretrained``) reads it back.

    Example::

        engine.load(pipe, "svdq-int4", calib=prompts)
        save_pipeline(pipe, "flux-svdq-int4")
    """
    from .diffusers import resolve_transformer

    _ensure_lowbit_quantizer(resolve_transformer(pipe))
    pipe.save_pretrained(str(directory), safe_serialization=True)
    return Path(directory)


def load_pipeline(directory: str | os.PathLike[str], device: str | torch.device = "cpu",
                  torch_dtype: torch.dtype = torch.bfloat16) -> Any:
    """The pipeline of a folder :func:`save_pipeline` wrote (``lowbit-engine quantize --out``), on ``device``:
    one call, no calibration, no fmt / rank to repeat (the transformer's config.json holds them).

    Raises FileNotFoundError if ``directory`` holds no pipeline with a lowbit transformer.
    """
    import diffusers

    from . import diffusers_quantizer  # noqa: F401  (registers the "lowbit" backend)

    d = Path(directory)
    cfg = d / "transformer" / CONFIG_NAME
    quant = json.loads(cfg.read_text()).get("quantization_config", {}) if cfg.is_file() else {}
    if not (d / "model_index.json").is_file() or quant.get("quant_method") != "lowbit":
        raise FileNotFoundError(f"{d}: not a lowbit-engine quantized pipeline folder (expected model_index.json and "
                                f"transformer/{CONFIG_NAME} with a lowbit quantization_config, as "
                                "`lowbit-engine quantize --out` writes)")
    return diffusers.DiffusionPipeline.from_pretrained(str(d), torch_dtype=torch_dtype).to(device)


def _ensure_lowbit_quantizer(transformer: nn.Module) -> None:
    """Give a model quantized by ``engine.load`` diffusers' view of a quantized model (the lowbit backend),
    so that its ``save_pretrained`` writes the lowbit folder."""
    from .diffusers_quantizer import LowbitQuantizer, attach

    if isinstance(getattr(transformer, "hf_quantizer", None), LowbitQuantizer):
        return
    mods = ckpt.quantized_modules(transformer)
    if not mods:
        raise ValueError(f"save_pretrained: the {type(transformer).__name__} holds no quantized layer; "
                         f"run engine.load first")
    cfgs = [m.config() for m in mods.values()]
    attach(transformer, cfgs[0].get("format"), max(1, max(int(c.get("rank", 1) or 1) for c in cfgs)))


__all__ = ["save_pipeline", "load_pipeline", "resolve_checkpoint", "check_config", "checkpoint_format", "save_pretrained", "Resolved", "build_skeleton", "finish_loaded",
           "quantize_loaded", "CONFIG_NAME", "WEIGHTS_NAME"]
