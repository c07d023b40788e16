import json

import numpy as np
import pytest

from anyms_core.cli import CaseError, load_case, main
from anyms_core.testing import random_reference_image as reference_image


def write_case(tmp_path, **overrides):
    reference_image(0).save(tmp_path / "a.png")
    case = {"prompt": "a photo", "subjects": [{"name": "a", "image": "a.png", "box": [0.1, 0.1, 0.6, 0.6]}],
            "variant": "anyms", "seed": 1, "steps": 2, "height": 64, "width": 64, "model": "tiny-sdxl"}
    case.update(overrides)
    path = tmp_path / "case.json"
    path.write_text(json.dumps(case))
    return path


def test_generate_writes_a_run(tmp_path, capsys):
    from anyms_core import Run

    assert main(["generate", str(write_case(tmp_path)), "--out", str(tmp_path / "out")]) == 0
    run = Run.load(tmp_path / "out")
    assert run.config["seed"] == 1 and run.config["steps"] == 2 and run.image.size == (64, 64)
    assert (tmp_path / "out" / "image.png").exists() and run.attention is not None


@pytest.mark.parametrize("overrides, field", [
    ({"prompt": 3}, "'prompt'"), ({"subjects": []}, "'subjects'"), ({"variant": "crop"}, "'variant'"),
    ({"steps": 0}, "'steps'"), ({"colour": "red"}, "unknown field"),
    ({"subjects": [{"image": "a.png"}]}, "subjects\\[0\\]: field 'box'"),
    ({"subjects": [{"image": "a.png", "box": [0, 0, 2, 1]}]}, "subjects\\[0\\]: .*outside"),
    ({"subjects": [{"image": "missing.png", "box": [0, 0, 1, 1]}]}, "subjects\\[0\\]: Cannot read"),
])
def test_bad_case_files_name_the_field(tmp_path, overrides, field):
    with pytest.raises(CaseError, match=field):
        load_case(write_case(tmp_path, **overrides))


def test_bad_case_file_exit_code_and_message(tmp_path, capsys):
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    assert main(["generate", str(path), "--out", str(tmp_path / "o")]) == 2
    assert "not valid JSON" in capsys.readouterr().err
