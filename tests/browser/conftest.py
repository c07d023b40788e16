"""Real-browser test harness: JupyterLab on 127.0.0.1 + Debian's Chromium driven by Playwright.

One JupyterLab server and one browser serve the whole session. Every server setting lives in a fresh
temp dir (config, data, runtime, workspaces, IPython), so the tests see neither the user's settings
nor a previous run's. The tests talk to the kernel directly (jupyter_client, over the connection file
in the server's runtime dir) to read what the widgets sent, polling with a bound instead of sleeping.
Screenshots go to ``test-artifacts/browser/``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from .harness import TOKEN

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts" / "browser"
CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]
SERVER_START_TIMEOUT_S = 60


def pytest_collection_modifyitems(items):
    for item in items:
        if Path(str(item.fspath)).is_relative_to(Path(__file__).parent):
            item.add_marker(pytest.mark.browser)


def _chromium() -> str | None:
    """``$CHROMIUM_PATH`` when set (a Chromium elsewhere), else Debian's."""
    candidates = [os.environ["CHROMIUM_PATH"]] if os.environ.get("CHROMIUM_PATH") else CHROMIUM_CANDIDATES
    return next((path for path in candidates if Path(path).exists()), None)


@pytest.fixture(scope="session")
def chromium_path() -> str:
    path = _chromium()
    if path is None:
        where = os.environ.get("CHROMIUM_PATH") or " or ".join(CHROMIUM_CANDIDATES)
        pytest.skip(f"Chromium not found at {where}: run scripts/install_browser.sh to run the browser tests.")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("Playwright for Python is not installed: pip install playwright.")
    return path


class LabServer:
    def __init__(self, url: str, root: Path, runtime: Path, process: subprocess.Popen, log: Path):
        self.url, self.root, self.runtime, self.process, self.log = url, root, runtime, process, log

    def api(self, path: str) -> object:
        with urllib.request.urlopen(f"{self.url}{path}?token={TOKEN}", timeout=10) as response:
            return json.loads(response.read())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def jupyter_lab(chromium_path, tmp_path_factory) -> LabServer:
    base = tmp_path_factory.mktemp("jupyterlab")
    dirs = {name: base / name for name in ("root", "config", "data", "runtime", "xdg", "ipython", "tmp")}
    for path in dirs.values():
        path.mkdir()
    # No news or update pop-ups over the widgets in the screenshots.
    settings = dirs["config"] / "lab" / "user-settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    env = {
        **os.environ,
        "JUPYTER_CONFIG_DIR": str(dirs["config"]), "JUPYTER_DATA_DIR": str(dirs["data"]),
        "JUPYTER_RUNTIME_DIR": str(dirs["runtime"]), "XDG_CONFIG_HOME": str(dirs["xdg"]),
        "IPYTHONDIR": str(dirs["ipython"]), "TMPDIR": str(dirs["tmp"]),
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "OMP_NUM_THREADS": "1",
    }
    port = _free_port()
    log = base / "jupyterlab.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}", "--allow-root",
         f"--IdentityProvider.token={TOKEN}", f"--ServerApp.root_dir={dirs['root']}",
         "--LabApp.expose_app_in_browser=True", "--FileContentsManager.delete_to_trash=False", "--LabApp.news_url="],
        env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
    )
    server = LabServer(f"http://127.0.0.1:{port}", dirs["root"], dirs["runtime"], process, log)
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while True:
        if process.poll() is not None:
            pytest.fail(f"JupyterLab exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            server.api("/api/status")
            break
        except OSError:
            if time.monotonic() > deadline:
                process.terminate()
                pytest.fail(f"JupyterLab did not answer within {SERVER_START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.25)
    yield server
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
    if ARTIFACTS.exists():
        shutil.copy(log, ARTIFACTS / "jupyterlab.log")


@pytest.fixture(scope="session")
def browser(chromium_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS
