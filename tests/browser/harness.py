"""Helpers of the browser tests: a second kernel client, notebook writing and opening in JupyterLab."""

from __future__ import annotations

import ast
import json
import time
from pathlib import Path
from typing import Callable

TOKEN = "anyms-browser-tests"
KERNEL_TIMEOUT_S = 90


class Kernel:
    """A second client of a notebook's kernel: evaluates expressions to see what the widgets sent."""

    def __init__(self, connection_file: Path):
        from jupyter_client import BlockingKernelClient

        self.client = BlockingKernelClient(connection_file=str(connection_file))
        self.client.load_connection_file()
        self.client.start_channels()
        self.client.wait_for_ready(timeout=KERNEL_TIMEOUT_S)

    def evaluate(self, expression: str, timeout: float = 30) -> object:
        """The value of a JSON-able Python expression in the kernel."""
        message_id = self.client.execute("", silent=True, store_history=False,
                                         user_expressions={"value": f"__import__('json').dumps({expression})"})
        deadline = time.monotonic() + timeout
        while True:
            reply = self.client.get_shell_msg(timeout=max(0.1, deadline - time.monotonic()))
            if reply["parent_header"].get("msg_id") == message_id:
                break
        result = reply["content"]["user_expressions"]["value"]
        if result["status"] != "ok":
            raise AssertionError(f"{expression!r} failed in the kernel: {result.get('ename')}: {result.get('evalue')}")
        return json.loads(ast.literal_eval(result["data"]["text/plain"]))

    def wait_for(self, expression: str, condition: Callable[[object], bool], timeout: float = 30, what: str = "") -> object:
        """Polls ``expression`` until ``condition(value)`` holds; fails with the last value after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if condition(value):
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"Timed out after {timeout} s waiting for {what or expression}; last value: {value!r}")
            time.sleep(0.1)

    def close(self) -> None:
        self.client.stop_channels()


def write_notebook(path: Path, cells: list[str]) -> None:
    import nbformat

    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell(source) for source in cells]
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, path)


def open_notebook(page, server, name: str) -> Kernel:
    """Opens ``name`` in JupyterLab, waits until its kernel is idle, runs all cells; returns a kernel client."""
    page.goto(f"{server.url}/lab/tree/{name}?token={TOKEN}")
    # The toolbar says "idle" before a kernel is attached: wait on the session's own kernel instead.
    page.wait_for_function(
        """(name) => {
            const app = window.jupyterapp;
            const panel = app && app.shell.currentWidget;
            const kernel = panel && panel.sessionContext && panel.sessionContext.session && panel.sessionContext.session.kernel;
            return !!(panel && panel.context && panel.context.path === name && kernel && kernel.status === 'idle' && panel.content.widgets.length > 0);
        }""",
        arg=name, timeout=KERNEL_TIMEOUT_S * 1000,
    )
    sessions = [s for s in server.api("/api/sessions") if s["path"] == name]
    assert len(sessions) == 1, f"expected one session for {name}, got {sessions}"
    kernel = Kernel(server.runtime / f"kernel-{sessions[0]['kernel']['id']}.json")
    page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
    return kernel
