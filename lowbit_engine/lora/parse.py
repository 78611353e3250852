"""Reading LoRA files: diffusers, PEFT and kohya (incl. BFL-style FLUX names) into one neutral form.

Every format becomes a list of :class:`Factor` ``(module, down [r, K], up [N, r], alpha)`` where ``module``
is a *logical* diffusers module name of the unfused transformer (``transformer_blocks.0.attn.to_q``), or a
fused name (``...attn.to_qkv``) when the file holds one factor for Q, K and V together. Mapping onto the
layers that exist after ``engine.load`` is :mod:`lowbit_engine.lora.mapping`'s job.

Key forms understood:

- diffusers: ``[transformer.]<module>.lora_A.weight`` / ``.lora_B.weight`` (+ optional ``<module>.alpha``);
- PEFT: ``base_model.model.<module>.lora_A[.<adapter>].weight`` / ``lora_B``; alpha from the
  ``adapter_config.json`` next to the file (``lora_alpha``, ``alpha_pattern``, ``use_rslora``), a ``config=``
  dict, or a scalar ``<module>.alpha`` key;
- kohya: ``lora_unet_<module_with_underscores>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``, where
  the module is a diffusers path (``lora_unet_transformer_blocks_0_attn_to_q``) or a BFL FLUX name
  (``lora_unet_double_blocks_0_img_attn_qkv``, ``lora_unet_single_blocks_0_linear1``).

Example:
    >>> import torch
    >>> sd = {"transformer.x.lora_A.weight": torch.ones(4, 64), "transformer.x.lora_B.weight": torch.ones(8, 4)}
    >>> f = parse_state_dict(sd)[0]
    >>> f.module, f.rank, f.alpha
    ('x', 4, 4.0)
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from .errors import LoRAError

KOHYA_PREFIXES = ("lora_unet_", "lora_transformer_")
PEFT_PREFIX = "base_model.model."
_DIFFUSERS_PREFIXES = ("transformer.", "diffusion_model.")  # the latter: ComfyUI's prefix for BFL names
# BFL (original FLUX) module names with dots, as ComfyUI and BFL write them with lora_A / lora_B: read as the
# kohya spelling of the same names (mapping.py's table), e.g. double_blocks.0.img_attn.qkv
_BFL_DOTTED = re.compile(r"^(?:double_blocks\.\d+\.|single_blocks\.\d+\.|img_in$|txt_in$|time_in\.|vector_in\.|"
                         r"guidance_in\.|final_layer\.)")
_AB = re.compile(r"^(?P<mod>.+?)\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_\-]+)?\.weight$")
_KOHYA = re.compile(r"^(?P<mod>.+?)\.(?P<part>lora_down\.weight|lora_up\.weight|alpha)$")


@dataclass(frozen=True)
class Factor:
    """One low-rank update ``delta_W = (alpha / rank) * up @ down`` of the logical module ``module``.

    ``down`` is ``[rank, K]`` and ``up`` ``[N, rank]``, in the file's float dtype; ``key`` is the file key it
    came from (for error messages).
    """

    module: str
    down: Tensor
    up: Tensor
    alpha: float
    key: str
    rslora: bool = False

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        """``alpha / rank`` (``alpha / sqrt(rank)`` for rsLoRA): the factor of ``up @ down`` at strength 1."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


# ---- reading files ------------------------------------------------------------------------------


def read_file(path: str | os.PathLike[str]) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    """The tensors of a ``.safetensors`` file (or a PEFT directory) and the PEFT adapter config beside it.

    Raises LoRAError for a missing file or one safetensors cannot read.
    """
    from safetensors.torch import load_file

    p = Path(path)
    if p.is_dir():  # a PEFT save_pretrained() directory
        p = p / "adapter_model.safetensors"
    if not p.is_file():
        raise LoRAError(f"LoRA file {str(p)!r} does not exist")
    try:
        tensors = load_file(str(p), device="cpu")
    except Exception as e:  # safetensors raises its own error types; one answer for all of them
        raise LoRAError(f"LoRA file {str(p)!r} cannot be read as safetensors: {type(e).__name__}: {e}") from e
    cfg_path = p.parent / "adapter_config.json"
    config = None
    if cfg_path.is_file():
        try:
            config = json.loads(cfg_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise LoRAError(f"LoRA config {str(cfg_path)!r} is not valid JSON: {e}") from None
        if not isinstance(config, dict):
            raise LoRAError(f"LoRA config {str(cfg_path)!r} must hold a JSON object, got {type(config).__name__}")
    else:
        config = _header_config(p)
    return tensors, config


def _header_config(path: Path) -> dict[str, Any] | None:
    """The PEFT config diffusers' ``save_lora_weights`` keeps in the safetensors header: JSON under
    ``lora_adapter_metadata`` with the transformer's keys prefixed (``"transformer.lora_alpha"``). Without it
    a file of rank 4 and lora_alpha 16 would run at scale 1 instead of 4."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        raw = (f.metadata() or {}).get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise LoRAError(f"LoRA file {str(path)!r}: lora_adapter_metadata is not valid JSON ({e})") from e
    if not isinstance(meta, dict):
        raise LoRAError(f"LoRA file {str(path)!r}: lora_adapter_metadata expected a JSON object, got {meta!r}")
    prefixed = {k[len("transformer."):]: v for k, v in meta.items() if k.startswith("transformer.")}
    return prefixed or meta


# ---- parsing ------------------------------------------------------------------------------------


def detect_format(keys: list[str]) -> str:
    """"kohya", "peft" or "diffusers", from the key prefixes (a mix is an error)."""
    kinds = {"kohya" if k.startswith(KOHYA_PREFIXES) else "peft" if k.startswith(PEFT_PREFIX) else "diffusers"
             for k in keys}
    if len(kinds) != 1:
        raise LoRAError(f"LoRA keys mix formats {sorted(kinds)}; e.g. {keys[0]!r} and {keys[-1]!r}")
    return kinds.pop()


def parse_state_dict(sd: Mapping[str, Tensor], config: dict[str, Any] | None = None) -> list[Factor]:
    """The factors of a LoRA state dict in any of the three formats (see the module docstring).

    Checks every key is understood, every module has both factors with matching ranks, alphas are
    scalars, and no value is NaN or inf. ``config``: a PEFT ``adapter_config`` (dict).
    """
    keys = list(sd)
    if not keys:
        raise LoRAError("the LoRA state dict is empty")
    fmt = detect_format(keys)
    factors = _parse_kohya(sd) if fmt == "kohya" else _parse_ab(sd, fmt, config)
    for f in factors:
        for what, t in (("down", f.down), ("up", f.up)):
            if not torch.isfinite(t).all():
                raise LoRAError(f"LoRA key {f.key!r}: the {what} factor holds NaN or inf")
        if not math.isfinite(f.alpha):
            raise LoRAError(f"LoRA key {f.key!r}: alpha is {f.alpha}")
    return factors


def _matrix(sd: Mapping[str, Tensor], key: str) -> Tensor:
    t = sd[key]
    if not isinstance(t, Tensor) or t.dim() != 2 or not t.is_floating_point():
        shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise LoRAError(f"LoRA key {key!r}: expected a 2-D float matrix, got {shape} (conv or other LoRA "
                        f"types are not supported)")
    # kept in the file's dtype: converting here would cost a full copy of the file; mapping casts once to
    # each layer's dtype and device
    return t.detach()


def _scalar(sd: Mapping[str, Tensor], key: str) -> float:
    t = sd[key]
    if isinstance(t, Tensor):
        if t.numel() != 1:
            raise LoRAError(f"LoRA key {key!r}: alpha must be a scalar, got shape {tuple(t.shape)}")
        return float(t.item())
    return float(t)


def _pair(module: str, down: Tensor, up: Tensor, alpha: float | None, key: str, rslora: bool = False) -> Factor:
    if up.shape[1] != down.shape[0]:
        raise LoRAError(f"LoRA key {key!r}: rank mismatch, down is {tuple(down.shape)} and up {tuple(up.shape)}")
    return Factor(module, down, up, float(down.shape[0]) if alpha is None else alpha, key, rslora)


def _parse_ab(sd: Mapping[str, Tensor], fmt: str, config: dict[str, Any] | None) -> list[Factor]:
    """diffusers and PEFT: ``<module>.lora_A.weight`` / ``lora_B.weight`` (+ ``<module>.alpha``)."""
    prefixes = (PEFT_PREFIX,) if fmt == "peft" else _DIFFUSERS_PREFIXES
    a: dict[str, str] = {}
    b: dict[str, str] = {}
    alphas: dict[str, str] = {}
    for key in sd:
        body = key
        for p in prefixes:
            if body.startswith(p):
                body = body[len(p):]
                break
        m = _AB.match(body)
        if m:
            (a if m["ab"] == "A" else b)[m["mod"]] = key
        elif body.endswith(".alpha"):
            alphas[body[: -len(".alpha")]] = key
        else:
            raise LoRAError(f"LoRA key {key!r} is not understood as {fmt} LoRA (expected <module>.lora_A.weight, "
                            f"<module>.lora_B.weight or <module>.alpha; DoRA, biases, LoHa/LoKr are not supported)")
    for mod in sorted(set(a) ^ set(b)):
        key = a.get(mod) or b.get(mod)
        raise LoRAError(f"LoRA key {key!r} has no matching lora_{'B' if mod in a else 'A'} factor")
    for mod, key in alphas.items():
        if mod not in a:
            raise LoRAError(f"LoRA key {key!r}: an alpha for a module without factors")
    config = config or {}
    rslora = bool(config.get("use_rslora", False))
    out = []
    for mod in a:
        alpha: float | None = _scalar(sd, alphas[mod]) if mod in alphas else _config_alpha(config, mod)
        logical = "kohya:" + mod.replace(".", "_") if _BFL_DOTTED.match(mod) else mod
        out.append(_pair(logical, _matrix(sd, a[mod]), _matrix(sd, b[mod]), alpha, a[mod], rslora))
    return out


def _config_alpha(config: dict[str, Any], module: str) -> float | None:
    """PEFT's alpha for ``module``: an ``alpha_pattern`` entry matching the name's end, else ``lora_alpha``."""
    for pattern, alpha in (config.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(?:.*\.)?{pattern}", module):
            return _config_number(f"alpha_pattern[{pattern!r}]", alpha)
    alpha = config.get("lora_alpha")
    return None if alpha is None else _config_number("lora_alpha", alpha)


def _config_number(key: str, value: Any) -> float:
    # float("big") would say only "could not convert string to float", without naming the key.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise LoRAError(f"LoRA config: {key} must be a finite number, got {value!r}")
    return float(value)


def _parse_kohya(sd: Mapping[str, Tensor]) -> list[Factor]:
    """kohya: ``lora_unet_<name>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``; ``<name>`` is
    resolved later (underscores are ambiguous until the model's module names are known), so the factor's
    ``module`` is the kohya name itself, prefixed ``kohya:``."""
    parts: dict[str, dict[str, str]] = {}
    for key in sd:
        m = _KOHYA.match(key)
        if not m or not key.startswith(KOHYA_PREFIXES):
            raise LoRAError(f"LoRA key {key!r} is not understood as kohya LoRA (expected lora_unet_<module>"
                            f".lora_down.weight / .lora_up.weight / .alpha; text-encoder keys, DoRA, LoHa/LoKr "
                            f"are not supported)")
        name = m["mod"]
        for p in KOHYA_PREFIXES:
            if name.startswith(p):
                name = name[len(p):]
        parts.setdefault(name, {})[m["part"]] = key
    out = []
    for name, got in parts.items():
        for need in ("lora_down.weight", "lora_up.weight"):
            if need not in got:
                some = next(iter(got.values()))
                raise LoRAError(f"LoRA key {some!r} has no matching .{need}")
        alpha = _scalar(sd, got["alpha"]) if "alpha" in got else None
        down_key = got["lora_down.weight"]
        out.append(_pair("kohya:" + name, _matrix(sd, down_key), _matrix(sd, got["lora_up.weight"]), alpha,
                         down_key))
    return out


__all__ = ["Factor", "read_file", "parse_state_dict", "detect_format"]
