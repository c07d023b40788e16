"""RunConfig: typed, frozen, validated once; the same object for generate(), case files and run.json."""

import dataclasses
import json
import math

import numpy as np
import pytest

from anyms_core import ConfigError, RunConfig, Subject, SubjectConfig
from anyms_core.config import MAX_SEED, VARIANTS, validate_box
from anyms_core.testing import random_reference_image as reference_image

BOX = [0.1, 0.1, 0.6, 0.6]


def config(**changes) -> RunConfig:
    return RunConfig.from_dict({"prompt": "a photo", "subjects": [{"box": BOX, "name": "a"}], **changes})


def test_variants_match_the_processor():
    from anyms_core.processor import VARIANTS as PROCESSOR_VARIANTS

    assert VARIANTS == PROCESSOR_VARIANTS


def test_round_trip_through_json_is_exact():
    original = config(seed=MAX_SEED, steps=3, guidance_scale=2.5, ip_adapter_scale=[0.5], height=64, width=32,
                      record={"kinds": ("affinity",)}, pipeline={"strength": 0.5}, model={"name": "toy"})
    again = RunConfig.from_dict(json.loads(json.dumps(original.to_dict())))
    assert again == original and again.to_dict() == original.to_dict()
    assert again.schema_version == 1 and again.ip_adapter_scale == (0.5,) and again.record == {"kinds": ["affinity"]}


def test_frozen():
    value = config()
    assert hash(value) == hash(config()) and len({value, config(), config(seed=1)}) == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        value.seed = 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        value.subjects[0].box = (0, 0, 1, 1)
    changed = value.replace(seed=4)
    assert changed.seed == 4 and value.seed == 0
    with pytest.raises(ConfigError, match="steps"):
        value.replace(steps=0)


@pytest.mark.parametrize("changes, message", [
    ({"seed": 2**70}, "seed must be <="), ({"seed": -1}, "seed must be >= 0"), ({"seed": "1"}, "seed must be an integer"),
    ({"seed": 1.0}, "seed must be an integer"), ({"seed": True}, "seed must be an integer"),
    ({"steps": 0}, "steps must be >= 1"), ({"steps": -1}, "steps must be >= 1"), ({"steps": "12"}, "steps must be an integer"),
    ({"guidance_scale": float("nan")}, "finite"), ({"guidance_scale": "3"}, "must be a number"),
    ({"guidance_scale": float("inf")}, "finite"),
    ({"ip_adapter_scale": "05"}, "ip_adapter_scale must be a number or a list"),
    ({"ip_adapter_scale": b"05"}, "ip_adapter_scale must be a number or a list"),
    ({"ip_adapter_scale": float("nan")}, "finite"), ({"ip_adapter_scale": [float("inf")]}, "finite"),
    ({"ip_adapter_scale": [1.0, 1.0]}, "2 values for 1 subjects"), ({"ip_adapter_scale": -1}, ">= 0"),
    ({"ip_adapter_scale": []}, "empty"), ({"ip_adapter_scale": True}, "must be a number"),
    ({"height": 0}, "height must be >= 1"), ({"width": 12.5}, "width must be an integer"),
    ({"variant": "crop"}, "variant must be one of"), ({"priority_rule": "size"}, "priority_rule"),
    ({"num_images_per_prompt": 0}, "num_images_per_prompt"), ({"prompt": 3}, "prompt must be a string"),
    ({"subjects": []}, "non-empty"), ({"subjects": "ab"}, "subjects must be a non-empty list"),
    ({"colour": "red"}, "unknown field"), ({"schema_version": 99}, "schema_version"),
    ({"subjects": [{"box": "0011"}]}, r"subjects\[0\]: box of subject must be four numbers"),
    ({"subjects": [{"box": b"0011"}]}, "four numbers"),
    ({"subjects": [{"box": [0, 0, 1, 1], "priority": "1"}]}, "priority of subject must be a number"),
    ({"subjects": [{"box": [0, 0, 1, 1], "size": 3}]}, "unknown field"),
    ({"subjects": [{"image": "a.png"}]}, "field 'box' is missing"),
    ({"pipeline": {"strength": float("nan")}}, "plain JSON"),
    ({"pipeline": {"num_images_per_prompt": 2}}, "repeat the case's own fields: 'num_images_per_prompt'"),
    ({"pipeline": {"num_inference_steps": 4, "seed": 1}}, r"'num_inference_steps' \(use the field 'steps'\), 'seed'"), ({"record": "affinity"}, "record must be an object"),
    ({"pipeline": {"output_type": "np", "generator": 1}}, r"sets itself: 'generator' \(use seed=\); 'output_type' \(a Run holds PIL"),
    ({"pipeline": {"ip_adapter_image_embeds": [[0.0]]}}, "'ip_adapter_image_embeds' .generate.. passes the subjects' images"),
])
def test_bad_values_are_refused_with_the_field_named(changes, message):
    with pytest.raises(ConfigError, match=message):
        config(**changes)


@pytest.mark.parametrize("box", ["0011", b"0011", [0, 0, 1], [0, 0, True, 1], [0, 0, "1", 1], [0, math.nan, 1, 1],
                                 [0, 0, math.inf, 1], [0.5, 0, 0.5, 1], [0, 0, 1.5, 1], 3, None, np.float64(1)])
def test_bad_boxes(box):
    with pytest.raises(ConfigError):
        validate_box(box)
    with pytest.raises(ValueError):
        Subject(reference_image(0), box)


def test_numpy_and_torch_numbers_are_numbers():
    import torch

    assert validate_box(np.array([0.1, 0.2, 0.5, 0.6], dtype=np.float32)) == pytest.approx((0.1, 0.2, 0.5, 0.6))
    assert validate_box(torch.tensor([0.0, 0.0, 1.0, 1.0])) == (0.0, 0.0, 1.0, 1.0)
    assert config(seed=np.int64(5)).seed == 5 and type(config(seed=np.int64(5)).seed) is int


def test_subject_is_immutable_and_revalidates_on_replace():
    subject = Subject(reference_image(0), BOX, name="a")
    with pytest.raises(dataclasses.FrozenInstanceError):
        subject.box = [2, 2, 3, 3]
    assert isinstance(subject.box, tuple)
    with pytest.raises(ValueError, match="outside"):
        dataclasses.replace(subject, box=[2, 2, 3, 3])
    assert subject.to_config().image.startswith("sha256:")
    assert subject.to_config() == SubjectConfig(box=tuple(BOX), name="a", image=subject.to_config().image)


def test_subject_records_its_path(tmp_path):
    path = tmp_path / "ref.png"
    reference_image(1).save(path)
    assert Subject(path, BOX).to_config().image == str(path)


@pytest.mark.parametrize("image", [np.zeros((0, 0, 3), dtype=np.uint8), np.zeros((0, 5), dtype=np.uint8)])
def test_empty_images_are_refused(image):
    with pytest.raises(ValueError, match="empty"):
        Subject(image, BOX)


def test_empty_pil_image_is_refused():
    from PIL import Image

    with pytest.raises(ValueError, match="empty"):
        Subject(Image.new("RGB", (0, 0)), BOX)


def test_mapping_style_access_for_older_code():
    value = config(seed=3)
    assert value["seed"] == 3 and value.get("steps") is None and value["subjects"][0]["box"] == BOX
    with pytest.raises(KeyError):
        value["colour"]


def test_config_module_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, anyms_core.config, anyms_core.cli; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
