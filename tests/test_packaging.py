"""pyproject.toml and environment.yml install the same packages; the CLI answers."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ]", requirement.strip(), maxsplit=1)[0].lower()


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {req for req in project["dependencies"]}
    for extra in ("notebooks", "dev"):
        wanted |= set(project["optional-dependencies"][extra])
    environment = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in environment["dependencies"] if isinstance(d, dict))
    listed = {req for req in pip_section if not req.startswith("-e")}
    assert listed == wanted, f"only in environment.yml: {listed - wanted}; only in pyproject: {wanted - listed}"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash scripts/test.sh" in readme and "bash scripts/test.sh" in ci


def test_cli_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "anyms_viz.cli", "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("generate", "demo", "train-toy", "evaluate-toy"):
        assert command in out
