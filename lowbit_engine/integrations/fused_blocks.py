"""Fused FLUX.1 block forwards: the activation quantizer of every entry linear leaves the linear.

An entry linear reads ``LayerNorm(x) * (1 + scale) + shift`` (adaLN): FLUX's fused QKV of both streams in a
double block, the MLP's fc1 of both streams, and in a single block the fused QKV and ``proj_mlp``. Unfused,
that input is written by the norm, read back by the quantizer, quantized and written again. The forwards
here hand x and the modulation straight to ``lowbit::norm_modulate_quantize`` (lowbit_engine.ops_fused),
which normalizes, modulates, smooths, quantizes and computes the lora-down in one pass, and then run the
layer's GEMM on its output (:meth:`SVDQLinear.gemm`). Everything else is the block's own computation, in
the same order, calling the same submodules (diffusers 0.42's ``FluxTransformerBlock`` /
``FluxSingleTransformerBlock`` and ``FluxAttnProcessor``).

A linear is fused when it is an :class:`~lowbit_engine.nn.SVDQLinear` with 8-bit tokens (the i8q / f8l
layouts, or g64 with int8 / fp8 tokens) of x's dtype; any other entry linear (bf16, W4A4 int4 tokens,
another module type) gets the unfused input, computed exactly as diffusers computes it. A block whose
attention uses another processor (IP-Adapter) or gets ``joint_attention_kwargs`` runs diffusers' own forward.
LoRA adapters on an SVDQLinear live in its low-rank branch, so they are fused too; bf16 layers keep their
LoRA hooks (they are not fused).

Numerics: the fused input is the fp32 LayerNorm-and-modulate rounded once to x's dtype; diffusers rounds the
LayerNorm output and the modulation in bf16 as it goes, so the two differ by bf16 roundings (tests hold the
blocks to 1e-2 relative). Without any fusable layer the fused forward is the original one, bit for bit.

Example:
    >>> from lowbit_engine.integrations.tiny import tiny_flux_pipeline
    >>> pipe, _ = tiny_flux_pipeline(seed=0)
    >>> install(pipe.transformer)                      # every FLUX block: 2 double + 4 single
    6
    >>> remove(pipe.transformer)
    6
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .. import ops_exit, ops_fused, reference
from ..nn import SVDQLinear

FUSED_ATTR = "_lowbit_fused_forward"
FUSABLE_ACTS = ("int8", "fp8")


def fusable(linear: nn.Module, x: Tensor) -> bool:
    """Whether ``linear`` can take its input from the fused entry quantizer."""
    return (isinstance(linear, SVDQLinear) and linear.act_mode in FUSABLE_ACTS and x.dtype == linear.dtype
            and linear.in_features == x.shape[-1] and not linear._forward_hooks and not linear._forward_pre_hooks)


def entry_linear(linear: nn.Module, x: Tensor, shift: Tensor, scale: Tensor, norm: nn.LayerNorm) -> Tensor:
    """``linear(norm(x) * (1 + scale[:, None]) + shift[:, None])`` for ``x [B, T, K]``, fused when it can be.

    ``norm`` is the block's own LayerNorm (no affine): its eps is the fused op's, and the unfused path calls it.
    """
    B, T, K = x.shape
    if fusable(linear, x) and x.is_contiguous():
        q, s, la = ops_fused.norm_modulate_quantize(x.reshape(B * T, K), shift.contiguous(), scale.contiguous(),
                                                    norm.eps, linear.smooth, linear.lora_down if linear.rank else None,
                                                    linear.act_mode, T)
        return linear.gemm(q, s, la if linear.rank else None, x.dtype).reshape(B, T, linear.out_features)
    return linear(norm(x) * (1 + scale[:, None]) + shift[:, None])


EXIT_LAYOUTS = ("f8l", "i8q")


def exit_fusable(fc1: nn.Module, fc2: nn.Module, x: Tensor) -> bool:
    """Whether fc1's GEMM can write fc2's quantized input itself (``lowbit::gemm_w4a8_exit``): fc1 an F8L /
    I8Q :class:`SVDQLinear` fed by the entry quantizer, fc2 an 8-bit SVDQLinear with a calibrated static
    ``input_scale`` (:func:`calibrate_exit_scales`), of x's dtype, without hooks. fc2 may be wider than
    fc1's output (a FLUX single block's proj_out also reads the attention output)."""
    return (fusable(fc1, x) and getattr(fc1, "weight_layout", None) in EXIT_LAYOUTS and isinstance(fc2, SVDQLinear)
            and fc2.act_mode in FUSABLE_ACTS and fc2.input_scale is not None and fc2.dtype == x.dtype
            and fc2.in_features >= fc1.out_features and not fc2._forward_hooks and not fc2._forward_pre_hooks)


def feed_forward(ff: nn.Module, x: Tensor, shift: Tensor, scale: Tensor, norm: nn.LayerNorm) -> Tensor:
    """diffusers' ``FeedForward`` (GELU-tanh fc1, dropout, fc2) on the modulated ``x``: fc1's input from the
    entry quantizer, and, when :func:`exit_fusable`, fc2's input written by fc1's GEMM epilogue (the GELU
    output is never stored in 16 bits). Otherwise the layers run one after the other."""
    gelu, fc2 = ff.net[0], ff.net[-1]
    middle = list(ff.net[1:-1])
    plain = (getattr(gelu, "approximate", None) == "tanh" and len(middle) == 1 and isinstance(middle[0], nn.Dropout)
             and (middle[0].p == 0 or not middle[0].training))
    B, T, K = x.shape
    if plain and x.is_contiguous() and exit_fusable(gelu.proj, fc2, x):
        q2, s2, la2 = _exit_gemm(gelu.proj, fc2, x, shift, scale, norm, 0)
        return fc2.gemm(q2, s2, la2 if fc2.rank else None, x.dtype).reshape(B, T, fc2.out_features)
    out = gelu.gelu(entry_linear(gelu.proj, x, shift, scale, norm))
    for module in ff.net[1:]:
        out = module(out)
    return out


def static_fusable(linear: nn.Module, x: Tensor) -> bool:
    """Whether ``linear``'s input can be quantized by one light static pass (``lowbit::quantize_act_static``)
    instead of its own per-token quantizer: an 8-bit :class:`SVDQLinear` (:func:`fusable`) with a calibrated
    ``input_scale`` (:func:`calibrate_exit_scales`)."""
    return fusable(linear, x) and linear.input_scale is not None


def attention_output_linear(linear: nn.Module, x: Tensor) -> Tensor:
    """``linear(x)`` for an attention output ``x [B, T, D]`` (a double block's ``to_out[0]`` / ``to_add_out``):
    when :func:`static_fusable`, x is quantized in one light pass with the layer's calibrated static scale and
    handed to its GEMM (:meth:`SVDQLinear.gemm`); otherwise the layer's own forward."""
    if not static_fusable(linear, x):
        return linear(x.contiguous())
    B, T, D = x.shape
    q, s, la = ops_exit.quantize_act_static(x.reshape(B * T, D).contiguous(), linear.input_scale, linear.smooth,
                                            linear.lora_down if linear.rank else None, linear.act_mode)
    return linear.gemm(q, s, la if linear.rank else None, x.dtype).reshape(B, T, linear.out_features)


def _exit_gemm(fc1: SVDQLinear, fc2: SVDQLinear, x: Tensor, shift: Tensor, scale: Tensor, norm: nn.LayerNorm,
               col: int) -> tuple[Tensor, Tensor, Tensor]:
    """fc1 on the modulated x (entry-fused), its GEMM writing GELU(h) as fc2's input columns ``col:`` (the
    slices of fc2's smooth and lora_down that meet them, read in place): ``(q, scales, lora_act partial)``."""
    B, T, K = x.shape
    q, s, la = ops_fused.norm_modulate_quantize(x.reshape(B * T, K), shift.contiguous(), scale.contiguous(), norm.eps,
                                                fc1.smooth, fc1.lora_down if fc1.rank else None, fc1.act_mode, T)
    bufs = fc1.weight_buffers()
    ld = fc2.lora_down[:, col:] if fc2.rank else None  # a row-strided view when col > 0: no copy
    return ops_exit.gemm_w4a8_exit(
        fc1.weight_layout, q, s, bufs["qweight"], bufs["wscales"], bufs.get("wzeros"), bufs["wrow"],
        la if fc1.rank else None, fc1.lora_up if fc1.rank else None, fc1.bias, h_dtype=x.dtype,
        activation="gelu_tanh", next_scale=fc2.input_scale, next_smooth=fc2.smooth[col:], next_lora_down=ld,
        next_mode=fc2.act_mode)


@torch.no_grad()
def calibrate_exit_scales(transformer: nn.Module, run: Callable[[], Any], *, max_loss_db: float = 1.0
                          ) -> dict[str, dict[str, Any]]:
    """Calibrate the static input scale of every exit linear the fused forwards can feed (:func:`_exit_pairs`:
    each MLP's fc2 and single-block proj_out, written by their producer's GEMM, and each double block's
    attention output projections ``to_out.0`` / ``to_add_out``, quantized in one light pass), by running
    ``run()`` (e.g. a few denoising steps of the pipeline) with hooks that watch the layers' inputs across
    every call.

    The scale is the largest ``|x / smooth|`` seen, over 127 (int8) or 448 (fp8). A static scale spends its
    codes on the worst token, so for each layer the calibration also measures the quantization SQNR of
    its inputs with the static scale and with per-token scales; where the static scale loses more than
    ``max_loss_db``, the layer keeps per-token quantization (``input_scale`` stays None) and the fused
    path is not used for it. Returns ``{name: {"scale", "static_db", "token_db", "used"}}``.

    Example::

        report = calibrate_exit_scales(pipe.transformer, lambda: pipe("a cat", num_inference_steps=4))
    """
    stats: dict[str, dict[str, Any]] = {}
    hooks = []
    before = {fc2: fc2.input_scale for _, _, fc2, _ in _exit_pairs(transformer) if isinstance(fc2, SVDQLinear)}
    for name, fc1, fc2, fc2_name in _exit_pairs(transformer):
        producer_ok = fc1 is None or (isinstance(fc1, SVDQLinear) and fc1.weight_layout in EXIT_LAYOUTS)
        if not (producer_ok and isinstance(fc2, SVDQLinear) and fc2.act_mode in FUSABLE_ACTS):
            continue
        fc2.input_scale = None  # the watched forward is the unfused one
        st = stats.setdefault(f"{name}.{fc2_name}", {"amax": 0.0, "inputs": [], "layer": fc2})

        def watch(module, args, st=st):
            x = args[0].reshape(-1, module.in_features)
            xs = x.float() / module.smooth
            st["amax"] = max(st["amax"], float(xs.abs().amax()))
            st["inputs"].append(x[:: max(1, x.shape[0] // 256)].detach().clone())  # a token sample per call

        hooks.append(fc2.register_forward_pre_hook(watch))
    try:
        run()
    except BaseException:
        for fc2, scale in before.items():  # a failed calibration leaves the scales as they were
            fc2.input_scale = scale
        raise
    finally:
        for h in hooks:
            h.remove()
    report = {}
    for name, st in stats.items():
        fc2 = st["layer"]
        if not st["inputs"] or not (st["amax"] > 0 and math.isfinite(st["amax"])):
            report[name] = {"scale": None, "static_db": None, "token_db": None, "used": False}
            continue
        qmax = 127.0 if fc2.act_mode == "int8" else 448.0
        scale = st["amax"] / qmax
        x = torch.cat(st["inputs"])
        xs = x.float() / fc2.smooth
        qs, ss, _ = reference.quantize_act_static(x, scale, fc2.smooth, None, fc2.act_mode)
        qt, st_, _ = reference.quantize_act(x, fc2.smooth, None, fc2.act_mode)
        static_db = _sqnr_db(xs, qs.float() * ss[:, None])
        token_db = _sqnr_db(xs, qt.float() * st_[:, None])
        used = static_db >= token_db - max_loss_db
        fc2.input_scale = scale if used else None
        report[name] = {"scale": scale, "static_db": static_db, "token_db": token_db, "used": used}
    return report


def _exit_pairs(transformer: nn.Module):
    """(module name, producer, exit linear, the exit linear's name in the module) of every fusable exit: each
    diffusers FeedForward's fc1 -> fc2, each FLUX single block's proj_mlp -> proj_out (whose input is the
    attention output beside the MLP's), and each joint attention's output projections (``to_out.0`` of the
    image stream, ``to_add_out`` of the text stream) of the FLUX double blocks, whose producer is the
    attention itself (None): their input is quantized in one light pass (:func:`attention_output_linear`).
    Only exits a fused forward uses are listed: SD3's joint attentions still quantize their own outputs'
    input, so a static scale there would be calibrated for nothing."""
    flux_attn = {id(b.attn) for b, fwd in _blocks(transformer) if fwd is double_block_forward}
    for name, m in transformer.named_modules():
        net = getattr(m, "net", None)
        if isinstance(net, nn.ModuleList) and len(net) >= 2 and hasattr(net[0], "proj"):
            yield name, net[0].proj, net[-1], f"net.{len(net) - 1}"
        elif all(hasattr(m, a) for a in ("proj_mlp", "act_mlp", "proj_out", "attn")):
            yield name, m.proj_mlp, m.proj_out, "proj_out"
        elif id(m) in flux_attn and isinstance(getattr(m, "to_out", None), nn.ModuleList) and hasattr(m, "to_add_out"):
            yield name, None, m.to_out[0], "to_out.0"
            if m.to_add_out is not None:
                yield name, None, m.to_add_out, "to_add_out"


def _sqnr_db(x: Tensor, xq: Tensor) -> float:
    err = (x - xq).double().pow(2).sum().clamp_min(1e-300)
    return float(10 * torch.log10(x.double().pow(2).sum() / err))


def _projections(attn: nn.Module, x: Tensor, shift: Tensor, scale: Tensor, norm: nn.LayerNorm, context: bool):
    """q, k, v of one stream: the fused QKV layer when the attention has one, else three entry linears."""
    fused_name = "to_added_qkv" if context else "to_qkv"
    if getattr(attn, "fused_projections", False) and hasattr(attn, fused_name):
        return entry_linear(getattr(attn, fused_name), x, shift, scale, norm).chunk(3, dim=-1)
    names = ("add_q_proj", "add_k_proj", "add_v_proj") if context else ("to_q", "to_k", "to_v")
    return tuple(entry_linear(getattr(attn, n), x, shift, scale, norm) for n in names)


def _attention(attn: nn.Module, q: Tensor, k: Tensor, v: Tensor, rotary) -> Tensor:
    """FluxAttnProcessor's core after the projections: heads, q/k RMSNorm (done by the caller per stream),
    rotary embedding, attention through diffusers' dispatcher, heads flattened."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn
    from diffusers.models.embeddings import apply_rotary_emb

    if rotary is not None:
        q = apply_rotary_emb(q, rotary, sequence_dim=1)
        k = apply_rotary_emb(k, rotary, sequence_dim=1)
    proc = attn.processor
    out = dispatch_attention_fn(q, k, v, attn_mask=None, backend=proc._attention_backend,
                                parallel_config=proc._parallel_config)
    return out.flatten(2, 3).to(q.dtype)


def _heads(attn: nn.Module, t: Tensor) -> Tensor:
    return t.unflatten(-1, (-1, attn.head_dim))


def _plain_processor(attn: nn.Module) -> bool:
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    return type(attn.processor) is FluxAttnProcessor


def double_block_forward(block: nn.Module, hidden_states: Tensor, encoder_hidden_states: Tensor, temb: Tensor,
                         image_rotary_emb: Any = None, joint_attention_kwargs: dict[str, Any] | None = None):
    """``FluxTransformerBlock.forward`` with the entry linears fused (see the module docstring); after
    :func:`calibrate_exit_scales`, the MLPs' fc2 take their input from fc1's GEMM (:func:`feed_forward`) and
    the attention output projections from one light static pass (:func:`attention_output_linear`)."""
    if joint_attention_kwargs or not _plain_processor(block.attn):
        return type(block).forward(block, hidden_states, encoder_hidden_states, temb, image_rotary_emb,
                                   joint_attention_kwargs)
    n1, n1c, attn = block.norm1, block.norm1_context, block.attn
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = n1.linear(n1.silu(temb)).chunk(6, dim=1)
    c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = n1c.linear(n1c.silu(temb)).chunk(
        6, dim=1)

    q, k, v = (_heads(attn, t) for t in _projections(attn, hidden_states, shift_msa, scale_msa, n1.norm, False))
    cq, ck, cv = (_heads(attn, t) for t in _projections(attn, encoder_hidden_states, c_shift_msa, c_scale_msa,
                                                           n1c.norm, True))
    q, k = attn.norm_q(q), attn.norm_k(k)
    cq, ck = attn.norm_added_q(cq), attn.norm_added_k(ck)
    joint = _attention(attn, torch.cat([cq, q], dim=1), torch.cat([ck, k], dim=1), torch.cat([cv, v], dim=1),
                       image_rotary_emb)
    text = encoder_hidden_states.shape[1]
    context_attn_output, attn_output = joint.split_with_sizes([text, joint.shape[1] - text], dim=1)
    # the output projections: one light static pass each when calibrated, else their own quantizer
    attn_output = attn.to_out[1](attention_output_linear(attn.to_out[0], attn_output))
    context_attn_output = attention_output_linear(attn.to_add_out, context_attn_output)

    hidden_states = hidden_states + gate_msa.unsqueeze(1) * attn_output
    ff_output = feed_forward(block.ff, hidden_states, shift_mlp, scale_mlp, block.norm2)
    hidden_states = hidden_states + gate_mlp.unsqueeze(1) * ff_output

    encoder_hidden_states = encoder_hidden_states + c_gate_msa.unsqueeze(1) * context_attn_output
    context_ff_output = feed_forward(block.ff_context, encoder_hidden_states, c_shift_mlp, c_scale_mlp,
                                     block.norm2_context)
    encoder_hidden_states = encoder_hidden_states + c_gate_mlp.unsqueeze(1) * context_ff_output
    if encoder_hidden_states.dtype == torch.float16:
        encoder_hidden_states = encoder_hidden_states.clip(-65504, 65504)
    return encoder_hidden_states, hidden_states


def single_block_forward(block: nn.Module, hidden_states: Tensor, encoder_hidden_states: Tensor, temb: Tensor,
                         image_rotary_emb: Any = None, joint_attention_kwargs: dict[str, Any] | None = None):
    """``FluxSingleTransformerBlock.forward`` with its two entry linears (QKV, proj_mlp) fused."""
    if joint_attention_kwargs or not _plain_processor(block.attn):
        return type(block).forward(block, hidden_states, encoder_hidden_states, temb, image_rotary_emb,
                                   joint_attention_kwargs)
    text = encoder_hidden_states.shape[1]
    hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
    residual = hidden_states
    norm, attn = block.norm, block.attn
    shift, scale, gate = norm.linear(norm.silu(temb)).chunk(3, dim=1)
    po = block.proj_out
    exit_fused = (getattr(block.act_mlp, "approximate", None) == "tanh" and hidden_states.is_contiguous()
                  and exit_fusable(block.proj_mlp, po, hidden_states))
    if exit_fused:  # proj_mlp's GEMM writes its columns of proj_out's 8-bit input (GELU applied)
        mlp_part = _exit_gemm(block.proj_mlp, po, hidden_states, shift, scale, norm.norm,
                              po.in_features - block.proj_mlp.out_features)
    else:
        mlp_hidden_states = block.act_mlp(entry_linear(block.proj_mlp, hidden_states, shift, scale, norm.norm))
    q, k, v = (_heads(attn, t) for t in _projections(attn, hidden_states, shift, scale, norm.norm, False))
    attn_output = _attention(attn, attn.norm_q(q), attn.norm_k(k), v, image_rotary_emb)

    if exit_fused:  # the attention output quantized in one light pass with the same static scale
        B, T, D = attn_output.shape
        qa, sa, la = ops_exit.quantize_act_static(attn_output.reshape(B * T, D).contiguous(), po.input_scale,
                                                  po.smooth[:D], po.lora_down[:, :D] if po.rank else None,
                                                  po.act_mode)
        qm, sm, lm = mlp_part
        sa = torch.where(torch.isnan(sm), sm, sa)  # a non-finite token in either part marks the whole row
        out = po.gemm(torch.cat([qa, qm], dim=1), sa, la + lm if po.rank else None, attn_output.dtype)
        hidden_states = residual + gate.unsqueeze(1) * out.reshape(B, T, po.out_features)
    else:
        hidden_states = torch.cat([attn_output, mlp_hidden_states], dim=2)
        hidden_states = residual + gate.unsqueeze(1) * po(hidden_states)
    if hidden_states.dtype == torch.float16:
        hidden_states = hidden_states.clip(-65504, 65504)
    return hidden_states[:, :text], hidden_states[:, text:]


def _blocks(transformer: nn.Module):
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

    for m in transformer.modules():
        if type(m) is FluxTransformerBlock:
            yield m, double_block_forward
        elif type(m) is FluxSingleTransformerBlock:
            yield m, single_block_forward


def install(transformer: nn.Module) -> int:
    """Give every FLUX block of ``transformer`` its fused forward (an instance attribute; the class, the
    state dict and the checkpoints are untouched). Returns how many blocks. Idempotent.

    Raises TypeError when the model has no FLUX blocks (another architecture keeps the unfused path).
    """
    found = list(_blocks(transformer))
    if not found:
        raise TypeError(f"fused_blocks.install: {type(transformer).__name__} has no FLUX.1 blocks "
                        "(FluxTransformerBlock / FluxSingleTransformerBlock)")
    for block, fwd in found:
        block.forward = functools.partial(fwd, block)
        setattr(block, FUSED_ATTR, True)
    return len(found)


def remove(transformer: nn.Module) -> int:
    """Undo :func:`install`: the blocks run diffusers' forward again. Returns how many blocks changed."""
    n = 0
    for block, _ in _blocks(transformer):
        if getattr(block, FUSED_ATTR, False):
            del block.forward
            delattr(block, FUSED_ATTR)
            n += 1
    return n


def installed(transformer: nn.Module) -> bool:
    """Whether :func:`install` is in effect on ``transformer``."""
    return any(getattr(b, FUSED_ATTR, False) for b, _ in _blocks(transformer))


__all__ = ["install", "remove", "installed", "entry_linear", "fusable", "exit_fusable", "feed_forward",
           "static_fusable", "attention_output_linear", "calibrate_exit_scales", "double_block_forward",
           "single_block_forward"]
