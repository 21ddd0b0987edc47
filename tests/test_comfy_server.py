"""A real ComfyUI server loads the pack: no import failure, nodes served with tooltips, prompts run.

The server runs from a temporary base directory whose ``custom_nodes`` holds a link to this
checkout, with every other custom node disabled, on a free loopback port; it is stopped at the
end of the module (bounded waits throughout).
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
from pathlib import Path

import pytest

pytestmark = pytest.mark.comfy

ROOT = Path(__file__).resolve().parents[1]
PACK = "ComfyUI-FewStep"
START_TIMEOUT_S = 300.0
RUN_TIMEOUT_S = 120.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, comfy_root: Path, base: Path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = base / "server.log"
        (base / "custom_nodes").mkdir(parents=True)
        (base / "custom_nodes" / PACK).symlink_to(ROOT, target_is_directory=True)
        command = [
            sys.executable,
            str(comfy_root / "main.py"),
            "--cpu",
            "--listen",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--base-directory",
            str(base),
            "--disable-all-custom-nodes",
            "--whitelist-custom-nodes",
            PACK,
            "--disable-api-nodes",
            "--database-url",
            "sqlite:///:memory:",
            "--preview-method",
            "none",
            "--disable-auto-launch",
        ]
        self.log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            command, cwd=str(comfy_root), stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def log_text(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def get(self, path: str, timeout: float = 30.0):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
            return json.loads(response.read())

    def post(self, path: str, body: dict, timeout: float = 30.0) -> tuple[int, dict]:
        request = urllib.request.Request(
            self.url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"ComfyUI exited with {self.process.returncode}:\n{self.log_text()[-4000:]}"
                )
            try:
                self.get("/system_stats", timeout=5.0)
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(1.0)
        raise RuntimeError(
            f"ComfyUI did not answer within {START_TIMEOUT_S:.0f} s:\n{self.log_text()[-4000:]}"
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=20)
        self.log.close()


@pytest.fixture(scope="module")
def server(comfy, tmp_path_factory):
    srv = Server(Path(comfy), tmp_path_factory.mktemp("comfy_base"))
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def our_node_ids(comfy):
    from comfyui_fewstep.nodes import node_list

    return [cls.GET_SCHEMA().node_id for cls in node_list()]


def test_pack_imports_without_errors(server):
    log = server.log_text()
    bad = [
        line
        for line in log.splitlines()
        if ("IMPORT FAILED" in line or "Cannot import" in line) and PACK in line
    ]
    assert not bad, "\n".join(bad)
    assert "ComfyUI-FewStep: the nodes failed to load" not in log
    assert "Traceback" not in log.split("Import times for custom nodes")[-1].split("Starting server")[0]


def test_every_node_is_served_with_tooltips(server, our_node_ids):
    info = server.get("/object_info")
    for node_id in our_node_ids:
        assert node_id in info, node_id
        node = info[node_id]
        assert node["python_module"] == f"custom_nodes.{PACK}"
        assert node["description"]
        for section in ("required", "optional"):
            for name, spec in node["input"].get(section, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{node_id}.{name}"
        assert node["output_tooltips"] and all(node["output_tooltips"]), node_id


def test_ksampler_dropdowns_show_the_presets(server):
    from comfyui_fewstep.nodes.ksampler_presets import SAMPLER_PRESETS, SCHEDULER_PRESETS

    ksampler = server.get("/object_info/KSampler")["KSampler"]["input"]["required"]
    samplers, schedulers = ksampler["sampler_name"][0], ksampler["scheduler"][0]
    assert set(SAMPLER_PRESETS) <= set(samplers) and set(SCHEDULER_PRESETS) <= set(schedulers)
    assert samplers[:3] == ["euler", "euler_cfg_pp", "euler_ancestral"]  # built-ins first, unchanged
    select = server.get("/object_info/KSamplerSelect")["KSamplerSelect"]["input"]["required"]
    assert set(SAMPLER_PRESETS) <= set(select["sampler_name"][0])


def _sampler_prompt(**widgets) -> dict:
    inputs = {
        "solver": "multistep",
        "order": 3,
        "solver_type": "midpoint",
        "prediction": "dpmsolver++",
        "lower_order_final": True,
        "lower_order_final_steps": 10,
        "euler_at_final": False,
        "final_step": "zero",
        "eta": 0.0,
        "s_noise": 1.0,
        "corrector": "none",
        "thresholding": "none",
        "threshold_percentile": 0.995,
        "threshold_max": 1.0,
    }
    inputs.update(widgets)
    return {
        "1": {"class_type": "FewStepDPMSolverSampler", "inputs": inputs},
        "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}},
    }


def test_a_prompt_with_our_node_executes(server):
    status, body = server.post(
        "/prompt", {"prompt": _sampler_prompt(corrector="bh2"), "client_id": uuid.uuid4().hex}
    )
    assert status == 200, body
    prompt_id = body["prompt_id"]
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        history = server.get(f"/history/{prompt_id}")
        if prompt_id in history and history[prompt_id]["status"].get("completed") is not None:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"prompt did not finish within {RUN_TIMEOUT_S:.0f} s:\n{server.log_text()[-3000:]}")
    assert history[prompt_id]["status"]["status_str"] == "success", history[prompt_id]["status"]


def test_invalid_combination_is_rejected_with_our_message(server):
    status, body = server.post("/prompt", {"prompt": _sampler_prompt(solver="adaptive", order=1)})
    assert status == 400
    errors = body["node_errors"]["1"]["errors"]
    assert any("order to 2 or 3" in (e.get("details", "") + e.get("message", "")) for e in errors), errors
