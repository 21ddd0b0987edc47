"""The pack's command line from its folder, without installing it.

Inside a ComfyUI install (ComfyUI-Manager or ``git clone`` into ``custom_nodes``) the pack is not an
installed package, so ``python -m comfyui_fewstep`` is not available. With ComfyUI's Python::

    python custom_nodes/ComfyUI-FewStep/tools/fewstep.py convert FILE.pkl
    python custom_nodes/ComfyUI-FewStep/tools/fewstep.py inspect FILE.safetensors

takes the same commands (``demo``, ``inspect``, ``convert``, ``bench``).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

PACKAGE = "comfyui_fewstep"
ROOT = Path(__file__).resolve().parents[1]


def load_pack():
    """This folder imported as ``comfyui_fewstep`` (the pack's modules use relative imports)."""
    spec = importlib.util.spec_from_file_location(PACKAGE, ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = module
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    load_pack()
    from comfyui_fewstep.cli import main  # noqa: E402 - after the pack is importable

    sys.argv[0] = "fewstep.py"
    raise SystemExit(main())
