"""Command line: ``python -m comfyui_fewstep {bench,demo,inspect,convert} ...``."""

from __future__ import annotations

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
