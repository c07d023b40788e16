"""The toy world: a tiny procedural world and a diffusers pipeline trained in it, shipped with the repo.

    from anyms_core.toy import load_toy_pipeline, make_case, DEFAULT_PROMPTS
    pipe = load_toy_pipeline()              # ToyWorldPipeline with its IP-Adapter loaded, offline
    case = make_case(n_subjects=3, seed=0)  # prompt, sprites, boxes, reference images
"""

from .pipeline import (
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_NUM_INFERENCE_STEPS,
    DEFAULT_WEIGHTS_DIR,
    ToyWorldPipeline,
    load_toy_pipeline,
    save_toy_pipeline,
)
from .world import (
    ALL_SPRITES,
    BACKGROUNDS,
    COLORS,
    DEFAULT_PROMPTS,
    SHAPES,
    Case,
    Sprite,
    make_case,
    make_cases,
    render_scene,
    sprite_reference,
)

__all__ = [
    "ALL_SPRITES",
    "BACKGROUNDS",
    "COLORS",
    "DEFAULT_GUIDANCE_SCALE",
    "DEFAULT_NUM_INFERENCE_STEPS",
    "DEFAULT_PROMPTS",
    "DEFAULT_WEIGHTS_DIR",
    "SHAPES",
    "Case",
    "Sprite",
    "ToyWorldPipeline",
    "load_toy_pipeline",
    "make_case",
    "make_cases",
    "render_scene",
    "save_toy_pipeline",
    "sprite_reference",
]
