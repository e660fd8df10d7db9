"""Tiny random SDXL / SD3 / FLUX diffusers pipelines built from configs (no downloads).

For tests and CLI smoke runs only: every component is randomly initialised from a fixed seed;
tokenizers are word-level `tokenizers` objects over a small vocabulary, so nothing is fetched.
Images are 32x32 (VAE factor 2 -> 16x16 latents).
"""
from __future__ import annotations

import torch

from ..optional import require

WORDS = ("a photo of cat dog red blue green small large tree house car bird on the in with sky sea "
         "mountain painting portrait city night day sun moon flower").split()


def tiny_tokenizer(max_length: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "<eos>": 2}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>",
                                   model_max_length=max_length)


def _clip(hidden: int, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=64, hidden_size=hidden, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, projection_dim=hidden,
                         bos_token_id=0, eos_token_id=2, pad_token_id=0, hidden_act="gelu")
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def _t5(d_model: int):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=64, d_model=d_model, d_ff=64, d_kv=8, num_layers=1, num_heads=2,
                   relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0)
    return T5EncoderModel(cfg).eval()


def _vae(**extra):
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3,
                         down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                         latent_channels=4, sample_size=32, **extra).eval()


def tiny_sdxl(seed: int = 0, scheduler: str = "euler"):
    require("diffusers", "the tiny SDXL pipeline")
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=80, cross_attention_dim=64).eval()
    sched_kwargs = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                        timestep_spacing="leading")
    sched = (DDIMScheduler(clip_sample=False, set_alpha_to_one=False, **sched_kwargs) if scheduler == "ddim"
             else EulerDiscreteScheduler(**sched_kwargs))
    return StableDiffusionXLPipeline(
        vae=_vae(), text_encoder=_clip(32, False), text_encoder_2=_clip(32, True),
        tokenizer=tiny_tokenizer(77), tokenizer_2=tiny_tokenizer(77), unet=unet, scheduler=sched)


def tiny_sd3(seed: int = 0):
    require("diffusers", "the tiny SD3 pipeline")
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=64, pooled_projection_dim=64, out_channels=4).eval()
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_vae(shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=_clip(32, True), text_encoder_2=_clip(32, True), text_encoder_3=_t5(64),
        tokenizer=tiny_tokenizer(77), tokenizer_2=tiny_tokenizer(77), tokenizer_3=tiny_tokenizer(512))


def tiny_flux(seed: int = 0):
    require("diffusers", "the tiny FLUX pipeline")
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=[4, 4, 8]).eval()
    return FluxPipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_vae(shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=_clip(32, False), text_encoder_2=_t5(32),
        tokenizer=tiny_tokenizer(77), tokenizer_2=tiny_tokenizer(512))


TINY = {"sdxl": tiny_sdxl, "sd3": tiny_sd3, "flux": tiny_flux}
