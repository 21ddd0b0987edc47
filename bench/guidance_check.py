"""The flow second step, the gaussian first step and the skip start under classifier-free guidance.

Usage::

    python bench/guidance_check.py [--out docs/benchmarks.md]

The tier-1 mixtures have no guidance. Here the model is a guided one, as ComfyUI's CFG guider
makes it: ``D = D_u + cfg (D_c - D_u)``, with ``D_u`` the exact denoiser of a 16-D, 8-component
mixture (mixture seeds 11-14, as the held-out problems of ``_tune.py``) and ``D_c`` that of its
first three components (the "prompt"). The reference is the same guided ODE solved with 800 steps of
3M on ``logsnr_uniform`` (256 trajectories). Each cell compares the few-step preset (2M + UniC-bh2,
gaussian first step, order-4 last step with gaussian weights, ``fewstep_window``) with ``second_step``
``log_snr`` and ``flow``: median per-sample RMS error, ``log_snr -> flow``. A second table compares the
preset's ``first_step`` ``gaussian`` with ``ddim`` (the geometric mean of the error ratio), a third the
preset without the call at sigma_max (``first_step="skip"`` on ``fewstep_skip_window``, one step more
for the same calls) with the preset.
"""

from __future__ import annotations

import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import import_package, out_arguments, publish

RANGES = ("sd15", "edm", "flow_shift3")
MIXTURE_SEEDS = (11, 12, 13, 14)
CFGS = (1.0, 3.0, 5.0, 7.0, 8.0, 12.0)
NFES = (4, 5, 6, 8, 10)
SAMPLES = 256
REFERENCE_STEPS = 800
PRESET = {"order": 2, "corrector": "bh2", "final_order": 4, "final_weights": "gaussian",
          "first_step": "gaussian"}
#: the runs per cell: the preset, the preset with the flow second step, the preset with the DDIM first step,
#: the preset without the call at sigma_max
VARIANTS = ({}, {"second_step": "flow"}, {"first_step": "ddim"}, {"first_step": "skip"})
BEGIN = "<!-- guidance-check:begin -->"
END = "<!-- guidance-check:end -->"


def main(argv: list[str] | None = None) -> int:
    args = out_arguments(__doc__, argv)
    torch.set_num_threads(1)
    import_package()
    from comfyui_fewstep.samplers import analytic, schedules
    from comfyui_fewstep.samplers.budget import steps_for_nfe
    from comfyui_fewstep.samplers.multistep import sample_dpmpp_multistep

    t0 = time.time()
    rows, ratios, first_ratios, skip_ratios = [], {}, {}, {}
    for seed in MIXTURE_SEEDS:
        full = analytic.GaussianMixture.random(16, 8, (0.05, 0.30), seed)
        for range_name in RANGES:
            rng = analytic.RANGE_PRESETS[range_name]
            p = rng.parameterization()
            x = full.sample(SAMPLES, rng.sigma_max, rng.form, generator=torch.Generator().manual_seed(1))
            for cfg in CFGS:
                guided = analytic.CountingDenoiser(analytic.GuidedMixture(full, 3, cfg), rng.form)
                reference = sample_dpmpp_multistep(
                    guided, x, schedules.get_sigmas("logsnr_uniform", REFERENCE_STEPS, p), parameterization=p,
                    order=3, disable=True, resume_history=False)
                cells = []
                for nfe in NFES:
                    medians = []
                    for variant in VARIANTS:
                        skip = variant.get("first_step") == "skip"
                        window = schedules.SKIP_WINDOW if skip else schedules.FEWSTEP_WINDOW
                        steps = steps_for_nfe("multistep", nfe, PRESET["order"], skip_start=skip).steps
                        sigmas = schedules.get_sigmas("logsnr_window", steps, p, **window)
                        out = sample_dpmpp_multistep(guided, x.float(), sigmas, parameterization=p, disable=True,
                                                     resume_history=False, **{**PRESET, **variant})
                        err = analytic.per_sample_rms(out.to(torch.float64), reference)
                        medians.append(float(err.median()))
                    ratios.setdefault((cfg, nfe), []).append(medians[1] / medians[0])
                    first_ratios.setdefault((cfg, nfe), []).append(medians[0] / medians[2])
                    skip_ratios.setdefault((cfg, nfe), []).append(medians[3] / medians[0])
                    cells.append(f"{medians[0]:.4f} -> {medians[1]:.4f}")
                rows.append(f"| {range_name}/seed{seed} | {cfg:g} | " + " | ".join(cells) + " |")
        print(f"[{time.time() - t0:6.1f} s] mixture seed {seed} done", file=sys.stderr)

    out = f" --out {args.out.as_posix()}" if args.out is not None else ""
    lines = [BEGIN, "## The flow second step, the gaussian first step and the skip start under guidance", "",
             (f"Produced by `python bench/guidance_check.py{out}` ({platform.python_implementation()} "
              f"{platform.python_version()}, torch {torch.__version__}, CPU, {time.time() - t0:.0f} s); "
              "see the script's docstring. Cells: median error of the few-step preset with "
              "`second_step` `log_snr` -> `flow`."),
             "",
             "| problem | cfg | " + " | ".join(f"NFE {n}" for n in NFES) + " |",
             "|---|---|" + "---|" * len(NFES),
             *rows,
             "",
             "Ratio flow / log_snr, geometric mean over the problems (largest in brackets):",
             "",
             "| cfg | " + " | ".join(f"NFE {n}" for n in NFES) + " |",
             "|---|" + "---|" * len(NFES)]
    lines += _ratio_rows(ratios)
    lines += ["", "Ratio of the preset's error with `first_step` `gaussian` to `ddim`, geometric mean over "
              "the problems (largest in brackets):", "",
              "| cfg | " + " | ".join(f"NFE {n}" for n in NFES) + " |", "|---|" + "---|" * len(NFES),
              *_ratio_rows(first_ratios)]
    lines += ["", "Ratio of the error without the call at sigma_max (`first_step` `skip`, "
              "`fewstep_skip_window`) to the preset's at the same calls, geometric mean over the problems "
              "(largest in brackets):", "",
              "| cfg | " + " | ".join(f"NFE {n}" for n in NFES) + " |", "|---|" + "---|" * len(NFES),
              *_ratio_rows(skip_ratios), END]
    publish(lines, args.out, BEGIN, END, after="<!-- solver-benchmark:end -->")
    return 0


def _ratio_rows(ratios: dict[tuple[float, int], list[float]]) -> list[str]:
    return [f"| {cfg:g} | " + " | ".join(
        f"{statistics.geometric_mean(ratios[cfg, n]):.2f} ({max(ratios[cfg, n]):.2f})" for n in NFES) + " |"
        for cfg in CFGS]


if __name__ == "__main__":
    raise SystemExit(main())
