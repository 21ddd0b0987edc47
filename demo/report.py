"""Outputs of the demo: the error table, the sample grid (PNG) and the error-vs-NFE plot."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from .image import grid, tile, to_uint8, write_png
from .run import DemoResult

__all__ = ["Progress", "format_table", "write_grid", "write_json", "write_plot"]

logger = logging.getLogger(__name__)


def format_table(result: DemoResult) -> str:
    """Median per-sample RMSE to the reference; ``*`` marks runs that used fewer calls."""
    name_width = max(len(p.name) for p in result.presets) + 2
    head = "sampler".ljust(name_width) + "".join(f"{f'NFE {n}':>10}" for n in result.nfes)
    lines = [
        (
            f"median per-sample RMSE to the reference ({result.reference_steps}-step dpmpp_3m, "
            f"{result.schedule} schedule unless the preset has its own, images in [-1, 1])"
        ),
        head,
        "-" * len(head),
    ]
    for preset in result.presets:
        cells = []
        for n in result.nfes:
            mark = "*" if result.calls[preset.name][n] < n else " "
            cells.append(f"{result.errors[preset.name][n]:9.4f}{mark}")
        lines.append(preset.name.ljust(name_width) + "".join(cells))
    if any(result.calls[p.name][n] < n for p in result.presets for n in result.nfes):
        lines.append("* fewer model calls than the budget (Heun makes 2 * steps - 1 calls)")
    return "\n".join(lines)


def write_grid(result: DemoResult, path: Path, show: int = 4) -> Path:
    """PNG grid: one row per sampler, one column per NFE, the reference as the last column.

    Each cell tiles the first ``show`` samples (square-ish); the layout is also stored in
    the PNG's ``tEXt`` chunks (``Rows``, ``Columns``).
    """
    show = max(1, min(show, result.reference.shape[0]))
    per_row = max(1, round(show**0.5))
    if per_row * per_row < show:
        per_row += 1

    def cell(x):
        return tile(to_uint8(x[:show]), per_row)

    ref_cell = cell(result.reference)
    cells = [[cell(result.samples[p.name][n]) for n in result.nfes] + [ref_cell] for p in result.presets]
    text = {
        "Title": "comfyui_fewstep demo: samples of the tiny digits teacher",
        "Rows": ", ".join(p.name for p in result.presets),
        "Columns": ", ".join(f"NFE {n}" for n in result.nfes) + ", reference",
    }
    return write_png(path, grid(cells, scale=4), text=text)


def write_plot(result: DemoResult, path: Path) -> Path | None:
    """Error-vs-NFE plot (log-log) with matplotlib; None (and a log line) when it is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("matplotlib is not installed: skipping the error-vs-NFE plot")
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for k, preset in enumerate(result.presets):
        xs = [result.calls[preset.name][n] for n in result.nfes]
        ys = [result.errors[preset.name][n] for n in result.nfes]
        ax.plot(xs, ys, marker="osv^DPX"[k % 7], markersize=5, linestyle="--" if preset.baseline else "-",
                label=preset.name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(result.nfes, [str(n) for n in result.nfes])
    ax.minorticks_off()
    ax.set_xlabel("model calls (NFE)")
    ax.set_ylabel("median RMSE to reference")
    own = ", ".join(f"{p.name}: {p.schedule}" for p in result.presets if p.schedule)
    ax.set_title(f"tiny digits teacher, {result.schedule} schedule" + (f" ({own})" if own else ""), fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_json(result: DemoResult, path: Path) -> Path:
    """The numbers behind the table, for scripts."""
    data = {
        "schedule": result.schedule,
        "reference_steps": result.reference_steps,
        "nfes": result.nfes,
        "errors": result.errors,
        "calls": result.calls,
        "seconds": round(result.seconds, 2),
    }
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


class Progress:
    """A progress bar: tqdm when installed, else a one-line bar on stderr."""

    def __init__(self, total: int, disable: bool = False) -> None:
        self.total, self.done, self.disable = total, 0, disable
        self._tqdm = None
        if disable:
            return
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return
        self._tqdm = tqdm(total=total, desc="sampling", leave=False)

    def __call__(self, label: str) -> None:
        self.done += 1
        if self.disable:
            return
        if self._tqdm is not None:
            self._tqdm.set_postfix_str(label, refresh=False)
            self._tqdm.update(1)
            return
        width = 30
        filled = width * self.done // max(1, self.total)
        bar = "#" * filled + "." * (width - filled)
        sys.stderr.write(f"\rsampling [{bar}] {self.done}/{self.total} {label:<28}")
        if self.done >= self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
