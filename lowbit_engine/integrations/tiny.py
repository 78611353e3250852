"""Tiny FLUX pipelines built from config (no hub, random weights), for the demo and the tests on a CPU.

The shapes follow FLUX.1 (double and single blocks, joint attention, rotary ids, 2x2-packed latents);
only the sizes are small, with every linear's input a multiple of 64 so that every intended layer can
be quantized.

Example:
    >>> pipe, emb = tiny_flux_pipeline(seed=0)
    >>> type(pipe.transformer).__name__, emb["prompt_embeds"].shape
    ('FluxTransformer2DModel', torch.Size([1, 16, 128]))
"""

from __future__ import annotations

from typing import Any

import torch


def tiny_flux_pipeline(seed: int = 0, dtype: torch.dtype = torch.bfloat16, hidden_heads: int = 4,
                       layers: int = 2, single_layers: int = 4) -> tuple[Any, dict[str, torch.Tensor]]:
    """A FluxPipeline with a tiny transformer and VAE and no text encoders, plus prompt embeddings for it.

    The pipeline runs with ``prompt_embeds`` / ``pooled_prompt_embeds`` (the returned dict) instead of
    prompts. Needs diffusers and transformers (the pipeline class imports the latter).
    """
    import diffusers

    torch.manual_seed(seed)
    joint = 128
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=layers, num_single_layers=single_layers, attention_head_dim=32,
        num_attention_heads=hidden_heads, joint_attention_dim=joint, pooled_projection_dim=joint,
        axes_dims_rope=[4, 14, 14])
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[32, 32], layers_per_block=1,
        latent_channels=4, norm_num_groups=32, sample_size=64, shift_factor=0.0, scaling_factor=1.0)
    pipe = diffusers.FluxPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=vae.to(dtype).eval(), text_encoder=None,
        tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=transformer.to(dtype).eval())
    g = torch.Generator().manual_seed(seed + 1)
    emb = {"prompt_embeds": torch.randn(1, 16, joint, generator=g).to(dtype),
           "pooled_prompt_embeds": torch.randn(1, joint, generator=g).to(dtype)}
    return pipe, emb
