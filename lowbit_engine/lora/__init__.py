"""LoRA adapters on a quantized transformer without requantization: load, strength, swap, unload.

A LoRA ``delta_W = scale * B @ A`` is low-rank, and :class:`~lowbit_engine.nn.SVDQLinear` already runs a
16-bit low-rank branch next to its int4 GEMM. So a LoRA is *appended* to that branch (A rows to
``lora_down``, ``scale * B`` columns to ``lora_up``): the quantized weights are never touched, and the
branch just gets wider ("the rank grows to 32 plus the sum of the ranks, padded to 16"). Layers kept in
bf16 get the same slots as a side branch. Everything lives in capacity preallocated on the first load, so
later loads, swaps, strength changes and unloads are in-place copies (see :mod:`.apply`).

Formats: diffusers, PEFT and kohya (incl. BFL FLUX names) safetensors files or state dicts
(:mod:`.parse`); Q/K/V LoRAs land on the fused ``to_qkv`` / ``to_added_qkv`` layers (:mod:`.mapping`).

Example:
    >>> import lowbit_engine as engine                                             # doctest: +SKIP
    >>> engine.load(pipe)                                                          # doctest: +SKIP
    >>> engine.lora.load(pipe, "style.safetensors", "style", strength=0.8)         # doctest: +SKIP
    >>> engine.lora.load(pipe, "detail.safetensors", "detail", strength=0.5)       # doctest: +SKIP
    >>> engine.lora.set_strength(pipe, "style", 0.6)                               # doctest: +SKIP
    >>> engine.lora.swap(pipe, "style", "other_style.safetensors")                 # doctest: +SKIP
    >>> engine.lora.unload(pipe, "detail")                                         # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ..integrations.diffusers import resolve_transformer
from . import apply, convert, parse
from .apply import DEFAULT_CAPACITY, Adapter, LoRAState, pad, state_of
from .errors import LoRAError
from .mapping import Piece, map_factors
from .parse import parse_state_dict
from .diffusers_api import route_pipeline  # pipe.load_lora_weights & co. -> this module (engine.load does it)

Source = str | os.PathLike[str] | Mapping[str, Tensor]
CACHE_SIZE = 8  # mapped adapters kept per model; switching back to one of them re-reads nothing


# ---- the cache ----------------------------------------------------------------------------------


def _cache_key(source: Source, config: dict[str, Any] | None) -> tuple[Any, Any]:
    """``(key, ref)``: files by path, mtime and size (an edited file is read again); state dicts by identity
    (the cache holds a reference, so the id cannot be reused while the entry lives)."""
    cfg = None if config is None else repr(sorted(config.items()))
    if isinstance(source, Mapping):
        return ("state_dict", id(source), cfg), source
    p = Path(source)
    target = p / "adapter_model.safetensors" if p.is_dir() else p
    try:
        st = target.stat()
    except OSError as e:
        raise LoRAError(f"LoRA file {str(target)!r} does not exist") from e
    return ("file", str(target.resolve()), st.st_mtime_ns, st.st_size, cfg), None


def _pieces(transformer: nn.Module, st: LoRAState, source: Source,
            config: dict[str, Any] | None) -> tuple[Any, list[Piece]]:
    """The mapped pieces of ``source`` on ``transformer``, from the cache or read, parsed and mapped."""
    key, ref = _cache_key(source, config)
    hit = st.cache.pop(key, None)
    if hit is not None:
        st.cache[key] = hit  # most recently used last
        return key, hit[1]
    if isinstance(source, Mapping):
        sd, file_cfg = source, None
    else:
        sd, file_cfg = parse.read_file(source)
    pieces = _read(transformer, sd, config if config is not None else file_cfg)
    st.cache[key] = (ref, pieces)
    in_use = {a.source for a in st.adapters.values()}
    for old in list(st.cache):  # evict least recently used entries no loaded adapter points at
        if len(st.cache) <= CACHE_SIZE:
            break
        if old not in in_use and old != key:
            del st.cache[old]
    return key, pieces


def _read(transformer: nn.Module, sd: Mapping[str, Tensor], config: dict[str, Any] | None) -> list[Piece]:
    """The project's parser first (exact for diffusers, PEFT, kohya and BFL names, fused factors kept as one
    block); what it cannot read goes through diffusers' converter for the architecture (:mod:`.convert`).
    When both fail the error gives both reasons. Text-encoder keys the converter finds are skipped, with a
    warning (the transformer is what lowbit-engine adapts)."""
    try:
        return map_factors(transformer, parse_state_dict(sd, config))
    except LoRAError as own:
        try:
            converted, dropped = convert.convert(sd, transformer)
            pieces = map_factors(transformer, parse_state_dict(converted, config))
        except LoRAError as theirs:
            raise LoRAError(f"{own}; diffusers' converters could not read it either: {theirs}") from own
    if dropped:
        warnings.warn(f"lowbit_engine.lora: skipped {len(dropped)} keys of other components (text encoders), "
                      f"e.g. {dropped[0]!r}: only the transformer's LoRA is applied", LoRASkippedKeysWarning,
                      stacklevel=4)
    return pieces


class LoRASkippedKeysWarning(UserWarning):
    """A LoRA file held keys for other components than the transformer (text encoders); they were skipped."""


# ---- checks -------------------------------------------------------------------------------------


def _strength(s: Any) -> float:
    # float("strong") would say only "could not convert string to float"; float(None) a bare TypeError.
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(float(s)):
        raise LoRAError(f"strength must be a finite number (e.g. 0.8), got {s!r}")
    return float(s)


def _loaded(st: LoRAState, name: str) -> Adapter:
    if name not in st.adapters:
        raise LoRAError(f"no LoRA adapter named {name!r} is loaded (loaded: {sorted(st.adapters) or 'none'})")
    return st.adapters[name]


def _capacity_for(st: LoRAState, pieces: list[Piece], max_rank: int | None) -> int:
    """Slots per layer: fixed by the first load (``max_rank``, default max(64, the adapter's rank)), padded."""
    if st.capacity is not None:
        if max_rank is not None and pad(max_rank) > st.capacity:
            raise LoRAError(f"max_rank={max_rank} is more than the capacity of {st.capacity} slots allocated by "
                            f"the first load; growing would reallocate every buffer (and recompile): call "
                            f"lowbit_engine.lora.release(pipe) with no adapter loaded, then load with max_rank=")
        return st.capacity
    need: dict[str, int] = {}
    for p in pieces:
        need[p.layer] = need.get(p.layer, 0) + p.rank
    if max_rank is None:
        return pad(max([DEFAULT_CAPACITY, *need.values()]))
    if max_rank <= 0:
        raise LoRAError(f"max_rank must be positive, got {max_rank}")
    return pad(max_rank)


# ---- public API ---------------------------------------------------------------------------------


def load(obj: Any, source: Source, name: str, strength: float = 1.0, *, max_rank: int | None = None,
         config: dict[str, Any] | None = None) -> Any:
    """Load a LoRA into the (quantized) transformer of ``obj`` under ``name``, at ``strength``.

    Args:
        obj: a diffusers pipeline (its ``.transformer``) or the transformer itself.
        source: a ``.safetensors`` file (diffusers, PEFT or kohya keys), a PEFT directory, or a state dict.
        name: the adapter's name for :func:`set_strength`, :func:`swap` and :func:`unload`.
        strength: multiplies ``alpha / rank``.
        max_rank: LoRA slots per layer to preallocate on the FIRST load (padded to 16; default max(64, the
            rank this adapter needs on its busiest layer)). Every later adapter (all loaded at once, summed
            per layer) must fit in it. On a fused QKV layer separate q, k, v factors of rank r take 3r slots
            (block-diagonal); a fused qkv factor (BFL ``img_attn_qkv``) takes r.
        config: a PEFT ``adapter_config`` dict for a state dict (a file's ``adapter_config.json`` beside it is
            read by itself).

    Returns ``obj``. Raises :class:`LoRAError` (the model unchanged) for an unknown key, a shape mismatch,
    NaN/inf, a rank over the free capacity or a name already loaded.

    Example:
        >>> engine.lora.load(pipe, "style.safetensors", "style", strength=0.8, max_rank=128)  # doctest: +SKIP
    """
    transformer = resolve_transformer(obj, "lowbit_engine.lora.load")
    st = state_of(transformer)
    if not isinstance(name, str) or not name:
        raise LoRAError(f"an adapter name must be a non-empty string, got {name!r}")
    if name in st.adapters:
        raise LoRAError(f"a LoRA adapter named {name!r} is already loaded; unload() or swap() it")
    strength = _strength(strength)
    key, pieces = _pieces(transformer, st, source, config)
    capacity = _capacity_for(st, pieces, max_rank)
    # Stage everything (new buffers, slot plan) before the first write: a failure leaves the model as it was.
    grows = apply.stage_capacity(transformer, st, capacity) if st.capacity is None else []
    staged = LoRAState(capacity, dict(st.layers), {}, {})
    if grows:  # plan against the capacity about to exist
        staged.layers.update({g.name: apply.LayerSlots(g.module, 0, capacity) for g in grows})
    starts = apply.plan(staged, pieces, None, name)
    apply.install_capacity(st, grows, capacity)
    adapter = Adapter(name, key, pieces, strength, starts)
    apply.write(st, adapter)
    st.adapters[name] = adapter
    return obj


def set_strength(obj: Any, name: str, strength: float) -> None:
    """Change a loaded adapter's strength in place (0 switches it off; it keeps its slots).

    Example:
        >>> engine.lora.set_strength(pipe, "style", 0.5)  # doctest: +SKIP
    """
    st = state_of(resolve_transformer(obj, "lowbit_engine.lora.set_strength"))
    adapter = _loaded(st, name)
    adapter.strength = _strength(strength)
    apply.write(st, adapter, up_only=True)


def swap(obj: Any, name: str, source: Source, strength: float | None = None, *,
         config: dict[str, Any] | None = None) -> None:
    """Replace the adapter ``name`` by another LoRA in its place: in-place copies into the preallocated
    slots, no reallocation (same buffers, same pointers), so compiled graphs and CUDA graphs stay valid.
    ``strength``: None keeps the old adapter's. A previously loaded source comes from the cache.

    Raises :class:`LoRAError` (the old adapter still loaded, unchanged) if the new one does not parse, map
    or fit.

    Example:
        >>> engine.lora.swap(pipe, "style", "watercolor.safetensors")  # doctest: +SKIP
    """
    transformer = resolve_transformer(obj, "lowbit_engine.lora.swap")
    st = state_of(transformer)
    old = _loaded(st, name)
    strength = old.strength if strength is None else _strength(strength)
    key, pieces = _pieces(transformer, st, source, config)
    starts = apply.plan(st, pieces, name, name)
    new = Adapter(name, key, pieces, strength, starts)
    apply.clear(st, old, keep=new)
    apply.write(st, new)
    st.adapters[name] = new


def unload(obj: Any, name: str) -> None:
    """Remove the adapter ``name``: its slots are zeroed, so the outputs are bit-identical to before it was
    loaded. The capacity stays allocated (for the next load or a compiled graph); :func:`release` frees it.

    Example:
        >>> engine.lora.unload(pipe, "style")  # doctest: +SKIP
    """
    st = state_of(resolve_transformer(obj, "lowbit_engine.lora.unload"))
    adapter = _loaded(st, name)
    apply.clear(st, adapter)
    del st.adapters[name]


def loaded(obj: Any) -> dict[str, float]:
    """The loaded adapters and their strengths.

    Example:
        >>> engine.lora.loaded(pipe)  # doctest: +SKIP
        {'style': 0.8}
    """
    st = state_of(resolve_transformer(obj, "lowbit_engine.lora.loaded"))
    return {n: a.strength for n, a in st.adapters.items()}


def capacity(obj: Any) -> int | None:
    """LoRA slots per layer (None before the first load)."""
    return state_of(resolve_transformer(obj, "lowbit_engine.lora.capacity")).capacity


def release(obj: Any) -> None:
    """Unload every adapter and free the capacity: the layers get back their original buffers (and the
    bf16 layers lose their hook). A compiled model recompiles afterwards; the next load allocates again."""
    st = state_of(resolve_transformer(obj, "lowbit_engine.lora.release"))
    for name in list(st.adapters):
        unload(obj, name)
    apply.release_capacity(st)


def clear_cache(obj: Any) -> None:
    """Forget the cached adapters that are not loaded (their device copies are freed)."""
    st = state_of(resolve_transformer(obj, "lowbit_engine.lora.clear_cache"))
    in_use = {a.source for a in st.adapters.values()}
    for key in [k for k in st.cache if k not in in_use]:
        del st.cache[key]


__all__ = ["load", "unload", "swap", "set_strength", "loaded", "capacity", "release", "clear_cache", "LoRAError",
           "LoRASkippedKeysWarning", "route_pipeline"]
