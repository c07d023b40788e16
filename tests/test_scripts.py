"""scripts/install_browser.sh: finds a Chromium first, installs only with --no-install-recommends and never
upgrades installed packages (apt-get is replaced by a recording fake here)."""

import os
import subprocess
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "install_browser.sh"


def fake_apt(tmp_path, dry_run_output: str) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "apt.log"
    for name in ("apt-get", "sudo"):
        script = bin_dir / name
        if name == "sudo":
            script.write_text('#!/bin/sh\nexec "$@"\n')
        else:
            script.write_text(f'#!/bin/sh\necho "$@" >> {log}\n'
                              f'case "$*" in *" -s "*) printf "%s\\n" "{dry_run_output}";; esac\n')
        script.chmod(0o755)
    return bin_dir


def run(tmp_path, *args, candidates, dry_run="Inst chromium (130.0 Debian:12/stable [amd64])", ci="1"):
    bin_dir = fake_apt(tmp_path, dry_run)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "ANYMS_CHROMIUM_CANDIDATES": candidates, "CI": ci}
    result = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env)
    log = tmp_path / "apt.log"
    return result, log.read_text().splitlines() if log.exists() else []


def test_a_found_chromium_installs_nothing(tmp_path):
    chromium = tmp_path / "chromium"
    chromium.write_text("#!/bin/sh\n")
    chromium.chmod(0o755)
    result, apt = run(tmp_path, candidates=f"{tmp_path}/none {chromium}")
    assert result.returncode == 0 and f"found {chromium}" in result.stdout and apt == []


def test_check_only_reports(tmp_path):
    result, apt = run(tmp_path, "--check", candidates=f"{tmp_path}/none")
    assert result.returncode == 1 and "no Chromium found" in result.stdout and apt == []


def test_installs_without_recommends(tmp_path):
    result, apt = run(tmp_path, candidates=f"{tmp_path}/none")
    assert result.returncode == 0, result.stderr
    assert apt[-1] == "install -y -q --no-install-recommends chromium"
    assert not any("upgrade" in line.split()[0] for line in apt)


def test_refuses_to_upgrade_installed_packages(tmp_path):
    result, apt = run(tmp_path, candidates=f"{tmp_path}/none",
                      dry_run="Inst libc6 [2.36-9] (2.36-9+deb12u9 Debian:12/stable [amd64])")
    assert result.returncode == 1 and "would upgrade installed packages (libc6 )" in result.stderr
    assert not any(line.startswith("install -y") for line in apt)


def test_test_sh_only_installs_in_ci():
    text = (ROOT / "scripts" / "test.sh").read_text()
    assert 'if [ -n "${CI:-}" ]; then\n    bash scripts/install_browser.sh\n' in text
    assert "install_browser.sh --check" in text and "browser tests will skip" in text
    assert "CI=${CI:-1} bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
