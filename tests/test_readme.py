"""README.md runs: every ```python block (in order, one namespace) and every ```json case file, with the toy
model, and every `anyms ...` / `hf download ...` command line it shows parses (the long ones are not run)."""

import itertools
import json
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, flags=re.S | re.M)


def test_readme_has_the_blocks_this_test_runs():
    assert len(blocks("python")) >= 2 and len(blocks("json")) >= 1 and len(blocks("bash")) >= 2


def test_python_blocks_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for index, code in enumerate(blocks("python")):
        try:
            exec(compile(code, f"README.md python block {index}", "exec"), namespace)
        except Exception as error:  # noqa: BLE001 - say which block failed
            pytest.fail(f"README.md python block {index} failed: {type(error).__name__}: {error}\n{code}")
    from anyms_core import Run

    assert Run.load(tmp_path / "runs" / "first").config == namespace["run"].config


@pytest.mark.parametrize("index", range(len(blocks("json"))))
def test_json_case_files_run(tmp_path, index, capsys):
    from anyms_core import Run
    from anyms_core.cli import main
    from anyms_core.testing import random_reference_image

    case = json.loads(blocks("json")[index])
    for subject in case["subjects"]:  # image files the README names: any picture will do
        if not subject["image"].startswith("toy:"):
            random_reference_image(index).save(tmp_path / subject["image"])
    (tmp_path / "case.json").write_text(blocks("json")[index])
    assert main(["generate", str(tmp_path / "case.json"), "--out", str(tmp_path / "run")]) == 0, capsys.readouterr().err
    run = Run.load(tmp_path / "run")
    assert run.config.prompt == case["prompt"] and len(run.config.subjects) == len(case["subjects"])


def command_lines(program: str) -> list[list[str]]:
    lines = []
    for block in blocks("bash"):
        for line in block.splitlines():
            for part in line.split("#")[0].split("&&"):
                argv = shlex.split(part)
                if argv and argv[0] == program:
                    lines.append(argv)
    return lines


def test_anyms_command_lines_parse():
    import importlib

    from anyms_core.cli import DELEGATED
    from anyms_viz.cli import parser

    lines = command_lines("anyms")
    assert {argv[1] for argv in lines} >= {"generate", "demo", "train-toy", "evaluate-toy"}
    for argv in lines:
        if argv[1] in DELEGATED:
            importlib.import_module(DELEGATED[argv[1]]).parse_args(argv[2:])
        else:
            parser().parse_args(argv[1:])


def test_hf_download_lines_are_the_loaders_own():
    from anyms_core.models import SDXL_BASE, SDXL_IP_ADAPTERS, _adapter_download, _base_download

    lines = [line.strip() for block in blocks("bash") for line in block.splitlines() if line.startswith("hf ")]
    assert lines == [_base_download(SDXL_BASE, None), _adapter_download(SDXL_IP_ADAPTERS["base"])]
    assert "huggingface-cli" not in README


def _toy_table_rows(text: str, heading: str) -> list[list[str]]:
    """The first markdown table after `heading`, as rows of cells (header and rule dropped)."""
    lines = text[text.index(heading):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    table = list(itertools.takewhile(lambda line: line.startswith("|"), lines[start:]))
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in table[2:]]


def _group(label: str) -> str:
    """A table's row label -> its results group: "2 subjects" -> "2", "3, overlapping boxes" / "overlap-3" -> "overlap-3"."""
    if label.startswith("overlap-"):
        return label
    count = label.split()[0].rstrip(",")
    return f"overlap-{count}" if "overlap" in label else count


def _percent(value: float) -> str:
    return f"{round(100 * value)}%"


@pytest.mark.parametrize("document, heading", [("README.md", "## The toy world, measured"),
                                               ("docs/toy-world-model-card.md", "## Evaluation")])
def test_toy_tables_match_the_results_file(document, heading):
    """The placement tables a reader sees are the held-out results' own numbers (results/toy_eval.json)."""
    results = json.loads((ROOT / "results" / "toy_eval.json").read_text())["groups"]
    rows = _toy_table_rows((ROOT / document).read_text(), heading)
    assert len(rows) >= 5
    for row in rows:
        entry = results[_group(row[0])]
        expected = [_percent(entry["anyms"]["placed"]["mean"]), _percent(entry["anyms"]["identity"]["mean"]),
                    _percent(entry["mask"]["placed"]["mean"]), _percent(entry["none"]["placed"]["mean"]),
                    _percent(entry["joint"]["placed"]["mean"]), _percent(entry["text"]["placed"]["mean"]),
                    _percent(entry["anyms"]["background"]["mean"])]
        assert row[1:8] == expected, f"{document}: row {row[0]!r}"
