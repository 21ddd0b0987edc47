"""``python -m comfyui_fewstep <command>``: the pack's command line, usable without ComfyUI.

Commands (each module owns its own arguments):
  demo     sample the bundled tiny teacher with our presets; writes a grid and a plot
  bench    run the tier-1 solver benchmark (from a source checkout)
  inspect  tell what a model file is (architecture, format, student, recipe)
  convert  turn a distilled-student pickle into safetensors + JSON without executing it
"""

from __future__ import annotations

import importlib
import logging
import runpy
import sys
from collections.abc import Sequence
from pathlib import Path

_COMMANDS = {
    "demo": ".demo.__main__",
    "inspect": ".distill_loaders.inspect",
    "convert": ".distill_loaders.convert_pickle",
}


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch to a sub-command's ``main(argv)``; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # the benchmark logs as the script does alone (warnings only); the other commands report progress
    level = logging.WARNING if argv[:1] == ["bench"] else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "bench":
        script = Path(__file__).resolve().parent / "bench" / "solver_benchmark.py"
        if not script.exists():
            print("the benchmark runs from a source checkout: bench/solver_benchmark.py is not here", file=sys.stderr)
            return 2
        sys.argv = [str(script), *rest]
        runpy.run_path(str(script), run_name="__main__")
        return 0
    if command not in _COMMANDS:
        print(f"unknown command {command!r}; expected one of: bench, {', '.join(_COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(_COMMANDS[command], __package__)
    return int(module.main(rest) or 0)
