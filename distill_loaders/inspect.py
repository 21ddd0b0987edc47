"""``python -m comfyui_fewstep inspect FILE [--json]``: what a model file is, without ComfyUI.

Prints layout, base architecture, prediction type, student and recipe (with the reasons), dtypes,
parameter count and missing/unexpected keys. Only the header is read (safetensors) so it is fast
on multi-GB files.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from .detect import detect
from .errors import StudentLoadError
from .recipes import recipe_sigma_values, recipe_timesteps
from .specs import RECIPES, recipe_names

__all__ = ["format_report", "main"]


def format_report(det, limit: int = 8, recipe=None, steps: int | None = None) -> str:
    """Human-readable multi-line report for a :class:`~.detect.Detection`: its recipe, or the
    ``recipe`` it is sampled with (custom timesteps, TCD eta) at ``steps`` steps."""
    recipe = recipe or (RECIPES.get(det.recipe) if det.recipe else None)
    lines = [
        f"file:        {det.path}",
        f"container:   {det.container}",
        f"layout:      {det.layout}",
        f"arch:        {det.arch}",
        f"parameters:  {det.parameters:,}" + (f" (LoRA rank {det.lora_rank})" if det.lora_rank else ""),
        f"dtypes:      {', '.join(f'{k} x{v}' for k, v in sorted(det.dtypes.items()))}",
    ]
    if recipe:
        sigma_values = recipe_sigma_values(recipe, steps)
        sig = ", ".join(f"{s:.4f}" for s in sigma_values)
        ts = ", ".join(f"{t:g}" for t in recipe_timesteps(recipe, steps))
        lines += [
            f"student:     {recipe.student} ({det.confidence})",
            f"recipe:      {recipe.name}: {recipe.prediction} prediction, {len(sigma_values) - 1} step(s), "
            f"{recipe.step_rule} steps, cfg {recipe.cfg:g}"
            + (f", eta {recipe.eta:g}" if recipe.step_rule == "tcd" else ""),
            f"timesteps:   [{ts}]" if ts else f"sigma_init:  {recipe.sigma_init}",
            f"sigmas:      [{sig}]",
            f"first noise: {recipe.first_noise}",
            f"source:      {recipe.source}",
        ]
        if recipe.note:
            lines.append(f"note:        {recipe.note}")
    else:
        lines.append("student:     not identified; pick a recipe: " + ", ".join(recipe_names()))
    lines.append("why:")
    lines += [f"  - {r}" for r in det.reasons]
    for label, items in (
        ("missing", det.missing),
        ("unexpected", det.unexpected),
        ("mismatched", det.mismatched),
    ):
        if items:
            shown = ", ".join(items[:limit]) + (
                f", ... (+{len(items) - limit})" if len(items) > limit else ""
            )
            lines.append(f"{label} keys ({len(items)}): {shown}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m comfyui_fewstep inspect", description=__doc__.splitlines()[0]
    )
    parser.add_argument("file", help="a .safetensors / .bin / .pt file or a diffusers folder")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--recipe", default=None, help="force a recipe (checked against the file)")
    args = parser.parse_args(argv)
    try:
        det = detect(args.file, override=args.recipe)
    except (StudentLoadError, ValueError) as e:
        if args.json:
            print(json.dumps({"error": str(e)}))
        else:
            print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(det.to_json(), indent=1))
    else:
        print(format_report(det))
    return 0
