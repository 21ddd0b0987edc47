"""Benchmark harness: run a sampler on an analytic problem and measure it against the reference."""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "comfyui_fewstep"


def import_package() -> Any:
    """Import this checkout as ``comfyui_fewstep`` (as ComfyUI's loader and the tests do)."""
    module = sys.modules.get(PACKAGE)
    if module is not None:
        return module
    spec = importlib.util.spec_from_file_location(
        PACKAGE, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = module
    spec.loader.exec_module(module)
    return module


@dataclass
class Result:
    """One (problem, method, schedule, target NFE) measurement."""

    problem: str
    source: str  # "ours", "comfy", "local"
    method: str
    schedule: str
    target_nfe: int
    nfe: int
    median: float
    p90: float
    flip_rate: float
    stochastic: bool = False
    error: str = ""
    #: per trajectory, whether it ended in another mixture component than the reference
    changed: torch.Tensor | None = field(default=None, repr=False, compare=False)
    #: total-variation distance of the output's component proportions to the reference's
    composition: float = math.nan

    @property
    def label(self) -> str:
        return f"{self.method} / {self.schedule}"

    @property
    def ok(self) -> bool:
        return not self.error and math.isfinite(self.median)

    @property
    def within_budget(self) -> bool:
        """Finished without error and consumed no more model calls than the target NFE."""
        return self.ok and self.nfe <= self.target_nfe


def measure(problem: Any, out: torch.Tensor, per_sample_rms: Callable) -> tuple[float, float, float]:
    """Median and 90th-percentile per-sample RMS error at sigma = 0, and the mode-flip rate."""
    med, p90, changed, _ = measure_samples(problem, out, per_sample_rms)
    return med, p90, float(changed.to(torch.float64).mean())


def measure_samples(
    problem: Any, out: torch.Tensor, per_sample_rms: Callable
) -> tuple[float, float, torch.Tensor, torch.Tensor]:
    """As :func:`measure`, with the mode flips per trajectory (a non-finite sample counts as one) and
    the component each output is nearest to (a non-finite one placed after ``nan_to_num``)."""
    out = out.to(torch.float64)
    finite = torch.isfinite(out.reshape(out.shape[0], -1)).all(dim=1)
    err = per_sample_rms(torch.where(finite[:, None], out, torch.zeros_like(out)), problem.reference)
    err = torch.where(finite, err, torch.full_like(err, math.inf))
    comp = problem.mixture.nearest_component(torch.nan_to_num(out))
    changed = (comp != problem.reference_component) | ~finite
    p90 = float(torch.quantile(err, 0.9)) if bool(finite.all()) else math.inf
    return float(err.median()), p90, changed, comp


def composition_distance(problem: Any, comp: torch.Tensor) -> float:
    """Total-variation distance between the mixture-component proportions of the outputs (their
    nearest components ``comp``, as :func:`measure_samples` returns them) and of the reference,
    ``1/2 sum_k |p_k - q_k|``: 0 when the samples that change component only swap places (the mix of
    components is kept), at most the flip rate when they all move one way."""
    reference = problem.reference_component
    k = int(max(int(reference.max()), int(comp.max()))) + 1
    p = torch.bincount(comp, minlength=k).to(torch.float64) / comp.numel()
    q = torch.bincount(reference, minlength=k).to(torch.float64) / reference.numel()
    return 0.5 * float((p - q).abs().sum())


def paired_flips(ours: Result, other: Result) -> tuple[int, int, float]:
    """Trajectories that change component with ``ours`` only and with ``other`` only, and the exact
    two-sided McNemar p-value of the difference (the discordant pairs split ``Binomial(k, 1/2)`` when
    the two flip rates are equal; McNemar 1947)."""
    if ours.changed is None or other.changed is None:
        raise ValueError("paired_flips needs results measured per trajectory")
    only_ours = int((ours.changed & ~other.changed).sum())
    only_other = int((~ours.changed & other.changed).sum())
    k = only_ours + only_other
    tail = sum(math.comb(k, i) for i in range(min(only_ours, only_other) + 1)) / 2.0**k if k else 1.0
    return only_ours, only_other, min(1.0, 2.0 * tail)


def euler_ode(model: Callable, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Euler on ``dx/dsigma = (x - D) / sigma`` (the probability-flow ODE in VE and flow form)."""
    s = [float(v) for v in sigmas]
    for i in range(len(s) - 1):
        denoised = model(x, torch.full((x.shape[0],), s[i], dtype=x.dtype))
        x = x + (x - denoised) / s[i] * (s[i + 1] - s[i])
    return x


def ddim(model: Callable, x: torch.Tensor, sigmas: torch.Tensor, form: str) -> torch.Tensor:
    """DDIM / first-order DPM-Solver++: ``x_t = (sigma_t / sigma_s) x_s + (alpha_t - alpha_s sigma_t / sigma_s) D``."""
    s = [float(v) for v in sigmas]
    for i in range(len(s) - 1):
        denoised = model(x, torch.full((x.shape[0],), s[i], dtype=x.dtype))
        a_s, a_t = (1.0, 1.0) if form == "ve" else (1.0 - s[i], 1.0 - s[i + 1])
        ratio = s[i + 1] / s[i]
        x = ratio * x + (a_t - a_s * ratio) * denoised
    return x


def check_out(path: Path | None) -> None:
    """Stop before any work when ``--out`` cannot be written (its folder is missing, or it is a folder)."""
    if path is not None and (not path.parent.is_dir() or path.is_dir()):
        raise SystemExit(f"--out {path}: the folder {path.parent} does not exist, or the path is a folder; "
                         "give a markdown file in an existing folder")


def out_arguments(doc: str, argv: list[str] | None) -> argparse.Namespace:
    """The ``--out`` argument of a script that writes one section of ``docs/benchmarks.md``, checked."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="markdown file to update (docs/benchmarks.md)")
    args = ap.parse_args(argv)
    check_out(args.out)
    return args


def publish(lines: list[str], path: Path | None, begin: str, end: str, after: str | None = None) -> None:
    """Print the markdown section ``lines`` (from ``begin`` to ``end``) and, with ``path``, put it in that
    file (:func:`write_section`)."""
    section = "\n".join(lines) + "\n"
    print(section)
    if path is not None:
        write_section(path, section, begin, end, after)


def write_section(path: Path, section: str, begin: str, end: str, after: str | None = None) -> None:
    """Put ``section`` (which starts with ``begin`` and ends with ``end``) into the markdown file
    ``path``: in place of the previous one, else right after the marker ``after`` when the file
    has it, else at the end."""
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    section = section.rstrip("\n")
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1]
    elif after is not None and after in text:
        head, rest = text.split(after, 1)
        text = head + after + "\n\n" + section + rest
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)
