"""Train the toy-world model in two stages, like SD + IP-Adapter, within a wall-clock budget.

Stage 1 (text-to-image base): UNet + text encoder on scenes with 0-2 sprites whose prompt names every
sprite ("a photo of a red triangle and a cyan circle on grass"; an empty scene's prompt names only the
background). So the base knows the sprites by name, as SDXL knows objects, but no text ever says where.
Most one-sprite scenes are object-centric (`--stage1-frame-fraction`): without them the base never learnt
to draw the shape a word names (see diagnostics.py).

Alignment (`--align-steps`, before stage 2): the image encoder and the image projection learn to turn a
sprite reference into the text encoder's tokens of its name, as CLIP's image encoder is aligned with text.

Stage 2 (image adapter): the base is frozen; the image encoder, the image projection and every
cross-attention layer's to_k_ip / to_v_ip (diffusers' stock IP-Adapter modules, loaded through
`load_ip_adapter`) learn on single-sprite scenes whose prompt names only the background. The reference
is an augmented view of that one sprite (recentred, rescaled, on another backdrop). Training never sees
a layout or a multi-subject reference: multi-subject composition must come from AnyMS, training-free.

Data is rendered on the training device, a whole batch at a time (`world.render_batch`), so a GPU is
not starved. The budget (`--minutes`) is split between the stages; checkpoints are written every few
minutes and `--resume` continues from the last one (the budget counts the time already spent).

    python -m anyms_core.toy.train --out toy_ckpt --minutes 8 --device cuda --batch-size 512

writes toy_ckpt/weights/ (the shipped layout), toy_ckpt/loss_log.csv, toy_ckpt/samples.png,
toy_ckpt/train_summary.json and toy_ckpt/checkpoint.pt. ``--init-from anyms_core/toy/weights`` continues a
trained model (its base in stage 1, its adapter in stage 2) with a fresh schedule instead of starting from
random weights.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import world
from .diagnostics import frame_relative_shape, shape_reliance
from .pipeline import (
    LATENT_CHANNELS,
    ToyWorldPipeline,
    build_components,
    fold,
    unfold,
    IP_ADAPTER_WEIGHT_NAME,
    initial_ip_adapter_state_dict,
    load_toy_pipeline,
    save_toy_pipeline,
)

EMPTY_T = world.EMPTY_TEMPLATES


# --------------------------------------------------------------------------------------------
# Data: whole batches rendered on the device
# --------------------------------------------------------------------------------------------
def prompt_table() -> list[str]:
    """The stage-2 prompts (they name the background only): index 0 is the empty prompt (dropped
    text), then per background its EMPTY templates."""
    prompts = [""]
    for background in world.BACKGROUNDS:
        place = world._PLACE_WORDS[background]
        prompts += [t.format(place=place) for t in EMPTY_T]
    return prompts


def random_boxes(n: int, k: int, lo: float, hi: float, generator: torch.Generator, device) -> torch.Tensor:
    """[n, k, 4] boxes: side ~ U(lo, hi), aspect ratio 0.6-1.6, anywhere inside the image."""
    side = lo + (hi - lo) * torch.rand(n, k, generator=generator, device=device)
    aspect = torch.exp(math.log(0.6) + (math.log(1.6) - math.log(0.6)) * torch.rand(n, k, generator=generator, device=device))
    w = (side * aspect.sqrt()).clamp(max=1.0)
    h = (side / aspect.sqrt()).clamp(max=1.0)
    x0 = (1 - w) * torch.rand(n, k, generator=generator, device=device)
    y0 = (1 - h) * torch.rand(n, k, generator=generator, device=device)
    return torch.stack([x0, y0, x0 + w, y0 + h], dim=-1)


def _randint(high: int, shape, generator, device) -> torch.Tensor:
    return torch.randint(0, high, shape, generator=generator, device=device)


STAGE1_COUNTS = (0.05, 0.8, 0.15)  # shares of stage-1 scenes with 0, 1 and 2 sprites (run 1 used 0.25/0.45/0.30)
STAGE1_SIDES = (0.15, 0.85)  # range of a placed sprite's box side (fraction of the image side), stage 1
STAGE2_SIDES = (0.12, 0.9)  # the same, stage 2


def stage1_batch(
    n: int, size: int, generator: torch.Generator, device, frame_fraction: float = 0.0,
    counts: tuple[float, float, float] = STAGE1_COUNTS, sides: tuple[float, float] = STAGE1_SIDES,
) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """Base-model scenes [n, 3, H, W] in [-1, 1], their prompts and sprite coverage [n, H, W]: 0, 1 or 2
    sprites (shares `counts`), every sprite named in the prompt ("a photo of a red circle and a lime cross on
    grass"); an empty scene's prompt names the background only. So the base knows the 20 sprites by name
    (as SDXL knows objects), never draws one the prompt does not name, and no text ever says where or how
    big. `frame_fraction` of the one-sprite scenes are object-centric (the sprite inscribed in the whole
    frame): there the place is known from the start of sampling and only the prompt can tell a triangle
    from a circle, which is what teaches the base to draw the shape a word names."""
    backgrounds = _randint(len(world.BACKGROUNDS), (n,), generator, device)
    k = 2
    u = torch.rand(n, generator=generator, device=device)
    count = (u >= counts[0]).long() + (u >= counts[0] + counts[1]).long()
    present = torch.arange(k, device=device).view(1, k) < count.view(n, 1)
    shapes = _randint(len(world.SHAPES), (n, k), generator, device)
    colors = _randint(len(world.COLOR_NAMES), (n, k), generator, device)
    boxes = random_boxes(n, k, *sides, generator, device)
    margins = 0.08 * torch.rand(n, 4, generator=generator, device=device)
    framed = torch.cat([margins[:, :2], 1 - margins[:, 2:]], dim=-1)
    use_frame = (count == 1) & (torch.rand(n, generator=generator, device=device) < frame_fraction)
    boxes[:, 0] = torch.where(use_frame.view(n, 1), framed, boxes[:, 0])
    images = world.render_batch(backgrounds, shapes, colors, boxes, present, size, size, generator, supersample=2)
    coverage = (world.sprite_alpha(shapes, boxes, size, size, 2) * present.float().view(n, k, 1, 1)).amax(dim=1)
    template = _randint(6, (n,), generator, device)
    drop_text = torch.rand(n, generator=generator, device=device) < 0.1
    prompts = []
    for i, (bg, c, tpl, drop) in enumerate(zip(backgrounds.tolist(), count.tolist(), template.tolist(), drop_text.tolist())):
        if drop:
            prompts.append("")
            continue
        sprites = [world.Sprite(world.SHAPES[shapes[i, j]], world.COLOR_NAMES[colors[i, j]]) for j in range(c)]
        prompts.append(world.named_prompt(world.BACKGROUNDS[bg], sprites, tpl))
    return images * 2 - 1, prompts, coverage


def stage2_batch(
    n: int, size: int, generator: torch.Generator, device, frame_fraction: float = 0.5,
    sides: tuple[float, float] = STAGE2_SIDES,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Single-sprite scenes [n, 3, H, W] in [-1, 1], prompt indices [n], reference pixel values
    [n, 3, 32, 32] (normalized as the feature extractor does) and a keep-image mask [n]."""
    backgrounds = _randint(len(world.BACKGROUNDS), (n,), generator, device)
    shapes = _randint(len(world.SHAPES), (n, 1), generator, device)
    colors = _randint(len(world.COLOR_NAMES), (n, 1), generator, device)
    # Sizes vary widely, and a share of the scenes are object-centric (the sprite inscribed in the whole
    # frame, as in the photos real adapters learn from): with tokens everywhere, the sprite spans the
    # region that receives them. AnyMS later gives the tokens to a box only, and the sprite spans the box.
    boxes = random_boxes(n, 1, *sides, generator, device)
    margins = 0.08 * torch.rand(n, 1, 4, generator=generator, device=device)
    framed = torch.cat([margins[..., :2], 1 - margins[..., 2:]], dim=-1)
    use_frame = torch.rand(n, 1, 1, generator=generator, device=device) < frame_fraction
    boxes = torch.where(use_frame, framed, boxes)
    present = torch.ones(n, 1, dtype=torch.bool, device=device)
    images = world.render_batch(backgrounds, shapes, colors, boxes, present, size, size, generator, supersample=2)

    # Reference: the same sprite recentred and rescaled (fill 0.5-0.9, keeping or squaring its aspect
    # ratio, jittered), on the scene's background (30%), another background (40%) or plain grey (30%).
    u = torch.rand(n, generator=generator, device=device)
    other = (backgrounds + 1 + _randint(len(world.BACKGROUNDS) - 1, (n,), generator, device)) % len(world.BACKGROUNDS)
    ref_backgrounds = torch.where(u < 0.3, backgrounds, torch.where(u < 0.7, other, torch.full_like(other, len(world.BACKGROUNDS))))
    fill = 0.5 + 0.4 * torch.rand(n, generator=generator, device=device)
    w, h = boxes[:, 0, 2] - boxes[:, 0, 0], boxes[:, 0, 3] - boxes[:, 0, 1]
    keep_aspect = torch.rand(n, generator=generator, device=device) < 0.5
    aspect = torch.where(keep_aspect, (w / h).clamp(0.6, 1.6), torch.ones_like(w))
    refs = _render_references(ref_backgrounds, shapes, colors, fill, aspect, generator, device)

    prompts = 1 + backgrounds * len(EMPTY_T) + _randint(len(EMPTY_T), (n,), generator, device)
    r = torch.rand(n, generator=generator, device=device)
    drop_image = r < 0.10  # zero image embedding = diffusers' negative = no image branch at all
    drop_text = (r >= 0.05) & (r < 0.15)  # 5% both dropped, 5% text only
    prompts = torch.where(drop_text, torch.zeros_like(prompts), prompts)
    return images * 2 - 1, prompts, refs, ~drop_image


def _render_references(backgrounds, shapes, colors, fill, aspect, generator, device) -> torch.Tensor:
    """[n, 3, 32, 32] references of one sprite each (shapes, colors [n, 1]): its box fills `fill` of the
    frame at aspect ratio `aspect`, jittered about the centre; normalized as the feature extractor does."""
    n = backgrounds.shape[0]
    rw, rh = (fill * aspect.sqrt()).clamp(max=0.95), (fill / aspect.sqrt()).clamp(max=0.95)
    cx = 0.5 + (1 - rw) / 2 * 0.6 * (2 * torch.rand(n, generator=generator, device=device) - 1)
    cy = 0.5 + (1 - rh) / 2 * 0.6 * (2 * torch.rand(n, generator=generator, device=device) - 1)
    boxes = torch.stack([cx - rw / 2, cy - rh / 2, cx + rw / 2, cy + rh / 2], dim=-1).view(n, 1, 4)
    present = torch.ones(n, 1, dtype=torch.bool, device=device)
    refs = world.render_batch(backgrounds, shapes, colors, boxes, present, 32, 32, generator)
    refs = torch.round(refs * 255) / 255  # what a PIL reference holds
    return (refs - 0.5) / 0.5  # CLIPImageProcessor(image_mean=0.5, image_std=0.5)


def reference_batch(n: int, generator: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[n, 3, 32, 32] sprite references as the image encoder sees them (fill 0.5-0.9, aspect 0.6-1.6,
    jittered, on any background or plain grey; normalized), with their shape and colour ids [n]."""
    backgrounds = _randint(len(world.BACKGROUNDS) + 1, (n,), generator, device)  # the last is plain grey
    shapes = _randint(len(world.SHAPES), (n, 1), generator, device)
    colors = _randint(len(world.COLOR_NAMES), (n, 1), generator, device)
    fill = 0.5 + 0.4 * torch.rand(n, generator=generator, device=device)
    aspect = torch.exp(math.log(0.6) + (math.log(1.6) - math.log(0.6)) * torch.rand(n, generator=generator, device=device))
    refs = _render_references(backgrounds, shapes, colors, fill, aspect, generator, device)
    return refs, shapes[:, 0], colors[:, 0]


def align_image_encoder(pipe: ToyWorldPipeline, steps: int, batch_size: int, generator: torch.Generator, device,
                        lr: float = 2e-3, max_seconds: float | None = None) -> float:
    """Before the adapter's diffusion training: fit the image encoder and the image projection so that a
    reference's 4 image tokens equal the text encoder's first 4 tokens of its name ("<bos> a red triangle"),
    as CLIP's image encoder is aligned with its text encoder before IP-Adapter ever uses it. With to_k_ip /
    to_v_ip starting as copies of to_k / to_v, the adapter then starts out saying the sprite's name, shape
    included, instead of having to discover shape through the diffusion loss. Only single-sprite references
    and their names are seen: no scene, box or layout. With `max_seconds` it stops there if the steps take
    longer (the learning-rate schedule then runs by time, like the stages'). Returns the final token MSE."""
    names = [f"a {c} {s}" for c in world.COLOR_NAMES for s in world.SHAPES]  # index: colour * 4 + shape
    ids = pipe.tokenizer(names, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids.to(device)
    with torch.no_grad():
        targets = pipe.text_encoder(ids)[0][:, :4]
    projection = pipe.unet.encoder_hid_proj.image_projection_layers[0]
    params = list(pipe.image_encoder.parameters()) + [projection.image_embeds.weight, projection.norm.weight]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    pipe.image_encoder.train()
    loss = torch.zeros(())
    start = time.perf_counter()
    for step in tqdm(range(steps), desc="align image encoder", mininterval=2.0, dynamic_ncols=True):
        fraction = step / steps
        if max_seconds is not None:
            fraction = max(fraction, (time.perf_counter() - start) / max(max_seconds, 1e-9))
            if fraction >= 1 and step > 0:
                tqdm.write(f"align image encoder: stopped after {step} of {steps} steps, the time budget is spent "
                           "(more --minutes, or fewer --align-steps)", file=sys.stderr)
                break
        for group in optimizer.param_groups:
            group["lr"] = lr_at(fraction, lr)
        refs, shapes, colors = reference_batch(batch_size, generator, device)
        tokens = projection(pipe.image_encoder(refs).image_embeds)
        loss = F.mse_loss(tokens, targets[colors * len(world.SHAPES) + shapes])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return float(loss.detach())


# --------------------------------------------------------------------------------------------
# Diffusion objective (zero terminal SNR, clean-image prediction)
# --------------------------------------------------------------------------------------------
def training_alphas_cumprod(scheduler) -> torch.Tensor:
    """The training schedule the sampler was configured with (exactly 0 signal at t = T-1)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(scheduler.config).alphas_cumprod.clone()


HIGH_NOISE_FROM = 600  # --high-noise-share draws that share of timesteps from [HIGH_NOISE_FROM, T)


def v_loss(
    unet, images, text_embeds, alphas_cumprod, generator, added_cond_kwargs=None, sprite_coverage=None, sprite_weight=0.0,
    high_noise_share: float = 0.0, edge_weight: float = 0.0,
) -> torch.Tensor:
    """Clean-image (x0) prediction loss, weighted 1 + min(SNR, 4): the weight grows towards low noise,
    where edges and shapes are decided, but never lets the near-clean steps dominate. With
    `sprite_coverage` [n, H, W], latent cells are further weighted 1 + sprite_weight * (sprite share of
    the cell), so that the few sprite cells are not outweighed by the textured backgrounds.
    `high_noise_share` of the timesteps are drawn from [HIGH_NOISE_FROM, T) instead of [0, T): where a
    sprite has just appeared in the noisy image and its shape must be decided relative to it.
    `edge_weight` adds that weight times the same loss on the pixel image's horizontal and vertical
    differences: an error constant over a 4x4 fold block is a step at the block's edge there (the
    visible 4-px grid), and sprite outlines are differences too."""
    x0 = fold(images)
    n = x0.shape[0]
    steps = alphas_cumprod.shape[0]
    t = torch.randint(0, steps, (n,), generator=generator, device=x0.device)
    if high_noise_share > 0:
        high = torch.randint(HIGH_NOISE_FROM, steps, (n,), generator=generator, device=x0.device)
        t = torch.where(torch.rand(n, generator=generator, device=x0.device) < high_noise_share, high, t)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device)
    alpha = alphas_cumprod[t].view(n, 1, 1, 1)
    x_t = alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise
    pred = unet(x_t, t, encoder_hidden_states=text_embeds, added_cond_kwargs=added_cond_kwargs, return_dict=False)[0]
    weight = 1 + (alpha / (1 - alpha).clamp_min(1e-8)).clamp(max=4.0)
    if sprite_coverage is not None and sprite_weight > 0:
        cells = F.avg_pool2d(sprite_coverage.unsqueeze(1).float(), images.shape[-1] // x0.shape[-1])
        weight = weight * (1 + sprite_weight * cells)
    loss = ((pred.float() - x0.float()) ** 2 * weight).mean()
    if edge_weight > 0:
        error = unfold(pred.float()) - images.float()
        sample_weight = weight.mean(dim=(1, 2, 3), keepdim=True)
        edges = (error.diff(dim=-1) ** 2 * sample_weight).mean() + (error.diff(dim=-2) ** 2 * sample_weight).mean()
        loss = loss + edge_weight * edges
    return loss


# --------------------------------------------------------------------------------------------
# Training state
# --------------------------------------------------------------------------------------------
class EMA:
    """Exponential moving average of a set of named parameters (what gets shipped)."""

    def __init__(self, params: dict[str, torch.nn.Parameter], decay: float):
        self.decay = decay
        self.shadow = {k: p.detach().clone() for k, p in params.items()}

    @torch.no_grad()
    def update(self, params: dict[str, torch.nn.Parameter], step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for k, p in params.items():
            self.shadow[k].lerp_(p.detach(), 1 - d)

    @torch.no_grad()
    def copy_to(self, params: dict[str, torch.nn.Parameter]) -> None:
        for k, p in params.items():
            p.copy_(self.shadow[k])


def stage1_params(pipe: ToyWorldPipeline) -> dict[str, torch.nn.Parameter]:
    params = {f"unet.{k}": p for k, p in pipe.unet.named_parameters()}
    params.update({f"text_encoder.{k}": p for k, p in pipe.text_encoder.named_parameters()})
    return params


def stage2_params(pipe: ToyWorldPipeline) -> dict[str, torch.nn.Parameter]:
    """Image encoder + image projection (its biases stay 0, see initial_ip_adapter_state_dict) + to_k_ip / to_v_ip."""
    params = {f"image_encoder.{k}": p for k, p in pipe.image_encoder.named_parameters()}
    for k, p in pipe.unet.named_parameters():
        if "to_k_ip" in k or "to_v_ip" in k:
            params[f"unet.{k}"] = p
        elif k.startswith("encoder_hid_proj") and not k.endswith("bias"):
            params[f"unet.{k}"] = p
    return params


def training_scale(bounds: tuple[float, float], generator: torch.Generator, device) -> float:
    """An IP-Adapter scale drawn log-uniformly from [lo, hi] (one per training step, for the whole batch)."""
    lo, hi = bounds
    u = torch.rand((), generator=generator, device=device).item()
    return float(math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo))))


def lr_at(fraction: float, base: float, warmup: float = 0.03) -> float:
    """Linear warm-up over the first 3% of the stage, then cosine decay to 10% (by time or steps)."""
    if fraction < warmup:
        return base * max(fraction / warmup, 0.01)
    progress = min((fraction - warmup) / (1 - warmup), 1.0)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def build_pipeline(seed: int, device: torch.device, with_adapter: bool) -> ToyWorldPipeline:
    pipe = ToyWorldPipeline(**build_components(seed))
    pipe.set_progress_bar_config(disable=True)
    if with_adapter:
        add_adapter(pipe, seed)
    return pipe.to(device)


def add_adapter(pipe: ToyWorldPipeline, seed: int, init_from: str | None = None) -> None:
    """A fresh adapter (to_k_ip / to_v_ip copied from to_k / to_v), or the one in a weights folder."""
    if init_from is not None:
        pipe.load_ip_adapter(str(init_from), subfolder="ip_adapter", weight_name=IP_ADAPTER_WEIGHT_NAME,
                             local_files_only=True)
        return
    state = initial_ip_adapter_state_dict(pipe.unet, pipe.image_encoder.config.projection_dim, seed=seed)
    pipe.load_ip_adapter(state, subfolder=None, weight_name=None)


def load_base_weights(pipe: ToyWorldPipeline, weights_dir: str) -> None:
    """Copy a weights folder's UNet (without its adapter), text encoder and image encoder into `pipe`."""
    trained = load_toy_pipeline(weights_dir)
    trained.unet.set_default_attn_processor()
    base = {k: v for k, v in trained.unet.state_dict().items() if not k.startswith("encoder_hid_proj")}
    pipe.unet.load_state_dict(base)
    pipe.text_encoder.load_state_dict(trained.text_encoder.state_dict())
    pipe.image_encoder.load_state_dict(trained.image_encoder.state_dict())


# --------------------------------------------------------------------------------------------
# Quick checks during training (a few seconds): background accuracy from pure noise, subject presence
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def quick_check(pipe: ToyWorldPipeline, stage: int, n: int, seed: int) -> tuple[dict, list]:
    from . import metrics

    device = pipe.device
    images, rows = [], {"background": [], "subject_found": [], "shape_ok": []}
    for i in range(n):
        background = world.BACKGROUNDS[i % len(world.BACKGROUNDS)]
        kwargs = {}
        case = None
        if stage == 2:
            case = world.make_case(1, 77_000 + seed * 1000 + i, background=background)
            kwargs["ip_adapter_image"] = [[case.references[0]]]
        g = torch.Generator(device="cpu").manual_seed(seed * 1000 + i)
        latents = torch.randn((1, LATENT_CHANNELS, 16, 16), generator=g).to(device)
        image = pipe(world.DEFAULT_PROMPTS[background], latents=latents, **kwargs).images[0]
        images.append(image)
        bg_pred = metrics.classify_background(image, boxes=[] if case is None else case.boxes)
        rows["background"].append(float(bg_pred == background))
        if case is not None:
            found = metrics.find_subject(image, case.sprites[0], None)
            rows["subject_found"].append(float(found is not None))
            rows["shape_ok"].append(float(found is not None and found.shape == case.sprites[0].shape))
    summary = {k: round(sum(v) / len(v), 3) for k, v in rows.items() if v}
    # Is the shape learned at all? Error with a wrong shape / with the right one at t=900 (1.0 = shape
    # ignored; see diagnostics.py), for framed sprites and for what AnyMS needs: stage 1 tells the shape by
    # the prompt (and for a sprite placed anywhere), stage 2 by the reference (and only inside its own box).
    def ratio(source: str, **kwargs) -> float:
        return shape_reliance(pipe, source, n=16, timesteps=(900,), seed=seed, **kwargs)[900]

    if stage == 1:
        summary["shape_reliance"] = ratio("text")
        summary["shape_reliance_anywhere"] = ratio("text", framed=False)
    else:
        summary["shape_reliance"] = ratio("image")
        summary["shape_reliance_in_box"] = ratio("boxed")
        # and where the in-box shape comes from at the first step: the sprite inscribed in the box (what AnyMS
        # needs) or the crop of the model's own framed prediction (IoU inside the box; diagnostics.py)
        first_step = frame_relative_shape(pipe, n=8, seed=seed)["all"]
        summary["first_step_inscribed"] = first_step["inscribed"]
        summary["first_step_framed_crop"] = first_step["framed_crop"]
    return summary, images


def image_grid(images: list, columns: int, scale: int = 4):
    from PIL import Image

    w, h = images[0].size
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * (w + 2), rows * (h + 2)), (255, 255, 255))
    for i, im in enumerate(images):
        grid.paste(im, ((i % columns) * (w + 2), (i // columns) * (h + 2)))
    return grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)


# --------------------------------------------------------------------------------------------
# Main loop
# --------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="anyms train-toy", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (checkpoint, logs, final weights)")
    p.add_argument("--minutes", type=float, default=60.0, help="total wall-clock budget over all resumes")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--init-from", default=None, metavar="WEIGHTS_DIR",
                   help="start from a trained weights folder (e.g. the shipped one) instead of random weights: "
                        "stage 1 continues its base, stage 2 its adapter (fresh optimiser and schedule)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--size", type=int, default=64, help="training image side in pixels")
    p.add_argument("--stage1-fraction", type=float, default=0.4, help="share of the training time for stage 1")
    p.add_argument("--stage1-steps", type=int, default=None, help="fixed step count for stage 1 (overrides time)")
    p.add_argument("--stage2-steps", type=int, default=None, help="fixed step count for stage 2 (overrides time)")
    p.add_argument("--frame-fraction", type=float, default=0.6,
                   help="share of stage-2 scenes whose sprite is inscribed in the whole frame")
    p.add_argument("--stage1-frame-fraction", type=float, default=0.85,
                   help="share of stage-1 one-sprite scenes whose sprite is inscribed in the whole frame")
    p.add_argument("--stage1-counts", type=float, nargs=3, default=list(STAGE1_COUNTS), metavar=("P0", "P1", "P2"),
                   help="shares of stage-1 scenes with 0, 1 and 2 sprites (sum 1)")
    p.add_argument("--stage1-sides", type=float, nargs=2, default=list(STAGE1_SIDES), metavar=("LO", "HI"),
                   help="range of a placed sprite's box side in stage 1 (fraction of the image side)")
    p.add_argument("--stage2-sides", type=float, nargs=2, default=list(STAGE2_SIDES), metavar=("LO", "HI"),
                   help="range of a placed sprite's box side in stage 2 (fraction of the image side)")
    p.add_argument("--high-noise-share", type=float, default=0.0,
                   help=f"share of training timesteps drawn from [{HIGH_NOISE_FROM}, 1000) instead of [0, 1000) (both stages)")
    p.add_argument("--edge-weight", type=float, default=0.0,
                   help="weight of the loss on pixel differences (block edges, outlines), both stages (0: off)")
    p.add_argument("--sprite-weight", type=float, default=0.0,
                   help="stage-1 loss weight on sprite cells: 1 + W * coverage (0: uniform)")
    p.add_argument("--scale-jitter", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="stage 2: each step's IP-Adapter scale drawn log-uniformly from [LO, HI] (default: 1.0), "
                        "so that sums of several subjects' image attention (the `none` ablation) stay in range")
    p.add_argument("--align-steps", type=int, default=2000,
                   help="before stage 2, align the image encoder to the text encoder's sprite names for N steps "
                        "(batch 128; starts a fresh adapter, see align_image_encoder); stops early if stage 2's share "
                        "of --minutes runs out")
    p.add_argument("--lr1", type=float, default=6e-4)
    p.add_argument("--lr2", type=float, default=5e-4)
    p.add_argument("--ema", type=float, default=0.995)
    p.add_argument("--checkpoint-minutes", type=float, default=5.0)
    p.add_argument("--check-images", type=int, default=12, help="images per quick check at each checkpoint")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (1 is fastest on shared cores)")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--session-steps", type=int, default=None,
                   help="stop this run after N optimizer steps (checkpoint, no export); resume later with --resume")
    args = p.parse_args(argv)
    for flag in ("stage1_steps", "stage2_steps", "align_steps"):
        if getattr(args, flag) is not None and getattr(args, flag) < 0:
            p.error(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
    for flag in ("frame_fraction", "stage1_frame_fraction", "stage1_fraction", "high_noise_share"):
        if not 0 <= getattr(args, flag) <= 1:
            p.error(f"--{flag.replace('_', '-')} must be in [0, 1], got {getattr(args, flag)}")
    if min(args.stage1_counts) < 0 or abs(sum(args.stage1_counts) - 1) > 1e-6:
        p.error(f"--stage1-counts must be 3 shares >= 0 that sum to 1, got {args.stage1_counts}")
    for flag in ("stage1_sides", "stage2_sides"):
        lo, hi = getattr(args, flag)
        if not 0 < lo <= hi <= 1:
            p.error(f"--{flag.replace('_', '-')} must be 0 < LO <= HI <= 1, got {lo} {hi}")
    for flag in ("sprite_weight", "edge_weight"):
        if getattr(args, flag) < 0:
            p.error(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
    if args.scale_jitter is not None and not 0 < args.scale_jitter[0] <= args.scale_jitter[1]:
        p.error(f"--scale-jitter must be 0 < LO <= HI, got {args.scale_jitter[0]} {args.scale_jitter[1]}")
    if args.init_from is not None and not (Path(args.init_from) / "unet" / "config.json").exists():
        p.error(f"--init-from {args.init_from}: not a toy-world weights folder (no unet/config.json)")
    return args


def _save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda given but torch.cuda.is_available() is False")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint.pt"
    t_start = time.perf_counter()

    budget = args.minutes * 60.0
    reserve = min(60.0, 0.08 * budget)  # final export, sample grid and check
    train_budget = max(budget - reserve, 1.0)
    stage_budget = {1: args.stage1_fraction * train_budget, 2: (1 - args.stage1_fraction) * train_budget}
    stage_steps = {1: args.stage1_steps, 2: args.stage2_steps}

    generator = torch.Generator(device=device).manual_seed(args.seed)
    state = {"stage": 1, "step": {1: 0, 2: 0}, "elapsed": {1: 0.0, 2: 0.0}, "log": [], "checks": []}
    pipe = build_pipeline(args.seed, device, with_adapter=False)
    resumed_optimizer = resumed_ema = None
    if args.resume and ckpt_path.exists():
        saved = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if saved["has_adapter"]:
            add_adapter(pipe, args.seed)
        pipe.unet.load_state_dict(saved["unet"])
        pipe.text_encoder.load_state_dict(saved["text_encoder"])
        pipe.image_encoder.load_state_dict(saved["image_encoder"])
        if saved["stage"] >= 2 and not saved["has_adapter"]:
            add_adapter(pipe, args.seed, args.init_from)  # stage 1 finished: the adapter on the final base
        pipe.to(device)
        generator.set_state(saved["generator"])
        state = {k: saved[k] for k in ("stage", "step", "elapsed", "log", "checks")}
        resumed_optimizer, resumed_ema = saved["optimizer"], saved["ema"]
        print(f"resumed from {ckpt_path}: stage {state['stage']}, steps {state['step']}, "
              f"{sum(state['elapsed'].values()) / 60:.1f} min done", file=sys.stderr)
        if state["stage"] > 2:
            print("--resume: this run had finished; exporting its weights again (to train on: a new --out with "
                  f"--init-from {out / 'weights'})", file=sys.stderr)
    else:
        if args.resume:
            print(f"--resume: no checkpoint at {ckpt_path}, starting fresh", file=sys.stderr)
        if args.init_from is not None:
            load_base_weights(pipe, args.init_from)
            pipe.to(device)

    tokens = pipe.tokenizer(
        prompt_table(), padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(device)
    alphas_cumprod = training_alphas_cumprod(pipe.scheduler).to(device)
    log_csv = out / "loss_log.csv"
    if not log_csv.exists() or not args.resume:
        log_csv.write_text("stage,step,seconds,loss,lr\n")

    # Startup (building, moving to the device, resuming) counts against this run's budget.
    startup = time.perf_counter() - t_start
    remaining = {k: stage_budget[k] - state["elapsed"][k] for k in (1, 2)}
    shrink = max(0.0, 1 - startup / max(remaining[1] + remaining[2], 1e-6))
    stage_budget = {k: state["elapsed"][k] + max(remaining[k], 0) * shrink for k in (1, 2)}

    session_steps = 0
    for stage in (1, 2):
        if state["stage"] > stage:
            continue
        if stage == 2 and state["stage"] == 1:
            # freeze the base (its EMA weights) and attach a fresh adapter
            state["stage"] = 2
            # an aligned image encoder starts from a fresh adapter (to_k_ip / to_v_ip = to_k / to_v)
            add_adapter(pipe, args.seed, None if args.align_steps else args.init_from)
            pipe.to(device)
            if args.align_steps:
                t_align = time.perf_counter()
                # never past stage 2's time budget (a fixed --stage2-steps has none)
                align_seconds = None if stage_steps[2] is not None else max(stage_budget[2] - state["elapsed"][2], 0.0)
                state["align_loss"] = align_image_encoder(pipe, args.align_steps, 128, generator, device,
                                                          max_seconds=align_seconds)
                state["elapsed"][2] += time.perf_counter() - t_align
                tqdm.write(f"aligned the image encoder: token MSE {state['align_loss']:.4f}", file=sys.stderr)
            resumed_optimizer = resumed_ema = None
        params = stage1_params(pipe) if stage == 1 else stage2_params(pipe)
        for p in pipe.unet.parameters():
            p.requires_grad_(False)
        for p in list(pipe.text_encoder.parameters()) + list(pipe.image_encoder.parameters()):
            p.requires_grad_(False)
        for p in params.values():
            p.requires_grad_(True)
        base_lr = args.lr1 if stage == 1 else args.lr2
        optimizer = torch.optim.AdamW(params.values(), lr=base_lr, weight_decay=0.0 if stage == 2 else 0.01)
        ema = EMA(params, args.ema)
        if resumed_optimizer is not None:
            optimizer.load_state_dict(resumed_optimizer)
            ema.shadow = {k: v.to(device) for k, v in resumed_ema.items()}
            resumed_optimizer = resumed_ema = None
        n_params = sum(p.numel() for p in params.values())
        print(f"stage {stage}: {n_params / 1e6:.2f} M trainable parameters, batch {args.batch_size}, {device}", file=sys.stderr)

        pipe.unet.train()
        pipe.text_encoder.train(stage == 1)
        pipe.image_encoder.train(stage == 2)
        budget_s, fixed_steps = stage_budget[stage], stage_steps[stage]
        by_steps = fixed_steps is not None  # 0 steps is a valid request (e.g. export an --init-from model)
        last_ckpt = time.perf_counter()
        running, running_n = torch.zeros((), device=device), 0
        bar = tqdm(
            total=fixed_steps if by_steps else round(budget_s),
            initial=state["step"][stage] if by_steps else min(round(state["elapsed"][stage]), round(budget_s)),
            unit="step" if by_steps else "s",
            desc=f"stage {stage}",
            dynamic_ncols=True,
            mininterval=2.0,
            bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} {unit} [{elapsed}<{remaining}{postfix}]",
        )
        while True:
            step = state["step"][stage]
            if by_steps:
                fraction = step / fixed_steps if fixed_steps > 0 else 1.0
            else:
                fraction = state["elapsed"][stage] / budget_s
            if fraction >= 1:
                break
            t0 = time.perf_counter()
            lr = lr_at(fraction, base_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if stage == 1:
                images, prompts, coverage = stage1_batch(
                    args.batch_size, args.size, generator, device, args.stage1_frame_fraction, tuple(args.stage1_counts),
                    tuple(args.stage1_sides))
                ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                                     truncation=True, return_tensors="pt").input_ids.to(device)
                text_embeds = pipe.text_encoder(ids)[0]
                loss = v_loss(pipe.unet, images, text_embeds, alphas_cumprod, generator,
                              sprite_coverage=coverage, sprite_weight=args.sprite_weight,
                              high_noise_share=args.high_noise_share, edge_weight=args.edge_weight)
            else:
                images, prompts, refs, keep = stage2_batch(args.batch_size, args.size, generator, device, args.frame_fraction,
                                                           tuple(args.stage2_sides))
                with torch.no_grad():
                    text_embeds = pipe.text_encoder(tokens[prompts])[0]
                image_embeds = pipe.image_encoder(refs).image_embeds * keep.view(-1, 1).float()
                if args.scale_jitter is not None:
                    pipe.set_ip_adapter_scale(training_scale(args.scale_jitter, generator, device))
                added = {"image_embeds": [image_embeds.unsqueeze(1)]}  # [B, 1 image, dim], one adapter
                loss = v_loss(pipe.unet, images, text_embeds, alphas_cumprod, generator, added,
                              high_noise_share=args.high_noise_share, edge_weight=args.edge_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params.values(), 1.0)
            optimizer.step()
            ema.update(params, step)
            state["step"][stage] = step + 1
            running += loss.detach()  # no per-step host sync
            running_n += 1
            dt = time.perf_counter() - t0
            state["elapsed"][stage] += dt
            bar.update(1 if by_steps else min(dt, max(budget_s - bar.n, 0)))
            if (step + 1) % args.log_every == 0:
                row = {"stage": stage, "step": step + 1, "seconds": round(state["elapsed"][stage], 2),
                       "loss": running.item() / running_n, "lr": lr}
                state["log"].append(row)
                with open(log_csv, "a") as f:
                    f.write(f"{stage},{step + 1},{row['seconds']},{row['loss']:.6f},{lr:.3g}\n")
                bar.set_postfix(loss=f"{row['loss']:.4f}", steps=step + 1, it_s=f"{(step + 1) / max(state['elapsed'][stage], 1e-6):.1f}")
                running, running_n = torch.zeros((), device=device), 0
            session_steps += 1
            if args.session_steps is not None and session_steps >= args.session_steps:
                bar.close()
                _checkpoint(pipe, optimizer, ema, params, state, generator, ckpt_path, stage, args)
                print(f"stopped after {session_steps} steps this session; continue with --resume", file=sys.stderr)
                return {"steps": state["step"], "stopped_early": True}
            if time.perf_counter() - last_ckpt > args.checkpoint_minutes * 60:
                t1 = time.perf_counter()
                _checkpoint(pipe, optimizer, ema, params, state, generator, ckpt_path, stage, args)
                last_ckpt = time.perf_counter()
                state["elapsed"][stage] += last_ckpt - t1  # checks count against the budget too
        bar.close()
        # End of stage: the EMA weights are the result (and the frozen base of stage 2).
        ema.copy_to(params)
        _checkpoint(pipe, optimizer, ema, params, state, generator, ckpt_path, stage, args, final=True)

    # Export the shipped layout, reload it the way users do, and make the sample grid from it.
    weights = out / "weights"
    save_toy_pipeline(pipe, weights)
    shipped = load_toy_pipeline(weights, device=device)
    summary, text_summary = {}, {}
    if args.check_images > 0:  # checks and the sample grid on the exported weights, as users load them
        try:
            summary, images = quick_check(shipped, 2, max(args.check_images, 6), seed=12345)
            text_summary, text_images = _text_only_check(shipped, 6)
            image_grid(text_images + images, columns=6).save(out / "samples.png")
        except Exception as error:  # noqa: BLE001  (the weights are already written)
            summary = {"error": repr(error)}
    result = {
        "args": vars(args),
        "steps": state["step"],
        "align_loss": state.get("align_loss"),
        "train_seconds": state["elapsed"],
        "wall_seconds_this_run": round(time.perf_counter() - t_start, 1),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "final_check": {"text_only": text_summary, "one_subject": summary},
        "checks": state["checks"],
    }
    (out / "train_summary.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("steps", "train_seconds", "wall_seconds_this_run", "final_check")}), file=sys.stderr)
    return result


@torch.no_grad()
def _text_only_check(pipe: ToyWorldPipeline, n: int) -> tuple[dict, list]:
    """Text-only generations need image embeds once an adapter is loaded: pass zeros (= no image)."""
    from . import metrics

    dim = pipe.image_encoder.config.projection_dim
    images, ok = [], []
    for i in range(n):
        background = world.BACKGROUNDS[i % len(world.BACKGROUNDS)]
        g = torch.Generator(device="cpu").manual_seed(999 + i)
        latents = torch.randn((1, LATENT_CHANNELS, 16, 16), generator=g).to(pipe.device)
        zeros = torch.zeros(2, 1, dim, device=pipe.device)  # [negative; positive] for CFG
        image = pipe(world.DEFAULT_PROMPTS[background], latents=latents, ip_adapter_image_embeds=[zeros]).images[0]
        images.append(image)
        ok.append(float(metrics.classify_background(image, boxes=[]) == background))
    return {"background": round(sum(ok) / len(ok), 3)}, images


def _checkpoint(pipe, optimizer, ema, params, state, generator, path, stage, args, final: bool = False) -> None:
    """Save everything needed to resume; run the quick check on the EMA weights and log it."""
    saved = {
        "unet": pipe.unet.state_dict(),
        "text_encoder": pipe.text_encoder.state_dict(),
        "image_encoder": pipe.image_encoder.state_dict(),
        "optimizer": None if final else optimizer.state_dict(),
        "ema": None if final else ema.shadow,
        "generator": generator.get_state(),
        "has_adapter": pipe.unet.encoder_hid_proj is not None,
        **{k: state[k] for k in ("step", "elapsed", "log", "checks")},
        "stage": stage + 1 if final else stage,
        "args": vars(args),
    }
    # the quick check uses the EMA weights, then restores the live ones
    live = {k: p.detach().clone() for k, p in params.items()}
    ema.copy_to(params)
    was_training = pipe.unet.training
    pipe.unet.eval(), pipe.text_encoder.eval(), pipe.image_encoder.eval()
    if stage == 2 and args.scale_jitter is not None:
        pipe.set_ip_adapter_scale(1.0)  # checks at the training scale, not at the last jittered one
    try:
        if args.check_images > 0:
            try:  # a diagnostic must never end a training run
                summary, _ = quick_check(pipe, stage, args.check_images, seed=stage)
            except Exception as error:  # noqa: BLE001
                summary = {"error": repr(error)}
            row = {"stage": stage, "step": state["step"][stage], "seconds": round(state["elapsed"][stage], 1), **summary}
            state["checks"].append(row)
            saved["checks"] = state["checks"]
            tqdm.write(f"check: {row}", file=sys.stderr)
    finally:
        if not final:
            with torch.no_grad():
                for k, p in params.items():
                    p.copy_(live[k])
        pipe.unet.train(was_training)
    _save_checkpoint(path, saved)


if __name__ == "__main__":
    main()
