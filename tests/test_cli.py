import json
import subprocess
import sys
import time

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
    assert run.config["seed"] == 1 and run.config.steps == 2 and run.image.size == (64, 64)
    assert (tmp_path / "out" / "image.png").exists() and run.attention is not None
    assert run.config.model == "tiny-sdxl" and run.config.subjects[0].image == str((tmp_path / "a.png").resolve())
    # the saved config is itself a case file: it replays to the same image
    (tmp_path / "replay.json").write_text(json.dumps(json.loads((tmp_path / "out" / "run.json").read_text())["config"]))
    assert main(["generate", str(tmp_path / "replay.json"), "--out", str(tmp_path / "again")]) == 0
    assert Run.load(tmp_path / "again").image.tobytes() == run.image.tobytes()
    # a second generate into the same folder is refused unless --overwrite
    assert main(["generate", str(write_case(tmp_path)), "--out", str(tmp_path / "out")]) == 2
    assert "not empty (pass --overwrite" in capsys.readouterr().err
    assert main(["generate", str(write_case(tmp_path, seed=2)), "--out", str(tmp_path / "out"), "--overwrite"]) == 0
    assert Run.load(tmp_path / "out").config.seed == 2


def test_pipeline_section_with_image_paths(tmp_path):
    from anyms_core import Run

    path = write_case(tmp_path, pipeline={"eta": 0.0, "callback_on_step_end_tensor_inputs": ["latents"]})
    assert main(["generate", str(path), "--out", str(tmp_path / "out")]) == 0
    assert Run.load(tmp_path / "out").config.pipeline == {"eta": 0.0, "callback_on_step_end_tensor_inputs": ["latents"]}
    case = load_case(write_case(tmp_path, pipeline={"ip_adapter_image_embeds_not": {"path": "a.png"}}))
    assert case.pipeline_kwargs["ip_adapter_image_embeds_not"].size == (40, 40)


@pytest.mark.parametrize("overrides, field", [
    ({"prompt": 3}, "prompt must be a string"), ({"subjects": []}, "subjects"), ({"variant": "crop"}, "variant"),
    ({"steps": 0}, "steps must be >= 1"), ({"colour": "red"}, "unknown field"), ({"seed": 2**70}, "seed"),
    ({"ip_adapter_scale": "05"}, "ip_adapter_scale"), ({"record": "nonsense"}, "field 'record'"),
    ({"subjects": [{"image": "a.png"}]}, "field 'box' is missing"),
    ({"subjects": [{"box": [0, 0, 1, 1]}]}, r"subjects\[0\]: field 'image' is missing"),
    ({"subjects": [{"image": "a.png", "box": "0011"}]}, "four numbers"),
    ({"subjects": [{"image": "a.png", "box": [0, 0, 2, 1]}]}, "outside"),
    ({"subjects": [{"image": "missing.png", "box": [0, 0, 1, 1]}]}, r"subjects\[0\]: Cannot read"),
    ({"pipeline": {"image": {"path": "missing.png"}}}, r"pipeline\.image: Cannot read"),
])
def test_bad_case_files_name_the_field(tmp_path, overrides, field):
    with pytest.raises(CaseError, match=field):
        load_case(write_case(tmp_path, **overrides))


def test_priority_on_some_subjects_only(tmp_path):
    path = write_case(tmp_path, subjects=[{"image": "a.png", "box": [0, 0, 0.6, 0.6]},
                                         {"image": "a.png", "box": [0.4, 0.4, 1, 1], "priority": 1}])
    assert [s.priority for s in load_case(path).subjects] == [None, 1.0]


def error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("anyms: error: "), err
    return err[0]


@pytest.mark.parametrize("argv, message", [
    (["generate", "{case}", "--out", "{tmp}/o", "--device", "bogus"], "--device 'bogus' is not a device"),
    (["generate", "{case}", "--out", "/proc/o"], "cannot write into /proc"),
    (["generate", "{tmp}/none.json", "--out", "{tmp}/o"], "no such case file"),
    (["generate", "{broken}", "--out", "{tmp}/o"], "not valid JSON"),
    (["generate", "{case_sd3}", "--out", "{tmp}/o"], "Unknown model 'sd3'"),
    (["generate", "{case}", "--out", "{tmp}/a.png"], "is a file, not a folder"),
    (["generate", "{case}"], "the following arguments are required: --out"),
    (["nonsense"], "invalid choice"),
    (["demo", "--model", "sd3", "--out", "{tmp}/demo"], "Unknown model 'sd3'"),
])
def test_user_errors_are_one_line_and_nothing_loads(tmp_path, capsys, monkeypatch, argv, message):
    import anyms_core.models

    monkeypatch.setattr(anyms_core.models, "load_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    case = write_case(tmp_path)
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "sd3.json").write_text(json.dumps({**json.loads(case.read_text()), "model": "sd3"}))
    argv = [a.format(case=case, tmp=tmp_path, broken=tmp_path / "broken.json", case_sd3=tmp_path / "sd3.json") for a in argv]
    from anyms_viz.cli import main as anyms

    try:
        status = anyms(argv)
    except SystemExit as exit:  # argparse usage errors exit
        status = exit.code
    assert status == 2
    assert message in error_line(capsys)
    assert not (tmp_path / "o").exists() and not (tmp_path / "demo").exists()


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(CaseError):
        main(["--debug", "generate", str(tmp_path / "none.json"), "--out", str(tmp_path / "o")])


def test_a_failed_demo_leaves_no_folder(tmp_path, monkeypatch, capsys):
    import anyms_core.sampler

    def fail(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(anyms_core.sampler.AnyMS, "generate", fail)
    from anyms_viz.cli import main as anyms

    assert anyms(["demo", "--out", str(tmp_path / "demo")]) == 1
    err = capsys.readouterr().err.strip().splitlines()  # the model loader logs its own progress first
    assert err[-1].startswith("anyms: error: RuntimeError: boom") and "Traceback" not in "".join(err)
    assert list(tmp_path.iterdir()) == []


SUBCOMMANDS = ["generate", "demo", "train-toy", "evaluate-toy", "diagnose-toy", "sweep", "score"]
WRITING_TO_OUT = ["generate", "demo", "train-toy", "evaluate-toy", "sweep"]


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_answers_help(command):
    result = subprocess.run([sys.executable, "-m", "anyms_viz.cli", command, "--help"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: anyms {command} ")  # the command as a user types it
    assert "usage:" in result.stdout and ("--out" in result.stdout or command not in WRITING_TO_OUT)


def test_top_level_help_is_fast_and_imports_nothing_heavy():
    code = ("import sys, time; t = time.perf_counter(); from anyms_viz.cli import main\n"
            "try: main(['--help'])\nexcept SystemExit: pass\n"
            "print(time.perf_counter() - t, *[m in sys.modules for m in ('torch', 'diffusers', 'matplotlib')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[-3:] == ["False", "False", "False"]
    assert float(out[-4]) < 1.0
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "anyms_viz.cli", "--help"], capture_output=True, check=True)
    assert time.perf_counter() - start < 3.0  # whole interpreter start included, on a loaded shared machine


def test_evaluate_toy_takes_its_documented_flags(tmp_path, capsys):
    assert main(["evaluate-toy", "--subjects", "2", "--cases", "1", "--variants", "anyms", "--bootstrap", "10",
                 "--out", str(tmp_path / "eval")]) == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["settings"]["groups"] == ["2"] and report["settings"]["cases"] == 1
    assert {"grid", "artefact", "fidelity"} <= set(report["groups"]["2"]["anyms"]) and "grid" in report["groups"]["2"]["ceiling"]
    assert "`anyms` grid (rendered)" in (tmp_path / "eval.md").read_text()


def test_train_toy_reaches_its_parser(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["train-toy", "--minutes"])
    assert exit.value.code == 2 and "--minutes: expected one argument" in capsys.readouterr().err


def test_demo_writes_its_folder_whole_and_refuses_to_mix(tmp_path, monkeypatch, capsys):
    from anyms_viz import figures
    from anyms_viz.cli import main as anyms

    # the figures are tested in test_figures.py; here only what the command writes where
    monkeypatch.setattr(figures, "plot_comparison", lambda *a, **k: None)
    monkeypatch.setattr(figures, "plot_attention", lambda *a, **k: None)
    monkeypatch.setattr(figures, "save", lambda fig, path, dpi=300: [path.write_bytes(b"png") or path])
    out = tmp_path / "demo"
    assert anyms(["demo", "--out", str(out)]) == 0
    expected = {"anyms.png", "mask.png", "none.png", "variants.png", "comparison.png", "attention.png",
                "comparison_with_differences.png", "runs"}
    assert {p.name for p in out.iterdir()} == expected and sorted(p.name for p in tmp_path.iterdir()) == ["demo"]
    (out / "stale.txt").write_text("from an older demo")
    assert anyms(["demo", "--out", str(out)]) == 2 and "not empty" in capsys.readouterr().err
    assert anyms(["demo", "--out", str(out), "--overwrite"]) == 0
    assert {p.name for p in out.iterdir()} == expected  # replaced whole: the stale file is gone


def test_a_delegated_command_s_message_exit_is_one_line(capsys, tmp_path):
    from anyms_core.cli import run_reporting_errors

    def handler():
        raise SystemExit("--device cuda given but torch.cuda.is_available() is False")

    assert run_reporting_errors(handler, debug=False) == 1
    assert error_line(capsys) == "anyms: error: --device cuda given but torch.cuda.is_available() is False"
    with pytest.raises(SystemExit):
        run_reporting_errors(lambda: (_ for _ in ()).throw(SystemExit(0)), debug=False)  # a plain exit stays one


def test_a_run_made_in_python_replays_through_the_cli(tmp_path, capsys):
    from anyms_core import AnyMS, Run, Subject
    from anyms_core.models import load_pipeline

    reference_image(4).save(tmp_path / "ref.png")
    pipe = load_pipeline({"name": "tiny-sd15", "task": "img2img"})
    assert pipe.anyms_model == {"name": "tiny-sd15", "task": "img2img"}
    run = AnyMS(pipe).generate("a photo", [Subject(tmp_path / "ref.png", [0.1, 0.1, 0.9, 0.9])], num_inference_steps=2,
                               height=64, width=64, strength=0.9, image=reference_image(5, 64))
    run.save(tmp_path / "run")
    record = json.loads((tmp_path / "run" / "run.json").read_text())["config"]
    assert record["model"] == {"name": "tiny-sd15", "task": "img2img"} and record["subjects"][0]["image"] == str(tmp_path / "ref.png")
    reference_image(5, 64).save(tmp_path / "init.png")
    record["pipeline"]["image"] = {"path": "init.png"}  # an in-memory image is recorded by hash: name its file
    (tmp_path / "case.json").write_text(json.dumps(record))
    assert main(["generate", str(tmp_path / "case.json"), "--out", str(tmp_path / "again")]) == 0, capsys.readouterr().err
    assert Run.load(tmp_path / "again").image.tobytes() == run.image.tobytes()
    record["pipeline"]["image"] = run.config.pipeline["image"]
    (tmp_path / "hashed.json").write_text(json.dumps(record))
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "hashed.json"), "--out", str(tmp_path / "hashed")]) == 2
    assert "pipeline.image: " in error_line(capsys)
