"""Calibrated schedules vs ComfyUI's best built-in sampler x scheduler on exact Gaussian mixtures.

Usage::

    python bench/calibration_benchmark.py [--quick] [--out docs/benchmarks.md]

For every problem of the tier-1 benchmark (``bench/solver_benchmark.py``) and NFE in 4, 5, 6, 8, 10,
each calibratable preset is calibrated on its own noise (32 seeds drawn independently of the
evaluation noise) with :func:`comfyui_fewstep.samplers.calibration.calibrate`, then evaluated on
the held-out evaluation trajectories against the exact ODE solution. The preset reported per cell
is the one with the lowest *calibration* error (no selection on the evaluation set). Baselines
come from the solver benchmark's own code: every ComfyUI sampler x scheduler (with
``COMFYUI_PATH``) or the local Euler/DDIM loops, and our presets on fixed schedules.
The bundled tiny trained teacher (``comfyui_fewstep.demo``, tier 2 of the solver benchmark:
8x8 digits, EDM, 128 evaluation trajectories against a 500-step reference, 128 calibration
seeds: the refinement generalises better from more) is benchmarked the same way; mode flips are
not defined for it. The fitted presets include the mean first step (``first_step="mean"``) and
its end-to-end refinement (``refine_iterations``, as the node's ``refine_iterations``).
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
from _harness import check_out, import_package, measure, publish
from _tier2 import make_teacher_problem

NFES = (4, 5, 6, 8, 10)
TARGET_NFES = (4, 5, 6, 8)  # the calibration target's cells
TARGET_RATIO = 0.25
SOLVER_TARGET_NFES = (5, 6, 8, 10)  # the solver benchmark's target window, for comparison
SOLVER_TARGET_RATIO = 0.5
CALIBRATION_SEEDS = 32
#: refined on 32 / 64 / 128 seeds, the teacher's held-out error at 4 NFE was 0.0232 / 0.0217 / 0.0215
TEACHER_CALIBRATION_SEEDS = 128
CALIBRATION_SEED = 1000  # the evaluation noise uses seed 0
#: Gauss-Newton iterations of the refined preset (``calibrate(refine_iterations=...)``; the
#: library's default, ``fitted_refine.DEFAULT_ITERATIONS``, and the node tooltip's suggestion)
REFINE_ITERATIONS = 8
#: (label, solver, options, refine_iterations)
CALIBRATED = (
    ("2M fitted", "fitted", {}, 0),
    ("2M fitted, mean first step", "fitted", {"first_step": "mean"}, 0),
    ("2M fitted, mean first step, refined", "fitted", {"first_step": "mean"}, REFINE_ITERATIONS),
    ("2M", "multistep", {"order": 2}, 0),
    ("3M", "multistep", {"order": 3}, 0),
    ("3M+UniC(bh2)", "multistep", {"order": 3, "corrector": "bh2"}, 0),
    ("2M+UniC(bh2)", "multistep", {"order": 2, "corrector": "bh2"}, 0),
)
BEGIN = "<!-- calibration-benchmark:begin -->"
END = "<!-- calibration-benchmark:end -->"


def calibration_noise(problem, n):
    """Calibration noise at sigma_max, independent of the evaluation noise (seed 0)."""
    g = torch.Generator().manual_seed(CALIBRATION_SEED)
    if hasattr(problem.mixture, "sample"):
        return problem.mixture.sample(n, problem.range.sigma_max, problem.form, generator=g)
    return torch.randn(n, *problem.x_start.shape[1:], generator=g, dtype=torch.float64) * problem.range.sigma_max


def calibrate_problem(problem, nfes, cal, analytic, n_seeds):
    """Calibrated rows for one problem: (nfe, label, median, p90, flips, calibration error, cost, sigmas)."""
    p = problem.range.parameterization()
    x_cal = calibration_noise(problem, n_seeds)
    with torch.no_grad():
        teacher = cal.run_teacher(problem.denoiser(), x_cal, p, cal.DEFAULTS["grid_points"], cal.DEFAULTS["substeps"])
    rows = []
    for nfe in nfes:
        for label, solver, options, refine in CALIBRATED:
            if refine and n_seeds < cal.MIN_REFINE_SEEDS:
                continue  # calibrate() refuses: too few seeds to refine without overfitting
            spec = cal.SolverSpec(solver, options, label)
            t0 = time.perf_counter()
            with torch.no_grad():
                res = cal.calibrate(problem.denoiser(), x_cal, p, nfe, spec, teacher=teacher,
                                    refine_iterations=refine)
            seconds = time.perf_counter() - t0 + teacher.seconds
            model = problem.denoiser()
            with torch.no_grad():
                out = spec.run(model, problem.x_start, torch.tensor(res.sigmas, dtype=torch.float64), p, nfe=nfe,
                               coefficients=res.coefficients, first_prediction=res.first_prediction)
            assert model.nfe == nfe, (label, nfe, model.nfe)
            med, p90, flips = measure(problem, out, analytic.per_sample_rms)
            total = teacher.nfe + res.cost["search_nfe"] + res.cost["refine_nfe"]
            cost = dict(res.cost, teacher_nfe=teacher.nfe, total_nfe=total, seconds=seconds)
            rows.append((nfe, label, med, p90, flips, res.error, cost, res.sigmas))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 problems, 256 samples, a reduced ComfyUI grid")
    ap.add_argument("--out", type=Path, default=None, help="markdown file to update (e.g. docs/benchmarks.md)")
    ap.add_argument("--samples", type=int, default=None,
                    help=f"evaluation trajectories per problem ({sb.QUICK_SAMPLES} / {sb.FULL_SAMPLES})")
    ap.add_argument("--no-teacher", action="store_true", help="skip the tiny trained teacher")
    args = ap.parse_args(argv)
    check_out(args.out)
    torch.set_num_threads(1)
    t0 = time.time()
    pkg = import_package()
    from comfyui_fewstep.samplers import analytic
    from comfyui_fewstep.samplers import calibration as cal

    comfy = _comfy.import_comfy()
    n_samples = args.samples or (sb.QUICK_SAMPLES if args.quick else sb.FULL_SAMPLES)
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
    problems = [(lambda r=r, m=m: analytic.make_problem(r, m, n_samples=n_samples, seed=0), CALIBRATION_SEEDS)
                for r, m in problems_spec]
    if not args.no_teacher:
        problems.append((lambda: make_teacher_problem(pkg, n_samples=32 if args.quick else 128),
                         TEACHER_CALIBRATION_SEEDS))
    for make, n_seeds in problems:
        problem = make()
        bench.run_presets(problem)
        if comfy is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                bench.run_comfy(problem, comfy, samplers, schedulers)
        else:
            bench.run_local(problem)
        rows = calibrate_problem(problem, NFES, cal, analytic, n_seeds)
        body += [f"### {problem.name}", "",
                 (f"| NFE | {base_name} | median / p90 / flips | ours, fixed schedule (best) | median | calibrated "
                 "(preset chosen by calibration error) | median / p90 / flips | ratio to ComfyUI | "
                 "calibration cost: model calls (teacher + search + refinement), s |"),
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
                f"{c['total_nfe']} ({c['teacher_nfe']} + {c['search_nfe']}"
                + (f" + {c['refine_nfe']} refinement" if c["refine_nfe"] else "") + f"), {c['seconds']:.1f} |"
            )
        body += ["", "All calibrated presets (median held-out error / calibration error):", "",
                 "| preset | " + " | ".join(f"NFE {n}" for n in NFES) + " |", "|---" * (len(NFES) + 1) + "|"]
        for label, *_ in CALIBRATED:
            cells_p = [next((f"{r[2]:.4f} / {r[5]:.4f}" for r in rows if r[0] == n and r[1] == label), "-")
                       for n in NFES]
            body.append(f"| {label} | " + " | ".join(cells_p) + " |")
        body.append("")
        print(f"[{time.time() - t0:6.1f} s] {problem.name} done", file=sys.stderr)
    elapsed = time.time() - t0
    command = "python bench/calibration_benchmark.py" + (" --quick" if args.quick else "")
    command += f" --samples {args.samples}" if args.samples else ""
    command += " --no-teacher" if args.no_teacher else ""
    if args.out is not None:
        command += f" --out {args.out.as_posix()}"
    if comfy is not None:
        command = "COMFYUI_PATH=<ComfyUI 0.3.64 checkout> " + command
    solver_cells = [c for c in cells if c[1] in SOLVER_TARGET_NFES]
    solver_met = [c for c in solver_cells if c[2] <= SOLVER_TARGET_RATIO and c[3]]
    cells = [c for c in cells if c[1] in TARGET_NFES]
    met = [c for c in cells if c[2] <= TARGET_RATIO and c[3]]
    met_median = [c for c in cells if c[2] <= TARGET_RATIO]
    lines += [
        (f"Produced by `{command}` ({platform.python_implementation()} {platform.python_version()}, torch "
        f"{torch.__version__}, CPU, {elapsed:.0f} s). Calibration: {CALIBRATION_SEEDS} seeds independent of the "
        f"{n_samples} evaluation trajectories, teacher {cal.DEFAULTS['grid_points']} grid points x "
        f"{cal.DEFAULTS['substeps']} substeps, search budget {cal.DEFAULTS['search_nfe']} model calls, "
        f"{REFINE_ITERATIONS} refinement iterations for the refined preset; the tiny teacher is calibrated on "
        f"{TEACHER_CALIBRATION_SEEDS} seeds against {32 if args.quick else 128} evaluation trajectories; the "
        "teacher is shared by the presets and NFEs of a problem, and its cost is counted in every row. "
        "Errors: per-sample RMS against the exact ODE solution at sigma = 0; cells median / p90 / mode-flip rate."),
        "",
        (f"Target: calibrated median <= {TARGET_RATIO} x the {base_name} median: met in {len(met_median)} of "
        f"{len(cells)} (problem, NFE) cells; with no more mode flips as well: {len(met)} of {len(cells)}. Median "
        f"ratio over cells: {sorted(c[2] for c in cells)[len(cells) // 2]:.2f} (NFE "
        f"{', '.join(map(str, TARGET_NFES))})."),
        "",
        (f"For comparison with the solver benchmark's target (our median <= {SOLVER_TARGET_RATIO} x ComfyUI's best "
         f"with no more mode flips, NFE {', '.join(map(str, SOLVER_TARGET_NFES))}; see 'Targets' there): "
         f"calibrated, it holds in {len(solver_met)} of {len(solver_cells)} cells."),
        "",
        *body,
        END,
    ]
    publish(lines, args.out, BEGIN, END)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
