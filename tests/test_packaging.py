"""Hygiene: layering, packaging metadata and the import-safe root."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the test extra installs tomli
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
CORE = ("samplers", "distill_loaders", "cuda_graph")
COMFY_MODULES = {"comfy", "comfy_api", "comfy_extras", "comfy_execution", "folder_paths", "nodes",
                 "node_helpers", "server", "execution", "latent_preview"}


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _imported_modules(path: Path, module_level_only: bool = False) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in tree.body if module_level_only else ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_core_never_imports_comfyui():
    offenders = []
    for folder in CORE + ("tools", "demo"):  # bench/ compares against ComfyUI and may import it
        for path in sorted((ROOT / folder).rglob("*.py")):
            hits = _imported_modules(path) & COMFY_MODULES
            if hits:
                offenders.append(f"{path.relative_to(ROOT)}: {sorted(hits)}")
    # root modules may reach ComfyUI only lazily, inside the entry point
    for path in sorted(ROOT.glob("*.py")):
        hits = _imported_modules(path, module_level_only=True) & COMFY_MODULES
        if hits:
            offenders.append(f"{path.relative_to(ROOT)}: {sorted(hits)}")
    assert not offenders, "only nodes/ may import ComfyUI:\n" + "\n".join(offenders)


def test_no_absolute_imports_of_the_pack_inside_the_pack():
    ours = {"samplers", "distill_loaders", "cuda_graph", "nodes", "comfyui_fewstep", "cli"}
    offenders = []
    for folder in CORE + ("nodes",):
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    if node.module.split(".")[0] in ours - {"nodes"}:
                        offenders.append(f"{path.relative_to(ROOT)}: from {node.module}")
    assert not offenders, "use relative imports inside the pack:\n" + "\n".join(offenders)


def test_core_imports_with_comfyui_blocked():
    blocked = ", ".join(repr(m) for m in sorted(COMFY_MODULES))
    code = (
        "import sys, importlib.util\n"
        f"for m in [{blocked}]: sys.modules[m] = None\n"
        f"spec = importlib.util.spec_from_file_location('comfyui_fewstep', {str(ROOT / '__init__.py')!r},"
        f" submodule_search_locations=[{str(ROOT)!r}])\n"
        "mod = importlib.util.module_from_spec(spec); sys.modules['comfyui_fewstep'] = mod;"
        " spec.loader.exec_module(mod)\n"
        "import importlib\n"
        f"for sub in {CORE!r}: importlib.import_module('comfyui_fewstep.' + sub)\n"
        "assert hasattr(mod, 'comfy_entrypoint') and not hasattr(mod, 'NODE_CLASS_MAPPINGS')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_requirements_mirror_project_dependencies():
    deps = _pyproject()["project"]["dependencies"]
    lines = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines() if line.strip()]
    assert lines == deps


def test_torch_requirement_admits_the_cpu_build():
    torch_dep = next(d for d in _pyproject()["project"]["dependencies"] if d.startswith("torch"))
    assert ">" in torch_dep and "2.14" not in torch_dep and "==" not in torch_dep


def test_every_subpackage_is_listed():
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    found = {"comfyui_fewstep"}
    for init in ROOT.rglob("__init__.py"):
        rel = init.parent.relative_to(ROOT)
        if rel.parts and rel.parts[0] in {"tests", "tools", "bench", "build"} | {p for p in rel.parts if p.startswith(".")}:
            continue
        found.add(".".join(("comfyui_fewstep",) + rel.parts))
    assert found == listed


def test_registry_metadata():
    comfy = _pyproject()["tool"]["comfy"]
    for key in ("PublisherId", "DisplayName", "Icon", "requires-comfyui"):
        assert key in comfy
    assert "GNU GENERAL PUBLIC LICENSE" in (ROOT / "LICENSE").read_text()[:200]


def test_the_command_line_runs_from_the_pack_folder(tmp_path):
    """Inside a ComfyUI install the pack is not an installed package: tools/fewstep.py runs the
    same commands from the folder (the loaders' messages name it for convert and inspect)."""
    import subprocess
    import sys
    from pathlib import Path

    from comfyui_fewstep.distill_loaders.errors import command

    root = Path(__file__).resolve().parents[1]
    env = {"PATH": "/usr/bin:/bin", "PYTHONNOUSERSITE": "1"}
    done = subprocess.run([sys.executable, "-S", str(root / "tools" / "fewstep.py"), "inspect", "--help"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "inspect" in done.stdout, done.stderr
    assert str(root / "tools" / "fewstep.py") in command("convert FILE")


def test_entrypoint_on_a_comfyui_without_the_v3_api_says_to_update():
    """A ComfyUI older than the V3 node API: one line saying which version is needed, no traceback
    and no request to report it."""
    code = (
        "import asyncio, importlib.util, logging, sys\n"
        "sys.modules['comfy_api'] = None\n"
        "logging.basicConfig(level=logging.INFO, format='%(levelname)s %(message)s')\n"
        f"spec = importlib.util.spec_from_file_location('comfyui_fewstep', {str(ROOT / '__init__.py')!r},"
        f" submodule_search_locations=[{str(ROOT)!r}])\n"
        "mod = importlib.util.module_from_spec(spec); sys.modules['comfyui_fewstep'] = mod;"
        " spec.loader.exec_module(mod)\n"
        "assert asyncio.run(mod.comfy_entrypoint()) is None\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "needs ComfyUI 0.3.64 or newer" in result.stderr
    assert "Traceback" not in result.stderr and "report" not in result.stderr


def test_a_plain_install_ships_the_pack_without_its_tests(tmp_path):
    """``pip install .`` (not editable): the wheel maps the root to ``comfyui_fewstep`` with every
    subpackage and the demo weights, leaves the tests out, and the installed copy samples."""
    import shutil

    pytest.importorskip("setuptools", minversion="77")
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "build", "*.egg-info", "__pycache__", "docs", "bench", "example_workflows"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    built = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "-w", str(tmp_path / "dist"), str(source)],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("comfyui_fewstep-*.whl")
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if n.startswith(("tests/", "comfyui_fewstep/tests/"))]
    for package in _pyproject()["tool"]["setuptools"]["packages"]:
        assert package.replace(".", "/") + "/__init__.py" in names
    assert "comfyui_fewstep/demo/tiny_teacher.safetensors" in names

    site = tmp_path / "site"
    installed = subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(site),
                                str(wheel)], capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr
    code = (
        "import sys, torch, comfyui_fewstep\n"
        f"assert comfyui_fewstep.__file__.startswith({str(site)!r}), comfyui_fewstep.__file__\n"
        "from comfyui_fewstep.samplers import sample_dpmpp_multistep\n"
        "x = sample_dpmpp_multistep(lambda x, s, **k: 0.0 * x, torch.ones(1, 2),"
        " torch.tensor([1.0, 0.5, 0.0]), disable=True)\n"
        "assert torch.equal(x, torch.zeros(1, 2)), x\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    ran = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert ran.returncode == 0, ran.stderr
