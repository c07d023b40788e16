"""Does the toy model use what it is told about a sprite's shape? A direct measurement, no sampling.

Identity at chance can come from the base (it cannot draw the shape a word names) or from the adapter
(its image tokens carry no shape). `shape_reliance` tells them apart: for one-sprite scenes it noises the
true image to timestep t and compares the model's clean-image error around the sprite when it is told the
right shape with the error when it is told a wrong one (same colour, same background):

    ratio(t) = error(wrong shape) / error(right shape)

A model that ignores shape gives 1.0 at every t; one that draws the named shape gives clearly more at high
noise (t >= 800), where the image itself no longer shows the shape. `source="text"` tells the shape by the
prompt ("a photo of a red triangle on grass", no reference image: the base); `source="image"` by the
reference image, with a prompt naming only the background (the adapter, at the pipeline's current scale);
`source="boxed"` by the reference image injected through AnyMS into the sprite's own box only (one subject,
crop-and-merge): the situation of every subject in an AnyMS image, and the one the adapter never saw in
training. Its sprite is placed anywhere: framed, the box would be nearly the whole image, which `source="image"`
already measures.

`frame_relative_shape` asks what the model draws in a box instead. At the first sampling step (t = 999, pure
noise) it compares, inside one subject's AnyMS box, the sprite-colour mask of the model's clean-image
prediction with (a) the sprite inscribed in the box (what AnyMS asks for) and (b) the model's own prediction
for the same reference and noise with the box widened to the whole image (the stock pipeline), cropped to
the box. A model that learnt a sprite's shape relative to the image frame, not to the region its tokens
reach, agrees with (b) more than with (a): it draws the piece of the full-frame sprite that falls in the box.

    anyms diagnose-toy [WEIGHTS_DIR]        # = python -m anyms_core.toy.diagnostics
"""

from __future__ import annotations

import argparse
import random

import numpy as np
import torch
import torch.nn.functional as F

from . import world
from .pipeline import fold, unfold

_SOURCES = ("text", "image", "boxed")


def _scenes(n: int, framed: bool, generator: torch.Generator):
    backgrounds = torch.randint(0, len(world.BACKGROUNDS), (n,), generator=generator)
    shapes = torch.randint(0, len(world.SHAPES), (n, 1), generator=generator)
    colors = torch.randint(0, len(world.COLOR_NAMES), (n, 1), generator=generator)
    wrong = (shapes[:, 0] + 1 + torch.randint(0, len(world.SHAPES) - 1, (n,), generator=generator)) % len(world.SHAPES)
    if framed:  # the sprite inscribed in the whole image: its place is known, only its shape is not
        boxes = torch.tensor(world.FRAMED_BOX).expand(n, 1, 4).clone()
    else:
        side = 0.3 + 0.4 * torch.rand(n, generator=generator)
        x0, y0 = (1 - side) * torch.rand(n, generator=generator), (1 - side) * torch.rand(n, generator=generator)
        boxes = torch.stack([x0, y0, x0 + side, y0 + side], dim=-1).view(n, 1, 4)
    present = torch.ones(n, 1, dtype=torch.bool)
    images = world.render_batch(backgrounds, shapes, colors, boxes, present, 64, 64, generator, supersample=2) * 2 - 1
    alpha = world.sprite_alpha(shapes, boxes, 64, 64, 2)[:, 0]
    # the sprite and a 4-pixel ring around it: where a wrong shape differs from the right one
    region = (F.max_pool2d(alpha[:, None], 9, 1, 4)[:, 0] > 0).float()
    return backgrounds, shapes[:, 0], colors[:, 0], wrong, images, region, boxes[:, 0]


@torch.no_grad()
def shape_reliance(
    pipe,
    source: str = "text",
    n: int = 48,
    timesteps: tuple[int, ...] = (600, 800, 950),
    framed: bool | None = None,
    seed: int = 0,
) -> dict[int, float]:
    """{t: error(wrong shape) / error(right shape)} for `n` one-sprite scenes (see the module docstring).

    `framed` (default: True for "text" and "image", False for "boxed") inscribes the sprite in the whole image."""
    if source not in _SOURCES:
        raise ValueError(f"source must be one of {_SOURCES}; got {source!r}")
    if source != "text" and pipe.unet.encoder_hid_proj is None:
        raise ValueError(f"source={source!r} needs a pipeline with its IP-Adapter loaded")
    if source == "boxed" and framed:
        raise ValueError("source='boxed' places its sprite anywhere; framed, its box would be nearly the whole image "
                         "(measure that with source='image', framed=True)")
    framed = source != "boxed" if framed is None else framed
    from diffusers import DDPMScheduler

    device = pipe.device
    alphas = DDPMScheduler.from_config(pipe.scheduler.config).alphas_cumprod.to(device)
    generator = torch.Generator().manual_seed(seed)
    backgrounds, shapes, colors, wrong, images, region, boxes = _scenes(n, framed, generator)
    images, region = images.to(device), region.to(device)

    def text_embeds(prompts: list[str]) -> torch.Tensor:
        ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(device)
        return pipe.text_encoder(ids)[0]

    def sprites(shape_ids: torch.Tensor) -> list[world.Sprite]:
        return [world.Sprite(world.SHAPES[s], world.COLOR_NAMES[c]) for s, c in zip(shape_ids.tolist(), colors.tolist())]

    names = [world.BACKGROUNDS[b] for b in backgrounds.tolist()]
    image_dim = pipe.image_encoder.config.projection_dim
    conditions = {}
    for label, shape_ids in (("right", shapes), ("wrong", wrong)):
        if source == "text":
            prompts = [world.named_prompt(b, [s]) for b, s in zip(names, sprites(shape_ids))]
            image_embeds = torch.zeros(n, 1, image_dim, device=device)  # = no image branch
        else:
            prompts = [world.DEFAULT_PROMPTS[b] for b in names]
            references = [world.sprite_reference(s) for s in sprites(shape_ids)]
            pixels = pipe.feature_extractor(references, return_tensors="pt").pixel_values.to(device)
            image_embeds = pipe.image_encoder(pixels).image_embeds.unsqueeze(1)
        added = {"image_embeds": [image_embeds]} if pipe.unet.encoder_hid_proj is not None else None
        conditions[label] = (text_embeds(prompts), added, references if source == "boxed" else None)

    def predict(x_t, t, embeds, added, references):
        timestep = torch.full((x_t.shape[0],), t, device=device)
        if references is None:
            return pipe.unet(x_t, timestep, encoder_hidden_states=embeds, added_cond_kwargs=added, return_dict=False)[0]
        from ..layout import Subject
        from ..session import decoupled

        preds = []
        for i, reference in enumerate(references):  # one session per scene: each has its own box
            with decoupled(pipe, [Subject(reference, boxes[i].tolist())]):
                preds.append(pipe.unet(x_t[i:i + 1], timestep[i:i + 1], encoder_hidden_states=embeds[i:i + 1],
                                       added_cond_kwargs={"image_embeds": [added["image_embeds"][0][i:i + 1]]},
                                       return_dict=False)[0])
        return torch.cat(preds)

    x0 = fold(images)
    ratios = {}
    for t in timesteps:
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed * 1000 + t)).to(device)
        a = alphas[t]
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        errors = {}
        for label, (embeds, added, references) in conditions.items():
            pred = predict(x_t, t, embeds, added, references)
            error = ((unfold(pred) - images) ** 2).mean(dim=1)
            errors[label] = ((error * region).sum() / region.sum()).item()
        ratios[t] = round(errors["wrong"] / errors["right"], 4)
    return ratios


def mask_agreement(in_box: np.ndarray, framed: np.ndarray, inscribed: np.ndarray, box: np.ndarray) -> dict[str, float]:
    """IoU, inside `box`, of the in-box prediction's mask with the inscribed sprite, the framed prediction's
    crop and the whole box (boolean [H, W] masks; two empty masks agree: IoU 1)."""
    def iou(a: np.ndarray, b: np.ndarray) -> float:
        a, b = a & box, b & box
        union = (a | b).sum()
        return 1.0 if union == 0 else float((a & b).sum() / union)

    return {"inscribed": iou(in_box, inscribed), "framed_crop": iou(in_box, framed), "whole_box": iou(in_box, box)}


@torch.no_grad()
def frame_relative_shape(pipe, n: int = 48, seed: int = 0, size: int = 64) -> dict:
    """Where does a subject's shape in its AnyMS box come from (see the module docstring)? For `n` one-subject
    cases (a square box of side 0.3-0.5 anywhere), the mean IoU inside the box of the first step's clean-image
    prediction with the sprite inscribed in the box (`inscribed`), with the framed prediction's crop
    (`framed_crop`) and with the whole box (`whole_box`), overall and per shape; through the public API
    (`AnyMS.generate`, its first x0 preview), at the pipeline's own guidance and IP-Adapter scale."""
    if pipe.unet.encoder_hid_proj is None:
        raise ValueError("frame_relative_shape needs a pipeline with its IP-Adapter loaded")
    from ..layout import Subject
    from ..sampler import AnyMS
    from .metrics import _pixel_box, color_mask

    anyms = AnyMS(pipe)
    rng = random.Random(seed)
    rows: dict[str, list[dict[str, float]]] = {}
    for i in range(n):
        sprite = world.Sprite(rng.choice(world.SHAPES), rng.choice(world.COLOR_NAMES))
        background = rng.choice(world.BACKGROUNDS)
        side = rng.uniform(0.3, 0.5)
        x0, y0 = rng.uniform(0, 1 - side), rng.uniform(0, 1 - side)
        box = [x0, y0, x0 + side, y0 + side]
        reference = world.sprite_reference(sprite)
        masks = {}
        for name, subject_box in (("in_box", box), ("framed", [0.0, 0.0, 1.0, 1.0])):
            run = anyms.generate(world.DEFAULT_PROMPTS[background], [Subject(reference, subject_box, name=sprite.name)],
                                 seed=seed * 100_003 + i, num_inference_steps=1, height=size, width=size, progress=False)
            masks[name] = color_mask(run.previews[0], sprite.color)
        inscribed = color_mask(world.render_scene(background, [(sprite, box)], size=size), sprite.color)
        px0, py0, px1, py1 = _pixel_box(box, size, size)
        box_mask = np.zeros((size, size), dtype=bool)
        box_mask[py0:py1, px0:px1] = True
        rows.setdefault(sprite.shape, []).append(mask_agreement(masks["in_box"], masks["framed"], inscribed, box_mask))

    def means(values: list[dict[str, float]]) -> dict[str, float]:
        return {k: round(float(np.mean([v[k] for v in values])), 4) for k in values[0]}

    result = {"all": means([v for values in rows.values() for v in values]) | {"cases": n}}
    for shape in world.SHAPES:
        if shape in rows:
            result[shape] = means(rows[shape]) | {"cases": len(rows[shape])}
    return result


def parse_args(argv=None) -> argparse.Namespace:
    from .pipeline import DEFAULT_WEIGHTS_DIR

    p = argparse.ArgumentParser(prog="anyms diagnose-toy", description=__doc__.split("\n\n")[0])
    p.add_argument("weights", nargs="?", default=str(DEFAULT_WEIGHTS_DIR), help="toy weights folder (default: the shipped ones)")
    p.add_argument("--cases", type=int, default=48, help="one-sprite scenes per measurement")
    p.add_argument("--ip-adapter-scale", type=float, default=None, help="default: the weights' sampling.json")
    args = p.parse_args(argv)
    if args.cases < 1:
        p.error(f"--cases must be >= 1, got {args.cases}")
    return args


def main(argv=None) -> dict:
    from .pipeline import load_toy_pipeline

    args = parse_args(argv)
    torch.set_num_threads(1)
    pipe = load_toy_pipeline(args.weights)
    if args.ip_adapter_scale is not None:
        pipe.set_ip_adapter_scale(args.ip_adapter_scale)
    result = {
        f"{source}, {'framed' if framed else 'placed anywhere'}": shape_reliance(pipe, source, args.cases, framed=framed)
        for source in ("text", "image")
        for framed in (True, False)
    }
    result["image, only in its AnyMS box"] = shape_reliance(pipe, "boxed", args.cases)
    print("error with a wrong shape / error with the right shape (1.0 = shape ignored), per timestep")
    for label, ratios in result.items():
        print(f"  {label:28s} " + "  ".join(f"t={t}: {r:.3f}" for t, r in ratios.items()))
    result["frame_relative_shape"] = frame_relative_shape(pipe, args.cases)
    print("first step inside a subject's AnyMS box: IoU of its sprite-colour mask with (inscribed) the sprite "
          "inscribed in the box, (framed crop) the model's own prediction without the box, cropped to it")
    for label, row in result["frame_relative_shape"].items():
        print(f"  {label:9s} inscribed {row['inscribed']:.2f}  framed crop {row['framed_crop']:.2f}  "
              f"whole box {row['whole_box']:.2f}  (n={row['cases']})")
    return result


if __name__ == "__main__":
    main()
