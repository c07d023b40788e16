"""torch.compile: a UNet compiled once runs any box layout with the same number of subjects, unchanged.

The layout reaches the processors as tensors (built outside the graph, per session and UNet level), so
dynamo sees graph inputs, not Python constants. ``aot_eager`` traces and partitions like inductor but
runs the same ATen kernels as eager, so the outputs must be bitwise equal to eager's.
What still recompiles (each once, documented in the processor's docstring): a new subject count, a new
variant, recording switched on/off, another latent size.
"""

import random

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from anyms_core import Subject, decoupled
from anyms_core.testing import random_reference_image, tiny_sdxl_pipeline


@pytest.fixture(autouse=True, scope="module")
def dynamo_config():
    # a high limit, so that a regression shows up as a count instead of a silent fall back to eager
    with torch._dynamo.config.patch(recompile_limit=64):
        yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def pipe():
    return tiny_sdxl_pipeline()


def unet_inputs(num_subjects, latent=(8, 8), batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        sample=torch.randn(batch, 4, *latent, generator=g), timestep=10,
        encoder_hidden_states=torch.randn(batch, 7, 64, generator=g),
        added_cond_kwargs={"text_embeds": torch.randn(batch, 32, generator=g), "time_ids": torch.zeros(batch, 6),
                           "image_embeds": [torch.randn(batch, num_subjects, 32, generator=g)]},
    )


def random_layouts(count, num_subjects, seed=0):
    rng = random.Random(seed)
    layouts = []
    for _ in range(count):
        boxes = []
        for _ in range(num_subjects):
            x0, y0 = rng.uniform(0, 0.7), rng.uniform(0, 0.7)
            boxes.append([x0, y0, rng.uniform(x0 + 0.05, 1.0), rng.uniform(y0 + 0.05, 1.0)])
        layouts.append(boxes)
    layouts[1] = [[0.0, 0.0, 1.0, 1.0]] * num_subjects  # every box covers the grid
    layouts[2] = [[0.5, 0.5, 0.52, 0.52]] * num_subjects  # one cell per box on every level
    return layouts


def subjects_for(boxes):
    return [Subject(random_reference_image(i), box, name=f"s{i}") for i, box in enumerate(boxes)]


def run_both(pipe, compiled, boxes, variant="anyms", record=None, latent=(8, 8)):
    inputs = unet_inputs(len(boxes), latent)
    with decoupled(pipe, subjects_for(boxes), variant=variant, record=record) as session, torch.no_grad():
        eager = pipe.unet(**inputs).sample
        fast = compiled(**inputs).sample
    return eager, fast, session


@pytest.mark.parametrize("variant", ["anyms", "mask", "none", "joint", "text"])
def test_no_recompile_over_layouts_and_exact(pipe, variant):
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(pipe.unet, backend=counter)
    layouts = random_layouts(10, 3)
    for index, boxes in enumerate(layouts):
        eager, fast, _ = run_both(pipe, compiled, boxes, variant)
        assert torch.equal(eager, fast), f"layout {index}: compiled output differs from eager"
        if index == 0:
            first = counter.frame_count
            assert first >= 1
        assert counter.frame_count == first, f"layout {index} recompiled"
    assert len({str(b) for b in layouts}) == 10


def test_subject_count_recompiles_once_then_never(pipe):
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(pipe.unet, backend=counter)
    for boxes in random_layouts(3, 2, seed=1):
        run_both(pipe, compiled, boxes)
    two = counter.frame_count
    for boxes in random_layouts(3, 4, seed=2):
        eager, fast, _ = run_both(pipe, compiled, boxes)
        assert torch.equal(eager, fast)
    assert counter.frame_count == 2 * two  # one new graph for the new subject count, none per layout
    for boxes in random_layouts(3, 2, seed=3):  # back to two subjects: the first graph still serves
        run_both(pipe, compiled, boxes)
    assert counter.frame_count == 2 * two


def test_recording_inside_the_compiled_graph(pipe):
    """The recorder's add() only appends, so recording traces without graph breaks and records what eager does."""
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(pipe.unet, backend=counter)
    record = {"kinds": ["affinity", "contribution"], "policy": "layer"}
    for index, boxes in enumerate(random_layouts(10, 2, seed=4)):
        eager, fast, session = run_both(pipe, compiled, boxes, record=record)
        assert torch.equal(eager, fast)
        maps = session.attention
        assert maps.steps == [0, 1]  # step 0 ran eager, step 1 compiled
        for (kind, step, key), value in maps.entries.items():
            if step == 1:
                assert torch.equal(value, maps.entries[(kind, 0, key)]), (kind, key)
        if index == 0:
            first = counter.frame_count
    assert counter.frame_count == first == 1


def test_in_place_compile_of_the_pipelines_unet(pipe):
    """``pipe.unet.compile()`` (the session's hook then runs inside the compiled call): a whole pipeline,
    equal to eager, and still one set of graphs for all layouts."""
    from anyms_core.testing import tiny_sdxl_pipeline

    compiled_pipe = tiny_sdxl_pipeline()
    counter = CompileCounterWithBackend("aot_eager")
    compiled_pipe.unet.compile(backend=counter)
    call = dict(num_inference_steps=2, height=64, width=64, output_type="np")
    for index, boxes in enumerate(random_layouts(4, 2, seed=5)):
        subjects = subjects_for(boxes)
        with decoupled(pipe, subjects) as session:
            eager = pipe("a photo", ip_adapter_image=session.ip_adapter_image, generator=torch.Generator().manual_seed(0), **call).images
        with decoupled(compiled_pipe, subjects) as session:
            fast = compiled_pipe("a photo", ip_adapter_image=session.ip_adapter_image, generator=torch.Generator().manual_seed(0), **call).images
        assert (eager == fast).all()
        if index == 0:
            first = counter.frame_count
    assert counter.frame_count == first
