"""Calibrated schedules vs ComfyUI's best built-in sampler x scheduler on exact Gaussian mixtures.

Usage::

    python bench/calibration_benchmark.py [--quick] [--out docs/benchmarks.md]

For every problem of the tier-1 benchmark (``bench/solver_benchmark.py``) and NFE in 4, 5, 6, 8,
each calibratable preset is calibrated on its own noise (32 seeds drawn independently of the
evaluation noise) with :func:`comfyui_fewstep.samplers.calibration.calibrate`, then evaluated on
the held-out evaluation trajectories against the exact ODE solution. The preset reported per cell
is the one with the lowest *calibration* error (no selection on the evaluation set). Baselines
come from the solver benchmark's own code: every ComfyUI sampler x scheduler (with
``COMFYUI_PATH``) or the local Euler/DDIM loops, and our presets on fixed schedules.
When the bundled tiny teacher (``comfyui_fewstep.demo``) has weights, it is benchmarked the same
way with a 500-step reference.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _comfy
import solver_benchmark as sb
from _harness import import_package, measure

NFES = (4, 5, 6, 8)
TARGET_RATIO = 0.25
CALIBRATION_SEEDS = 32
CALIBRATION_SEED = 1000  # the evaluation noise uses seed 0
CALIBRATED = (
    ("2M", "multistep", {"order": 2}),
    ("3M", "multistep", {"order": 3}),
    ("3M+UniC(bh2)", "multistep", {"order": 3, "corrector": "bh2"}),
    ("2M+UniC(bh2)", "multistep", {"order": 2, "corrector": "bh2"}),
)
BEGIN = "<!-- calibration-benchmark:begin -->"
END = "<!-- calibration-benchmark:end -->"


def calibrate_problem(problem, nfes, cal, analytic):
    """Calibrated rows for one problem: (nfe, label, median, p90, flips, calibration error, cost)."""
    p = problem.range.parameterization()
    g = torch.Generator().manual_seed(CALIBRATION_SEED)
    x_cal = problem.mixture.sample(CALIBRATION_SEEDS, problem.range.sigma_max, problem.form, generator=g)
    teacher = cal.run_teacher(problem.denoiser(), x_cal, p, cal.DEFAULTS["grid_points"], cal.DEFAULTS["substeps"])
    rows = []
    for nfe in nfes:
        for label, solver, options in CALIBRATED:
            spec = cal.SolverSpec(solver, options, label)
            t0 = time.perf_counter()
            res = cal.calibrate(problem.denoiser(), x_cal, p, nfe, spec, teacher=teacher)
            seconds = time.perf_counter() - t0 + teacher.seconds
            model = problem.denoiser()
            out = spec.run(model, problem.x_start, torch.tensor(res.sigmas, dtype=torch.float64), p, nfe=nfe)
            assert model.nfe == nfe, (label, nfe, model.nfe)
            med, p90, flips = measure(problem, out, analytic.per_sample_rms)
            cost = dict(res.cost, teacher_nfe=teacher.nfe, total_nfe=teacher.nfe + res.cost["search_nfe"],
                        seconds=seconds)
            rows.append((nfe, label, med, p90, flips, res.error, cost, res.sigmas))
    return rows


def run_tiny_teacher(nfes, cal, lines):
    """The bundled tiny EDM teacher, if its weights are present: calibrated 2M vs fixed schedules."""
    try:
        from comfyui_fewstep.demo import load_teacher

        net = load_teacher()
    except (ImportError, FileNotFoundError, ValueError) as exc:
        lines += [f"Tiny trained teacher: not run ({type(exc).__name__}: {exc}).", ""]
        return
    from comfyui_fewstep.samplers.parameterization import Parameterization
    from comfyui_fewstep.samplers.schedules import get_sigmas

    p = Parameterization("ve", float(net.sigma_min), float(net.sigma_max), "edm")
    shape = (1, net.config.in_channels if hasattr(net.config, "in_channels") else 1, 16, 16)

    def noise(n, seed):
        return torch.randn((n, *shape[1:]), generator=torch.Generator().manual_seed(seed)) * p.sigma_max

    with torch.no_grad():
        x_cal, x_eval = noise(16, CALIBRATION_SEED), noise(64, 0)
        ref = cal.SolverSpec("multistep", {"order": 3}).run(net, x_eval, get_sigmas("logsnr_uniform", 500, p).double(), p)
        lines += ["### Tiny trained teacher (EDM, 8x8 digits), median per-sample RMS error vs a 500-step 3M reference", "",
                  "| NFE | calibrated 2M | 2M best fixed schedule | ratio | calibration cost (model calls, s) |",
                  "|---|---|---|---|---|"]
        spec = cal.SolverSpec("multistep", {"order": 2}, "2M")
        for nfe in nfes:
            res = cal.calibrate(net, x_cal, p, nfe, spec)

            def err(sig, nfe=nfe):
                out = spec.run(net, x_eval, sig, p, nfe=nfe)
                return float((out - ref).reshape(out.shape[0], -1).pow(2).mean(1).sqrt().median())

            ours = err(torch.tensor(res.sigmas, dtype=torch.float64))
            fixed = {n: err(get_sigmas(n, nfe, p).double()) for n in cal.BASELINE_SCHEDULES}
            name = min(fixed, key=fixed.get)
            lines.append(f"| {nfe} | {ours:.4f} | {fixed[name]:.4f} ({name}) | {ours / fixed[name]:.2f} | "
                         f"{res.cost['total_nfe']}, {res.cost['seconds']:.1f} |")
    lines.append("")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 problems, 256 samples, a reduced ComfyUI grid")
    ap.add_argument("--out", type=Path, default=None, help="markdown file to update (e.g. docs/benchmarks.md)")
    ap.add_argument("--samples", type=int, default=None, help="evaluation trajectories per problem (256 / 512)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    pkg = import_package()
    from comfyui_fewstep.samplers import analytic
    from comfyui_fewstep.samplers import calibration as cal

    comfy = _comfy.import_comfy()
    n_samples = args.samples or (256 if args.quick else 512)
    problems_spec = sb.QUICK_PROBLEMS if args.quick else sb.FULL_PROBLEMS
    bench = sb.Bench(pkg, NFES)
    samplers, schedulers = [], []
    if comfy is not None:
        samplers, _ = _comfy.sampler_list(comfy)
        schedulers = _comfy.scheduler_names(comfy)
        if args.quick:
            samplers = [s for s in samplers if s.name in sb.QUICK_COMFY_SAMPLERS]
            schedulers = [s for s in schedulers if s in sb.QUICK_COMFY_SCHEDULERS]
    base_source = "comfy" if comfy is not None else "local"
    base_name = "ComfyUI best sampler x scheduler" if comfy is not None else "local Euler/DDIM, best schedule"
    lines = [BEGIN, "## Calibrated schedules", ""]
    body: list[str] = []
    cells = []
    for range_name, mixture_name in problems_spec:
        problem = analytic.make_problem(range_name, mixture_name, n_samples=n_samples, seed=0)
        bench.run_presets(problem)
        if comfy is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                bench.run_comfy(problem, comfy, samplers, schedulers)
        else:
            bench.run_local(problem)
        rows = calibrate_problem(problem, NFES, cal, analytic)
        body += [f"### {problem.name}", "",
                 (f"| NFE | {base_name} | median / p90 / flips | ours, fixed schedule (best) | median | calibrated "
                 "(preset chosen by calibration error) | median / p90 / flips | ratio to ComfyUI | "
                 "calibration cost: model calls (teacher + search), s |"),
                 "|---|---|---|---|---|---|---|---|---|"]
        for nfe in NFES:
            b = sb.best(bench.results, problem.name, base_source, nfe, deterministic_only=True)
            f = sb.best(bench.results, problem.name, "ours", nfe)
            mine = min((r for r in rows if r[0] == nfe), key=lambda r: r[5])
            ratio = mine[2] / b.median if b and b.median > 0 else math.nan
            cells.append((problem.name, nfe, ratio, mine[4] <= (b.flip_rate if b else 1.0) + 1e-12))
            c = mine[6]
            body.append(
                f"| {nfe} | {b.label if b else '-'} | {sb.fmt(b)} | {f.label if f else '-'} | "
                f"{f.median:.4f} | {mine[1]} | {mine[2]:.4f} / {mine[3]:.4f} / {mine[4]:.3f} | {ratio:.2f} | "
                f"{c['total_nfe']} ({c['teacher_nfe']} + {c['search_nfe']}), {c['seconds']:.1f} |"
            )
        body += ["", "All calibrated presets (median held-out error / calibration error):", "",
                 "| preset | " + " | ".join(f"NFE {n}" for n in NFES) + " |", "|---" * (len(NFES) + 1) + "|"]
        for label, *_ in CALIBRATED:
            cells_p = [next(f"{r[2]:.4f} / {r[5]:.4f}" for r in rows if r[0] == n and r[1] == label) for n in NFES]
            body.append(f"| {label} | " + " | ".join(cells_p) + " |")
        body.append("")
        print(f"[{time.time() - t0:6.1f} s] {problem.name} done", file=sys.stderr)
    run_tiny_teacher(NFES, cal, body)
    elapsed = time.time() - t0
    command = "python bench/calibration_benchmark.py" + (" --quick" if args.quick else "")
    if comfy is not None:
        command = "COMFYUI_PATH=<ComfyUI 0.3.64 checkout> " + command
    met = [c for c in cells if c[2] <= TARGET_RATIO and c[3]]
    lines += [
        (f"Produced by `{command}` ({platform.python_implementation()} {platform.python_version()}, torch "
        f"{torch.__version__}, CPU, {elapsed:.0f} s). Calibration: {CALIBRATION_SEEDS} seeds independent of the "
        f"{n_samples} evaluation trajectories, teacher {cal.DEFAULTS['grid_points']} grid points x "
        f"{cal.DEFAULTS['substeps']} substeps, search budget {cal.DEFAULTS['search_nfe']} model calls; the "
        "teacher is shared by the presets and NFEs of a problem, and its cost is counted in every row. "
        "Errors: per-sample RMS against the exact ODE solution at sigma = 0; cells median / p90 / mode-flip rate."),
        "",
        (f"Target: calibrated median <= {TARGET_RATIO} x the {base_name} median with no more flips: met in "
        f"{len(met)} of {len(cells)} (problem, NFE) cells. Median ratio over cells: "
        f"{sorted(c[2] for c in cells)[len(cells) // 2]:.2f}."),
        "",
        *body,
        END,
    ]
    section = "\n".join(lines) + "\n"
    print(section)
    if args.out is not None:
        text = args.out.read_text() if args.out.exists() else "# Benchmarks\n\n"
        if BEGIN in text and END in text:
            head, rest = text.split(BEGIN, 1)
            text = head + section.rstrip("\n") + rest.split(END, 1)[1]
        else:
            text = text.rstrip("\n") + "\n\n" + section
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
