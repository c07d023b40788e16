"""Bad inputs fail loudly before the pipeline runs; runs are saved atomically and never mixed; errors name files."""

import json

import numpy as np
import pytest
import torch

from anyms_core import AnyMS, ConfigError, Run, RunConfig, Subject
from anyms_core.testing import random_reference_image as reference_image


@pytest.fixture(scope="module")
def toy():
    from anyms_core.models import load_pipeline

    return load_pipeline("toy")


def subjects(n=2):
    boxes = [[0.05, 0.1, 0.5, 0.55], [0.5, 0.45, 0.95, 0.9], [0.3, 0.3, 0.7, 0.7]]
    return [Subject(reference_image(i), boxes[i], name=f"s{i}") for i in range(n)]


def unet_calls(pipe, fn):
    calls = []
    handle = pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        fn()
    finally:
        handle.remove()
    return len(calls)


@pytest.mark.parametrize("kwargs, message", [
    ({"ip_adapter_scale": "05"}, "ip_adapter_scale must be a number or a list"),
    ({"ip_adapter_scale": float("nan")}, "finite"), ({"ip_adapter_scale": [1.0, float("inf")]}, "finite"),
    ({"num_inference_steps": -1}, "steps must be >= 1"), ({"num_inference_steps": 0}, "steps must be >= 1"),
    ({"seed": 2**70}, "seed must be <="), ({"seed": "0"}, "seed must be an integer"),
    ({"guidance_scale": float("nan")}, "finite"), ({"height": -32}, "height"), ({"variant": "crop"}, "variant"),
])
def test_generate_refuses_bad_values_before_the_pipeline_runs(toy, kwargs, message):
    before = dict(toy.unet.attn_processors)
    with pytest.raises(ConfigError, match=message):
        assert unet_calls(toy, lambda: AnyMS(toy).generate("a photo", subjects(), **kwargs)) == 0
    assert dict(toy.unet.attn_processors) == before


def test_generate_refuses_unknown_pipeline_arguments(toy):
    with pytest.raises(TypeError, match=r"does not take \['strenght'\]"):
        AnyMS(toy).generate("a photo", subjects(), strenght=0.5)
    with pytest.raises(TypeError, match="'generator' itself"):
        AnyMS(toy).generate("a photo", subjects(), generator=torch.Generator())


def test_pipeline_arguments_reach_the_pipeline_and_the_config(toy):
    seen = []

    def on_step_end(pipe, step, timestep, kwargs):
        seen.append(step)
        return {}

    run = AnyMS(toy).generate("a photo", subjects(), num_inference_steps=3, eta=0.0, callback_on_step_end=on_step_end)
    assert seen == [0, 1, 2]
    assert run.config.pipeline == {"eta": 0.0, "callback_on_step_end": {"callable": on_step_end.__qualname__}}


def test_a_run_replays_from_its_saved_config(toy, tmp_path):
    run = AnyMS(toy).generate("a photo", subjects(), num_inference_steps=3, seed=7, ip_adapter_scale=[0.5, 1.0])
    run.save(tmp_path / "run")
    loaded = Run.load(tmp_path / "run")
    assert loaded.config == run.config and isinstance(loaded.config, RunConfig)
    again = AnyMS(toy).generate_from_config(loaded.config, loaded.subjects())
    assert np.array_equal(np.asarray(again.image), np.asarray(run.image))
    assert again.config == run.config


def test_save_refuses_a_non_empty_directory_and_overwrite_replaces_it_whole(toy, tmp_path):
    first = AnyMS(toy).generate("a photo", subjects(3), num_inference_steps=2)
    second = AnyMS(toy).generate("a photo", subjects(1), num_inference_steps=3, record=False)
    first.save(tmp_path / "run")
    with pytest.raises(FileExistsError, match="not empty"):
        second.save(tmp_path / "run")
    assert Run.load(tmp_path / "run").config == first.config  # untouched
    second.save(tmp_path / "run", overwrite=True)
    loaded = Run.load(tmp_path / "run")
    assert loaded.config == second.config and loaded.attention is None and len(loaded.subject_images) == 1
    assert len(loaded.previews) == 3
    assert sorted(p.name for p in (tmp_path / "run" / "subjects").iterdir()) == ["0.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no temporary folders left
    (tmp_path / "empty").mkdir()
    second.save(tmp_path / "empty")  # an empty directory is fine


def test_a_failed_save_leaves_nothing(toy, tmp_path, monkeypatch):
    run = AnyMS(toy).generate("a photo", subjects(), num_inference_steps=2)

    def broken(self, directory):
        (directory / "image.png").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(Run, "_write", broken)
    with pytest.raises(OSError, match="disk full"):
        run.save(tmp_path / "run")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def saved(toy, tmp_path_factory):
    path = tmp_path_factory.mktemp("saved") / "run"
    AnyMS(toy).generate("a photo", subjects(), num_inference_steps=2).save(path)
    return path


def copy_of(saved, tmp_path):
    import shutil

    shutil.copytree(saved, tmp_path / "run")
    return tmp_path / "run"


@pytest.mark.parametrize("break_it, message", [
    (lambda p: (p / "run.json").write_text("{not json"), r"run\.json: not valid JSON"),
    (lambda p: (p / "run.json").write_text("[]"), r"run\.json: a run record is a JSON object"),
    (lambda p: _edit(p, lambda r: r.pop("config")), r"run\.json: field\(s\) \['config'\] missing"),
    (lambda p: _edit(p, lambda r: r["config"].update(steps="many")), r"run\.json: config: steps must be an integer"),
    (lambda p: _edit(p, lambda r: r["config"]["subjects"][0].update(box="0011")), r"run\.json: config: subjects\[0\]"),
    (lambda p: _edit(p, lambda r: r.update(format_version=99)), "run format 99"),
    (lambda p: (p / "arrays.safetensors").unlink(), r"arrays\.safetensors is missing"),
    (lambda p: (p / "arrays.safetensors").write_bytes(b"garbage"), r"arrays\.safetensors: cannot read"),
    (lambda p: (p / "subjects" / "1.png").unlink(), r"subjects/1\.png is missing"),
    (lambda p: (p / "image.png").write_bytes(b"garbage"), r"image\.png: cannot read"),
    (lambda p: _edit(p, lambda r: r["arrays"].append("attention/x/0/y")), "lacks 1 array"),
])
def test_load_names_the_file_and_what_is_wrong(saved, tmp_path, break_it, message):
    path = copy_of(saved, tmp_path)
    break_it(path)
    with pytest.raises(ValueError, match=message):
        Run.load(path)


def _edit(path, change):
    record = json.loads((path / "run.json").read_text())
    change(record)
    (path / "run.json").write_text(json.dumps(record))


def test_load_missing_directory(tmp_path):
    with pytest.raises(ValueError, match="is not a saved run"):
        Run.load(tmp_path / "nothing")


def test_heun_steps_are_scheduler_steps(tiny_sdxl):
    from diffusers import EulerDiscreteScheduler, HeunDiscreteScheduler

    original = tiny_sdxl.scheduler
    tiny_sdxl.scheduler = HeunDiscreteScheduler.from_config(original.config)
    try:
        run = AnyMS(tiny_sdxl).generate("a photo", subjects(), num_inference_steps=4, height=64, width=64)
        again = AnyMS(tiny_sdxl).generate_from_config(run.config, run.subjects())
    finally:
        tiny_sdxl.scheduler = original
    assert isinstance(original, EulerDiscreteScheduler)
    assert run.config.steps == 4 and run.timings["unet_calls"] == 7
    assert np.array_equal(np.asarray(again.image), np.asarray(run.image))


def test_edm_scheduler_disables_previews_with_a_note(tiny_sdxl):
    from diffusers import EDMDPMSolverMultistepScheduler

    original = tiny_sdxl.scheduler
    tiny_sdxl.scheduler = EDMDPMSolverMultistepScheduler()  # no x0 in its output, no alphas_cumprod
    try:
        with pytest.warns(UserWarning, match="previews are off"):
            run = AnyMS(tiny_sdxl).generate("a photo", subjects(), num_inference_steps=2, height=64, width=64)
    finally:
        tiny_sdxl.scheduler = original
    assert run.previews == [] and run.config.steps == 2 and run.image.size == (64, 64)


def test_runs_saved_in_format_1_still_load(saved, tmp_path):
    path = copy_of(saved, tmp_path)

    def to_format_1(record):
        record["format_version"] = 1
        del record["arrays"]
        for key in ("schema_version", "pipeline"):
            del record["config"][key]
        for subject in record["config"]["subjects"]:
            del subject["image"]

    _edit(path, to_format_1)
    loaded = Run.load(path)
    assert loaded.config.subjects[0].image is None and loaded.attention is not None and len(loaded.previews) == 2
    (path / "arrays.safetensors").unlink()
    with pytest.raises(ValueError, match="arrays.safetensors is missing"):
        Run.load(path)


def test_a_saved_run_has_the_umask_s_permissions(saved, tmp_path):
    (tmp_path / "plain").mkdir()
    assert (saved.stat().st_mode & 0o777) == ((tmp_path / "plain").stat().st_mode & 0o777)
