"""Preset selection on held-out problems (not the benchmark's): the data behind the preset choices.

Usage::

    python bench/_tune.py [--samples 256] [--nfes 4,5,6,8,10] [--mixture-seeds 11,12]

The benchmark (``solver_benchmark.py``) scores on the ``gmm16`` mixture (mixture seed 0,
trajectory seed 0). Preset choices (order, lower-order-final policy, schedule) are made here on
other 16-D, 8-component mixtures of the same shape (``--mixture-seeds``, default 11 and 12) with
other starting noise (trajectory seed 1), so they are not tuned to the problem they are scored
on. Prints, per problem and NFE, each candidate's median error and its ratio to the best ComfyUI
sampler x scheduler (when ``COMFYUI_PATH`` is set) on the same held-out problem.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _comfy
from _harness import import_package, measure

RANGES = ("sd15", "edm", "flow_shift1", "flow_shift3")
COMFY_SAMPLERS = ("ipndm_v", "ipndm", "deis", "uni_pc", "uni_pc_bh2", "dpmpp_2m", "gradient_estimation",
                  "res_multistep", "dpmpp_2m_sde(eta=0)", "dpmpp_3m_sde(eta=0)", "euler", "lms", "er_sde(ode)",
                  "sa_solver(eta=0)")


def held_out_problem(analytic: Any, range_name: str, mixture_seed: int, n_samples: int) -> Any:
    """A gmm16-shaped mixture with another seed, noise from trajectory seed 1, DOP853 reference."""
    rng = analytic.RANGE_PRESETS[range_name]
    mixture = analytic.GaussianMixture.random(16, 8, (0.05, 0.30), mixture_seed)
    g = torch.Generator().manual_seed(1)
    x_start, noise = mixture.sample_with_noise(n_samples, rng.sigma_max, rng.form, generator=g)
    reference = mixture.ode_solution(x_start, rng.sigma_max, 0.0, rng.form)
    return analytic.Problem(f"{range_name}/seed{mixture_seed}", mixture, rng, x_start, reference,
                            mixture.nearest_component(reference), noise)


def candidates() -> list[tuple[str, dict[str, Any], str]]:
    """(label, sampler options, schedule) to compare; schedules ending in '(ComfyUI)' come from ComfyUI."""
    out = []
    configs = {
        "2M": {"order": 2},
        "2M+UniC": {"order": 2, "corrector": "bh2"},
        "3M": {"order": 3},
        "3M+UniC": {"order": 3, "corrector": "bh2"},
        "4M": {"order": 4},
        "4M+UniC": {"order": 4, "corrector": "bh2"},
        "3M nolof": {"order": 3, "lower_order_final": False},
        "3M+UniC nolof": {"order": 3, "corrector": "bh2", "lower_order_final": False},
        "4M nolof": {"order": 4, "lower_order_final": False},
        "4M+UniC nolof": {"order": 4, "corrector": "bh2", "lower_order_final": False},
        "2M+UniC final4": {"order": 2, "corrector": "bh2", "final_order": 4},
        "2M+UniC final3": {"order": 2, "corrector": "bh2", "final_order": 3},
        "2M+UniC final2": {"order": 2, "corrector": "bh2", "final_order": 2},
        "3M+UniC final4": {"order": 3, "corrector": "bh2", "final_order": 4},
        "2M+UniC final4g": {"order": 2, "corrector": "bh2", "final_order": 4, "final_weights": "gaussian"},
        "2M+UniC final3g": {"order": 2, "corrector": "bh2", "final_order": 3, "final_weights": "gaussian"},
        "2M+UniC final4g flow2nd": {"order": 2, "corrector": "bh2", "final_order": 4,
                                    "final_weights": "gaussian", "second_step": "flow"},
        "2M+UniC final4g gauss1st": {"order": 2, "corrector": "bh2", "final_order": 4,
                                     "final_weights": "gaussian", "first_step": "gaussian"},
        "2M+UniC final4g flow2nd gauss1st": {"order": 2, "corrector": "bh2", "final_order": 4,
                                             "final_weights": "gaussian", "second_step": "flow",
                                             "first_step": "gaussian"},
        "2M+UniC final4g skip": {"order": 2, "corrector": "bh2", "final_order": 4,
                                 "final_weights": "gaussian", "first_step": "skip"},
        "2M+UniC final4g flow2nd skip": {"order": 2, "corrector": "bh2", "final_order": 4,
                                         "final_weights": "gaussian", "second_step": "flow",
                                         "first_step": "skip"},
    }
    for label, opts in configs.items():
        for schedule in ("logsnr_uniform", "logsnr_window", "time_uniform", "exponential (ComfyUI)", "kl_optimal (ComfyUI)",
                         "beta (ComfyUI)", "sgm_uniform (ComfyUI)", "karras (ComfyUI)", "simple (ComfyUI)"):
            out.append((label, opts, schedule))
        if "final_order" in opts:  # the window for an accurate last step (samplers.schedules.FEWSTEP_WINDOW)
            for lambda_start in (-2.0, -2.5, -3.0, -3.5):
                for sigma_end in (0.02, 0.03, 0.04, 0.05):
                    out.append((label, opts, f"logsnr_window:{lambda_start}:{sigma_end}"))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--nfes", default="4,5,6,8,10,15,20")
    ap.add_argument("--mixture-seeds", default="11,12")
    ap.add_argument("--ranges", default=",".join(RANGES))
    ap.add_argument("--only", default="", help="comma-separated candidate labels to run (default: all)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    pkg = import_package()
    from comfyui_fewstep.samplers import analytic, schedules
    from comfyui_fewstep.samplers.budget import steps_for_nfe

    comfy = _comfy.import_comfy()
    nfes = [int(n) for n in args.nfes.split(",")]
    only = set(filter(None, args.only.split(",")))
    cands = [c for c in candidates() if not only or c[0] in only]
    # ratio to the best ComfyUI median, per (candidate label, schedule, nfe) over problems, and
    # whether the cell meets the benchmark's target (ratio <= 0.5 with no more mode flips)
    ratios: dict[tuple[str, str, int], list[float]] = {}
    met: dict[tuple[str, str, int], list[bool]] = {}
    for range_name in args.ranges.split(","):
        for mseed in (int(s) for s in args.mixture_seeds.split(",")):
            prob = held_out_problem(analytic, range_name, mseed, args.samples)
            p = prob.range.parameterization()
            ms = _comfy.model_sampling_for(comfy, prob.range) if comfy is not None else None
            x = prob.x_start.to(torch.float32)
            best_comfy: dict[int, tuple[float, str, float]] = {}
            if comfy is not None:
                samplers, _ = _comfy.sampler_list(comfy)
                for sampler in samplers:
                    if sampler.name not in COMFY_SAMPLERS:
                        continue
                    fn, options = _comfy.sampler_function(comfy, sampler)
                    for nfe in nfes:
                        for scheduler in _comfy.scheduler_names(comfy):
                            sig = _comfy.comfy_sigmas(comfy, ms, scheduler, nfe, sampler.base)
                            model = prob.denoiser()
                            try:
                                with warnings.catch_warnings():
                                    warnings.simplefilter("ignore")
                                    x0 = _comfy.start_state(ms, sig, prob.x_start, prob.noise).float()
                                    out = fn(_comfy.ComfyModel(model, ms), x0, sig.clone(),
                                             extra_args={"seed": 0}, callback=None, disable=True, **options)
                            except Exception:  # noqa: BLE001, S112 - a failing combination is skipped
                                continue
                            if model.nfe > nfe:
                                continue
                            med, _, flips = measure(prob, out, analytic.per_sample_rms)
                            if nfe not in best_comfy or med < best_comfy[nfe][0]:
                                best_comfy[nfe] = (med, f"{sampler.name}/{scheduler}", flips)
            print(f"\n## {prob.name}: best ComfyUI " + ", ".join(
                f"{n}: {best_comfy[n][0]:.4f} {best_comfy[n][1]}" for n in nfes if n in best_comfy))
            rows = []
            for label, opts, schedule in cands:
                meds = []
                for nfe in nfes:
                    # the NFE planner's steps (one more without the call at sigma_max)
                    steps = steps_for_nfe("multistep", nfe, opts["order"],
                                          skip_start=opts.get("first_step") == "skip").steps
                    if schedule.startswith("logsnr_window:"):  # logsnr_window:LAMBDA_START:SIGMA_END
                        _, lambda_start, sigma_end = schedule.split(":")
                        sig = schedules.get_sigmas("logsnr_window", steps, p,
                                                   lambda_start=float(lambda_start),
                                                   sigma_end=float(sigma_end))
                    elif schedule.endswith("(ComfyUI)"):
                        if comfy is None:
                            meds.append(float("nan"))
                            continue
                        sig = _comfy.comfy_sigmas(comfy, ms, schedule.split()[0], steps, "")
                    else:
                        sig = schedules.get_sigmas(schedule, steps, p)
                    model = prob.denoiser()
                    x0 = x if ms is None else _comfy.start_state(ms, sig, prob.x_start, prob.noise).float()
                    out = pkg.samplers.sample_dpmpp_multistep(model, x0, sig, parameterization=p,
                                                              resume_history=False, disable=True, **opts)
                    if model.nfe != nfe:
                        raise RuntimeError(
                            f"{label} / {schedule} made {model.nfe} calls at a budget of {nfe}")
                    med, _, flips = measure(prob, out, analytic.per_sample_rms)
                    meds.append(med)
                    if nfe in best_comfy:
                        ratio = med / best_comfy[nfe][0]
                        ratios.setdefault((label, schedule, nfe), []).append(ratio)
                        meets = ratio <= 0.5 and flips <= best_comfy[nfe][2]
                        met.setdefault((label, schedule, nfe), []).append(meets)
                rows.append((label, schedule, meds))
            for label, schedule, meds in rows:
                print(f"{label:16s} {schedule:24s} " + " ".join(f"{m:.4f}" for m in meds))
    if ratios:
        print("\n## geometric-mean ratio to the best ComfyUI median over held-out problems "
              "(in brackets: problems where the target is met, ratio <= 0.5 with no more mode flips)")
        keys = sorted({(k[0], k[1]) for k in ratios}, key=lambda k: statistics.geometric_mean(
            [v for n in nfes for v in ratios.get((k[0], k[1], n), [])] or [1e9]))
        for label, schedule in keys:
            cells = [f"{statistics.geometric_mean(ratios[(label, schedule, n)]):.2f}"
                     f"({sum(met[(label, schedule, n)])})" if (label, schedule, n) in ratios else "nan"
                     for n in nfes]
            print(f"{label:16s} {schedule:24s} " + " ".join(cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
