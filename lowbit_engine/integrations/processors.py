"""Attention processors after QKV fusion.

diffusers' ``fuse_qkv_projections()`` gives every attention of an SD3 transformer the joint fused processor
``FusedJointAttnProcessor2_0``. Two of its cases compute something other than the unfused model:

* SD3.5-Medium's second self-attention ``attn2`` (no text stream): its forward fails on
  ``encoder_hidden_states.ndim`` (None). Such attentions get diffusers' plain fused self-attention
  processor, which computes what the joint one computes for the image stream alone (qk norms, fused Q/K/V
  split, output projection).
* a joint attention with qk norms (SD3.5's ``qk_norm="rms_norm"``): diffusers 0.42's fused joint processor
  never applies ``norm_q`` / ``norm_k`` / ``norm_added_q`` / ``norm_added_k``, so the fused model attends
  with unnormalized queries and keys. Such attentions get :class:`FusedJointQKNormAttnProcessor`:
  ``JointAttnProcessor2_0``'s computation, with the projections read from ``to_qkv`` / ``to_added_qkv``.

Example:
    >>> from torch import nn
    >>> repair_self_attention(nn.Linear(4, 4))
    []
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_JOINT_FUSED = "FusedJointAttnProcessor2_0"
_QK_NORMS = ("norm_q", "norm_k", "norm_added_q", "norm_added_k")


def has_qk_norms(attn: nn.Module) -> bool:
    """Whether the attention normalizes queries or keys of either stream."""
    return any(getattr(attn, n, None) is not None for n in _QK_NORMS)


def joint_attention_core(attn: nn.Module, q: Tensor, k: Tensor, v: Tensor, cq: Tensor | None, ck: Tensor | None,
                         cv: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """``JointAttnProcessor2_0`` after the projections, op for op: heads, the qk norms of each stream, the
    image tokens then the text tokens in one ``scaled_dot_product_attention``, heads flattened, the split,
    ``to_add_out`` (unless ``context_pre_only``) and ``to_out``. ``cq`` None: self-attention only."""
    B = q.shape[0]
    head_dim = k.shape[-1] // attn.heads
    q, k, v = (t.view(B, -1, attn.heads, head_dim).transpose(1, 2) for t in (q, k, v))
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    T = None
    if cq is not None:
        T = q.shape[2]
        cq, ck, cv = (t.view(B, -1, attn.heads, head_dim).transpose(1, 2) for t in (cq, ck, cv))
        if attn.norm_added_q is not None:
            cq = attn.norm_added_q(cq)
        if attn.norm_added_k is not None:
            ck = attn.norm_added_k(ck)
        q, k, v = torch.cat([q, cq], dim=2), torch.cat([k, ck], dim=2), torch.cat([v, cv], dim=2)
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
    out = out.transpose(1, 2).reshape(B, -1, attn.heads * head_dim).to(q.dtype)
    context = None
    if T is not None:
        out, context = out[:, :T], out[:, T:]
        if not attn.context_pre_only:
            context = attn.to_add_out(context)
    out = attn.to_out[1](attn.to_out[0](out))
    return out, context


class FusedJointQKNormAttnProcessor:
    """``JointAttnProcessor2_0`` on fused ``to_qkv`` / ``to_added_qkv`` projections: the qk norms applied
    (diffusers' ``FusedJointAttnProcessor2_0`` drops them). Joint attentions only (SD3 / SD3.5 blocks)."""

    def __call__(self, attn: nn.Module, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, *args: Any, **kwargs: Any):
        q, k, v = torch.split(attn.to_qkv(hidden_states), attn.to_qkv.out_features // 3, dim=-1)
        if encoder_hidden_states is None:
            return joint_attention_core(attn, q, k, v, None, None, None)[0]
        cqkv = attn.to_added_qkv(encoder_hidden_states)
        cq, ck, cv = torch.split(cqkv, cqkv.shape[-1] // 3, dim=-1)
        return joint_attention_core(attn, q, k, v, cq, ck, cv)


def repair_self_attention(model: nn.Module) -> list[str]:
    """Put right what diffusers' joint fused processor gets wrong (the module docstring): fused self-only
    attentions (a ``to_qkv``, no ``to_added_qkv`` / ``add_q_proj``) get the plain fused processor, joint
    ones with qk norms :class:`FusedJointQKNormAttnProcessor`. Returns the names of the attentions changed."""
    fixed = []
    for name, mod in model.named_modules():
        proc = mod.__dict__.get("processor")
        if type(proc).__name__ != _JOINT_FUSED or not hasattr(mod, "to_qkv"):
            continue
        if hasattr(mod, "to_added_qkv") or getattr(mod, "add_q_proj", None) is not None:
            if not (has_qk_norms(mod) and hasattr(mod, "to_added_qkv")):
                continue  # a joint attention without qk norms: diffusers' joint processor is right
            mod.set_processor(FusedJointQKNormAttnProcessor())
        else:
            from diffusers.models.attention_processor import FusedAttnProcessor2_0

            mod.set_processor(FusedAttnProcessor2_0())
        fixed.append(name)
    return fixed


__all__ = ["repair_self_attention", "FusedJointQKNormAttnProcessor", "joint_attention_core", "has_qk_norms"]
