"""diffusers' LoRA methods on a quantized pipeline, routed to :mod:`lowbit_engine.lora`.

diffusers' own loaders inject PEFT layers around ``nn.Linear`` weights, which a quantized layer does not
have (``pipe.load_lora_weights`` died with a ``KeyError`` on a weight name, and ``fuse_lora`` /
``unload_lora_weights`` / ``enable_lora_hotswap`` did nothing). After ``engine.load(pipe)`` the pipeline's
methods are replaced, on that pipeline object only:

- ``pipe.load_lora_weights(src, adapter_name=None, hotswap=False, weight_name=None)``: ``engine.lora.load`` (name
  ``"default_<n>"`` as diffusers names them); ``hotswap=True`` swaps the adapter of that name in place;
- ``pipe.set_adapters(names, adapter_weights=None)``: the named adapters at those strengths (1.0 by
  default), every other loaded adapter at 0, as diffusers does;
- ``pipe.unload_lora_weights()``: every adapter out and the capacity released (``engine.lora.release``);
- ``pipe.delete_adapters(names)``: ``engine.lora.unload`` each;
- ``pipe.enable_lora_hotswap(target_rank=...)``: reserves ``target_rank`` slots for the first load (swaps
  are always in place here);
- ``pipe.fuse_lora`` / ``unfuse_lora``: a :class:`LoRAError`: fusing would requantize the 4-bit weights;
  the adapters already run inside the low-rank branch at no extra kernel.

The transformer's own PEFT entry points (``load_lora_adapter``, ``fuse_lora``, ...) raise the same exact
error pointing here, so a pipeline built around a ``from_pretrained``-quantized transformer never silently
does nothing.

Example:
    >>> import lowbit_engine as engine                                   # doctest: +SKIP
    >>> engine.load(pipe)                                                # doctest: +SKIP
    >>> pipe.load_lora_weights("style.safetensors", adapter_name="style")  # doctest: +SKIP
    >>> pipe.set_adapters(["style"], adapter_weights=[0.7])              # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from .errors import LoRAError

_FUSE_MSG = ("{what}: a quantized transformer cannot fuse a LoRA into its 4-bit weights (that would requantize "
             "them); lowbit_engine.lora runs adapters inside the low-rank branch instead: "
             "lowbit_engine.lora.load(pipe, file, name=..., strength=...)")
_PEFT_MSG = ("{what}: diffusers' PEFT LoRA layers cannot wrap lowbit-engine's quantized layers; use "
             "pipe.load_lora_weights on the pipeline engine.load quantized, or lowbit_engine.lora.load(pipe, file, "
             "name=...), set_strength, swap, unload")
_TRANSFORMER_METHODS = ("load_lora_adapter", "fuse_lora", "unfuse_lora", "unload_lora", "set_adapters",
                        "enable_lora_hotswap", "delete_adapters", "disable_lora", "enable_lora", "add_adapter")


def _raiser(message: str):
    def method(*args: Any, **kwargs: Any) -> None:
        raise LoRAError(message)
    return method


def guard_transformer(transformer: nn.Module) -> None:
    """Replace the transformer's PEFT LoRA methods (on this instance) by exact errors."""
    for name in _TRANSFORMER_METHODS:
        if hasattr(transformer, name):
            msg = _FUSE_MSG if "fuse" in name else _PEFT_MSG
            object.__setattr__(transformer, name, _raiser(msg.format(what=f"{type(transformer).__name__}.{name}")))


class _Routes:
    """The pipeline's LoRA methods bound to one pipeline (see the module docstring)."""

    def __init__(self, pipe: Any):
        self.pipe = pipe
        self.reserve: int | None = None
        self.count = 0

    def load_lora_weights(self, source: Any, adapter_name: str | None = None, hotswap: bool = False,
                          **kwargs: Any) -> None:
        from . import load, loaded, swap

        weight_name = kwargs.pop("weight_name", None)
        if weight_name is not None:  # diffusers' form for a folder: load_lora_weights(folder, weight_name=file)
            from pathlib import Path

            source = Path(source) / weight_name
        ignored = sorted(k for k in kwargs if k != "low_cpu_mem_usage")
        if ignored:
            raise LoRAError(f"load_lora_weights on a quantized pipeline: arguments {ignored} are not supported "
                            f"(lowbit_engine.lora.load takes source, name, strength, max_rank, config)")
        name = adapter_name or f"default_{self.count}"
        self.count += adapter_name is None
        if hotswap:
            if name not in loaded(self.pipe):
                raise LoRAError(f"load_lora_weights(hotswap=True): no adapter named {name!r} is loaded to swap")
            swap(self.pipe, name, source)
        else:
            load(self.pipe, source, name, max_rank=self.reserve)

    def set_adapters(self, adapter_names: str | Sequence[str], adapter_weights: Any = None) -> None:
        from . import loaded, set_strength

        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if adapter_weights is None:
            weights = [1.0] * len(names)
        elif isinstance(adapter_weights, (int, float)):
            weights = [float(adapter_weights)] * len(names)
        else:
            weights = list(adapter_weights)
        if len(weights) != len(names) or any(isinstance(w, dict) for w in weights):
            raise LoRAError(f"set_adapters: expected one number per adapter for {names}, got {adapter_weights!r} "
                            f"(per-block weight dicts are not supported on a quantized pipeline)")
        have = loaded(self.pipe)
        missing = [n for n in names if n not in have]
        if missing:
            raise LoRAError(f"set_adapters: no adapter named {missing} is loaded (loaded: {sorted(have) or 'none'})")
        for n in have:  # diffusers: only the named adapters stay active
            set_strength(self.pipe, n, weights[names.index(n)] if n in names else 0.0)

    def delete_adapters(self, adapter_names: str | Sequence[str]) -> None:
        from . import unload

        for n in [adapter_names] if isinstance(adapter_names, str) else adapter_names:
            unload(self.pipe, n)

    def unload_lora_weights(self, *args: Any, **kwargs: Any) -> None:
        from . import release

        release(self.pipe)

    def enable_lora_hotswap(self, target_rank: int | None = None, **kwargs: Any) -> None:
        from . import capacity

        if capacity(self.pipe) is not None:
            raise LoRAError("enable_lora_hotswap: call it before the first load_lora_weights (the LoRA capacity is "
                            "allocated by the first load); lowbit_engine.lora.release(pipe) frees it")
        self.reserve = target_rank

    def fuse_lora(self, *args: Any, **kwargs: Any) -> None:
        raise LoRAError(_FUSE_MSG.format(what="fuse_lora"))

    def unfuse_lora(self, *args: Any, **kwargs: Any) -> None:
        raise LoRAError(_FUSE_MSG.format(what="unfuse_lora"))


def route_pipeline(pipe: Any) -> None:
    """Bind the routed LoRA methods on ``pipe`` (a diffusers pipeline; other objects are left alone).

    ``engine.load(pipe)`` does it. A pipeline assembled around a transformer from ``from_pretrained`` (a
    lowbit folder, or ``quantization_config=``) needs this call: diffusers' FLUX loader reads
    ``<layer>.weight`` from the transformer's state dict before any transformer method runs, and a quantized
    layer has no such tensor (a ``KeyError`` inside diffusers otherwise).

    Example:
        >>> lowbit_engine.lora.route_pipeline(pipe)                          # doctest: +SKIP
        >>> pipe.load_lora_weights("style.safetensors", adapter_name="style")  # doctest: +SKIP
    """
    if not hasattr(pipe, "load_lora_weights"):
        return
    routes = _Routes(pipe)
    for name in ("load_lora_weights", "set_adapters", "delete_adapters", "unload_lora_weights",
                 "enable_lora_hotswap", "fuse_lora", "unfuse_lora"):
        object.__setattr__(pipe, name, getattr(routes, name))


__all__ = ["guard_transformer", "route_pipeline"]
