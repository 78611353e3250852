"""Which linear layers of a diffusers transformer to quantize: one small table per architecture.

A :class:`Policy` is a list of rows ``(name regex, action, reason)``; the first row whose regex matches the
whole qualified module name (``re.fullmatch``) decides. Actions:

- ``"quantize"``: the layer becomes the format's module (e.g. :class:`~lowbit_engine.nn.SVDQLinear`): the
  format ``load`` was asked for, or the row's own ``fmt`` when it names one;
- ``"keep-bf16"``: the layer stays as it is, and the reason says why.

The tables follow SVDQuant practice for the big layers: attention projections and MLPs get the load's
format. The adaLN modulation linears (and ``norm_out``) run on one token per image, the time embedding, so
their cost is the weight read and 4-bit activations would buy nothing: they get the weight-only ``w4a16``
format (``fmt=W4A16``) whatever the load's format is. In FLUX.1-dev they hold 3.2 B of the 11.9 B
parameters. The timestep/text/caption embedders and the final projection stay bf16: together well under 1%
of the parameters, and docs/fidelity.md measures what quantizing them would cost. A layer that no row
matches is kept, and a "quantize" layer whose ``in_features`` is not a multiple of 64 (the group size) is
kept too, each with its reason in the load report. ``load(..., skip={regex: reason})`` opts single layers
out, with the caller's reason in the report.

Example:
    >>> FLUX.decide("transformer_blocks.0.attn.to_qkv", 3072).action
    'quantize'
    >>> FLUX.decide("transformer_blocks.0.norm1.linear", 3072).fmt
    'w4a16'
    >>> policy_for(type("MyDiT", (), {})()).name
    'generic'
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

QUANTIZE = "quantize"
KEEP = "keep-bf16"
ACTIONS = (QUANTIZE, KEEP)
GROUP = 64  # K must be a multiple of the int4 group size
W4A16 = "w4a16"  # the weight-only format of the adaLN rows

# Reasons shared by the tables (the report groups kept layers by reason, so the same words matter).
ATTN = "attention projection"
MLP = "MLP"
ADALN = "adaLN modulation: w4a16 weight-only (one token per image: the cost is the weight read)"
EMBED = "embedder: kept bf16 (runs once per step on few tokens)"
FINAL = "final projection: kept bf16 (sets the output directly)"
NO_RULE = "no policy row matched: kept bf16"
NOT_GROUPED = f"in_features not a multiple of {GROUP}: kept bf16"
USER_SKIP = "skip= given by the caller"
GENERIC_ADALN = "looks like adaLN modulation: w4a16 weight-only"


@dataclass(frozen=True)
class Rule:
    """One row of a policy table."""

    pattern: str
    action: str
    reason: str
    fmt: str | None = None  # a "quantize" row's own format (None: the format load was asked for)

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"Rule {self.pattern!r}: action must be one of {ACTIONS}, got {self.action!r}")
        if self.fmt is not None and self.action != QUANTIZE:
            raise ValueError(f"Rule {self.pattern!r}: only a {QUANTIZE!r} row can name a format, got fmt={self.fmt!r}")
        re.compile(self.pattern)  # fail at import, not at load time

    def format_for(self, load_fmt: str) -> str:
        """The format this row quantizes with when ``load`` was asked for ``load_fmt``."""
        return self.fmt or load_fmt


@dataclass(frozen=True)
class Policy:
    """A named table of rules, plus whether diffusers' QKV fusion is known to work for the architecture.

    ``fuse_qkv``: call ``fuse_qkv_projections()`` before quantizing. Only set where it was checked that the
    attention processors then run the fused ``to_qkv`` / ``to_added_qkv`` / ``to_kv`` layers (the separate
    projections become dead weight and are removed).
    """

    name: str
    rules: tuple[Rule, ...]
    fuse_qkv: bool = False
    _compiled: tuple[re.Pattern[str], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_compiled", tuple(re.compile(r.pattern) for r in self.rules))

    def decide(self, name: str, in_features: int) -> Rule:
        """The row that applies to the linear layer ``name`` (a synthetic row when none or K does not fit)."""
        for rx, rule in zip(self._compiled, self.rules):
            if rx.fullmatch(name):
                if rule.action == QUANTIZE and in_features % GROUP != 0:
                    return Rule(rule.pattern, KEEP, NOT_GROUPED)
                return rule
        return Rule(".*", KEEP, NO_RULE)


def _table(name: str, rows: list[tuple[str, ...]], fuse_qkv: bool) -> Policy:
    return Policy(name, tuple(Rule(*row) for row in rows), fuse_qkv)


_B = r"(?:transformer_blocks|single_transformer_blocks|blocks)\.\d+"  # a block prefix

# FLUX.1: 19 dual-stream blocks (image + context streams) and 38 single-stream blocks.
FLUX = _table("flux", [
    (rf"{_B}\.attn\.(?:to_qkv|to_added_qkv|to_[qkv]|add_[qkv]_proj|to_out\.0|to_add_out)", QUANTIZE, ATTN),
    (rf"{_B}\.(?:ff|ff_context)\.net\.(?:0\.proj|2)", QUANTIZE, MLP),
    (rf"{_B}\.(?:proj_mlp|proj_out)", QUANTIZE, "single-block MLP in / fused attention+MLP out"),
    (rf"{_B}\.(?:norm1|norm1_context|norm)\.linear", QUANTIZE, ADALN, W4A16),
    (r"time_text_embed\..*", KEEP, EMBED),
    (r"x_embedder|context_embedder", KEEP, EMBED),
    (r"norm_out\.linear", QUANTIZE, ADALN, W4A16),
    (r"proj_out", KEEP, FINAL),
], fuse_qkv=True)

# SD3 / SD3.5: dual-stream MMDiT blocks; SD3.5 adds a second self-attention (attn2) in early blocks.
SD3 = _table("sd3", [
    (rf"{_B}\.attn2?\.(?:to_qkv|to_added_qkv|to_[qkv]|add_[qkv]_proj|to_out\.0|to_add_out)", QUANTIZE, ATTN),
    (rf"{_B}\.(?:ff|ff_context)\.net\.(?:0\.proj|2)", QUANTIZE, MLP),
    (rf"{_B}\.(?:norm1|norm1_context)\.linear", QUANTIZE, ADALN, W4A16),
    (r"time_text_embed\..*", KEEP, EMBED),
    (r"context_embedder|pos_embed\..*", KEEP, EMBED),
    (r"norm_out\.linear", QUANTIZE, ADALN, W4A16),
    (r"proj_out", KEEP, FINAL),
], fuse_qkv=True)

# PixArt-Sigma: self-attention (attn1), cross-attention to the caption (attn2), MLP; one shared adaLN.
PIXART = _table("pixart", [
    (rf"{_B}\.attn[12]\.(?:to_qkv|to_kv|to_[qkv]|to_out\.0)", QUANTIZE, ATTN),
    (rf"{_B}\.ff\.net\.(?:0\.proj|2)", QUANTIZE, MLP),
    (r"adaln_single\.linear", QUANTIZE, ADALN, W4A16),
    (r"adaln_single\.emb\..*|caption_projection\..*|pos_embed\..*", KEEP, EMBED),
    (r"proj_out", KEEP, FINAL),
], fuse_qkv=True)

# SANA: linear self-attention, cross-attention; the MLP is GLUMBConv (1x1/3x3 convolutions, not linears,
# so it is not touched). Fusion is tried, but in diffusers 0.42.1 fuse_qkv_projections() is a no-op here (the
# legacy Attention class is not an AttentionModuleMixin): no fused layer appears and the report says so.
SANA = _table("sana", [
    (rf"{_B}\.attn[12]\.(?:to_[qkv]|to_out\.0)", QUANTIZE, ATTN),
    (r"time_embed\.linear", QUANTIZE, ADALN, W4A16),
    (r"time_embed\.emb\..*|caption_projection\..*|patch_embed\..*", KEEP, EMBED),
    (r"proj_out", KEEP, FINAL),
], fuse_qkv=True)

# Wan 2.1: self-attention, cross-attention (add_k/add_v for the image stream of I2V), FFN.
WAN = _table("wan", [
    (rf"{_B}\.attn[12]\.(?:to_qkv|to_kv|to_[qkv]|add_[kv]_proj|to_out\.0)", QUANTIZE, ATTN),
    (rf"{_B}\.ffn\.net\.(?:0\.proj|2)", QUANTIZE, MLP),
    (r"condition_embedder\.time_proj", QUANTIZE, ADALN, W4A16),
    (r"condition_embedder\..*|patch_embedding\..*", KEEP, EMBED),
    (r"proj_out", KEEP, FINAL),
], fuse_qkv=True)

# Anything else: every linear, except names that look like embedders, adaLN modulation or the final
# projection. No QKV fusion: nothing tells us that an unknown model's attention would use fused layers.
_EMBEDDERS = (r"x_embedder|context_embedder|patch_embed|patch_embedding|pos_embed|time_text_embed|time_embed"
              r"|timestep_embedder|time_embedder|text_embedder|guidance_embedder|caption_projection"
              r"|condition_embedder|adaln_single")
GENERIC = _table("generic", [
    (rf"(?:.*\.)?(?:{_EMBEDDERS})(?:\..*)?", KEEP, EMBED),
    (r"(?:.*\.)?(?:norm\w*|\w*_norm)\.linear", QUANTIZE, GENERIC_ADALN, W4A16),
    (r"norm_out(?:\..*)?", QUANTIZE, GENERIC_ADALN, W4A16),
    (r"proj_out", KEEP, FINAL),
    (r".*", QUANTIZE, "generic policy: every other linear"),
], fuse_qkv=False)

POLICIES: dict[str, Policy] = {p.name: p for p in (FLUX, SD3, PIXART, SANA, WAN, GENERIC)}
# transformer class name -> policy (by name, so no diffusers import is needed to pick one)
BY_CLASS: dict[str, Policy] = {
    "FluxTransformer2DModel": FLUX,
    "SD3Transformer2DModel": SD3,
    "PixArtTransformer2DModel": PIXART,
    "SanaTransformer2DModel": SANA,
    "WanTransformer3DModel": WAN,
}


def policy_for(transformer: Any, policy: Policy | str | None = None) -> Policy:
    """The policy to use: ``policy`` itself, the one named ``policy``, or the one for the model's class.

    Example:
        >>> policy_for(None, "wan").name
        'wan'
    """
    if isinstance(policy, Policy):
        return policy
    if isinstance(policy, str):
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; known: {', '.join(POLICIES)}")
        return POLICIES[policy]
    if policy is not None:
        raise TypeError(f"policy must be a Policy, a policy name or None, got {type(policy).__name__}")
    return BY_CLASS.get(type(transformer).__name__, GENERIC)


__all__ = ["Rule", "Policy", "POLICIES", "BY_CLASS", "policy_for", "QUANTIZE", "KEEP", "W4A16",
           "FLUX", "SD3", "PIXART", "SANA", "WAN", "GENERIC"]
