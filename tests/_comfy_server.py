"""A real ComfyUI server for the tests: ``main.py --cpu`` in a subprocess, this checkout as its only pack.

The server runs from a temporary base directory whose ``custom_nodes`` holds a link to this
checkout, with every other custom node and the API nodes disabled, an in-memory database and no
previews, on a free loopback port. Every wait is bounded; a server that exits or stays silent
raises with the tail of its log. ``tests/conftest.py`` starts one per test session
(fixture ``comfy_server``).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACK = "ComfyUI-FewStep"
START_TIMEOUT_S = 300.0
#: a guard against a server that hangs, not a speed check: on a 2-core CPU the calibration example
#: with its end-to-end refinement (32 seeds, gradients through the SD1.5-shaped UNet) takes 5-6 min
RUN_TIMEOUT_S = 900.0


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """``main.py`` from ``comfy_root`` serving ``base``; ``extra_args`` are appended to its command line."""

    def __init__(self, comfy_root: Path, base: Path, extra_args: Sequence[str] = ()):
        self.base = base
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = base / "server.log"
        (base / "custom_nodes").mkdir(parents=True)
        (base / "custom_nodes" / PACK).symlink_to(ROOT, target_is_directory=True)
        command = [
            sys.executable, str(comfy_root / "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
            "--base-directory", str(base), "--disable-all-custom-nodes", "--whitelist-custom-nodes", PACK,
            "--disable-api-nodes", "--database-url", "sqlite:///:memory:", "--preview-method", "none",
            "--disable-auto-launch", *extra_args,
        ]  # fmt: skip
        self.log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            command, cwd=str(comfy_root), stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )

    # -------------------------------------------------------------------------------- plumbing

    def log_text(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def _check_alive(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(f"ComfyUI exited with {self.process.returncode}:\n{self.log_text()[-4000:]}")

    def get(self, path: str, timeout: float = 30.0):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
            return json.loads(response.read())

    def post(self, path: str, body: dict, timeout: float = 30.0) -> tuple[int, dict | None]:
        """(HTTP status, JSON answer or None when the answer is empty); errors are answers too."""
        request = urllib.request.Request(
            self.url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                data = response.read()
                return response.status, json.loads(data) if data else None
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def link_model(self, folder: str, path: Path) -> str:
        """Link ``path`` into ``models/<folder>`` (ComfyUI rescans a folder whose mtime changed)."""
        target = self.base / "models" / folder
        target.mkdir(parents=True, exist_ok=True)
        link = target / path.name
        if not link.exists():
            link.symlink_to(path)
        return path.name

    # -------------------------------------------------------------------------------- lifecycle

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                self.get("/system_stats", timeout=5.0)
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(1.0)
        raise RuntimeError(f"ComfyUI did not answer within {timeout:.0f} s:\n{self.log_text()[-4000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=20)
        self.log.close()

    # -------------------------------------------------------------------------------- prompts

    def queue(self, prompt: dict) -> tuple[int, dict | None]:
        """``POST /prompt``: (HTTP status, answer with ``prompt_id`` or ``node_errors``)."""
        return self.post("/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})

    def wait_for(self, prompt_id: str, timeout: float = RUN_TIMEOUT_S) -> dict:
        """The history entry of ``prompt_id`` once it has completed (successfully or not)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id]["status"].get("completed") is not None:
                return history[prompt_id]
            self._check_alive()
            time.sleep(0.5)
        raise TimeoutError(f"prompt did not finish within {timeout:.0f} s:\n{self.log_text()[-3000:]}")

    def run(self, prompt: dict, free_first: bool = True, timeout: float = RUN_TIMEOUT_S) -> tuple[dict, str]:
        """Queue ``prompt``; return its history entry and the server log written meanwhile."""
        if free_first:  # drop models and cached outputs of the previous prompt (bounded memory)
            self.post("/free", {"unload_models": True, "free_memory": True})
            time.sleep(1.0)
        start = len(self.log_text())
        status, body = self.queue(prompt)
        if status != 200:
            raise RuntimeError(f"ComfyUI refused the prompt ({status}): {body}")
        entry = self.wait_for(body["prompt_id"], timeout)
        time.sleep(0.2)  # let the worker's log lines after the run land
        return entry, self.log_text()[start:]
