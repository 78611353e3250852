"""LoRA files through diffusers' own converters (``diffusers.loaders.lora_conversion_utils``, reached via each
pipeline mixin's ``lora_state_dict``), for the naming schemes the project's parser does not read: kohya files
that carry text-encoder keys too, XLabs ``processor.qkv_lora1``, Wan's original ``diffusion_model.blocks``
names, and whatever else diffusers learns to read.

The result is a diffusers-format state dict (``transformer.<module>.lora_A.weight`` / ``lora_B.weight``, and
``<module>.alpha`` for the network alphas a converter returns) that :mod:`.parse` reads. Keys for other
components (text encoders) are dropped, and returned so the caller can say so: lowbit-engine quantizes and
adapts the transformer only.

Example:
    >>> from torch import nn
    >>> convert({"x.lora_A.weight": None}, nn.Linear(4, 4))
    Traceback (most recent call last):
    ...
    lowbit_engine.lora.errors.LoRAError: diffusers has no LoRA converter for a Linear (known: FluxTransformer2DModel, SD3Transformer2DModel, SanaTransformer2DModel, WanTransformer3DModel)
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from .errors import LoRAError

# transformer class -> the diffusers pipeline mixin whose lora_state_dict converts files for it
MIXINS = {"FluxTransformer2DModel": "FluxLoraLoaderMixin", "SD3Transformer2DModel": "SD3LoraLoaderMixin",
          "SanaTransformer2DModel": "SanaLoraLoaderMixin", "WanTransformer3DModel": "WanLoraLoaderMixin"}
PREFIX = "transformer."
OTHER_COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "unet")


def convert(sd: Mapping[str, Any], transformer: nn.Module) -> tuple[dict[str, Tensor], list[str]]:
    """``(state dict for the transformer, keys of other components dropped)`` from diffusers' converter for
    ``transformer``'s architecture.

    Raises LoRAError when diffusers has no converter for the architecture, or its converter fails or keeps
    no transformer key.
    """
    arch = type(transformer).__name__
    if arch not in MIXINS:
        raise LoRAError(f"diffusers has no LoRA converter for a {arch} (known: {', '.join(MIXINS)})")
    from diffusers import loaders

    mixin = getattr(loaders, MIXINS[arch], None) or getattr(loaders.lora_pipeline, MIXINS[arch])
    fn = mixin.lora_state_dict
    kwargs = {"return_alphas": True} if "return_alphas" in inspect.signature(fn).parameters else {}
    try:
        out = fn(dict(sd), **kwargs)
    except Exception as e:  # the converters raise ValueError, KeyError, ...: all mean "not readable here"
        raise LoRAError(f"diffusers' {MIXINS[arch]}.lora_state_dict could not convert it: "
                        f"{type(e).__name__}: {e}") from e
    converted, alphas = (out[0], out[1]) if isinstance(out, tuple) else (out, None)
    kept: dict[str, Tensor] = {}
    dropped: list[str] = []
    for key, value in converted.items():
        if key.split(".")[0] in OTHER_COMPONENTS:
            dropped.append(key)
        else:  # some converters leave a few transformer keys unprefixed (FLUX: norm_out.linear)
            kept[key if key.startswith(PREFIX) else PREFIX + key] = value
    for key, alpha in (alphas or {}).items():  # network alphas: "<prefix>.<module>.alpha"
        name = key if key.startswith(PREFIX) else None
        if name is not None:
            kept[name if name.endswith(".alpha") else f"{name}.alpha"] = alpha
    if not kept:
        raise LoRAError(f"diffusers' {MIXINS[arch]}.lora_state_dict kept no transformer key "
                        f"(e.g. {next(iter(converted), None)!r})")
    if converted is not None and set(kept) == set(sd) and all(kept[k] is sd[k] for k in kept):
        raise LoRAError(f"diffusers' {MIXINS[arch]}.lora_state_dict left the keys as they were")
    return kept, sorted(dropped)


__all__ = ["convert", "MIXINS"]
