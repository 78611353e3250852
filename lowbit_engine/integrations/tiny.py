"""Tiny FLUX pipelines and SD3 / SD3.5 transformers built from config (no hub, random weights), for the demo
and the tests on a CPU.

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


TINY_WORDS = ("[PAD] [UNK] a an the of in on at and with photo red fox snow watercolor lighthouse dusk city "
              "street night rain cat dog portrait").split()


def tiny_flux_pipeline_with_text(seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> Any:
    """:func:`tiny_flux_pipeline` with tiny CLIP and T5 text encoders and a word-level tokenizer (random weights).

    It takes prompts like a real FLUX pipeline (words outside :data:`TINY_WORDS` map to ``[UNK]``), and
    ``save_pretrained`` / ``DiffusionPipeline.from_pretrained`` round-trip it offline. For the tests of the
    commands that calibrate on prompts.

    Example:
        >>> pipe = tiny_flux_pipeline_with_text()
        >>> pipe("a red fox", height=32, width=32, num_inference_steps=1, max_sequence_length=16,
        ...      output_type="pt").images.shape
        torch.Size([1, 3, 32, 32])
    """
    import diffusers
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    pipe, _ = tiny_flux_pipeline(seed=seed, dtype=dtype)
    words = Tokenizer(models.WordLevel({w: i for i, w in enumerate(TINY_WORDS)}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=words, pad_token="[PAD]", unk_token="[UNK]",
                                                     model_max_length=16)
    torch.manual_seed(seed + 2)
    joint = pipe.transformer.config.joint_attention_dim  # CLIP's pooled output and T5's tokens both feed it
    clip = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(TINY_WORDS), hidden_size=joint, intermediate_size=2 * joint, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=16, projection_dim=joint))
    t5 = transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=len(TINY_WORDS), d_model=joint, d_kv=32, d_ff=2 * joint, num_layers=1, num_heads=2))
    return diffusers.FluxPipeline(scheduler=pipe.scheduler, vae=pipe.vae, transformer=pipe.transformer,
                                  text_encoder=clip.to(dtype).eval(), tokenizer=tokenizer,
                                  text_encoder_2=t5.to(dtype).eval(), tokenizer_2=tokenizer)


def tiny_sd3_transformer(seed: int = 0, medium: bool = False, dtype: torch.dtype = torch.bfloat16,
                         layers: int = 3) -> Any:
    """A tiny ``SD3Transformer2DModel``: SD3's MMDiT blocks (the last one ``context_pre_only``), or with
    ``medium`` SD3.5-Medium's: qk RMSNorm and a second self-attention (``attn2``) in all but the last block.
    Every linear's input is a multiple of 64. Inputs: :func:`tiny_sd3_inputs`.

    Example:
        >>> t = tiny_sd3_transformer(medium=True)
        >>> t(**tiny_sd3_inputs(seed=1), return_dict=False)[0].shape
        torch.Size([2, 4, 16, 16])
    """
    import diffusers

    torch.manual_seed(seed)
    extra = dict(qk_norm="rms_norm", dual_attention_layers=tuple(range(layers - 1))) if medium else {}
    t = diffusers.SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_layers=layers, attention_head_dim=32, num_attention_heads=2,
        joint_attention_dim=128, caption_projection_dim=64, pooled_projection_dim=64, out_channels=4, **extra)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # qk norm weights away from 1, so that dropping a norm shows
        for name, p in t.named_parameters():
            if ".norm_q." in name or ".norm_k." in name or ".norm_added_" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    return t.to(dtype).eval()


def tiny_sd3_inputs(seed: int = 0, batch: int = 2, dtype: torch.dtype = torch.bfloat16) -> dict[str, Any]:
    """Forward kwargs for :func:`tiny_sd3_transformer` (random latents, text tokens and pooled embedding)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    return dict(hidden_states=r(batch, 4, 16, 16), encoder_hidden_states=r(batch, 8, 128),
                pooled_projections=r(batch, 64), timestep=torch.rand(batch, generator=g) * 1000)
