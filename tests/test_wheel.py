"""A built wheel is complete: installed into a fresh virtual environment (no editable checkout in
sight), it imports the widgets (their .js/.css) and runs the shipped toy model.

Slow (a wheel build and a venv, ~20-40 s), but part of the default suite: the editable install hides
exactly these defects.
"""

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CHECK = r"""
import sys, torch
torch.set_num_threads(1)
import anyms_core, anyms_viz.widgets
from anyms_viz.widgets import BoxEditor
from anyms_core import AnyMS, Subject
from anyms_core.models import load_pipeline
from anyms_core.toy import sprite_reference
from pathlib import Path
assert Path(anyms_core.__file__).is_relative_to(sys.prefix), anyms_core.__file__
assert Path(anyms_viz.widgets.__file__).is_relative_to(sys.prefix), anyms_viz.widgets.__file__
import anyms_viz.widgets.box_editor as module
assert all(Path(module.__file__).with_name(name).is_file() for name in ("box_editor.js", "box_editor.css"))
subject = Subject(sprite_reference("red circle"), [0.1, 0.1, 0.6, 0.6], name="circle")
editor = BoxEditor([subject])
run = AnyMS(load_pipeline("toy")).generate("a photo at night", [subject], num_inference_steps=2, record=False)
print("ok", run.image.size, anyms_core.__file__)
"""


@pytest.mark.slow
def test_wheel_installs_with_widgets_and_toy_model(tmp_path):
    if shutil.which("git") is None:
        pytest.skip("git is needed to copy the tracked files")
    # build from a copy of the tracked files, so that no build/ or egg-info is left in the checkout
    source = tmp_path / "src"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, files):
        target = source / os.fsdecode(name)
        if (ROOT / os.fsdecode(name)).is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / os.fsdecode(name), target)
    wheels = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(wheels), str(source)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = wheels.glob("anyms-*.whl")

    env_dir = tmp_path / "venv"
    venv.create(env_dir, system_site_packages=True, with_pip=False)
    python = env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
                             capture_output=True, text=True)
    if install.returncode != 0 and "no such option: --python" in install.stderr:
        pytest.skip("pip is too old for --python")
    assert install.returncode == 0, install.stderr[-2000:]

    environment = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([str(python), "-c", CHECK], cwd=tmp_path, capture_output=True, text=True, env=environment,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("ok (64, 64)") and str(env_dir) in result.stdout
    console = env_dir / "bin" / "anyms"
    if console.exists():
        help_text = subprocess.run([str(console), "--help"], cwd=tmp_path, capture_output=True, text=True, env=environment)
        assert help_text.returncode == 0 and "generate" in help_text.stdout
