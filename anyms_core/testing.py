"""Tiny SD1.5 / SDXL pipelines with random weights and a random IP-Adapter: no download needed.

They have the real architectures (two text encoders and ``text_time`` conditioning for SDXL; a
CLIP vision encoder; an IP-Adapter state dict in the original key layout loaded through diffusers'
own ``load_ip_adapter``), at a size that runs a whole pipeline call in a fraction of a second.
Images are noise: these models are for tests and for timing, not for pictures.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

TEXT_DIM = 32
IMAGE_EMBED_DIM = 32


def random_reference_image(seed: int, size: int = 40):
    """A seeded RGB noise image to stand in for a subject's reference photo."""
    import numpy as np
    from PIL import Image

    return Image.fromarray((np.random.RandomState(seed).rand(size, size, 3) * 255).astype(np.uint8))


def tiny_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer built in memory: the 512 byte-level symbols and no merges (one token per byte)."""
    from .toy.pipeline import build_tokenizer

    return build_tokenizer(words=(), max_length=77)


def _text_config(projection_dim: int = TEXT_DIM) -> CLIPTextConfig:
    return CLIPTextConfig(
        bos_token_id=512, eos_token_id=513, pad_token_id=513, hidden_size=TEXT_DIM, intermediate_size=37,
        layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=2, vocab_size=514,
        hidden_act="gelu", projection_dim=projection_dim, max_position_embeddings=77,
    )


def _image_encoder(hidden_size: int = IMAGE_EMBED_DIM) -> tuple[CLIPVisionModelWithProjection, CLIPImageProcessor]:
    config = CLIPVisionConfig(
        hidden_size=hidden_size, projection_dim=IMAGE_EMBED_DIM, num_hidden_layers=2, num_attention_heads=4,
        image_size=32, patch_size=8, intermediate_size=37,
    )
    return CLIPVisionModelWithProjection(config).eval(), CLIPImageProcessor(size=32, crop_size=32)


def _vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=[8, 16], in_channels=3, out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], latent_channels=4, norm_num_groups=8,
    ).eval()


def random_ip_adapter_state_dict(unet: UNet2DConditionModel, plus: bool = False, num_tokens: int = 16,
                                 image_embed_dim: int = IMAGE_EMBED_DIM, seed: int = 0, std: float = 0.2) -> dict:
    """A randomly initialised IP-Adapter in the original checkpoint layout (``image_proj`` + ``ip_adapter``).

    Base adapters project the pooled image embedding to 4 tokens; "plus" adapters run a Resampler over
    the encoder's penultimate hidden states and give ``num_tokens`` tokens.
    """
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * std

    cross_dim = unet.config.cross_attention_dim
    if plus:
        width, inner, depth = 64, 64, 4  # diffusers infers heads = inner // 64 and a depth of 4
        image_proj = {
            "latents": rand(1, num_tokens, width), "proj_in.weight": rand(width, image_embed_dim),
            "proj_in.bias": torch.zeros(width), "proj_out.weight": rand(cross_dim, width),
            "proj_out.bias": torch.zeros(cross_dim), "norm_out.weight": torch.ones(cross_dim),
            "norm_out.bias": torch.zeros(cross_dim),
        }
        for i in range(depth):
            image_proj.update({
                f"layers.{i}.0.norm1.weight": torch.ones(width), f"layers.{i}.0.norm1.bias": torch.zeros(width),
                f"layers.{i}.0.norm2.weight": torch.ones(width), f"layers.{i}.0.norm2.bias": torch.zeros(width),
                f"layers.{i}.0.to_q.weight": rand(inner, width), f"layers.{i}.0.to_kv.weight": rand(2 * inner, width),
                f"layers.{i}.0.to_out.weight": rand(width, inner),
                f"layers.{i}.1.0.weight": torch.ones(width), f"layers.{i}.1.0.bias": torch.zeros(width),
                f"layers.{i}.1.1.weight": rand(4 * width, width), f"layers.{i}.1.3.weight": rand(width, 4 * width),
            })
    else:
        image_proj = {
            "proj.weight": rand(4 * cross_dim, image_embed_dim), "proj.bias": rand(4 * cross_dim),
            "norm.weight": torch.ones(cross_dim), "norm.bias": torch.zeros(cross_dim),
        }
    ip_adapter = {}
    key_id = 1  # the original checkpoints number every attention layer; cross-attention ones are odd
    for name in unet.attn_processors:
        if name.endswith("attn2.processor"):
            attn = unet.get_submodule(name.removesuffix(".processor"))
            ip_adapter[f"{key_id}.to_k_ip.weight"] = rand(attn.to_k.out_features, cross_dim)
            ip_adapter[f"{key_id}.to_v_ip.weight"] = rand(attn.to_v.out_features, cross_dim)
            key_id += 2
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def tiny_sdxl_pipeline(ip_adapter: str | None = "base", seed: int = 0) -> StableDiffusionXLPipeline:
    """A tiny SDXL pipeline (random weights) with a random IP-Adapter: ``"base"``, ``"plus"`` or None."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * 8 + TEXT_DIM, cross_attention_dim=2 * TEXT_DIM, norm_num_groups=8,
    ).eval()
    image_encoder, feature_extractor = _image_encoder()
    pipe = StableDiffusionXLPipeline(
        vae=_vae(), text_encoder=CLIPTextModel(_text_config()).eval(), text_encoder_2=CLIPTextModelWithProjection(_text_config()).eval(),
        tokenizer=tiny_tokenizer(), tokenizer_2=tiny_tokenizer(), unet=unet,
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="trailing"),
        image_encoder=image_encoder, feature_extractor=feature_extractor, force_zeros_for_empty_prompt=True,
    )
    pipe.set_progress_bar_config(disable=True)
    if ip_adapter is not None:
        pipe.load_ip_adapter(random_ip_adapter_state_dict(unet, plus=ip_adapter == "plus", seed=seed + 1),
                             subfolder="", weight_name="", image_encoder_folder=None)
    return pipe


def tiny_sd15_pipeline(ip_adapter: str | None = "base", seed: int = 0) -> StableDiffusionPipeline:
    """A tiny SD1.5 pipeline (random weights) with a random IP-Adapter: ``"base"``, ``"plus"`` or None."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_DIM, attention_head_dim=4, norm_num_groups=8,
    ).eval()
    image_encoder, feature_extractor = _image_encoder()
    pipe = StableDiffusionPipeline(
        vae=_vae(), text_encoder=CLIPTextModel(_text_config()).eval(), tokenizer=tiny_tokenizer(), unet=unet,
        scheduler=DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, steps_offset=1),
        safety_checker=None, feature_extractor=feature_extractor, image_encoder=image_encoder,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    if ip_adapter is not None:
        pipe.load_ip_adapter(random_ip_adapter_state_dict(unet, plus=ip_adapter == "plus", seed=seed + 1),
                             subfolder="", weight_name="", image_encoder_folder=None)
    return pipe


def save_fake_hub_folders(base: str, ip_adapter: str, family: str = "sd15", adapter: str = "base",
                          variant: str | None = None, seed: int = 0) -> None:
    """Writes tiny random models in the real hub layouts, for loader tests without downloads.

    ``base``: a diffusers pipeline folder like ``stable-diffusion-v1-5`` / ``stable-diffusion-xl-base-1.0``
    (``model_index.json``, ``unet/``, ...; weight files named for ``variant``, e.g. ``*.fp16.safetensors``),
    without an image encoder, as on the hub. ``ip_adapter``: the ``h94/IP-Adapter`` layout: the adapter's
    safetensors (``image_proj.*`` and ``ip_adapter.*`` keys) under its subfolder and the CLIP image encoder
    folder the loader's table names.
    """
    from pathlib import Path

    from safetensors.torch import save_file

    from .models import FAMILIES

    adapters = FAMILIES[family][1]
    weights = adapters[adapter]
    build = tiny_sdxl_pipeline if family == "sdxl" else tiny_sd15_pipeline
    pipe = build(ip_adapter=None, seed=seed)
    image_encoder = pipe.image_encoder
    pipe.register_modules(image_encoder=None)  # the hub's base repositories ship no image encoder
    pipe.save_pretrained(base, variant=variant, safe_serialization=True)
    state = random_ip_adapter_state_dict(pipe.unet, plus=weights.tokens == 16, seed=seed + 1)
    flat = {f"{group}.{key}": value.contiguous() for group, values in state.items() for key, value in values.items()}
    target = Path(ip_adapter) / weights.subfolder / weights.weight_name
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file(flat, target)
    image_encoder.save_pretrained(Path(ip_adapter) / weights.image_encoder_folder)
