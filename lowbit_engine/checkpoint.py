"""Save and load the quantized modules of a model: one safetensors file with JSON metadata.

A checkpoint holds every quantized submodule of a model (any module whose class is registered in
``lowbit_engine.nn.QUANTIZED_MODULES``), and nothing else: the rest of the model comes from its usual
source (e.g. ``from_pretrained``). Layout of the file:

- tensors ``"<module name>.<state name>"`` (``"blocks.0.attn.to_q.qweight"``); for a root module
  (name ``""``) just ``"<state name>"``. Contiguous, CPU, exactly the module's ``state_dict()``.
- header metadata key ``"lowbit_engine"``: a JSON string::

      {"lowbit_checkpoint_version": 1,
       "library_version": "0.1.0",
       "modules": {"blocks.0.attn.to_q": {
           "class": "SVDQLinear",
           "config": {...module.config()...},
           "tensors": {"qweight": {"dtype": "uint8", "shape": [3072, 1536], "sha256": "..."}, ...}}}}

Loading checks everything before it changes anything (see :func:`load_checkpoint`), so a bad file or a
model of other shapes raises :class:`~lowbit_engine.errors.CheckpointError` and leaves the model as it was.

Example:
    >>> import torch, tempfile, os
    >>> from lowbit_engine.nn import SVDQLinear
    >>> from lowbit_engine import checkpoint
    >>> layer = SVDQLinear(128, 64, rank=16)
    >>> path = checkpoint.save(layer, os.path.join(tempfile.mkdtemp(), "layer.safetensors"))
    >>> again = checkpoint.load_checkpoint(path)
    >>> all(torch.equal(a, b) for a, b in zip(layer.state_dict().values(), again.state_dict().values()))
    True
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .errors import CheckpointError

CHECKPOINT_VERSION = 1
METADATA_KEY = "lowbit_engine"

__all__ = ["CHECKPOINT_VERSION", "METADATA_KEY", "save", "load_checkpoint", "quantized_modules"]


def _registry() -> Mapping[str, type[nn.Module]]:
    # Imported late: lowbit_engine.nn imports the ops and formats, which this module does not need until a
    # checkpoint is actually written or read.
    from .nn import QUANTIZED_MODULES

    return QUANTIZED_MODULES


def quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every quantized submodule of ``model`` by qualified name (``""`` for ``model`` itself).

    A quantized module is a leaf here: its own children belong to it and are saved in its state.
    A module reachable under two names is listed once, under the first (as ``named_modules`` does).

    Example:
        >>> from torch import nn
        >>> from lowbit_engine.nn import SVDQLinear
        >>> list(quantized_modules(nn.Sequential(nn.ReLU(), SVDQLinear(64, 64))))
        ['1']
    """
    registry = _registry()
    found: dict[str, nn.Module] = {}
    seen: set[int] = set()

    def walk(module: nn.Module, name: str) -> None:
        if id(module) in seen:
            return
        seen.add(id(module))
        if type(module).__name__ in registry:
            found[name] = module
            return
        for child_name, child in module.named_children():
            walk(child, f"{name}.{child_name}" if name else child_name)

    walk(model, "")
    return found


def _tensor_name(module_name: str, state_name: str) -> str:
    return f"{module_name}.{state_name}" if module_name else state_name


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _sha256(t: torch.Tensor) -> str:
    # Hash the raw bytes; a flat uint8 view works for every dtype (bf16 and fp8 have no numpy type).
    raw = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(memoryview(raw)).hexdigest()


def _json_normal(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples become lists), so live and stored configs compare equal."""
    return json.loads(json.dumps(obj))


def save(module: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Write every quantized submodule of ``module`` to one safetensors file at ``path``.

    Tensors are ``"<module name>.<state name>"``; the JSON metadata (format in the module docstring) carries
    each module's class, ``config()`` and a sha256 per tensor. The file is written next to ``path`` and
    renamed over it, so an interrupted save never leaves a half-written checkpoint under the final name.

    Raises ``ValueError`` if ``module`` holds no quantized module.

    Example:
        >>> import tempfile, os
        >>> from torch import nn
        >>> from lowbit_engine.nn import SVDQLinear
        >>> model = nn.Sequential(SVDQLinear(64, 128, rank=8), nn.GELU(), SVDQLinear(128, 64, bias=False))
        >>> save(model, os.path.join(tempfile.mkdtemp(), "model.safetensors")).name
        'model.safetensors'
    """
    path = Path(path)
    found = quantized_modules(module)
    if not found:
        known = ", ".join(sorted(_registry()))
        raise ValueError(f"{path}: {type(module).__name__} holds no quantized module ({known}); nothing to save")

    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, dict[str, Any]] = {}
    for name, qm in found.items():
        records: dict[str, dict[str, Any]] = {}
        for state_name, t in qm.state_dict().items():
            # Names cannot collide: quantized modules are leaves, so no module's name is a prefix of another's.
            t = t.detach().to("cpu").contiguous()
            tensors[_tensor_name(name, state_name)] = t
            records[state_name] = {"dtype": _dtype_name(t.dtype), "shape": list(t.shape), "sha256": _sha256(t)}
        entries[name] = {"class": type(qm).__name__, "config": qm.config(), "tensors": records}

    from . import __version__  # late: the package __init__ may import this module before it sets __version__

    meta = {"lowbit_checkpoint_version": CHECKPOINT_VERSION, "library_version": __version__, "modules": entries}
    tmp = path.with_name(path.name + ".partial")
    try:
        save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(meta, sort_keys=True)})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


@dataclass
class _Entry:
    """One checkpoint module, checked and loaded on the side, and where it goes in the target model."""

    name: str
    record: dict[str, Any]  # the module's metadata: class, config, tensors
    target: nn.Module | None = None  # the model's module at `name`, None when loading without a model
    replace: bool = False  # True: target is an nn.Linear to swap out; False: copy into target
    module: nn.Module | None = None  # built from the config and filled with the file's tensors


def _error(path: Path, module_name: str | None, message: str) -> CheckpointError:
    where = f"{path}" if module_name is None else f"{path}: module {module_name!r}"
    return CheckpointError(f"{where}: {message}")


def _read_entries(f: Any, path: Path, registry: Mapping[str, type[nn.Module]]) -> list[_Entry]:
    """The modules of the header metadata, after checking the checkpoint version and each class and config."""
    raw = (f.metadata() or {}).get(METADATA_KEY)
    if raw is None:
        raise _error(path, None, f"no {METADATA_KEY!r} key in the header metadata: not a lowbit-engine checkpoint")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise _error(path, None, f"the {METADATA_KEY!r} metadata is not valid JSON ({e})") from e
    version = meta.get("lowbit_checkpoint_version") if isinstance(meta, dict) else None
    if version != CHECKPOINT_VERSION:
        raise _error(path, None, f"lowbit_checkpoint_version expected {CHECKPOINT_VERSION}, got {version!r}")
    modules = meta.get("modules")
    if not isinstance(modules, dict) or not modules:
        raise _error(path, None, f"metadata 'modules' expected a non-empty object, got {modules!r}")

    for name in modules:
        parts = name.split(".")
        outers = [".".join(parts[:i]) for i in range(len(parts))] if name else []  # "" (the root) and each prefix
        inside = [outer for outer in outers if outer in modules]
        if inside:
            raise _error(path, name, f"lies inside the quantized module {inside[0]!r}; quantized modules are leaves")
    entries = []
    for name, record in modules.items():
        cls_name = record.get("class") if isinstance(record, dict) else None
        if cls_name not in registry:
            raise _error(path, name, f"class expected one of {sorted(registry)}, got {cls_name!r}")
        if not isinstance(record.get("config"), dict):
            raise _error(path, name, f"config expected a JSON object, got {record.get('config')!r}")
        if not isinstance(record.get("tensors", {}), dict):
            raise _error(path, name, f"tensors expected a JSON object, got {record['tensors']!r}")
        entries.append(_Entry(name, record))
    return entries


def _find_target(path: Path, model: nn.Module, entry: _Entry) -> None:
    """Set ``entry.target``: the model's module at the entry's name, if the checkpoint module can go there."""
    name, cls_name, cfg = entry.name, entry.record["class"], entry.record["config"]
    try:
        target = model.get_submodule(name)
    except AttributeError:
        raise _error(path, name, f"expected a {cls_name} or nn.Linear at this name in the model; there is none")
    if type(target).__name__ == cls_name:
        live = _json_normal(target.config())
        if live != cfg:
            diff = {k: (cfg.get(k), live.get(k)) for k in sorted(set(cfg) | set(live)) if cfg.get(k) != live.get(k)}
            raise _error(path, name, f"the model's {cls_name} has another config; (checkpoint, model): {diff}")
        entry.target = target
    elif isinstance(target, nn.Linear):
        if name == "":
            raise _error(path, name, "the model itself is an nn.Linear and cannot be replaced in place; "
                        "call load_checkpoint(path) without a model")
        want = (cfg.get("in_features"), cfg.get("out_features"), cfg.get("has_bias"))
        have = (target.in_features, target.out_features, target.bias is not None)
        if want != have:
            raise _error(path, name, f"(in_features, out_features, has_bias) expected {want} from the checkpoint, "
                        f"the model's nn.Linear has {have}")
        entry.target, entry.replace = target, True
    else:
        raise _error(path, name, f"expected a {cls_name} or nn.Linear in the model, found {type(target).__name__}")


def _build_device(entry: _Entry, device: torch.device | str | None) -> torch.device:
    """Where a module built from the checkpoint lives: ``device``, else beside the Linear it replaces, else CPU."""
    if entry.replace and device is None:
        dev = entry.target.weight.device
        return torch.device("cpu") if dev.type == "meta" else dev  # a Linear still on meta has no real place
    if entry.target is not None and not entry.replace:
        return torch.device("cpu")  # only a staging copy: the tensors are copied into the target, which stays put
    return torch.device("cpu" if device is None else device)


def _load_entry(f: Any, path: Path, entry: _Entry, cls: type[nn.Module], file_keys: set[str],
                device: torch.device, verify: bool) -> None:
    """Set ``entry.module``: built from the entry's config, filled with the file's tensors after checking them."""
    name, cfg, stored = entry.name, entry.record["config"], entry.record.get("tensors", {})
    try:
        module = cls.from_config(cfg, device=device)
    except (ValueError, KeyError, TypeError) as e:
        raise _error(path, name, f"{cls.__name__}.from_config rejected the stored config: {e}") from e
    loaded: dict[str, torch.Tensor] = {}
    for state_name, want in module.state_dict().items():
        key = _tensor_name(name, state_name)
        if key not in file_keys:
            raise _error(path, name, f"tensor {key!r} ({_dtype_name(want.dtype)} {list(want.shape)}) is missing")
        t = f.get_tensor(key)
        if t.dtype != want.dtype or t.shape != want.shape:
            raise _error(path, name, f"tensor {key!r} expected {_dtype_name(want.dtype)} {list(want.shape)} "
                        f"(from config {cfg}), got {_dtype_name(t.dtype)} {list(t.shape)}")
        digest = (stored.get(state_name) or {}).get("sha256")
        if verify and digest is not None and _sha256(t) != digest:
            raise _error(path, name, f"tensor {key!r} does not match the sha256 in the metadata: the file is corrupt")
        loaded[state_name] = t.to(want.device)
    # assign=True keeps the tensors just read rather than copying them into the empty ones (half the memory).
    module.load_state_dict(loaded, strict=True, assign=True)
    entry.module = module


def load_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module | None = None,
    *,
    strict: bool = True,
    device: torch.device | str | None = None,
    verify: bool = True,
) -> nn.Module | dict[str, nn.Module]:
    """Load a checkpoint written by :func:`save`, standalone or into ``model``.

    Without ``model``: returns the module itself if the checkpoint holds one module named ``""`` (a saved
    single layer), else a dict ``name -> module``. Modules go to ``device`` (default CPU).

    With ``model``: for every checkpoint module, the model's submodule at that name must be

    - the same quantized class with an equal ``config()``: the tensors are copied into it (it keeps its
      device), or
    - an ``nn.Linear`` with the same in/out features and bias presence: it is replaced, on its parent, by
      the quantized module, built on ``device`` (default: the Linear's device) in the Linear's train/eval mode.

    With ``strict`` (default) the model must not hold quantized modules that the checkpoint lacks. Returns
    ``model``. With ``verify`` (default) each tensor whose metadata has a sha256 is checked against it.

    Everything is checked and loaded on the side first (header, versions, classes, configs against the
    model, each tensor's presence, dtype, shape and checksum, no unexpected tensors); only then is the model
    changed. Any failure raises :class:`~lowbit_engine.errors.CheckpointError` and leaves ``model`` as it was.
    The price: peak memory is the model plus the checkpoint's modules.

    Example:
        >>> import tempfile, os
        >>> from torch import nn
        >>> from lowbit_engine.nn import SVDQLinear
        >>> path = os.path.join(tempfile.mkdtemp(), "m.safetensors")
        >>> _ = save(nn.Sequential(SVDQLinear(64, 128, rank=8), nn.GELU()), path)
        >>> fresh = nn.Sequential(nn.Linear(64, 128), nn.GELU())   # e.g. straight from from_pretrained
        >>> type(load_checkpoint(path, fresh)[0]).__name__
        'SVDQLinear'
    """
    path = Path(path)
    registry = _registry()
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            entries = _read_entries(f, path, registry)
            # Cheap checks against the model first, so a wrong model fails before any tensor is read.
            if model is not None:
                for entry in entries:
                    _find_target(path, model, entry)
                if strict:
                    missing = sorted(set(quantized_modules(model)) - {e.name for e in entries})
                    if missing:
                        raise _error(path, None, f"strict: the model has quantized modules the checkpoint lacks: "
                                    f"{missing}")
            file_keys = set(f.keys())
            for entry in entries:
                cls = registry[entry.record["class"]]
                _load_entry(f, path, entry, cls, file_keys, _build_device(entry, device), verify)
            extra = sorted(file_keys - {_tensor_name(e.name, k) for e in entries for k in e.module.state_dict()})
            if extra:
                more = f" and {len(extra) - 8} more" if len(extra) > 8 else ""
                raise _error(path, None, f"unexpected tensors that no module's config accounts for: {extra[:8]}{more}")
    except (SafetensorError, OSError) as e:
        # A truncated or garbled file fails inside safetensors (or the OS): say which file and why.
        raise _error(path, None, f"cannot read the safetensors file ({type(e).__name__}: {e})") from e

    if model is None:
        if len(entries) == 1 and entries[0].name == "":
            return entries[0].module
        return {e.name: e.module for e in entries}

    # Commit: nothing below can fail on a checked plan, short of running out of memory.
    for e in entries:
        if e.replace:
            parent_name, _, child_name = e.name.rpartition(".")
            e.module.train(e.target.training)
            setattr(model.get_submodule(parent_name), child_name, e.module)
        else:
            with torch.no_grad():
                live = e.target.state_dict()  # detached views of the live tensors: copy_ writes through
                for state_name, t in e.module.state_dict().items():
                    live[state_name].copy_(t)
    return model
