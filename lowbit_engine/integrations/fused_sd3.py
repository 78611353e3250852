"""Fused SD3 / SD3.5 block forwards: the activation quantizer of every entry linear leaves the linear.

The same step as :mod:`lowbit_engine.integrations.fused_blocks` (FLUX.1), for diffusers'
``JointTransformerBlock`` (SD3, SD3.5 Large / Medium): the entry linears read ``LayerNorm(x) * (1 + scale)
+ shift``, so they take their 8-bit input from ``lowbit::norm_modulate_quantize`` (:func:`fused_blocks.entry_linear`):

* the image stream's Q/K/V (``to_qkv`` or ``to_q``/``to_k``/``to_v``) from ``norm1``'s first modulation;
* SD3.5-Medium's second self-attention ``attn2`` (``SD35AdaLayerNormZeroX``) from its third modulation,
  of the same LayerNorm;
* the text stream's Q/K/V (``to_added_qkv`` or ``add_q/k/v_proj``) from ``norm1_context``: adaLN-Zero, or
  in the last block (``context_pre_only``) ``AdaLayerNormContinuous`` (whose chunks are scale, then shift);
* both MLPs' fc1 from ``norm2`` / ``norm2_context``, through :func:`fused_blocks.feed_forward`, which also
  lets fc1's GEMM write fc2's input when fc2 has a calibrated static scale
  (:func:`fused_blocks.calibrate_exit_scales`).

Everything else is the block's own computation in the same order, calling the same submodules
(diffusers 0.42's ``JointTransformerBlock.forward`` and its processors ``JointAttnProcessor2_0``,
``FusedJointAttnProcessor2_0`` (only without qk norms: it drops them), lowbit's
:class:`~lowbit_engine.integrations.processors.FusedJointQKNormAttnProcessor` and, for ``attn2``,
``FusedAttnProcessor2_0``). A block runs diffusers' own forward when anything is unusual: another
processor, ``joint_attention_kwargs``, a chunked feed-forward, a norm that is not a plain LayerNorm
without affine (the fused op has no weight or bias), an adaLN with its own embedding.

Which linears are fused, and the numerics, are as in fused_blocks: 8-bit-token :class:`SVDQLinear` of x's
dtype; the fused input is the fp32 LayerNorm-and-modulate rounded once (diffusers rounds in bf16 as it
goes). Without any fusable layer the fused forward is diffusers' own, bit for bit.

Example:
    >>> import torch, diffusers
    >>> t = diffusers.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2,
    ...     attention_head_dim=32, num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=64,
    ...     pooled_projection_dim=64, out_channels=4)
    >>> install(t), installed(t), remove(t)
    (2, True, 2)
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor, nn

from .fused_blocks import FUSED_ATTR, entry_linear, feed_forward, fusable
from .processors import FusedJointQKNormAttnProcessor, has_qk_norms, joint_attention_core


def _plain_norm(norm: Any) -> bool:
    """A LayerNorm the fused op computes: torch's own, without weight or bias."""
    return type(norm) is nn.LayerNorm and norm.weight is None and norm.bias is None


class _Stream:
    """One stream's adaLN-modulated input ``norm(x) * (1 + scale[:, None]) + shift[:, None]`` for its entry
    linears: each fusable linear gets it from the fused quantizer, the others the 16-bit tensor, computed
    once, as diffusers computes it."""

    def __init__(self, x: Tensor, shift: Tensor, scale: Tensor, norm: nn.LayerNorm):
        self.x, self.shift, self.scale, self.norm = x, shift, scale, norm
        self._y: Tensor | None = None

    def __call__(self, linear: nn.Module) -> Tensor:
        if fusable(linear, self.x) and self.x.is_contiguous():
            return entry_linear(linear, self.x, self.shift, self.scale, self.norm)
        if self._y is None:
            self._y = self.norm(self.x) * (1 + self.scale[:, None]) + self.shift[:, None]
        return linear(self._y)


# ---- attention ----------------------------------------------------------------------------------


def _kind(attn: nn.Module, joint: bool) -> str | None:
    """Which processor computation the attention runs ("separate", "fused", "fused-qknorm"; None: one
    this module does not follow, so the block keeps diffusers' forward)."""
    from diffusers.models.attention_processor import (FusedAttnProcessor2_0, FusedJointAttnProcessor2_0,
                                                      JointAttnProcessor2_0)

    proc = type(attn.processor)
    if proc is JointAttnProcessor2_0:
        names = ("to_q", "to_k", "to_v") + (("add_q_proj", "add_k_proj", "add_v_proj") if joint else ())
        return "separate" if all(getattr(attn, n, None) is not None for n in names) else None
    fused = hasattr(attn, "to_qkv") and (not joint or hasattr(attn, "to_added_qkv"))
    if not fused:
        return None
    if joint and proc is FusedJointQKNormAttnProcessor:
        return "fused-qknorm"
    if joint and proc is FusedJointAttnProcessor2_0 and not has_qk_norms(attn):
        return "fused"
    if not joint and proc is FusedAttnProcessor2_0 and attn.spatial_norm is None and attn.group_norm is None \
            and not attn.residual_connection:
        return "fused"
    return None


def _joint_attention(attn: nn.Module, kind: str, img: _Stream, ctx: _Stream) -> tuple[Tensor, Tensor | None]:
    """``attn(hidden_states=norm(x), encoder_hidden_states=norm(c))`` of a JointTransformerBlock."""
    if kind == "separate":
        return joint_attention_core(attn, img(attn.to_q), img(attn.to_k), img(attn.to_v), ctx(attn.add_q_proj),
                                    ctx(attn.add_k_proj), ctx(attn.add_v_proj))
    qkv, cqkv = img(attn.to_qkv), ctx(attn.to_added_qkv)
    if kind == "fused-qknorm":
        q, k, v = torch.split(qkv, attn.to_qkv.out_features // 3, dim=-1)
        cq, ck, cv = torch.split(cqkv, cqkv.shape[-1] // 3, dim=-1)
        return joint_attention_core(attn, q, k, v, cq, ck, cv)
    # FusedJointAttnProcessor2_0 (no qk norms), op for op: the streams joined before the heads are split
    T = img.x.shape[1]
    q, k, v = torch.split(qkv, qkv.shape[-1] // 3, dim=-1)
    cq, ck, cv = torch.split(cqkv, cqkv.shape[-1] // 3, dim=-1)
    q, k, v = torch.cat([q, cq], dim=1), torch.cat([k, ck], dim=1), torch.cat([v, cv], dim=1)
    B, head_dim = ctx.x.shape[0], k.shape[-1] // attn.heads
    q, k, v = (t.view(B, -1, attn.heads, head_dim).transpose(1, 2) for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
    out = out.transpose(1, 2).reshape(B, -1, attn.heads * head_dim).to(q.dtype)
    out, context = out[:, :T], out[:, T:]
    out = attn.to_out[1](attn.to_out[0](out))
    if not attn.context_pre_only:
        context = attn.to_add_out(context)
    return out, context


def _self_attention(attn: nn.Module, kind: str, img: _Stream) -> Tensor:
    """``attn2(hidden_states=norm_hidden_states2)``: JointAttnProcessor2_0 without a text stream, or
    FusedAttnProcessor2_0 (which also divides by ``rescale_output_factor``)."""
    if kind == "separate":
        return joint_attention_core(attn, img(attn.to_q), img(attn.to_k), img(attn.to_v), None, None, None)[0]
    q, k, v = torch.split(img(attn.to_qkv), attn.to_qkv.out_features // 3, dim=-1)
    return joint_attention_core(attn, q, k, v, None, None, None)[0] / attn.rescale_output_factor


# ---- the block ----------------------------------------------------------------------------------


def _plan(block: nn.Module) -> tuple[str, str | None] | None:
    """(attn's kind, attn2's kind) when the fused forward follows this block exactly; None: diffusers' forward."""
    from diffusers.models.activations import GELU
    from diffusers.models.normalization import AdaLayerNormContinuous, AdaLayerNormZero, SD35AdaLayerNormZeroX

    n1, nc = block.norm1, block.norm1_context
    if block._chunk_size is not None:
        return None
    if not ((type(n1) is AdaLayerNormZero and n1.emb is None) or type(n1) is SD35AdaLayerNormZeroX):
        return None
    if (type(n1) is SD35AdaLayerNormZeroX) != bool(block.use_dual_attention):
        return None
    if block.context_pre_only:
        ok = type(nc) is AdaLayerNormContinuous and block.ff_context is None
    else:
        ok = type(nc) is AdaLayerNormZero and nc.emb is None and _plain_norm(block.norm2_context)
    norms = (n1.norm, nc.norm, block.norm2)
    ffs = [block.ff] + ([] if block.context_pre_only else [block.ff_context])
    if not (ok and all(_plain_norm(n) for n in norms) and all(type(ff.net[0]) is GELU for ff in ffs)):
        return None
    kind = _kind(block.attn, joint=True)
    kind2 = _kind(block.attn2, joint=False) if block.use_dual_attention else None
    if kind is None or (block.use_dual_attention and kind2 is None):
        return None
    return kind, kind2


def joint_block_forward(block: nn.Module, hidden_states: Tensor, encoder_hidden_states: Tensor, temb: Tensor,
                        joint_attention_kwargs: dict[str, Any] | None = None):
    """``JointTransformerBlock.forward`` with the entry linears fused (see the module docstring)."""
    plan = None if joint_attention_kwargs else _plan(block)
    if plan is None:
        return type(block).forward(block, hidden_states, encoder_hidden_states, temb, joint_attention_kwargs)
    kind, kind2 = plan
    n1, nc = block.norm1, block.norm1_context
    emb = n1.linear(n1.silu(temb))
    if block.use_dual_attention:
        (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, shift_msa2, scale_msa2,
         gate_msa2) = emb.chunk(9, dim=1)
    else:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = emb.chunk(6, dim=1)
    if block.context_pre_only:  # AdaLayerNormContinuous: scale first, the SiLU cast to the stream's dtype
        c_scale_msa, c_shift_msa = torch.chunk(nc.linear(nc.silu(temb).to(encoder_hidden_states.dtype)), 2, dim=1)
    else:
        c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = nc.linear(
            nc.silu(temb)).chunk(6, dim=1)

    img = _Stream(hidden_states, shift_msa, scale_msa, n1.norm)
    attn_output, context_attn_output = _joint_attention(block.attn, kind, img,
                                                        _Stream(encoder_hidden_states, c_shift_msa, c_scale_msa,
                                                                nc.norm))
    residual = hidden_states
    hidden_states = hidden_states + gate_msa.unsqueeze(1) * attn_output
    if block.use_dual_attention:  # attn2 reads the block's input, modulated by the third chunk triple
        attn_output2 = _self_attention(block.attn2, kind2, _Stream(residual, shift_msa2, scale_msa2, n1.norm))
        hidden_states = hidden_states + gate_msa2.unsqueeze(1) * attn_output2

    ff_output = feed_forward(block.ff, hidden_states, shift_mlp, scale_mlp, block.norm2)
    hidden_states = hidden_states + gate_mlp.unsqueeze(1) * ff_output

    if block.context_pre_only:
        encoder_hidden_states = None
    else:
        encoder_hidden_states = encoder_hidden_states + c_gate_msa.unsqueeze(1) * context_attn_output
        context_ff_output = feed_forward(block.ff_context, encoder_hidden_states, c_shift_mlp, c_scale_mlp,
                                         block.norm2_context)
        encoder_hidden_states = encoder_hidden_states + c_gate_mlp.unsqueeze(1) * context_ff_output
    return encoder_hidden_states, hidden_states


# ---- install ------------------------------------------------------------------------------------


def _blocks(transformer: nn.Module):
    from diffusers.models.attention import JointTransformerBlock

    for m in transformer.modules():
        if type(m) is JointTransformerBlock:
            yield m


def install(transformer: nn.Module) -> int:
    """Give every ``JointTransformerBlock`` of ``transformer`` its fused forward (an instance attribute; the
    class, the state dict and the checkpoints are untouched). Returns how many blocks. Idempotent.

    Raises TypeError when the model has no SD3 blocks.
    """
    found = list(_blocks(transformer))
    if not found:
        raise TypeError(f"fused_sd3.install: {type(transformer).__name__} has no SD3 / SD3.5 blocks "
                        "(JointTransformerBlock)")
    for block in found:
        block.forward = functools.partial(joint_block_forward, block)
        setattr(block, FUSED_ATTR, True)
    return len(found)


def remove(transformer: nn.Module) -> int:
    """Undo :func:`install`: the blocks run diffusers' forward again. Returns how many blocks changed."""
    n = 0
    for block in _blocks(transformer):
        if getattr(block, FUSED_ATTR, False):
            del block.forward
            delattr(block, FUSED_ATTR)
            n += 1
    return n


def installed(transformer: nn.Module) -> bool:
    """Whether :func:`install` is in effect on ``transformer``."""
    return any(getattr(b, FUSED_ATTR, False) for b in _blocks(transformer))


__all__ = ["install", "remove", "installed", "joint_block_forward"]
