"""Do calibrated schedules and fitted coefficients carry over to a model they were not fitted on?

Usage::

    python bench/calibration_transfer.py [--out docs/benchmarks.md]

A calibration is fitted to one model and one conditioning; a user then samples other prompts
with it. The tier-1 stand-in: calibrate on the benchmark mixture ``gmm16`` (32 seeds), then
sample two other distributions of the same sigma range with the result, never calibrated on:

* ``reweighted``: the same components with other weights (a prompt that favours other modes);
* ``other mixture``: another random 16-D, 8-component mixture (mixture seed 11), a harder change
  than a prompt.

Each target is scored on 256 trajectories against its exact ODE solution, next to the same
preset calibrated on the target itself ("native") and our fixed few-step preset (2M+UniC(bh2)
with the gaussian first step and the order-4 last step in its gaussian weights on ``fewstep_window``,
:data:`samplers.schedules.FEWSTEP_WINDOW`). The
fitted solver with a mean first step (its first prediction is the calibration distribution's
mean, so it is the most specific to what it was calibrated on) is carried over and calibrated
natively the same way. So is ``2M fitted`` with the end-to-end
refinement (``refine_iterations``), which fits the calibration seeds more closely: does that
carry over? Cells: median per-sample RMS error / mode-flip rate.
"""

from __future__ import annotations

import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import import_package, measure, out_arguments, publish

RANGES = ("sd15", "edm", "flow_shift3")
NFES = (5, 8)
CALIBRATION_SEEDS = 32
CALIBRATION_SEED = 1000
#: Gauss-Newton iterations of the refined column (as in the calibration benchmark)
REFINE_ITERATIONS = 8
SAMPLES = 256
BEGIN = "<!-- calibration-transfer:begin -->"
END = "<!-- calibration-transfer:end -->"


def targets(analytic, rng, source):
    """The two distributions the source calibration is carried to, with noise and exact references."""
    g = torch.Generator().manual_seed(5)
    weights = torch.rand(source.weights.shape[0], generator=g, dtype=torch.float64)
    mixtures = {
        "reweighted": analytic.GaussianMixture(source.means, source.stds, 0.25 + 1.5 * weights),
        "other mixture": analytic.GaussianMixture.random(16, 8, (0.05, 0.30), 11),
    }
    out = {}
    for name, mixture in mixtures.items():
        x = mixture.sample(SAMPLES, rng.sigma_max, rng.form, generator=torch.Generator().manual_seed(1))
        reference = mixture.ode_solution(x, rng.sigma_max, 0.0, rng.form)
        out[name] = analytic.Problem(name, mixture, rng, x, reference, mixture.nearest_component(reference))
    return out


def main(argv: list[str] | None = None) -> int:
    args = out_arguments(__doc__, argv)
    torch.set_num_threads(1)
    t0 = time.time()
    import_package()
    from comfyui_fewstep.samplers import analytic, schedules
    from comfyui_fewstep.samplers import calibration as cal
    from comfyui_fewstep.samplers.multistep import sample_dpmpp_multistep

    specs = {"2M fitted": cal.SolverSpec("fitted", {}, "2M fitted"),
             "mean first": cal.SolverSpec("fitted", {"first_step": "mean"}, "2M fitted, mean first step"),
             "2M": cal.SolverSpec("multistep", {"order": 2}, "2M")}
    rows = []
    for range_name in RANGES:
        rng = analytic.RANGE_PRESETS[range_name]
        p = rng.parameterization()
        source = analytic.MIXTURE_PRESETS["gmm16"].build()

        def calibrate(mixture, nfe, spec, refine=0, rng=rng, p=p):
            g = torch.Generator().manual_seed(CALIBRATION_SEED)
            x = mixture.sample(CALIBRATION_SEEDS, rng.sigma_max, rng.form, generator=g)
            return cal.calibrate(analytic.CountingDenoiser(mixture, rng.form), x, p, nfe, spec,
                                 refine_iterations=refine)

        problems = targets(analytic, rng, source)
        for nfe in NFES:
            carried = {label: calibrate(source, nfe, spec) for label, spec in specs.items()}
            refined = calibrate(source, nfe, specs["2M fitted"], REFINE_ITERATIONS)
            for name, prob in problems.items():
                def score(spec, res, prob=prob, p=p, rng=rng):
                    model = analytic.CountingDenoiser(prob.mixture, rng.form)
                    out = spec.run(model, prob.x_start, torch.tensor(res.sigmas, dtype=torch.float64), p,
                                   coefficients=res.coefficients, first_prediction=res.first_prediction)
                    return measure(prob, out, analytic.per_sample_rms)

                native = calibrate(prob.mixture, nfe, specs["2M fitted"])
                native_mean = calibrate(prob.mixture, nfe, specs["mean first"])
                sigmas = schedules.get_sigmas("logsnr_window", nfe, p, **schedules.FEWSTEP_WINDOW)
                fixed = sample_dpmpp_multistep(
                    analytic.CountingDenoiser(prob.mixture, rng.form), prob.x_start.clone(),
                    sigmas.to(torch.float64), parameterization=p, order=2, corrector="bh2", final_order=4,
                    final_weights="gaussian", first_step="gaussian", resume_history=False, disable=True,
                )
                rows.append((range_name, nfe, name, score(specs["2M fitted"], carried["2M fitted"]),
                             score(specs["2M fitted"], native), score(specs["2M"], carried["2M"]),
                             measure(prob, fixed, analytic.per_sample_rms),
                             score(specs["mean first"], carried["mean first"]),
                             score(specs["mean first"], native_mean), score(specs["2M fitted"], refined)))
            print(f"[{time.time() - t0:6.1f} s] {range_name} NFE {nfe} done", file=sys.stderr)

    def cell(m):
        return f"{m[0]:.4f} / {m[2]:.3f}"

    out = f" --out {args.out.as_posix()}" if args.out is not None else ""
    lines = [BEGIN, "## Calibration carried to another distribution", "",
             (f"Produced by `python bench/calibration_transfer.py{out}` ({platform.python_implementation()} "
              f"{platform.python_version()}, torch {torch.__version__}, CPU, {time.time() - t0:.0f} s). "
              f"Calibrated on `gmm16` ({CALIBRATION_SEEDS} seeds), sampled on a distribution never "
              f"calibrated on ({SAMPLES} trajectories, exact ODE reference); see the script's docstring. "
              "Cells: median error / mode-flip rate."),
             "",
             "| range | NFE | target | 2M fitted, carried over | 2M fitted, calibrated on the target | "
             "carried / native | 2M schedule only, carried over | "
             "fixed 2M+UniC(bh2)+final4g+gauss1st / fewstep_window | "
             "fixed / carried fitted | mean first step, carried over | mean first step, native | "
             "carried / native | 2M fitted, refined, carried over | refined / unrefined, carried |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for range_name, nfe, name, carried, native, plain, fixed, mean_carried, mean_native, refined in rows:
        lines.append(f"| {range_name} | {nfe} | {name} | {cell(carried)} | {cell(native)} | "
                     f"{carried[0] / native[0]:.2f} | {cell(plain)} | {cell(fixed)} | "
                     f"{fixed[0] / carried[0]:.1f} | {cell(mean_carried)} | {cell(mean_native)} | "
                     f"{mean_carried[0] / mean_native[0]:.2f} | {cell(refined)} | "
                     f"{refined[0] / carried[0]:.2f} |")
    lines.append(END)
    publish(lines, args.out, BEGIN, END, after="<!-- calibration-benchmark:end -->")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
