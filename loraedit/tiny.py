"""A tiny, randomly initialised Wan2.1-I2V model in the real diffusers folder layout.

Built from the same classes as Wan-AI/Wan2.1-I2V-14B-480P-Diffusers (UMT5 text encoder, CLIP
vision encoder, AutoencoderKLWan with the real 4x temporal / 8x spatial factors and 16 latent
channels, WanTransformer3DModel with the 36-channel I2V input and the image attention path), so
that code exercised on it takes exactly the loading and tensor paths of the real model. Used by the
tests and the benchmarks; it downloads nothing.
"""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = (
    "a an the of and in on with to at is are his her their red blue green yellow white black brown orange purple "
    "pink gray man woman person cat dog kitten car ball hat jacket shirt clothes cowboy walking running turning "
    "head floor wooden street grass sky background video frame moving object shape square circle bright dark "
    "overexposed static blurred details subtitles style works paintings images overall worst quality low jpeg "
    "compression residue ugly incomplete extra fingers poorly drawn hands faces deformed disfigured misshapen "
    "limbs fused still picture messy three legs many people walking backwards"
).split()


def build_tokenizer():
    """A word-level tokenizer with T5's special tokens, built offline with `tokenizers`."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in dict.fromkeys(WORDS):
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def tiny_transformer_config(**overrides) -> dict:
    cfg = dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=36, out_channels=16,
        text_dim=32, freq_dim=32, ffn_dim=48, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=16, added_kv_proj_dim=24, rope_max_seq_len=64,
    )
    cfg.update(overrides)
    if "added_kv_proj_dim" not in overrides:  # Wan's image k/v projections act on the inner width
        cfg["added_kv_proj_dim"] = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    return cfg


def build_tiny_pipeline(seed: int = 0, transformer_overrides: dict | None = None, vae_base_dim: int = 8):
    """A WanImageToVideoPipeline with tiny random components (not saved)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanImageToVideoPipeline, WanTransformer3DModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    text_encoder = UMT5EncoderModel(
        UMT5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                   relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    ).eval()
    image_encoder = CLIPVisionModel(
        CLIPVisionConfig(hidden_size=16, intermediate_size=32, projection_dim=16, num_hidden_layers=2,
                         num_attention_heads=2, image_size=32, patch_size=8)
    ).eval()
    image_processor = CLIPImageProcessor(crop_size={"height": 32, "width": 32}, size={"shortest_edge": 32})
    vae = AutoencoderKLWan(base_dim=vae_base_dim, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    transformer = WanTransformer3DModel(**tiny_transformer_config(**(transformer_overrides or {}))).eval()
    # the scheduler of the real Wan2.1-I2V-480P diffusers folder
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        num_train_timesteps=1000, flow_shift=3.0)
    return WanImageToVideoPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
        image_processor=image_processor, image_encoder=image_encoder, transformer=transformer,
    )


def save_tiny_model(folder: str | Path, seed: int = 0, **kwargs) -> Path:
    """Build the tiny model and save it in diffusers layout (model_index.json + component folders)."""
    folder = Path(folder)
    build_tiny_pipeline(seed=seed, **kwargs).save_pretrained(folder, safe_serialization=True)
    return folder


# ---------------------------------------------------------------- the Wan2.2 layouts (and a text-to-video one)


def _tiny_text_encoder(tokenizer):
    from transformers import UMT5Config, UMT5EncoderModel

    return UMT5EncoderModel(
        UMT5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                   relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    ).eval()


def _tiny_wan22_vae(base_dim: int = 8):
    """The Wan2.2 VAE's layout (residual blocks, 2×2 patchify in front: 16x spatial, 4x temporal,
    48 latent channels), tiny; latent mean/std are not 0/1 so that normalisation is exercised."""
    from diffusers import AutoencoderKLWan

    z = 48
    return AutoencoderKLWan(
        base_dim=base_dim, decoder_base_dim=base_dim, z_dim=z, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
        temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12, patch_size=2,
        scale_factor_spatial=16, scale_factor_temporal=4,
        latents_mean=[round(0.1 * ((i % 7) - 3), 3) for i in range(z)], latents_std=[round(1.0 + 0.05 * (i % 5), 3) for i in range(z)],
    ).eval()


def build_tiny_a14b_pipeline(seed: int = 0, boundary_ratio: float = 0.9):
    """Wan2.2-I2V-A14B's layout, tiny: two experts (transformer = high noise, transformer_2 = low
    noise), boundary_ratio, the 36-channel input, no CLIP image encoder (image_dim None)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanImageToVideoPipeline, WanTransformer3DModel

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    text_encoder = _tiny_text_encoder(tokenizer)
    vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]).eval()
    cfg = tiny_transformer_config(image_dim=None, added_kv_proj_dim=None)
    high = WanTransformer3DModel(**cfg).eval()
    low = WanTransformer3DModel(**cfg).eval()
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=5.0)
    return WanImageToVideoPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                                   transformer=high, transformer_2=low, boundary_ratio=boundary_ratio)


def build_tiny_ti2v_pipeline(seed: int = 0, expand_timesteps: bool = True):
    """Wan2.2-TI2V-5B's layout, tiny: a WanPipeline with expand_timesteps, a 48-channel transformer
    without mask channels or image attention, and the Wan2.2 VAE. expand_timesteps=False gives a
    plain text-to-video WanPipeline folder (which loraedit refuses)."""
    from diffusers import UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    text_encoder = _tiny_text_encoder(tokenizer)
    vae = _tiny_wan22_vae()
    transformer = WanTransformer3DModel(**tiny_transformer_config(in_channels=48, out_channels=48, image_dim=None, added_kv_proj_dim=None)).eval()
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=5.0)
    return WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler, transformer=transformer,
                       expand_timesteps=expand_timesteps)


TINY_LAYOUTS = {
    "wan2.1": ("tiny-Wan2.1-I2V-14B-480P-Diffusers", build_tiny_pipeline),
    # the same configs as 480P (the name says 720P), with the rope table long enough for 1280 pixels
    "wan2.1-720p": ("tiny-Wan2.1-I2V-14B-720P-Diffusers", lambda seed=0: build_tiny_pipeline(seed, {"rope_max_seq_len": 1024})),
    "a14b": ("tiny-Wan2.2-I2V-A14B-Diffusers", build_tiny_a14b_pipeline),
    "ti2v": ("tiny-Wan2.2-TI2V-5B-Diffusers", build_tiny_ti2v_pipeline),
    "t2v": ("tiny-Wan2.1-T2V-Diffusers", lambda seed=0: build_tiny_ti2v_pipeline(seed, expand_timesteps=False)),
}


def save_tiny_layout(parent: str | Path, layout: str, seed: int = 0) -> Path:
    """Save the tiny model of `layout` (a TINY_LAYOUTS key) in diffusers layout under `parent`,
    in a folder named like the real download."""
    name, build = TINY_LAYOUTS[layout]
    folder = Path(parent) / name
    build(seed=seed).save_pretrained(folder, safe_serialization=True)
    return folder
