"""Slots in preallocated low-rank capacity: where adapters live in the layers, and the in-place writes.

Every targetable layer gets, once, ``capacity`` extra rank slots (zeros) on top of its base rank:

- :class:`~lowbit_engine.nn.SVDQLinear`: ``lora_down`` grows to ``[base + capacity, K]`` and ``lora_up`` to
  ``[N, base + capacity]`` (the base rows/columns copied unchanged). The quantizer computes
  ``x @ lora_down^T`` for all of them and the GEMM epilogue adds ``lora_act @ lora_up^T``: a LoRA costs no
  extra kernel, only a wider low-rank branch.
- ``nn.Linear`` (layers the policy keeps in bf16) and the weight-only ``W4A16Linear``: two non-persistent buffers ``lora_down`` / ``lora_up``
  and a forward hook adding ``(x @ lora_down^T) @ lora_up^T``. A hook keeps the module, its name and its
  state dict as they were (checkpoints and the policy report see the same model), and dynamo traces
  module hooks, so ``torch.compile`` works when the capacity exists before compiling.

Zero slots add exactly 0 to the output, so unloading (writing zeros back) restores the outputs bit for bit,
and nothing but the slot contents ever changes afterwards: same shapes, same data pointers (no
recompilation, CUDA graphs stay valid). An adapter takes ``rank`` slots per piece on a layer (the q, k and
v factors of a fused QKV layer take one block each: block-diagonal), its scale ``strength * alpha / rank``
folded into the up columns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..nn import SVDQLinear
from .errors import LoRAError
from .mapping import Piece, is_target, layer_device, layer_dtype

SLOT_ALIGN = 16  # capacity is padded to a multiple of 16 (the kernels' rank tiles)
DEFAULT_CAPACITY = 64


def pad(rank: int, align: int = SLOT_ALIGN) -> int:
    """``rank`` rounded up to a multiple of ``align``.

    Example:
        >>> pad(1), pad(16), pad(40)
        (16, 16, 48)
    """
    return -(-rank // align) * align


def _side_branch(module: nn.Linear, args: tuple[Any, ...], output: Tensor) -> Tensor:
    """Forward hook of a bf16 ``nn.Linear``: its LoRA slots as a low-rank side branch."""
    x = args[0]
    return output + (x.to(module.lora_down.dtype) @ module.lora_down.T @ module.lora_up.T).to(output.dtype)


@dataclass
class LayerSlots:
    """The capacity of one layer: ``base`` rank (SVDQuant's own branch; 0 for nn.Linear) + ``capacity``
    slots; ``used`` maps an adapter name to its ``(start, rank)`` ranges (relative to ``base``)."""

    module: nn.Module
    base: int
    capacity: int
    orig: tuple[Tensor, Tensor] | None = None  # SVDQLinear's original lora_down / lora_up, for release()
    hook: Any = None
    used: dict[str, list[tuple[int, int]]] = field(default_factory=dict)

    @property
    def down(self) -> Tensor:
        return self.module.lora_down

    @property
    def up(self) -> Tensor:
        return self.module.lora_up

    def free(self, without: str | None = None) -> int:
        return self.capacity - sum(r for n, ranges in self.used.items() if n != without for _, r in ranges)

    def first_fit(self, ranks: list[int], without: str | None = None) -> list[int] | None:
        """Starts for blocks of ``ranks`` in the free slots (``without``'s slots counted free), or None."""
        taken = sorted(rng for n, ranges in self.used.items() if n != without for rng in ranges)
        starts = []
        for r in ranks:
            pos = 0
            for s, n in sorted(taken):
                if s - pos >= r:
                    break
                pos = max(pos, s + n)
            if pos + r > self.capacity:
                return None
            starts.append(pos)
            taken.append((pos, r))
        return starts


@dataclass
class Adapter:
    name: str
    source: Any                 # the cache key it was loaded from
    pieces: list[Piece]
    strength: float
    starts: list[int]           # slot start of each piece (relative to its layer's base)


@dataclass
class LoRAState:
    """Everything :mod:`lowbit_engine.lora` keeps on a transformer (``transformer.__dict__['_lowbit_lora']``)."""

    capacity: int | None = None
    layers: dict[str, LayerSlots] = field(default_factory=dict)
    adapters: dict[str, Adapter] = field(default_factory=dict)
    cache: dict[Any, tuple[Any, list[Piece]]] = field(default_factory=dict)  # key -> (source ref, pieces)


def state_of(transformer: nn.Module) -> LoRAState:
    st = transformer.__dict__.get("_lowbit_lora")
    if st is None:
        st = LoRAState()
        transformer.__dict__["_lowbit_lora"] = st  # not a submodule or buffer: the state dict is unchanged
    return st


# ---- capacity -----------------------------------------------------------------------------------


@dataclass
class Growth:
    """A layer's capacity buffers built on the side; installed only at commit time."""

    name: str
    module: nn.Module
    down: Tensor
    up: Tensor


def stage_capacity(transformer: nn.Module, st: LoRAState, capacity: int) -> list[Growth]:
    """New, zero-filled capacity for every targetable layer that has none yet (nothing installed)."""
    grows = []
    for name, mod in transformer.named_modules():
        if not name or not is_target(mod) or name in st.layers:
            continue
        dtype, device = layer_dtype(mod), layer_device(mod)
        base = mod.rank if isinstance(mod, SVDQLinear) else 0
        down = torch.zeros(base + capacity, mod.in_features, dtype=dtype, device=device)
        up = torch.zeros(mod.out_features, base + capacity, dtype=dtype, device=device)
        if base:  # the SVDQuant branch itself, copied bit for bit into the first columns
            down[:base].copy_(mod.lora_down)
            up[:, :base].copy_(mod.lora_up)
        grows.append(Growth(name, mod, down, up))
    return grows


def install_capacity(st: LoRAState, grows: list[Growth], capacity: int) -> None:
    for g in grows:
        mod = g.module
        if isinstance(mod, SVDQLinear):
            slots = LayerSlots(mod, mod.rank, capacity, orig=(mod.lora_down, mod.lora_up))
            mod.lora_down, mod.lora_up = g.down, g.up  # registered buffers: replaced in _buffers
            mod.rank = slots.base + capacity
        else:
            mod.register_buffer("lora_down", g.down, persistent=False)
            mod.register_buffer("lora_up", g.up, persistent=False)
            slots = LayerSlots(mod, 0, capacity, hook=mod.register_forward_hook(_side_branch))
        st.layers[g.name] = slots
    st.capacity = capacity


def release_capacity(st: LoRAState) -> None:
    """Undo :func:`install_capacity` on every layer (no adapter may be loaded)."""
    for slots in st.layers.values():
        mod = slots.module
        if isinstance(mod, SVDQLinear):
            # where and in what dtype the layer is now: a .to() since the first load moved the live buffers
            dev, dtype = mod.lora_down.device, mod.lora_down.dtype
            mod.lora_down, mod.lora_up = (t.to(device=dev, dtype=dtype) for t in slots.orig)
            mod.rank = slots.base
        else:
            slots.hook.remove()
            del mod._buffers["lora_down"], mod._buffers["lora_up"]
    st.layers.clear()
    st.capacity = None


# ---- planning and writing -----------------------------------------------------------------------


def plan(st: LoRAState, pieces: list[Piece], replacing: str | None, adapter: str) -> list[int]:
    """Slot starts for ``pieces`` (``replacing``'s slots count as free), or LoRAError naming the layer."""
    by_layer: dict[str, list[int]] = {}
    for i, p in enumerate(pieces):
        by_layer.setdefault(p.layer, []).append(i)
    starts = [0] * len(pieces)
    for layer, idx in by_layer.items():
        slots = st.layers.get(layer)
        if slots is None:
            raise LoRAError(f"layer {layer!r} has no LoRA capacity (it appeared after the first LoRA load); "
                            f"release() and load again")
        ranks = [pieces[i].rank for i in idx]
        got = slots.first_fit(ranks, without=replacing)
        if got is None:
            raise LoRAError(f"adapter {adapter!r} needs rank {sum(ranks)} on layer {layer!r} (key "
                            f"{pieces[idx[0]].key!r}), but only {slots.free(without=replacing)} of the "
                            f"{slots.capacity} preallocated slots are free; pass max_rank= on the first load (or "
                            f"release() with no adapter loaded) to reserve more")
        for i, s in zip(idx, got):
            starts[i] = s
    return starts


def _footprint(p: Piece, start: int) -> tuple[str, int, int, int, int]:
    return p.layer, start, p.rank, p.row, int(p.up.shape[0])


@torch.no_grad()
def clear(st: LoRAState, a: Adapter, keep: Adapter | None = None) -> None:
    """Zero ``a``'s slots (in place) and free them. Slots that ``keep`` (the swap's new adapter) is about to
    overwrite with the same footprint (layer, slots, rows) are not zeroed first: a swap between adapters
    of the same shape is then one copy per piece."""
    skip = set() if keep is None else {_footprint(p, s) for p, s in zip(keep.pieces, keep.starts)}
    for p, s in zip(a.pieces, a.starts):
        slots = st.layers[p.layer]
        slots.used.pop(a.name, None)
        if _footprint(p, s) in skip:
            continue
        c = slots.base + s
        slots.down[c:c + p.rank].zero_()
        slots.up[:, c:c + p.rank].zero_()


@torch.no_grad()
def write(st: LoRAState, a: Adapter, up_only: bool = False) -> None:
    """Copy ``a``'s factors into its slots (in place), the up columns scaled by ``strength * alpha / rank``."""
    for p, s in zip(a.pieces, a.starts):
        slots = st.layers[p.layer]
        c = slots.base + s
        if not up_only:
            slots.down[c:c + p.rank].copy_(p.down)
            slots.used.setdefault(a.name, []).append((s, p.rank))
        up = slots.up[p.row:p.row + p.up.shape[0], c:c + p.rank]
        up.copy_(p.up.float() * (a.strength * p.scale))  # scale in fp32, one rounding to the layer dtype


__all__ = ["LayerSlots", "Adapter", "LoRAState", "state_of", "stage_capacity", "install_capacity",
           "release_capacity", "plan", "clear", "write", "pad", "DEFAULT_CAPACITY"]
