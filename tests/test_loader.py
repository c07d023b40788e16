"""The public loader and the CLI on tiny random models saved in the real hub layouts (no download)."""

import json

import numpy as np
import pytest

from anyms_core import AnyMS, Subject
from anyms_core.models import load_pipeline
from anyms_core.testing import random_reference_image, save_fake_hub_folders


@pytest.fixture(scope="module")
def sd15_fp16(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    save_fake_hub_folders(root / "sd15", root / "IP-Adapter", "sd15", "plus", variant="fp16")
    return root


def generate(pipe):
    return AnyMS(pipe).generate("a photo", [Subject(random_reference_image(0), [0, 0, 0.5, 0.5], name="a")],
                                num_inference_steps=2, height=64, width=64)


def test_sd15_plus_with_an_fp16_variant(sd15_fp16):
    spec = {"name": "sd15", "base": str(sd15_fp16 / "sd15"), "ip_adapter": str(sd15_fp16 / "IP-Adapter"), "adapter": "plus"}
    with pytest.raises(ValueError, match="holds the weight variant\\(s\\) \\['fp16'\\]: pass variant='fp16'"):
        load_pipeline(spec, device="cpu")
    pipe = load_pipeline({**spec, "variant": "fp16"}, device="cpu")
    assert type(pipe).__name__ == "StableDiffusionPipeline" and pipe.anyms_model_name == "sd15+ip-adapter:plus"
    assert pipe.image_encoder is not None  # came from the adapter folder's models/image_encoder
    assert generate(pipe).image.size == (64, 64)
    with pytest.raises(ValueError, match='lacks.*ip-adapter-plus-face_sd15.safetensors.*hf download h94/IP-Adapter '
                                         '--include "models/ip-adapter-plus-face_sd15.safetensors" --include "models/image_encoder/\\*"'):
        load_pipeline({**spec, "variant": "fp16", "adapter": "plus-face"}, device="cpu")


def test_sdxl_from_a_home_relative_path(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    save_fake_hub_folders(tmp_path / "sdxl", tmp_path / "IP-Adapter", "sdxl", "base")
    pipe = load_pipeline({"name": "sdxl", "base": "~/sdxl", "ip_adapter": "~/IP-Adapter"}, device="cpu")
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    assert (tmp_path / "IP-Adapter" / "sdxl_models" / "image_encoder" / "config.json").exists()
    assert generate(pipe).image.size == (64, 64)


def test_cli_case_file_with_model_paths_relative_to_it(sd15_fp16, tmp_path, capsys):
    from anyms_core import Run
    from anyms_core.cli import main

    cases = tmp_path / "cases"
    cases.mkdir()
    random_reference_image(3).save(cases / "ref.png")
    model = {"name": "sd15", "base": str(sd15_fp16 / "sd15"), "ip_adapter": str(sd15_fp16 / "IP-Adapter"),
             "adapter": "plus", "variant": "fp16"}
    # relative to the case file, not to the current folder
    relative = {**model, "base": "../hub/sd15", "ip_adapter": "../hub/IP-Adapter"}
    (tmp_path / "hub").symlink_to(sd15_fp16, target_is_directory=True)
    case = {"prompt": "a photo", "subjects": [{"image": "ref.png", "box": [0.2, 0.2, 0.8, 0.8]}], "steps": 2,
            "height": 64, "width": 64, "model": relative}
    (cases / "case.json").write_text(json.dumps(case))
    assert main(["generate", str(cases / "case.json"), "--out", str(tmp_path / "run"), "--device", "cpu"]) == 0, capsys.readouterr().err
    run = Run.load(tmp_path / "run")
    # recorded with absolute folders, so that the saved config replays from anywhere
    assert run.config.model == {**relative, "base": str((tmp_path / "hub" / "sd15").resolve()),
                                "ip_adapter": str((tmp_path / "hub" / "IP-Adapter").resolve())}
    assert run.image.size == (64, 64)
    direct = AnyMS(load_pipeline(model, device="cpu")).generate_from_config(run.config, run.subjects())
    assert np.array_equal(np.asarray(direct.image), np.asarray(run.image))


@pytest.mark.parametrize("task, extra", [("img2img", {}), ("inpaint", {"mask_image": {"path": "mask.png"}})])
def test_case_file_pipeline_section_drives_img2img_and_inpainting(tmp_path, task, extra, capsys):
    from anyms_core import Run
    from anyms_core.cli import load_case, main

    random_reference_image(1, 64).save(tmp_path / "init.png")
    random_reference_image(2, 64).convert("L").save(tmp_path / "mask.png")
    random_reference_image(3).save(tmp_path / "ref.png")
    pipeline = {"image": {"path": "init.png"}, "strength": 0.5, **extra}
    case = {"prompt": "a photo", "subjects": [{"image": "ref.png", "box": [0.2, 0.2, 0.8, 0.8]}], "steps": 4,
            "height": 64, "width": 64, "model": {"name": "tiny-sd15", "task": task}, "pipeline": pipeline}
    (tmp_path / "case.json").write_text(json.dumps(case))
    assert main(["generate", str(tmp_path / "case.json"), "--out", str(tmp_path / "run")]) == 0, capsys.readouterr().err
    run = Run.load(tmp_path / "run")
    assert run.config.pipeline == pipeline and run.config.steps == 4
    assert run.timings["unet_calls"] == 2  # strength 0.5 runs the last half of the 4 steps
    # the same case through the API gives the same image; another init image gives another
    loaded = load_case(tmp_path / "case.json")
    pipe = load_pipeline({"name": "tiny-sd15", "task": task})
    same = AnyMS(pipe).generate_from_config(loaded.config, loaded.subjects, **loaded.pipeline_kwargs)
    assert np.array_equal(np.asarray(same.image), np.asarray(run.image))
    other = AnyMS(pipe).generate_from_config(loaded.config, loaded.subjects,
                                             **{**loaded.pipeline_kwargs, "image": random_reference_image(9, 64)})
    assert not np.array_equal(np.asarray(other.image), np.asarray(run.image))


def test_unknown_task():
    with pytest.raises(ValueError, match="task must be one of"):
        load_pipeline({"name": "tiny-sd15", "task": "video"})


def test_hub_ids_load_from_the_hf_cache_offline_and_say_what_to_download(tmp_path):
    """Run in a subprocess: huggingface_hub reads HF_HUB_OFFLINE and HF_HUB_CACHE when it is imported."""
    import os
    import shutil
    import subprocess
    import sys

    cache = tmp_path / "hub"
    save_fake_hub_folders(tmp_path / "sdxl", tmp_path / "ip", "sdxl", "base")
    revision = "0" * 40
    for repo, folder in (("stabilityai/stable-diffusion-xl-base-1.0", tmp_path / "sdxl"), ("h94/IP-Adapter", tmp_path / "ip")):
        root = cache / ("models--" + repo.replace("/", "--"))
        (root / "refs").mkdir(parents=True)
        (root / "refs" / "main").write_text(revision)
        shutil.copytree(folder, root / "snapshots" / revision)
    code = ("from anyms_core.models import load_pipeline\n"
            "pipe = load_pipeline('sdxl', device='cpu'); print('loaded', pipe.anyms_model_name)\n"
            "try:\n    load_pipeline('sd15', device='cpu')\nexcept ValueError as error:\n    print('error', error)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "home")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert "loaded sdxl+ip-adapter:base" in lines
    error = next(line for line in lines if line.startswith("error"))
    assert ('`hf download stable-diffusion-v1-5/stable-diffusion-v1-5 --include "model_index.json"' in error
            and '`hf download h94/IP-Adapter --include "models/ip-adapter_sd15.safetensors" --include "models/image_encoder/*"`' in error)
