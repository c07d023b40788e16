"""anyms_core.sweep: spec validation before any model loads, deterministic run folders and index, resuming,
atomic writes, and the same runs on 1 and on 2 processes (accelerate, CPU, gloo)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from anyms_core.run import Run
from anyms_core.sweep import SpecError, load_spec, main, merge_index, read_index, run_sweep

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "model": "toy",
    "variants": ["none", "anyms"],  # not alphabetical: the index keeps the spec's order
    "seeds": [0, 1],
    "generation": {"steps": 2},
    "cases": [{"name": "pair", "prompt": "a photo on grass", "subjects": [
        {"image": "toy:red circle", "box": [0.05, 0.1, 0.5, 0.6]},
        {"image": "toy:cyan square", "box": [0.55, 0.4, 0.95, 0.9], "class": "square"},
    ]}],
}
RUN_IDS = ["pair__none__s0", "pair__none__s1", "pair__anyms__s0", "pair__anyms__s1"]


def _write(path: Path, spec: dict) -> Path:
    path.write_text(json.dumps(spec))
    return path


# --------------------------------------------------------------------------------------------
# Specs
# --------------------------------------------------------------------------------------------
def test_json_and_yaml_specs_give_the_same_runs(tmp_path):
    yaml = pytest.importorskip("yaml")
    (tmp_path / "cat.png").write_bytes(b"")  # only its existence is checked before generation
    spec = {**TINY, "cases": TINY["cases"] + [{"prompt": "a photo", "subjects": [{"image": "cat.png", "box": [0, 0, 1, 1]}]}]}
    from_json = load_spec(_write(tmp_path / "s.json", spec))
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    from_yaml = load_spec(tmp_path / "s.yaml")
    assert from_json.to_json() == from_yaml.to_json()
    assert [item.run_id for item in from_json.items()][:4] == RUN_IDS
    second = from_json.cases[1]
    assert second["name"] == "case001" and second["subjects"][0]["image"] == str((tmp_path / "cat.png").resolve())
    assert second["subjects"][0]["class"] == "cat"  # defaults to the name, which defaults to the file's stem
    assert from_json.cases[0]["subjects"][1] == {"image": "toy:cyan square", "box": [0.55, 0.4, 0.95, 0.9],
                                                 "name": "cyan square", "class": "square", "priority": None}
    assert load_spec({**TINY, "seeds": 3}).seeds == [0, 1, 2]


def test_a_subject_without_priority_has_priority_0_as_in_a_case_file():
    # The documented spec form: only the subject that must own the overlap sets a priority.
    from anyms_core.layout import paint_order
    from anyms_core.sweep import case_subjects

    first, second = TINY["cases"][0]["subjects"]
    spec = load_spec({**TINY, "cases": [{"prompt": "p", "subjects": [{**first, "priority": 1}, second]}]})
    subjects = case_subjects(spec.cases[0])
    assert [s.priority for s in subjects] == [1, None]
    assert paint_order(subjects) == [1, 0]  # the first subject is painted last: it owns the overlap


@pytest.mark.parametrize("change, message", [
    ({"variants": ["anyms", "crop"]}, "unknown variant 'crop'"),
    ({"seeds": [0, 0]}, "lists a seed twice"),
    ({"samplers": 1}, "unknown field(s) ['samplers']"),
    ({"model": "sd3"}, "field 'model' must be one of"),
    ({"generation": {"steps": 0}}, "generation.steps must be a positive integer"),
    ({"cases": [{"prompt": "p", "subjects": [{"image": "toy:red circle", "box": [0.5, 0, 0.2, 1]}]}]}, "is empty"),
    ({"cases": [{"prompt": "p", "subjects": [{"image": "missing.png", "box": [0, 0, 1, 1]}]}]}, "does not exist"),
    ({"cases": [{"prompt": "p", "subjects": [{"image": "toy:purple circle", "box": [0, 0, 1, 1]}]}]}, "unknown colour 'purple'"),
    ({"cases": [TINY["cases"][0], TINY["cases"][0]]}, "case names must be unique"),
    ({"cases": [{**TINY["cases"][0], "name": "a__b"}]}, "'name' must be"),
    ({"cases": []}, "the spec has no cases"),
])
def test_bad_specs_stop_with_one_line_before_any_model_loads(tmp_path, monkeypatch, capsys, change, message):
    import anyms_core.models

    monkeypatch.setattr(anyms_core.models, "load_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))
    path = _write(tmp_path / "bad.json", {**TINY, **change})
    with pytest.raises(SpecError, match=None) as error:
        load_spec(path)
    assert message in str(error.value) and str(path) in str(error.value)
    assert main([str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (importing the toy world may warn first)
    assert err.startswith("anyms sweep: error:") and message in err
    assert not (tmp_path / "out").exists()


def test_unreadable_spec_files_are_one_line_errors(tmp_path):
    (tmp_path / "s.json").write_text("{not json")
    (tmp_path / "s.yaml").write_text("cases: [unclosed")
    for path, message in ((tmp_path / "s.json", "not valid JSON"), (tmp_path / "s.yaml", "not valid YAML"),
                          (tmp_path / "none.json", "no such spec file")):
        with pytest.raises(SpecError, match=message) as error:
            load_spec(path)
        assert "\n" not in str(error.value)


# --------------------------------------------------------------------------------------------
# Running, resuming, atomic writes
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sweep") / "one"
    rows = run_sweep(TINY, out, device="cpu", progress=False)
    assert [row["run_id"] for row in rows] == RUN_IDS
    return out


def test_sweep_writes_one_run_per_case_variant_seed_and_an_index(one_process):
    rows = read_index(one_process)
    assert sorted(p.name for p in (one_process / "runs").iterdir()) == sorted(RUN_IDS)
    assert not list(one_process.glob("index.part*")) and not list((one_process / "runs").glob(".tmp-*"))
    for row in rows:
        run = Run.load(one_process / row["path"])
        assert (run.variant, run.config["seed"], run.config["steps"]) == (row["variant"], row["seed"], 2)
        assert run.boxes == row["boxes"] and row["classes"] == ["red circle", "square"] and row["n_subjects"] == 2
        assert run.attention is None and run.previews == []  # sweeps record nothing unless the spec asks
    assert json.loads((one_process / "sweep.json").read_text())["variants"] == ["none", "anyms"]
    images = {row["run_id"]: Run.load(one_process / row["path"]).image.tobytes() for row in rows}
    assert images["pair__anyms__s0"] != images["pair__anyms__s1"] != images["pair__none__s1"]


def test_resume_skips_finished_runs_and_may_extend_but_not_change_the_sweep(one_process, tmp_path, monkeypatch):
    import anyms_core.sweep as sweep

    out = tmp_path / "resume"
    first = run_sweep(TINY, out, device="cpu", progress=False, limit=1)
    assert [row["run_id"] for row in first] == RUN_IDS[:1]
    # an interrupted write leaves only a temporary folder, which does not count as finished
    (out / "runs" / ".tmp-pair__anyms__s1-p0").mkdir()
    generated = []
    original = sweep.generate_item
    monkeypatch.setattr(sweep, "generate_item", lambda anyms, spec, item, out, process=0: generated.append(item.run_id)
                        or original(anyms, spec, item, out, process))
    rows = run_sweep(TINY, out, device="cpu", progress=False)
    assert generated == RUN_IDS[1:] and [row["run_id"] for row in rows] == RUN_IDS
    for run_id in RUN_IDS:  # resumed runs are the runs of an uninterrupted sweep
        assert (Run.load(out / "runs" / run_id).image.tobytes() == Run.load(one_process / "runs" / run_id).image.tobytes())
    generated.clear()
    assert len(run_sweep(TINY, out, device="cpu", progress=False)) == 4 and generated == []
    # extending: a new seed for one variant generates only that run; the index keeps the earlier runs
    extended = run_sweep({**TINY, "variants": ["anyms"], "seeds": [0, 1, 2]}, out, device="cpu", progress=False)
    assert generated == ["pair__anyms__s2"] and len(extended) == 5
    assert json.loads((out / "sweep.json").read_text())["seeds"] == [0, 1, 2]
    with pytest.raises(SpecError, match="another generation"):
        run_sweep({**TINY, "generation": {"steps": 3}}, out, device="cpu", progress=False)
    # a lost index row (crash between the rename and the row's write) is rebuilt from the run folder
    (out / "index.jsonl").write_text("")
    assert [row["run_id"] for row in merge_index(load_spec(TINY), out)] == RUN_IDS  # (rebuilt for this spec's runs)


@pytest.mark.slow  # two fresh processes load torch, diffusers and the toy world: ~25 s on 2 shared cores
def test_two_processes_give_the_same_runs_as_one(one_process, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2 -m anyms_core.sweep` on the CPU (gloo)."""
    spec = _write(tmp_path / "tiny.json", TINY)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
               "-m", "anyms_core.sweep", str(spec), "--out", str(tmp_path / "two"), "--device", "cpu", "--threads", "1", "--no-progress"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    two, one = read_index(tmp_path / "two"), read_index(one_process)
    assert sorted({row["process"] for row in two}) == [0, 1]  # the work was really split
    assert not list((tmp_path / "two").glob("index.part*"))  # parts merged and removed
    strip = lambda rows: [{k: v for k, v in row.items() if k not in ("process", "seconds")} for row in rows]
    assert strip(two) == strip(one)
    for row in one:
        assert (tmp_path / "two" / row["path"] / "image.png").read_bytes() == (one_process / row["path"] / "image.png").read_bytes()
