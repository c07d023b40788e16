"""The toy world's text-to-image pipeline: a pixel-space diffusers pipeline with a stock IP-Adapter.

`ToyWorldPipeline` follows `StableDiffusionPipeline` call for call (its `encode_prompt`,
`encode_image` and `prepare_ip_adapter_image_embeds` are diffusers' own functions), with two
differences that are pure plumbing:

- there is no VAE: the "latents" are the image itself in [-1, 1], folded 4x4 into channels with an
  orthonormal 2-D Haar transform ([B, 3, 64, 64] -> [B, 48, 16, 16]). The fold is a rotation of pixel
  space, so diffusion in the folded space is exactly pixel-space diffusion, while the UNet runs at a
  quarter of the resolution (like SD's VAE factor of 8, but exact and free). Fine detail lives in the
  high-frequency bands, which are ~0 inside flat sprites: the model learns to leave them empty, which
  avoids the checkerboard that a plain pixel-unshuffle fold left.
- `preview_from_latents` maps (predicted) latents back to RGB in [0, 1].

After `load_ip_adapter` the UNet's cross-attention processors are diffusers' stock
`IPAdapterAttnProcessor2_0`, exactly as in an SDXL + IP-Adapter pipeline.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler, UNet2DConditionModel
from diffusers.loaders import IPAdapterMixin
from diffusers.pipelines import StableDiffusionPipeline
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from safetensors.torch import save_file
from transformers import (
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from .world import VOCABULARY_WORDS

FOLD = 4  # pixels per latent cell along each side
LATENT_CHANNELS = 3 * FOLD * FOLD
IP_ADAPTER_WEIGHT_NAME = "ip-adapter_toy.safetensors"
DEFAULT_WEIGHTS_DIR = Path(__file__).parent / "weights"
DEFAULT_NUM_INFERENCE_STEPS = 12
DEFAULT_GUIDANCE_SCALE = 3.0
# Pixel offsets (dy, dx) of the image under the 4x4 fold (`fold_shifts`) for the second half of the sampling
# steps, counted from the last one backwards and cycled; the first half, where the layout forms, is unshifted.
# Chosen on validation cases over a cycle through every step (results/toy_fold_shifts_validation.md).
FOLD_SHIFTS = ((1, 1), (1, -1), (-1, 1), (2, 2))
DEFAULT_SIZE = 64


def _haar_matrix(n: int) -> torch.Tensor:
    """Orthonormal 1-D Haar basis of length n (a power of 2); rows are basis vectors."""
    if n == 1:
        return torch.ones(1, 1)
    half = _haar_matrix(n // 2)
    coarse = torch.kron(half, torch.tensor([[1.0, 1.0]])) / 2**0.5
    fine = torch.kron(torch.eye(n // 2), torch.tensor([[1.0, -1.0]])) / 2**0.5
    return torch.cat([coarse, fine])


# Orthonormal 2-D Haar basis of a FOLD x FOLD block: [FOLD^2 bands, FOLD^2 pixels]; its inverse is its transpose.
_HAAR = torch.kron(_haar_matrix(FOLD), _haar_matrix(FOLD))


def fold(image: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] pixels -> [B, 3 * FOLD^2, H/FOLD, W/FOLD] Haar bands (band 0 of each colour = block mean)."""
    b, c, h, w = image.shape
    if h % FOLD or w % FOLD:
        raise ValueError(f"height and width must be multiples of {FOLD}; got {h}x{w}")
    x = F.pixel_unshuffle(image, FOLD).view(b, c, FOLD * FOLD, h // FOLD, w // FOLD)
    x = torch.einsum("ij,bcjhw->bcihw", _HAAR.to(x), x)
    return x.reshape(b, c * FOLD * FOLD, h // FOLD, w // FOLD)


def unfold(latents: torch.Tensor) -> torch.Tensor:
    """Inverse of `fold`: [B, 3 * FOLD^2, h, w] -> [B, 3, FOLD h, FOLD w]."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c // (FOLD * FOLD), FOLD * FOLD, h, w)
    x = torch.einsum("ji,bcjhw->bcihw", _HAAR.to(x), x)
    return F.pixel_shuffle(x.reshape(b, c, h, w), FOLD)


def shift_fold(latents: torch.Tensor, shift: tuple[int, int]) -> torch.Tensor:
    """The latents of the pixel image rolled by `shift` = (dy, dx) pixels (circularly): the same image
    folded on a grid moved by a fraction of a block. `shift_fold(shift_fold(x, s), (-dy, -dx)) == x`."""
    if shift == (0, 0):
        return latents
    return fold(torch.roll(unfold(latents), shifts=shift, dims=(-2, -1)))


# --------------------------------------------------------------------------------------------
# Component construction (fresh, random weights) and IP-Adapter state-dict layout
# --------------------------------------------------------------------------------------------
def _bytes_to_unicode() -> list[str]:
    """GPT-2 / CLIP byte-level alphabet: the 256 base symbols of the tokenizer."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def build_tokenizer(words: tuple[str, ...] = VOCABULARY_WORDS, max_length: int = 16) -> CLIPTokenizer:
    """A CLIP byte-level BPE tokenizer with the 512 byte symbols plus one merged token per world word."""
    symbols = _bytes_to_unicode()
    tokens = symbols + [s + "</w>" for s in symbols]
    merges: list[tuple[str, str]] = []
    for word in words:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            if (parts[0], parts[1]) not in merges:
                merges.append((parts[0], parts[1]))
            parts = [parts[0] + parts[1]] + parts[2:]
            tokens.append(parts[0])
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def save_tokenizer_files(tokenizer: CLIPTokenizer, directory: str | os.PathLike) -> None:
    """save_pretrained writes tokenizer.json; also write the human-readable vocab.json / merges.txt."""
    directory = Path(directory)
    tokenizer.save_pretrained(directory)
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    (directory / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges), encoding="utf-8")


def build_components(seed: int = 0, sample_size: int = DEFAULT_SIZE) -> dict[str, Any]:
    """Fresh, randomly initialised components of a ToyWorldPipeline (no IP-Adapter loaded yet)."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=tokenizer.model_max_length,
            projection_dim=64,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=sample_size // FOLD,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        block_out_channels=(48, 96, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        cross_attention_dim=64,
        attention_head_dim=4,  # diffusers' name for the number of heads
        norm_num_groups=16,
    )
    image_encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            image_size=32,
            patch_size=4,
            num_channels=3,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            projection_dim=64,
        )
    )
    feature_extractor = CLIPImageProcessor(
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    return dict(
        unet=unet,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=make_scheduler(),
        image_encoder=image_encoder,
        feature_extractor=feature_extractor,
    )


def scheduler_config() -> dict[str, Any]:
    """Zero terminal SNR + clean-image ("sample") prediction + trailing spacing: sampling starts from
    pure noise at t=999, where predicting the clean image is well posed. x0-prediction rather than v:
    45 of the 48 Haar bands are ~0 in this world, and predicting them as ~0 is easy, while v- or
    noise-prediction must carry the noise of every band through the UNet (measured: after 1,000 base
    steps a v-prediction model still predicted the detail bands worse than zeros, and sampled noise)."""
    return dict(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="sample",
        rescale_betas_zero_snr=True,
        timestep_spacing="trailing",
    )


def make_scheduler() -> DPMSolverMultistepScheduler:
    return DPMSolverMultistepScheduler(**scheduler_config(), algorithm_type="dpmsolver++", solver_order=2)


def initial_ip_adapter_state_dict(
    unet: UNet2DConditionModel, image_embed_dim: int, num_tokens: int = 4, seed: int = 0
) -> dict[str, dict[str, torch.Tensor]]:
    """A fresh IP-Adapter in diffusers' layout: to_k_ip / to_v_ip start as copies of to_k / to_v
    (as in the IP-Adapter paper); `proj.bias` and `norm.bias` are zero so that a zero image embedding
    (diffusers' negative) yields zero tokens and exactly no image-branch output."""
    generator = torch.Generator().manual_seed(seed)
    dim = unet.config.cross_attention_dim
    image_proj = {
        "proj.weight": torch.randn(num_tokens * dim, image_embed_dim, generator=generator) / image_embed_dim**0.5,
        "proj.bias": torch.zeros(num_tokens * dim),
        "norm.weight": torch.ones(dim),
        "norm.bias": torch.zeros(dim),
    }
    ip_adapter = {}
    modules = dict(unet.named_modules())
    key_id = 1  # diffusers numbers all attention processors and uses the odd ids for attn2
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        attn = modules[name[: -len(".processor")]]
        ip_adapter[f"{key_id}.to_k_ip.weight"] = attn.to_k.weight.detach().clone().cpu()
        ip_adapter[f"{key_id}.to_v_ip.weight"] = attn.to_v.weight.detach().clone().cpu()
        key_id += 2
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def ip_adapter_state_dict(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """The loaded IP-Adapter (adapter 0) as the flat safetensors dict `load_ip_adapter` reads."""
    if unet.encoder_hid_proj is None:
        raise ValueError("the UNet has no IP-Adapter loaded")
    projection = unet.encoder_hid_proj.image_projection_layers[0]
    flat = {
        "image_proj.proj.weight": projection.image_embeds.weight,
        "image_proj.proj.bias": projection.image_embeds.bias,
        "image_proj.norm.weight": projection.norm.weight,
        "image_proj.norm.bias": projection.norm.bias,
    }
    key_id = 1
    for name, processor in unet.attn_processors.items():
        if name.endswith("attn1.processor"):
            continue
        flat[f"ip_adapter.{key_id}.to_k_ip.weight"] = processor.to_k_ip[0].weight
        flat[f"ip_adapter.{key_id}.to_v_ip.weight"] = processor.to_v_ip[0].weight
        key_id += 2
    return {k: v.detach().float().cpu().contiguous() for k, v in flat.items()}


# --------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------
class ToyWorldPipeline(DiffusionPipeline, IPAdapterMixin):
    r"""Text-to-image (+ IP-Adapter) generation in the toy world, with StableDiffusionPipeline's call signature.

    Components: `unet` (UNet2DConditionModel on Haar-folded pixels), `text_encoder` (CLIPTextModel) +
    `tokenizer` (CLIPTokenizer), `scheduler` (a scheduler whose `scale_model_input` is the identity,
    e.g. DPM-Solver++ or DDIM), `image_encoder` (CLIPVisionModelWithProjection) + `feature_extractor`.
    """

    model_cpu_offload_seq = "text_encoder->image_encoder->unet"
    _optional_components = ["image_encoder", "feature_extractor"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    # diffusers' own prompt / image-embedding code (CFG batching [uncond; cond] and negative image
    # embeddings exactly as in StableDiffusionPipeline).
    encode_prompt = StableDiffusionPipeline.encode_prompt
    encode_image = StableDiffusionPipeline.encode_image
    prepare_ip_adapter_image_embeds = StableDiffusionPipeline.prepare_ip_adapter_image_embeds
    prepare_extra_step_kwargs = StableDiffusionPipeline.prepare_extra_step_kwargs

    def __init__(
        self,
        unet: UNet2DConditionModel,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        scheduler,
        image_encoder: CLIPVisionModelWithProjection | None = None,
        feature_extractor: CLIPImageProcessor | None = None,
    ):
        super().__init__()
        if unet.config.in_channels != LATENT_CHANNELS:
            raise ValueError(f"the UNet must take {LATENT_CHANNELS} folded channels; got {unet.config.in_channels}")
        self.register_modules(
            unet=unet,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            scheduler=scheduler,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
        )
        self.vae_scale_factor = FOLD  # image pixels per latent cell, as in SD pipelines
        # Sampling defaults used when a call leaves them None; the weights folder's sampling.json
        # (chosen on validation cases for those weights) overrides them in load_toy_pipeline.
        self.default_num_inference_steps = DEFAULT_NUM_INFERENCE_STEPS
        self.default_guidance_scale = DEFAULT_GUIDANCE_SCALE
        self.default_fold_shifts = False
        # (dy, dx): how far the image the UNet is running on now is rolled (`fold_shifts`); (0, 0) between
        # generations. Readers of the UNet's input and output (x0 previews) roll by minus this.
        self.fold_shift = (0, 0)

    # -- properties mirrored from StableDiffusionPipeline -------------------------------------
    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1

    @property
    def cross_attention_kwargs(self) -> dict[str, Any] | None:
        return self._cross_attention_kwargs

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    @property
    def clip_skip(self) -> int | None:
        return None

    # -- pixel space -----------------------------------------------------------------------------
    def preview_from_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """(Predicted) latents [B, 48, h, w] -> RGB [B, 3, 4h, 4w] in [0, 1]."""
        return (unfold(latents.float()) / 2 + 0.5).clamp(0, 1)

    def prepare_latents(self, batch_size, height, width, dtype, device, generator, latents=None) -> torch.Tensor:
        shape = (batch_size, LATENT_CHANNELS, height // FOLD, width // FOLD)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"got {len(generator)} generators for a batch of {batch_size} images")
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}; got {tuple(latents.shape)}")
        else:
            latents = latents.to(device=device, dtype=dtype)
        return latents * self.scheduler.init_noise_sigma

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image=None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[[Any, int, int, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        fold_shifts: bool | None = None,
    ):
        r"""Generate images. Arguments mean what they mean in `StableDiffusionPipeline.__call__`.

        `ip_adapter_image` is a list per loaded adapter, each a list of images: several subjects are
        several images of one adapter (`[[img_a, img_b]]`), reaching the attention processors as
        `[B, num_images, 4, dim]`. `output_type` is "pil", "np", "pt" (RGB in [0, 1]) or "latent".
        `num_inference_steps` / `guidance_scale` / `fold_shifts` left None take `pipe.default_num_inference_steps` /
        `pipe.default_guidance_scale` / `pipe.default_fold_shifts` (from the weights folder's sampling.json).

        `fold_shifts`: the model predicts the 4x4 Haar fold of the image, and its errors, constant over a
        fold block, draw a faint 4-px grid. With `fold_shifts` each step of the second half runs the UNet on
        the image rolled by `FOLD_SHIFTS[(num_steps - 1 - i) % 4]` pixels and rolls its prediction back, so
        each step's grid lies elsewhere; the last step averages two predictions half a block apart (one UNet
        call, batch doubled). The UNet, hence the attention processors and their recorded maps, sees a
        shifted step's image moved by that offset (at most 2 px, half a 16x16 latent cell) under boxes that
        stay put; `pipe.fold_shift` holds it during the step, and `anyms_core`'s x0 previews roll back by it.
        """
        num_inference_steps = num_inference_steps or self.default_num_inference_steps
        guidance_scale = self.default_guidance_scale if guidance_scale is None else guidance_scale
        fold_shifts = self.default_fold_shifts if fold_shifts is None else fold_shifts
        height = height or self.unet.config.sample_size * FOLD
        width = width or self.unet.config.sample_size * FOLD
        if height % (FOLD * 4) or width % (FOLD * 4):
            raise ValueError(f"height and width must be multiples of {FOLD * 4}; got {height}x{width}")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent'; got {output_type!r}")
        for name in callback_on_step_end_tensor_inputs:
            if name not in self._callback_tensor_inputs:
                raise ValueError(f"callback tensor input {name!r} is not one of {self._callback_tensor_inputs}")
        if prompt is None and prompt_embeds is None:
            raise ValueError("pass `prompt` or `prompt_embeds`")
        if ip_adapter_image is not None and ip_adapter_image_embeds is not None:
            raise ValueError("pass `ip_adapter_image` or `ip_adapter_image_embeds`, not both")

        self._guidance_scale = guidance_scale
        self._cross_attention_kwargs = cross_attention_kwargs
        self._interrupt = False

        if prompt is not None and isinstance(prompt, str):
            batch_size = 1
        elif prompt is not None:
            batch_size = len(prompt)
        else:
            batch_size = prompt_embeds.shape[0]
        device = self._execution_device

        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt,
            device,
            num_images_per_prompt,
            self.do_classifier_free_guidance,
            negative_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
        )
        if self.do_classifier_free_guidance:
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])  # [uncond; cond]

        added_cond_kwargs = None
        if ip_adapter_image is not None or ip_adapter_image_embeds is not None:
            image_embeds = self.prepare_ip_adapter_image_embeds(
                ip_adapter_image,
                ip_adapter_image_embeds,
                device,
                batch_size * num_images_per_prompt,
                self.do_classifier_free_guidance,
            )
            added_cond_kwargs = {"image_embeds": image_embeds}

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        latents = self.prepare_latents(
            batch_size * num_images_per_prompt, height, width, prompt_embeds.dtype, device, generator, latents
        )
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)

        self._num_timesteps = len(timesteps)
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                late = fold_shifts and i >= len(timesteps) // 2
                shifts = [FOLD_SHIFTS[(len(timesteps) - 1 - i) % len(FOLD_SHIFTS)] if late else (0, 0)]
                if fold_shifts and i == len(timesteps) - 1:
                    shifts.append(tuple(d - 2 if d > 0 else d + 2 for d in shifts[0]))  # half a block away
                self.fold_shift = shifts[0]
                model_input = self.scheduler.scale_model_input(latents, t)
                # Batch [uncond per shift; cond per shift]: diffusers' num_images_per_prompt layout.
                groups = 2 if self.do_classifier_free_guidance else 1
                latent_model_input = torch.cat([shift_fold(model_input, s) for s in shifts] * groups)
                step_cond_kwargs = added_cond_kwargs
                if len(shifts) > 1 and added_cond_kwargs is not None:
                    step_cond_kwargs = {"image_embeds": [_repeat_groups(e, groups, len(shifts)) for e in added_cond_kwargs["image_embeds"]]}
                noise_pred = self.unet(
                    latent_model_input,
                    t,
                    encoder_hidden_states=_repeat_groups(prompt_embeds, groups, len(shifts)),
                    cross_attention_kwargs=self.cross_attention_kwargs,
                    added_cond_kwargs=step_cond_kwargs,
                    return_dict=False,
                )[0]
                if shifts != [(0, 0)]:
                    noise_pred = _unshift_mean(noise_pred, shifts, groups)
                if self.do_classifier_free_guidance:
                    noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
                    noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
                latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]

                if callback_on_step_end is not None:
                    callback_kwargs = {}
                    for k in callback_on_step_end_tensor_inputs:
                        callback_kwargs[k] = locals()[k]
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                    latents = callback_outputs.pop("latents", latents)
                    prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                    negative_prompt_embeds = callback_outputs.pop("negative_prompt_embeds", negative_prompt_embeds)
                progress_bar.update()
        self.fold_shift = (0, 0)

        if output_type == "latent":
            images = latents
        else:
            images = self.preview_from_latents(latents)
            if output_type == "np":
                images = images.permute(0, 2, 3, 1).cpu().numpy()
            elif output_type == "pil":
                arrays = (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
                images = [Image.fromarray(a) for a in arrays]
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)


def _unshift_mean(pred: torch.Tensor, shifts: list[tuple[int, int]], groups: int) -> torch.Tensor:
    """[uncond per shift; cond per shift] predictions -> each rolled back and averaged over the shifts."""
    per_shift = pred.chunk(groups * len(shifts))
    return torch.cat([
        torch.stack([shift_fold(p, (-dy, -dx)) for p, (dy, dx) in zip(per_shift[g * len(shifts):], shifts)]).mean(0)
        for g in range(groups)
    ])


def _repeat_groups(x: torch.Tensor, groups: int, repeats: int) -> torch.Tensor:
    """[g0; g1] (`groups` equal blocks along dim 0) -> [g0 x repeats; g1 x repeats]."""
    if repeats == 1:
        return x
    return torch.cat([block for block in x.chunk(groups) for _ in range(repeats)])


# --------------------------------------------------------------------------------------------
# Saving and loading the shipped weights
# --------------------------------------------------------------------------------------------
def save_toy_pipeline(pipe: ToyWorldPipeline, directory: str | os.PathLike, dtype: torch.dtype = torch.float16) -> None:
    """Write the weights folder `load_toy_pipeline` reads (weights stored in `dtype`, loaded as float32).

    The UNet is saved without its IP-Adapter (its attention processors are reset to the defaults), and
    the adapter goes to `ip_adapter/ip-adapter_toy.safetensors` in diffusers' layout.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ip_state = ip_adapter_state_dict(pipe.unet)
    unet = UNet2DConditionModel.from_config(pipe.unet.config)
    base_state = {
        k: v for k, v in pipe.unet.state_dict().items() if not k.startswith("encoder_hid_proj") and "_ip." not in k
    }
    unet.load_state_dict({k: v.cpu() for k, v in base_state.items()})
    unet.to(dtype).save_pretrained(directory / "unet")
    copy.deepcopy(pipe.text_encoder).to("cpu", dtype).save_pretrained(directory / "text_encoder")
    copy.deepcopy(pipe.image_encoder).to("cpu", dtype).save_pretrained(directory / "image_encoder")
    save_tokenizer_files(pipe.tokenizer, directory / "tokenizer")
    pipe.feature_extractor.save_pretrained(directory / "feature_extractor")
    pipe.scheduler.save_pretrained(directory / "scheduler")
    (directory / "ip_adapter").mkdir(exist_ok=True)
    save_file({k: v.to(dtype) for k, v in ip_state.items()}, directory / "ip_adapter" / IP_ADAPTER_WEIGHT_NAME)
    sampling = {"num_inference_steps": pipe.default_num_inference_steps, "guidance_scale": pipe.default_guidance_scale,
                "fold_shifts": pipe.default_fold_shifts}
    (directory / "sampling.json").write_text(json.dumps(sampling, indent=1) + "\n")


def load_toy_pipeline(
    weights_dir: str | os.PathLike | None = None, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> ToyWorldPipeline:
    """The shipped toy-world pipeline with its IP-Adapter loaded (through `load_ip_adapter`); no network."""
    weights_dir = Path(weights_dir) if weights_dir is not None else DEFAULT_WEIGHTS_DIR
    if not (weights_dir / "unet" / "config.json").exists():
        raise FileNotFoundError(
            f"no toy-world weights in {weights_dir}; train them with `python -m anyms_core.toy.train --out DIR`"
        )
    # transformers >= 4.56 calls it `dtype`; we load in float32 then cast, which works everywhere.
    pipe = ToyWorldPipeline(
        unet=UNet2DConditionModel.from_pretrained(weights_dir / "unet", torch_dtype=torch.float32),
        text_encoder=CLIPTextModel.from_pretrained(weights_dir / "text_encoder").float(),
        tokenizer=CLIPTokenizer.from_pretrained(weights_dir / "tokenizer"),
        scheduler=DPMSolverMultistepScheduler.from_pretrained(weights_dir / "scheduler"),
        image_encoder=CLIPVisionModelWithProjection.from_pretrained(weights_dir / "image_encoder").float(),
        feature_extractor=CLIPImageProcessor.from_pretrained(weights_dir / "feature_extractor"),
    )
    pipe.load_ip_adapter(str(weights_dir), subfolder="ip_adapter", weight_name=IP_ADAPTER_WEIGHT_NAME, local_files_only=True)
    if (weights_dir / "sampling.json").exists():
        sampling = json.loads((weights_dir / "sampling.json").read_text())
        pipe.default_num_inference_steps = int(sampling["num_inference_steps"])
        pipe.default_guidance_scale = float(sampling["guidance_scale"])
        pipe.default_fold_shifts = bool(sampling.get("fold_shifts", False))
        # The adapter's strength is part of the model's tuned defaults, like IP-Adapter's own `scale`.
        pipe.set_ip_adapter_scale(float(sampling.get("ip_adapter_scale", 1.0)))
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    if dtype != torch.float32:
        # Only when asked: diffusers warns on every dtype cast, even with no float32-only modules.
        pipe.to(dtype=dtype)
    return pipe
