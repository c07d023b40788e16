"""The compatibility matrix of docs/compatibility.md, cell by cell on tiny random models: with one
full-image subject, AnyMS (every variant that has an image branch) gives exactly the stock diffusers image."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch

import diffusers
from anyms_core import AnyMS, Subject
from anyms_core.models import for_task
from anyms_core.testing import random_reference_image, tiny_sd15_pipeline, tiny_sdxl_pipeline

FAMILIES = {"sd15": tiny_sd15_pipeline, "sdxl": tiny_sdxl_pipeline}
TASKS = ("text2img", "img2img", "inpaint")
SCHEDULERS = ("EulerDiscreteScheduler", "DDIMScheduler", "HeunDiscreteScheduler", "DPMSolverMultistepScheduler",
              "EulerAncestralDiscreteScheduler")  # ancestral: its noise comes from the pipeline's generator
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DOC = Path(__file__).resolve().parents[1] / "docs" / "compatibility.md"


# bfloat16 (slow on CPUs) with the two Euler schedulers only
SCHEDULERS_BY_DTYPE = {"float32": SCHEDULERS, "bfloat16": ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler")}
CELLS = [(family, dtype, task, scheduler) for family in FAMILIES for dtype in DTYPES for task in TASKS
         for scheduler in SCHEDULERS_BY_DTYPE[dtype]]


@pytest.fixture(scope="module")
def bases():
    """One tiny pipeline per (family, dtype), built on first use."""
    built = {}

    def get(family, dtype):
        if (family, dtype) not in built:
            pipe = FAMILIES[family]().to(dtype=DTYPES[dtype])
            pipe.anyms_model_name = family
            built[family, dtype] = pipe
        return built[family, dtype]
    return get


@pytest.mark.parametrize("family, dtype, task, scheduler", CELLS, ids=["-".join(cell) for cell in CELLS])
def test_one_full_image_subject_equals_stock(bases, family, dtype, task, scheduler):
    base = bases(family, dtype)
    pipe = for_task(base, task)
    pipe.scheduler = getattr(diffusers, scheduler).from_config(base.scheduler.config)
    extra = {} if task == "text2img" else {"image": random_reference_image(3, 64), "strength": 0.75}
    if task == "inpaint":
        extra["mask_image"] = random_reference_image(5, 64).convert("L")
    reference = random_reference_image(0)
    stock = pipe("a photo", ip_adapter_image=[[reference]], num_inference_steps=3, height=64, width=64,
                 generator=torch.Generator("cpu").manual_seed(0), **extra).images[0]
    variants = ("anyms", "mask", "none", "joint") if scheduler == SCHEDULERS[0] else ("anyms",)
    for variant in variants:
        run = AnyMS(pipe).generate("a photo", [Subject(reference, [0, 0, 1, 1])], variant=variant, num_inference_steps=3,
                                   height=64, width=64, seed=0, **extra)
        assert np.array_equal(np.asarray(run.image), np.asarray(stock)), variant
        assert run.config.steps == 3


def test_the_documented_matrix_is_the_tested_one():
    text = DOC.read_text()
    rows = re.findall(r"^\| (sd15|sdxl) \| (\w+) \| `(\w+)` \| ([^|]+) \|", text, flags=re.M)
    documented = {(family, task, dtype, tuple(s.strip(" `") for s in schedulers.split(",")))
                  for family, task, dtype, schedulers in rows}
    tested = {(family, task, dtype, tuple(s.removesuffix("Scheduler") for s in SCHEDULERS_BY_DTYPE[dtype]))
              for family in FAMILIES for task in TASKS for dtype in DTYPES}
    assert documented == tested
