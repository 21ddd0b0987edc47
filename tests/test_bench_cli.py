"""The solver benchmark as the command line runs it: its log level and its COMFYUI_PATH check."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["bench", "--quick", "--no-tier2", "--samples", "16"]


def _run_cli(args: list[str], tmp_path: Path, comfyui_path: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "COMFYUI_PATH"}
    if comfyui_path is not None:
        env["COMFYUI_PATH"] = comfyui_path
    return subprocess.run([sys.executable, "-m", "comfyui_fewstep", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


def test_bench_logs_warnings_only(tmp_path):
    """Run through the command line, the benchmark prints its table and progress, not INFO records."""
    done = _run_cli(QUICK, tmp_path, None)
    assert done.returncode == 0, done.stderr
    assert "| NFE |" in done.stdout
    assert "sd15/gmm16 done" in done.stderr
    assert not [line for line in done.stderr.splitlines() if line.startswith("INFO ")], done.stderr


@pytest.mark.parametrize("make_comfy_folder", [False, True], ids=["no-checkout", "not-importable"])
def test_bench_refuses_an_unusable_comfyui_path(tmp_path, make_comfy_folder):
    """A COMFYUI_PATH the benchmark cannot use stops it with a message, not tables without ComfyUI."""
    fake = tmp_path / "ComfyUI"
    (fake / "comfy").mkdir(parents=True)
    if not make_comfy_folder:
        (fake / "comfy").rmdir()
    done = _run_cli(QUICK, tmp_path, str(fake))
    assert done.returncode != 0
    assert "| NFE |" not in done.stdout
    assert f"COMFYUI_PATH={fake}" in done.stderr
    assert ("not a ComfyUI checkout" in done.stderr) != make_comfy_folder
    assert "Traceback" not in done.stderr
