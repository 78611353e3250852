"""Attention processors after QKV fusion: diffusers' ``fuse_qkv_projections()`` gives every attention of an
SD3 transformer the joint fused processor, including SD3.5-Medium's second self-attention ``attn2`` (no
text stream), whose forward then fails on ``encoder_hidden_states.ndim`` (None). Such attentions get
diffusers' plain fused self-attention processor, which computes what the joint one computes for the image
stream alone (qk norms, fused Q/K/V split, output projection).

Example:
    >>> from torch import nn
    >>> repair_self_attention(nn.Linear(4, 4))
    []
"""

from __future__ import annotations

from torch import nn

_JOINT_FUSED = "FusedJointAttnProcessor2_0"


def repair_self_attention(model: nn.Module) -> list[str]:
    """Give fused self-only attentions (a ``to_qkv``, no ``to_added_qkv`` / ``add_q_proj``) that got the
    joint fused processor the plain fused one; returns their names."""
    fixed = []
    for name, mod in model.named_modules():
        proc = mod.__dict__.get("processor")
        if type(proc).__name__ != _JOINT_FUSED or not hasattr(mod, "to_qkv"):
            continue
        if hasattr(mod, "to_added_qkv") or getattr(mod, "add_q_proj", None) is not None:
            continue  # a joint attention: the joint processor is right
        from diffusers.models.attention_processor import FusedAttnProcessor2_0

        mod.set_processor(FusedAttnProcessor2_0())
        fixed.append(name)
    return fixed


__all__ = ["repair_self_attention"]
