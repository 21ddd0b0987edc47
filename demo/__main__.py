"""``python -m comfyui_fewstep demo``: sample the bundled tiny teacher with every preset.

Writes into ``--out`` (default ``./fewstep-demo``): ``grid.png`` (rows: samplers,
columns: NFE, last column: the reference), ``error_vs_nfe.png`` (when matplotlib is
installed), ``errors.json``; prints the error table. Needs only torch, safetensors, numpy.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from ..samplers.schedules import SCHEDULE_NAMES
from .presets import PRESET_NAMES, PRESETS
from .report import Progress, format_table, write_grid, write_json, write_plot
from .run import run_demo
from .teacher import load_teacher

__all__ = ["main"]

logger = logging.getLogger(__name__)

DEFAULT_NFES = (3, 4, 5, 6, 8, 10, 12, 15, 20)
QUICK_NFES = (3, 6, 12)
_SCHEDULES = tuple(s for s in SCHEDULE_NAMES if s not in ("custom", "ays", "gits"))


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return sorted(set(values))


def _name_list(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [n for n in names if n not in PRESET_NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown sampler(s) {unknown}; choose from {', '.join(PRESET_NAMES)}"
        )
    return names


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m comfyui_fewstep demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("fewstep-demo"),
                   help="output folder (default ./fewstep-demo)")
    p.add_argument("--quick", action="store_true",
                   help="a few seconds: 8 samples, NFE 3,6,12, 40-step reference")
    p.add_argument("--nfe", type=_int_list, default=None,
                   help=f"budgets (default {','.join(map(str, DEFAULT_NFES))})")
    p.add_argument("--samplers", type=_name_list, default=None, help=f"subset of {','.join(PRESET_NAMES)}")
    p.add_argument("--samples", type=int, default=None, help="samples per run (default 64; --quick 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the starting noise")
    p.add_argument("--schedule", choices=_SCHEDULES, default="logsnr_uniform",
                   help="one schedule for every sampler except fewstep_2m_unipc and fewstep_2m_skip, which "
                        "keep their own logsnr_window (default logsnr_uniform, as DPM-Solver recommends)")
    p.add_argument("--reference-steps", type=int, default=None,
                   help="3M steps of the reference (default 200)")
    p.add_argument("--show", type=int, default=4, help="samples shown per grid cell")
    p.add_argument("--weights", type=Path, default=None, help="another tiny-teacher safetensors file")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads while sampling (default 1: the network is too small to gain more)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; returns the exit code."""
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    nfes = args.nfe or list(QUICK_NFES if args.quick else DEFAULT_NFES)
    samples = (8 if args.quick else 64) if args.samples is None else args.samples
    ref_steps = (40 if args.quick else 200) if args.reference_steps is None else args.reference_steps
    if samples < 1 or ref_steps < 1:
        print(f"--samples and --reference-steps must be >= 1, got {samples} and {ref_steps}", file=sys.stderr)
        return 2
    presets = [p for p in PRESETS if args.samplers is None or p.name in args.samplers]
    start = time.perf_counter()
    try:  # before any sampling: a bad output folder or weights file fails at once
        args.out.mkdir(parents=True, exist_ok=True)
        probe = args.out / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        print(f"error: cannot write to the output folder {args.out} ({exc.strerror or exc}); give another "
              "with --out", file=sys.stderr)
        return 2
    try:
        denoiser = load_teacher(args.weights)
    except Exception as exc:  # noqa: BLE001 - any failure to read the weights is one line
        print(f"error: cannot load the teacher weights {args.weights} ({type(exc).__name__}: "
              f"{str(exc)[:200]}); give a tiny-teacher .safetensors file (tools/train_tiny_teacher.py "
              "writes one)", file=sys.stderr)
        return 2
    progress = Progress(1 + len(presets) * len(nfes), disable=args.no_progress)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, args.threads))
    try:
        result = run_demo(denoiser, nfes, presets, samples, args.seed, args.schedule, ref_steps, progress)
    finally:
        torch.set_num_threads(threads)
        progress.close()
    outputs = [
        write_grid(result, args.out / "grid.png", args.show),
        write_json(result, args.out / "errors.json"),
    ]
    plot = write_plot(result, args.out / "error_vs_nfe.png")
    if plot is not None:
        outputs.append(plot)
    print(format_table(result))
    print(f"\n{samples} samples, seed {args.seed}, {time.perf_counter() - start:.1f}s; wrote "
          + ", ".join(str(p) for p in outputs))
    return 0
