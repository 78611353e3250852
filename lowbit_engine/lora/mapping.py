"""Mapping LoRA factors onto the layers that exist after ``engine.load``, fused QKV included.

A factor names a *logical* module of the unfused diffusers transformer (``attn.to_q``), a fused group
(``attn.to_qkv``, from a BFL ``img_attn_qkv`` key) or a kohya name with underscores. After QKV fusion the
separate ``to_q`` / ``to_k`` / ``to_v`` are gone; their LoRA lands on the rows of the fused ``to_qkv`` that
belong to them. So every factor becomes one or more :class:`Piece` ``(layer, row offset, down, up)``: the
down factor reads the layer's full input, the up factor writes only its row slice (block-diagonal when
Q, K and V each bring their own factors).

Example:
    >>> from torch import nn
    >>> attn = nn.Module(); attn.to_qkv = nn.Linear(64, 192)
    >>> names = LogicalNames(nn.ModuleDict({"attn": attn}))
    >>> names.resolve("attn.to_k")
    [('attn.to_qkv', 64, 64)]
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..nn import SVDQLinear, W4A16Linear
from .errors import LoRAError
from .parse import Factor

# fused layer name -> the separate projections it concatenates, in row order
FUSED_PARTS = {"to_qkv": ("to_q", "to_k", "to_v"), "to_kv": ("to_k", "to_v"),
               "to_added_qkv": ("add_q_proj", "add_k_proj", "add_v_proj")}

# BFL (original FLUX) module names as kohya writes them -> diffusers logical names, in row order.
# "{i}" is the block index. A list of several targets splits the up factor's rows (single-block linear1 is
# q, k, v and the MLP input concatenated).
_BFL: list[tuple[re.Pattern[str], tuple[str, ...]]] = [(re.compile(p), t) for p, t in [
    (r"double_blocks_(\d+)_img_attn_qkv", ("transformer_blocks.{i}.attn.to_qkv",)),
    (r"double_blocks_(\d+)_img_attn_proj", ("transformer_blocks.{i}.attn.to_out.0",)),
    (r"double_blocks_(\d+)_img_mlp_0", ("transformer_blocks.{i}.ff.net.0.proj",)),
    (r"double_blocks_(\d+)_img_mlp_2", ("transformer_blocks.{i}.ff.net.2",)),
    (r"double_blocks_(\d+)_img_mod_lin", ("transformer_blocks.{i}.norm1.linear",)),
    (r"double_blocks_(\d+)_txt_attn_qkv", ("transformer_blocks.{i}.attn.to_added_qkv",)),
    (r"double_blocks_(\d+)_txt_attn_proj", ("transformer_blocks.{i}.attn.to_add_out",)),
    (r"double_blocks_(\d+)_txt_mlp_0", ("transformer_blocks.{i}.ff_context.net.0.proj",)),
    (r"double_blocks_(\d+)_txt_mlp_2", ("transformer_blocks.{i}.ff_context.net.2",)),
    (r"double_blocks_(\d+)_txt_mod_lin", ("transformer_blocks.{i}.norm1_context.linear",)),
    (r"single_blocks_(\d+)_linear1", ("single_transformer_blocks.{i}.attn.to_qkv",
                                      "single_transformer_blocks.{i}.proj_mlp")),
    (r"single_blocks_(\d+)_linear2", ("single_transformer_blocks.{i}.proj_out",)),
    (r"single_blocks_(\d+)_modulation_lin", ("single_transformer_blocks.{i}.norm.linear",)),
    (r"img_in", ("x_embedder",)),
    (r"txt_in", ("context_embedder",)),
    (r"time_in_in_layer", ("time_text_embed.timestep_embedder.linear_1",)),
    (r"time_in_out_layer", ("time_text_embed.timestep_embedder.linear_2",)),
    (r"vector_in_in_layer", ("time_text_embed.text_embedder.linear_1",)),
    (r"vector_in_out_layer", ("time_text_embed.text_embedder.linear_2",)),
    (r"guidance_in_in_layer", ("time_text_embed.guidance_embedder.linear_1",)),
    (r"guidance_in_out_layer", ("time_text_embed.guidance_embedder.linear_2",)),
    (r"final_layer_linear", ("proj_out",)),
    (r"final_layer_adaLN_modulation_1", ("norm_out.linear",)),
]]
# BFL's final adaLN emits (shift, scale); diffusers' AdaLayerNormContinuous chunks (scale, shift).
_SWAP_HALVES = {"norm_out.linear"}


def is_target(module: nn.Module) -> bool:
    """Layers a LoRA can land on: SVDQLinear (into its low-rank branch), plain nn.Linear and the weight-only
    W4A16Linear (a side branch; the 4-bit weights are never written)."""
    return isinstance(module, (SVDQLinear, W4A16Linear, nn.Linear))


def layer_dtype(module: nn.Module) -> torch.dtype:
    return module.dtype if isinstance(module, (SVDQLinear, W4A16Linear)) else module.weight.dtype


def layer_device(module: nn.Module) -> torch.device:
    return module.qweight.device if isinstance(module, (SVDQLinear, W4A16Linear)) else module.weight.device


@dataclass(frozen=True)
class Piece:
    """A factor's share of one layer: rows ``[row, row + up.shape[0])`` of ``layer`` get
    ``scale * up @ down`` (``scale`` = alpha / rank; the user's strength multiplies it when written).
    ``down`` / ``up`` are in the layer's dtype and on its device."""

    layer: str
    row: int
    down: Tensor
    up: Tensor
    scale: float
    key: str

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


class LogicalNames:
    """The transformer's targetable layers under the names a LoRA may use for them.

    ``resolve(name)`` -> ``[(layer, row offset, rows)]``: a layer itself; a separate projection inside a
    fused layer (its row slice); a fused group whose parts were not fused (split into the parts); or None.
    """

    def __init__(self, transformer: nn.Module):
        self.layers: dict[str, nn.Module] = {n: m for n, m in transformer.named_modules() if n and is_target(m)}
        self.others: dict[str, nn.Module] = {n: m for n, m in transformer.named_modules() if n}
        self.parts: dict[str, tuple[str, int, int]] = {}  # separate name -> (fused layer, offset, rows)
        self.groups: dict[str, list[str]] = {}            # unfused group name -> its existing parts
        for name, mod in self.layers.items():
            parent, _, child = name.rpartition(".")
            if child in FUSED_PARTS:
                n_parts = len(FUSED_PARTS[child])
                rows = mod.out_features // n_parts
                for i, part in enumerate(FUSED_PARTS[child]):
                    self.parts[_join(parent, part)] = (name, i * rows, rows)
        for name in self.layers:
            parent, _, child = name.rpartition(".")
            for fused, parts in FUSED_PARTS.items():
                names = [_join(parent, p) for p in parts]
                if child == parts[0] and all(n in self.layers for n in names):
                    self.groups[_join(parent, fused)] = names
        # kohya writes module paths with "_" for "."; names are unambiguous in diffusers models
        logical = [*self.layers, *self.parts, *self.groups]
        self.underscored = {n.replace(".", "_"): n for n in logical}

    def resolve(self, name: str) -> list[tuple[str, int, int]] | None:
        if name in self.layers:
            return [(name, 0, self.layers[name].out_features)]
        if name in self.parts:
            return [self.parts[name]]
        if name in self.groups:
            return [(p, 0, self.layers[p].out_features) for p in self.groups[name]]
        return None

    def kohya_targets(self, name: str) -> list[str] | None:
        """Logical names for a kohya module name (``transformer_blocks_0_attn_to_q`` or BFL style)."""
        if name in self.underscored:
            return [self.underscored[name]]
        for rx, targets in _BFL:
            m = rx.fullmatch(name)
            if m:
                i = m.group(1) if m.groups() else ""
                return [t.format(i=i) for t in targets]
        return None


def _join(parent: str, child: str) -> str:
    return f"{parent}.{child}" if parent else child


def map_factors(transformer: nn.Module, factors: list[Factor]) -> list[Piece]:
    """The pieces of ``factors`` on ``transformer``'s layers, every shape checked.

    Raises LoRAError naming the key when a module is unknown, not a linear layer, or the shapes differ.
    """
    names = LogicalNames(transformer)
    pieces: list[Piece] = []
    for f in factors:
        if f.module.startswith("kohya:"):
            logical = names.kohya_targets(f.module[len("kohya:"):])
        else:
            logical = [f.module]
        if logical is None:
            raise LoRAError(f"LoRA key {f.key!r}: module {f.module!r} is not in the model")
        targets: list[tuple[str, int, int]] = []
        for lname in logical:
            resolved = names.resolve(lname)
            if resolved is None:
                if lname in names.others:
                    raise LoRAError(f"LoRA key {f.key!r}: module {lname!r} is a "
                                    f"{type(names.others[lname]).__name__}; LoRA goes into linear layers only")
                raise LoRAError(f"LoRA key {f.key!r}: module {lname!r} is not in the model")
            targets.extend(resolved)
        rows = sum(n for _, _, n in targets)
        if f.up.shape[0] != rows:
            raise LoRAError(f"LoRA key {f.key!r}: up factor has {f.up.shape[0]} rows, the target "
                            f"{', '.join(t for t, _, _ in targets)} has {rows} output features")
        up = f.up
        if logical == ["norm_out.linear"] and f.module.startswith("kohya:final_layer"):
            up = torch.cat(up.chunk(2, dim=0)[::-1])  # BFL (shift, scale) -> diffusers (scale, shift)
        start = 0
        for layer, row, n in targets:
            mod = names.layers[layer]
            if f.down.shape[1] != mod.in_features:
                raise LoRAError(f"LoRA key {f.key!r}: down factor is {tuple(f.down.shape)}, layer {layer!r} has "
                                f"{mod.in_features} input features")
            dtype, device = layer_dtype(mod), layer_device(mod)
            pieces.append(Piece(layer, row, f.down.to(device, dtype), up[start:start + n].to(device, dtype),
                                f.scale, f.key))
            start += n
    return pieces


__all__ = ["Piece", "LogicalNames", "map_factors", "is_target", "FUSED_PARTS"]
