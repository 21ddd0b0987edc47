"""Tier-1 solver benchmark: DPM-Solver++ presets vs ComfyUI's samplers on exact Gaussian mixtures.

Usage::

    python bench/solver_benchmark.py [--quick] [--out docs/benchmarks.md] [--plot docs/solver_benchmark.png]

Every method starts from the same noise, drawn from the exact marginal of a Gaussian mixture at
the model family's ``sigma_max`` (SD1.5 discrete range, EDM range, rectified flow with shift 1
and 3), and is compared with the exact probability-flow ODE solution at sigma = 0 (8th-order
Runge-Kutta reference, ``samplers/analytic.py``). Metrics per method and NFE: median and 90th
percentile of the per-sample RMS error, and the mode-flip rate (output closer to a different
mixture component than the reference). NFE is counted in the model wrapper; a method whose
consumed NFE would exceed the target at the nearest step count is run at fewer steps.

With ``COMFYUI_PATH`` set to a ComfyUI checkout, every built-in sampler is run with every
built-in scheduler (schedules from ``calculate_sigmas`` on a real ``ModelSampling`` object) and
the per-step host overhead of our 2M is timed against ComfyUI's ``dpmpp_2m``. Without it, the
baselines are a local Euler and DDIM loop on our schedules.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _comfy  # noqa: E402
from _harness import (  # noqa: E402
    ROOT, Result, check_out, composition_distance, ddim, euler_ode, import_package, measure_samples,
    paired_flips, write_section,
)
from _tier2 import make_teacher_problem  # noqa: E402

import_package()
from comfyui_fewstep.samplers.budget import steps_for_nfe  # noqa: E402
from comfyui_fewstep.samplers.schedules import FEWSTEP_WINDOW, SKIP_WINDOW  # noqa: E402

NFES = (4, 5, 6, 8, 10, 15, 20)
TARGET_NFES = (5, 6, 8, 10)  # where the 0.5x target is checked
TARGET_RATIO = 0.5
OVERHEAD_TARGET = 1.1
#: trajectories per mixture problem. The flip rates compared in the target are 1-7 %: with 512
#: trajectories a difference of a few samples could not be told from chance (exact McNemar test),
#: with 2048 the paired counts resolve it (the run time hardly changes: the tiny teacher dominates it)
FULL_SAMPLES = 2048
QUICK_SAMPLES = 256
#: samplers run in float32 like ComfyUI latents (the exact denoiser and the reference are float64)
DTYPE = torch.float32
BEGIN = "<!-- solver-benchmark:begin -->"
END = "<!-- solver-benchmark:end -->"


@dataclass(frozen=True)
class Preset:
    """One of our sampler configurations."""

    label: str
    solver: str  # "multistep" | "singlestep"
    schedule: str
    options: dict[str, Any] = field(default_factory=dict)
    schedule_options: dict[str, Any] = field(default_factory=dict)
    schedule_label: str = ""  # the name shown for the schedule with its options (default: its name)

    @property
    def schedule_name(self) -> str:
        return self.schedule_label or self.schedule


PRESETS: tuple[Preset, ...] = (
    Preset("2M", "multistep", "logsnr_uniform", {"order": 2}),
    Preset("2M", "multistep", "time_uniform", {"order": 2}),
    Preset("2M", "multistep", "karras", {"order": 2}),
    Preset("2M", "multistep", "exponential", {"order": 2}),
    Preset("2M", "multistep", "ays", {"order": 2}),
    Preset("2M", "multistep", "gits", {"order": 2}),
    Preset("3M", "multistep", "logsnr_uniform", {"order": 3}),
    Preset("3M", "multistep", "time_uniform", {"order": 3}),
    Preset("3M", "multistep", "karras", {"order": 3}),
    Preset("2M+UniC(bh2)", "multistep", "logsnr_uniform", {"order": 2, "corrector": "bh2"}),
    Preset("2M+UniC(bh2)", "multistep", "time_uniform", {"order": 2, "corrector": "bh2"}),
    Preset("3M+UniC(bh2)", "multistep", "logsnr_uniform", {"order": 3, "corrector": "bh2"}),
    Preset("3M+UniC(bh1)", "multistep", "time_uniform", {"order": 3, "corrector": "bh1"}),
    Preset("2M", "multistep", "logsnr_window", {"order": 2}),
    Preset("2M+UniC(bh2)", "multistep", "logsnr_window", {"order": 2, "corrector": "bh2"}),
    Preset("3M+UniC(bh2)", "multistep", "logsnr_window", {"order": 3, "corrector": "bh2"}),
    Preset("4M", "multistep", "logsnr_uniform", {"order": 4}),
    Preset("4M+UniC(bh2)", "multistep", "logsnr_uniform", {"order": 4, "corrector": "bh2"}),
    Preset("4M+UniC(bh2)", "multistep", "logsnr_window", {"order": 4, "corrector": "bh2"}),
    Preset("3S", "singlestep", "logsnr_uniform", {"order": 3}),
    Preset("3S", "singlestep", "karras", {"order": 3}),
    # "+final4": the Adams-Bashforth last step to sigma 0 (final_order=4)
    Preset("2M+final4", "multistep", "logsnr_window", {"order": 2, "final_order": 4}),
    *(
        Preset(label, "multistep", schedule, {"order": order, "corrector": "bh2", "final_order": 4})
        for label, order, schedule in (
            ("2M+UniC(bh2)+final4", 2, "logsnr_window"),
            ("2M+UniC(bh2)+final4", 2, "logsnr_uniform"),
            ("3M+UniC(bh2)+final4", 3, "logsnr_window"),
            ("4M+UniC(bh2)+final4", 4, "logsnr_uniform"),
        )
    ),
    Preset("2M+UniC(bh2)+final4", "multistep", "logsnr_window",
           {"order": 2, "corrector": "bh2", "final_order": 4}, FEWSTEP_WINDOW, "fewstep_window"),
    # "+final4g": the same last step with its gaussian weights (final_weights="gaussian")
    *(
        Preset(label, "multistep", schedule, {"order": order, "corrector": "bh2", "final_order": 4,
                                              "final_weights": "gaussian"})
        for label, order, schedule in (
            ("2M+UniC(bh2)+final4g", 2, "logsnr_window"),
            ("3M+UniC(bh2)+final4g", 3, "logsnr_window"),
        )
    ),
    # the few-step preset: 2M + UniC + final4g on its own window (samplers.schedules.FEWSTEP_WINDOW;
    # the KSampler scheduler fewstep_window, the NFE Plan's dpmpp_2m_fast)
    Preset("2M+UniC(bh2)+final4g", "multistep", "logsnr_window",
           {"order": 2, "corrector": "bh2", "final_order": 4, "final_weights": "gaussian"}, FEWSTEP_WINDOW,
           "fewstep_window"),
    # its order-3 counterparts on the same window, with either last-step weights
    *(
        Preset(label, "multistep", "logsnr_window",
               {"order": 3, "corrector": "bh2", "final_order": 4, "final_weights": weights}, FEWSTEP_WINDOW,
               "fewstep_window")
        for label, weights in (("3M+UniC(bh2)+final4", "adams"), ("3M+UniC(bh2)+final4g", "gaussian"))
    ),
    # "+flow2nd": the second step in flow-equivalent time (second_step="flow"; for unguided or weakly
    # guided sampling, see bench/guidance_check.py)
    *(
        Preset(label, "multistep", "logsnr_window",
               {"order": order, "corrector": "bh2", "final_order": 4, "final_weights": weights,
                "second_step": "flow"}, *window)
        for label, order, weights, window in (
            ("2M+UniC(bh2)+final4g+flow2nd", 2, "gaussian", ()),
            ("2M+UniC(bh2)+final4g+flow2nd", 2, "gaussian", (FEWSTEP_WINDOW, "fewstep_window")),
            ("2M+UniC(bh2)+final4+flow2nd", 2, "adams", (FEWSTEP_WINDOW, "fewstep_window")),
            ("3M+UniC(bh2)+final4+flow2nd", 3, "adams", (FEWSTEP_WINDOW, "fewstep_window")),
            ("3M+UniC(bh2)+final4g+flow2nd", 3, "gaussian", (FEWSTEP_WINDOW, "fewstep_window")),
        )
    ),
    # "+gauss1st": the first step exact for Gaussian data of the model's sigma_data (first_step="gaussian");
    # the few-step preset is its 2M + UniC + final4g row on the few-step window
    *(
        Preset(label, "multistep", "logsnr_window",
               {"order": order, "corrector": "bh2", "final_order": 4, "final_weights": weights,
                "second_step": second, "first_step": "gaussian"}, *window)
        for label, order, weights, second, window in (
            ("2M+UniC(bh2)+final4g+gauss1st", 2, "gaussian", "log_snr", ()),
            ("2M+UniC(bh2)+final4g+gauss1st", 2, "gaussian", "log_snr", (FEWSTEP_WINDOW, "fewstep_window")),
            ("3M+UniC(bh2)+final4g+gauss1st", 3, "gaussian", "log_snr", (FEWSTEP_WINDOW, "fewstep_window")),
            ("2M+UniC(bh2)+final4g+flow2nd+gauss1st", 2, "gaussian", "flow", ()),
            ("2M+UniC(bh2)+final4g+flow2nd+gauss1st", 2, "gaussian", "flow",
             (FEWSTEP_WINDOW, "fewstep_window")),
            ("2M+UniC(bh2)+final4+flow2nd+gauss1st", 2, "adams", "flow", (FEWSTEP_WINDOW, "fewstep_window")),
            ("3M+UniC(bh2)+final4+flow2nd+gauss1st", 3, "adams", "flow", (FEWSTEP_WINDOW, "fewstep_window")),
        )
    ),
    # "+skip": no model call at sigma_max (first_step="skip"; a schedule of one step more for the same
    # calls) on its own window; the preset without the first call is its 2M + UniC + final4g row
    *(
        Preset(label, "multistep", "logsnr_window",
               {"order": 2, "corrector": "bh2", "final_order": 4, "final_weights": "gaussian",
                "second_step": second, "first_step": "skip"}, SKIP_WINDOW, "fewstep_skip_window")
        for label, second in (("2M+UniC(bh2)+final4g+skip", "log_snr"),
                              ("2M+UniC(bh2)+final4g+flow2nd+skip", "flow"))
    ),
)
#: our multistep presets also run on every ComfyUI scheduler when ComfyUI is available
COMFY_SCHEDULE_PRESETS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("2M", {"order": 2}),
    ("3M", {"order": 3}),
    ("2M+UniC(bh2)", {"order": 2, "corrector": "bh2"}),
    ("3M+UniC(bh2)", {"order": 3, "corrector": "bh2"}),
    ("4M+UniC(bh2)", {"order": 4, "corrector": "bh2"}),
    ("2M+UniC(bh2)+final4", {"order": 2, "corrector": "bh2", "final_order": 4}),
    ("3M+UniC(bh2)+final4", {"order": 3, "corrector": "bh2", "final_order": 4}),
    ("2M+UniC(bh2)+final4g", {"order": 2, "corrector": "bh2", "final_order": 4, "final_weights": "gaussian"}),
    ("2M+UniC(bh2)+final4g+flow2nd", {"order": 2, "corrector": "bh2", "final_order": 4,
                                      "final_weights": "gaussian", "second_step": "flow"}),
    ("2M+UniC(bh2)+final4g+gauss1st", {"order": 2, "corrector": "bh2", "final_order": 4,
                                       "final_weights": "gaussian", "first_step": "gaussian"}),
    ("2M+UniC(bh2)+final4g+skip", {"order": 2, "corrector": "bh2", "final_order": 4,
                                   "final_weights": "gaussian", "first_step": "skip"}),
)
#: the presets fixed in advance (chosen on held-out mixtures with ``bench/_tune.py``, not on the
#: benchmark's problems), (label, schedule, role); the target is also checked for each alone
FIXED_PRESETS: tuple[tuple[str, str, str], ...] = (
    ("2M+UniC(bh2)+final4g+gauss1st", "fewstep_window",
     "the few-step preset (`dpmpp_2m_fast`), safe at any cfg"),
    ("2M+UniC(bh2)+final4g+skip", "fewstep_skip_window",
     "the preset without the call at sigma_max (`dpmpp_2m_fast_skip`), for cfg up to about 5"),
)


def steps_for(options: dict[str, Any], nfe: int) -> int:
    """Multistep schedule steps for ``nfe`` calls (the NFE planner's: one more without the call at
    sigma_max)."""
    skip = options.get("first_step") == "skip"
    return steps_for_nfe("multistep", nfe, options.get("order", 2), skip_start=skip).steps
QUICK_PROBLEMS = (("sd15", "gmm16"), ("flow_shift3", "gmm16"))
FULL_PROBLEMS = (("sd15", "gmm16"), ("edm", "gmm16"), ("flow_shift1", "gmm16"), ("flow_shift3", "gmm16"))
QUICK_COMFY_SAMPLERS = ("euler", "dpmpp_2m", "dpmpp_3m_sde(eta=0)", "uni_pc", "ipndm_v", "deis")
QUICK_COMFY_SCHEDULERS = ("simple", "karras", "exponential", "beta", "normal")


class TargetCell(NamedTuple):
    """One (problem, NFE) cell of the target check."""

    problem: str
    nfe: int
    ratio: float  # our lowest median over the base's lowest median
    flips_ok: bool
    fixed: tuple[tuple[float, bool], ...]  # (ratio, flips no worse) of each fixed preset
    any_ok: Result | None  # the lowest-median preset of ours that meets the target, if any
    ours: Result | None
    base: Result | None


class Bench:
    def __init__(self, pkg: Any, nfes: tuple[int, ...]) -> None:
        self.pkg = pkg
        self.nfes = nfes
        s = pkg.samplers
        from comfyui_fewstep.samplers import analytic, budget, schedules  # noqa: F401

        self.analytic = analytic
        self.schedules = schedules
        self.budget = budget
        self.multistep = s.sample_dpmpp_multistep
        self.singlestep = s.sample_dpmpp_singlestep
        self.results: list[Result] = []

    def _record(self, problem, source, method, schedule, target, run: Callable, stochastic=False) -> Result:
        model = problem.denoiser()
        try:
            out = run(model)
            med, p90, changed, comp = measure_samples(problem, out, self.analytic.per_sample_rms)
            res = Result(problem.name, source, method, schedule, target, model.nfe, med, p90,
                         float(changed.to(torch.float64).mean()), stochastic, changed=changed,
                         composition=composition_distance(problem, comp))
        except Exception as exc:  # a sampler/scheduler combination that fails is reported, not fatal
            res = Result(problem.name, source, method, schedule, target, model.nfe, math.inf, math.inf, 1.0,
                         stochastic, f"{type(exc).__name__}: {exc}"[:120])
        self.results.append(res)
        return res

    # -- ours ---------------------------------------------------------------------------------
    def run_presets(self, problem) -> None:
        p = problem.range.parameterization()
        for preset in PRESETS:
            for nfe in self.nfes:
                if preset.solver == "multistep":
                    steps, orders = steps_for(preset.options, nfe), None
                else:
                    orders = list(self.budget.steps_for_nfe("singlestep", nfe, preset.options["order"]).orders)
                    steps = len(orders)
                try:
                    sigmas = self.schedules.get_sigmas(preset.schedule, steps, p, **preset.schedule_options)
                except (ValueError, TypeError):
                    break  # schedule not defined for this model family (AYS / GITS tables)
                x = problem.x_start.to(DTYPE)

                def run(model, sigmas=sigmas, orders=orders, preset=preset, x=x):
                    if preset.solver == "multistep":
                        return self.multistep(model, x, sigmas, parameterization=p, resume_history=False,
                                              disable=True, **preset.options)
                    return self.singlestep(model, x, sigmas, parameterization=p, orders=orders, disable=True)

                self._record(problem, "ours", preset.label, preset.schedule_name, nfe, run)

    def run_presets_on_comfy_schedules(self, problem, comfy, schedulers) -> None:
        """Our multistep presets on ComfyUI's schedulers (a SIGMAS input works with any schedule)."""
        p = problem.range.parameterization()
        ms = _comfy.model_sampling_for(comfy, problem.range)
        for label, options in COMFY_SCHEDULE_PRESETS:
            for scheduler in schedulers:
                for nfe in self.nfes:
                    sigmas = _comfy.comfy_sigmas(comfy, ms, scheduler, steps_for(options, nfe), "")
                    x = _comfy.start_state(ms, sigmas, problem.x_start, problem.noise).to(DTYPE)

                    def run(model, sigmas=sigmas, options=options, x=x):
                        return self.multistep(model, x, sigmas, parameterization=p, resume_history=False,
                                              disable=True, **options)

                    self._record(problem, "ours", label, f"{scheduler} (ComfyUI)", nfe, run)

    # -- local baselines ----------------------------------------------------------------------
    def run_local(self, problem) -> None:
        p = problem.range.parameterization()
        for schedule in ("logsnr_uniform", "time_uniform", "karras", "exponential"):
            for nfe in self.nfes:
                sigmas = self.schedules.get_sigmas(schedule, nfe, p)
                x = problem.x_start.to(DTYPE)
                self._record(problem, "local", "euler", schedule, nfe,
                             lambda m, s=sigmas, x=x: euler_ode(m, x, s))
                self._record(problem, "local", "ddim", schedule, nfe,
                             lambda m, s=sigmas, x=x: ddim(m, x, s, problem.form))

    # -- ComfyUI ------------------------------------------------------------------------------
    def run_comfy(self, problem, comfy, samplers, schedulers) -> None:
        ms = _comfy.model_sampling_for(comfy, problem.range)
        probe_x = problem.x_start[:2].to(DTYPE)
        for sampler in samplers:
            fn, options = _comfy.sampler_function(comfy, sampler)
            nfe_of_steps: dict[int, int] = {}

            def consumed(steps: int, fn=fn, options=options, sampler=sampler, nfe_of_steps=nfe_of_steps) -> int:
                if steps not in nfe_of_steps:
                    model = _comfy.ComfyModel(problem.denoiser(), ms)
                    sig = _comfy.comfy_sigmas(comfy, ms, "simple", steps, sampler.base)
                    try:
                        fn(model, probe_x.clone(), sig, extra_args={"seed": 0}, callback=None, disable=True,
                           **options)
                        nfe_of_steps[steps] = model.denoiser.nfe
                    except Exception:
                        nfe_of_steps[steps] = 10**9
                return nfe_of_steps[steps]

            for nfe in self.nfes:
                steps = max((k for k in range(1, nfe + 1) if consumed(k) <= nfe), default=None)
                if steps is None:
                    continue
                for scheduler in schedulers:
                    sigmas = _comfy.comfy_sigmas(comfy, ms, scheduler, steps, sampler.base)
                    x = _comfy.start_state(ms, sigmas, problem.x_start, problem.noise).to(DTYPE)

                    def run(model, sigmas=sigmas, x=x, fn=fn, options=options):
                        wrapped = _comfy.ComfyModel(model, ms)
                        # clones: uni_pc rewrites the last sigma in place
                        return fn(wrapped, x.clone(), sigmas.clone(), extra_args={"seed": 0}, callback=None,
                                  disable=True, **options)

                    self._record(problem, "comfy", sampler.name, scheduler, nfe, run, sampler.stochastic)


def best(results: list[Result], problem: str, source: str, nfe: int, deterministic_only: bool = False,
         prefix: str = ""):
    pool = [r for r in results if r.problem == problem and r.source == source and r.target_nfe == nfe
            and r.within_budget and not (deterministic_only and r.stochastic) and r.method.startswith(prefix)]
    return min(pool, key=lambda r: (r.median, r.flip_rate), default=None)


def fixed(results: list[Result], problem: str, nfe: int, preset: tuple[str, str, str]) -> Result | None:
    """The result of one of the :data:`FIXED_PRESETS` (None if it did not run)."""
    pool = [r for r in results if r.problem == problem and r.source == "ours" and r.target_nfe == nfe
            and (r.method, r.schedule) == preset[:2] and r.within_budget]
    return pool[0] if pool else None


def time_overhead(pkg: Any, comfy: Any | None, steps: int = 200, repeats: int = 15) -> dict[str, float]:
    """Per-step host time of our 2M and ComfyUI's dpmpp_2m with a trivial model (``x * 0.5``): the
    best of ``repeats`` runs each, the two taken in turn so that a spell of load on a shared machine
    falls on both."""
    from comfyui_fewstep.samplers import analytic, schedules

    p = analytic.RANGE_PRESETS["sd15"].parameterization()
    sigmas = schedules.get_sigmas("karras", steps, p)
    x = torch.randn(1, 4, 64, 64)

    def model(x, sigma, **kw):
        return x * 0.5

    runs = {"ours_us": lambda: pkg.samplers.sample_dpmpp_2m(model, x, sigmas, disable=True)}
    if comfy is not None:
        kds = comfy.k_diffusion.sampling
        runs["comfy_us"] = lambda: kds.sample_dpmpp_2m(model, x, sigmas, disable=True)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for fn in runs.values():  # warm-up
        fn()
    for _ in range(repeats):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    out = {name: min(values) / steps * 1e6 for name, values in times.items()}
    if comfy is not None:
        out["ratio"] = out["ours_us"] / out["comfy_us"]
    return out


def fmt(r: Result | None) -> str:
    if r is None:
        return "-"
    return f"{r.median:.4f} / {r.p90:.4f} / {r.flip_rate:.3f}"


def report(results: list[Result], problems, nfes, overhead: dict[str, float], command: str, with_comfy: bool,
           skipped: list[str], elapsed: float, n_samples: int, plot_name: str | None) -> str:
    base_source = "comfy" if with_comfy else "local"
    base_name = "ComfyUI (best sampler x scheduler)" if with_comfy else "local Euler/DDIM (best schedule)"
    lines = [BEGIN, "## Solver accuracy (tier 1: exact Gaussian mixtures)", ""]
    lines += [
        f"Produced by `{command}` ({platform.python_implementation()} {platform.python_version()}, "
        f"torch {torch.__version__}, CPU, {elapsed:.0f} s). Each problem: {n_samples} trajectories from the "
        "exact marginal at the family's sigma_max, reference = probability-flow ODE solved with DOP853 "
        "(rtol 1e-10) to sigma = 0. Cells: median / p90 per-sample RMS error / mode-flip rate; NFE counted in "
        "the model wrapper (a method that cannot hit the target NFE exactly runs at the largest step count "
        "that stays within it; the consumed NFE is shown, and a run that consumed more than the target "
        "(ComfyUI's `ddim_uniform` can return more steps than asked for) never counts as best). Every sampler works on a float32 state, as on "
        "ComfyUI latents; the exact denoiser and the reference are float64.",
        "",
    ]
    if with_comfy:
        lines += [
            "ComfyUI samplers are driven directly with the exact denoiser as `model` and schedules from "
            "`calculate_sigmas` on a real `ModelSampling` object (discard-penultimate rule applied). "
            "A schedule that starts below sigma_max (`ddim_uniform`) starts where KSampler starts it: from "
            "the trajectory's noise scaled to its first sigma (`noise_scaling`, empty latent). "
            "Deterministic configurations of the stochastic samplers reachable through ComfyUI's sampler "
            "nodes are included (`eta=0`; ER-SDE as `ode`, its node's solver type ODE); stochastic samplers, "
            "when run (`--stochastic`), never count as \"best\". "
            "Not run: " + (", ".join(skipped) or "none") + ".",
            "",
        ]
    target_rows = []
    fixed_names = [f"{label} / {schedule}" for label, schedule, _ in FIXED_PRESETS]
    for prob in problems:
        lines += [f"### {prob}", "",
                  f"| NFE | {base_name} | median / p90 / flips | ours (best preset) | median / p90 / flips "
                  "| median ratio | flips no worse |" + (" ratio vs best ComfyUI dpmpp_* |" if with_comfy else "")
                  + "".join(f" fixed preset {name}: median / flips, ratio |" for name in fixed_names),
                  "|---|---|---|---|---|---|---|" + ("---|" if with_comfy else "")
                  + "---|" * len(FIXED_PRESETS)]
        for nfe in nfes:
            b = best(results, prob, base_source, nfe, deterministic_only=True)
            o = best(results, prob, "ours", nfe)
            ratio = o.median / b.median if (o and b and b.median > 0) else math.nan
            flips_ok = (o.flip_rate <= b.flip_rate + 1e-12) if (o and b) else False
            d = best(results, prob, "comfy", nfe, deterministic_only=True, prefix="dpmpp_") if with_comfy else None
            dpm_cell = f"{o.median / d.median:.2f} ({d.label})" if (o and d and d.median > 0) else "-"
            fx_cells, fx_scores = [], []
            for preset in FIXED_PRESETS:
                fx = fixed(results, prob, nfe, preset)
                fx_ratio = fx.median / b.median if (fx and b and b.median > 0) else math.nan
                fx_ok = (fx.flip_rate <= b.flip_rate + 1e-12) if (fx and b) else False
                fx_scores.append((fx_ratio, fx_ok))
                fx_cells.append(f"{fx.median:.4f} / {fx.flip_rate:.3f}, {fx_ratio:.2f}"
                                f"{'' if fx_ok else ' (more flips)'}" if fx else "-")
            if nfe in TARGET_NFES and b is not None:
                # the lowest-median preset of ours that meets the target in this cell, if any
                meeting = [r for r in results if r.problem == prob and r.source == "ours"
                           and r.target_nfe == nfe and r.within_budget
                           and r.median <= TARGET_RATIO * b.median and r.flip_rate <= b.flip_rate + 1e-12]
                any_ok = min(meeting, key=lambda r: (r.median, r.flip_rate), default=None)
                target_rows.append(TargetCell(prob, nfe, ratio, flips_ok, tuple(fx_scores), any_ok, o, b))
            lines.append(
                f"| {nfe} | {b.label + f' ({b.nfe})' if b else '-'} | {fmt(b)} | "
                f"{o.label + f' ({o.nfe})' if o else '-'} | {fmt(o)} | {ratio:.2f} | {'yes' if flips_ok else 'no'} |"
                + (f" {dpm_cell} |" if with_comfy else "") + "".join(f" {c} |" for c in fx_cells)
            )
        lines.append("")
        # our presets across NFE
        ours_own = [r for r in results if r.source == "ours" and not r.schedule.endswith("(ComfyUI)")]
        labels = sorted({r.label for r in ours_own if r.problem == prob},
                        key=lambda s: [r.label for r in ours_own].index(s))
        lines += ["Our presets (median error):", "",
                  "| preset | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
                  "|---" * (len(nfes) + 1) + "|"]
        for label in labels:
            cells = []
            for n in nfes:
                rr = [r for r in results if r.problem == prob and r.source == "ours" and r.label == label
                      and r.target_nfe == n]
                cells.append(f"{rr[0].median:.4f}" if rr and rr[0].ok else "fail")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
        if with_comfy:
            lines += ["Our multistep presets on ComfyUI's schedulers, best scheduler per preset (median error):", "",
                      "| preset | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
                      "|---" * (len(nfes) + 1) + "|"]
            for label, _ in COMFY_SCHEDULE_PRESETS:
                cells = []
                for n in nfes:
                    rr = [r for r in results if r.problem == prob and r.source == "ours" and r.method == label
                          and r.schedule.endswith("(ComfyUI)") and r.target_nfe == n and r.within_budget]
                    r = min(rr, key=lambda r: r.median, default=None)
                    cells.append(f"{r.median:.4f} {r.schedule.split()[0]}" if r else "-")
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
            lines.append("")
            lines += ["ComfyUI, best scheduler per sampler (median error, consumed NFE in brackets when "
                      "below the target):", "",
                      "| sampler | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
                      "|---" * (len(nfes) + 1) + "|"]
            samplers = []
            for r in results:
                if r.problem == prob and r.source == "comfy" and r.method not in samplers:
                    samplers.append(r.method)
            for s in samplers:
                cells = []
                for n in nfes:
                    rr = [r for r in results if r.problem == prob and r.source == "comfy" and r.method == s
                          and r.target_nfe == n and r.within_budget]
                    if not rr:
                        cells.append("-")
                        continue
                    r = min(rr, key=lambda r: r.median)
                    extra = f" [{r.nfe}]" if r.nfe != n else ""
                    cells.append(f"{r.median:.4f} {r.schedule}{extra}")
                tag = " (stochastic)" if any(r.stochastic for r in results if r.method == s) else ""
                lines.append(f"| {s}{tag} | " + " | ".join(cells) + " |")
            lines.append("")
    lines += ["### Targets", ""]
    if target_rows:
        met = [r for r in target_rows if r.ratio <= TARGET_RATIO and r.flips_ok]
        base = "ComfyUI" if with_comfy else "baseline"
        lines.append(
            f"Target: our best median <= {TARGET_RATIO}x the best {base} "
            f"median at NFE {TARGET_NFES[0]}..{TARGET_NFES[-1]} with a flip rate no worse: met in "
            f"{len(met)} of {len(target_rows)} (problem, NFE) cells."
        )
        missed = [r for r in target_rows if r not in met]
        if missed:
            lines.append("Missed: " + "; ".join(
                f"{c.problem} NFE {c.nfe} (ratio {c.ratio:.2f}{', more flips' if not c.flips_ok else ''})"
                for c in missed
            ) + ".")
            paired = [(c, paired_flips(c.ours, c.base)) for c in missed if not c.flips_ok
                      and c.ours is not None and c.base is not None and c.ours.changed is not None
                      and c.base.changed is not None]
            if paired:
                lines.append(
                    "Mode flips in those cells, paired on the same trajectories (samples that change "
                    f"component with ours only / with the best {base} only; exact two-sided McNemar p of the "
                    "difference, small when it is not chance): " + "; ".join(
                        f"{c.problem} NFE {c.nfe}: {a} / {b_} (p = {pv:.2g})" for c, (a, b_, pv) in paired
                    ) + ".")
                lines.append(
                    "Whether they change the mix of components (total-variation distance between the "
                    "output's and the reference's component proportions; 0 when the changed samples only "
                    f"swap places, up to the flip rate), ours / the best {base}: " + "; ".join(
                        f"{c.problem} NFE {c.nfe}: {c.ours.composition:.3f} / {c.base.composition:.3f}"
                        for c, _ in paired
                    ) + ".")
            rescued = [(c.problem, c.nfe, c.any_ok) for c in missed if c.any_ok is not None]
            if rescued:
                lines.append(
                    f"Counting every preset of ours, not only the lowest-median one: met in "
                    f"{len(met) + len(rescued)} of {len(target_rows)} cells (" + "; ".join(
                        f"{p} NFE {n}: {r.label}, {r.median:.4f} with {r.flip_rate:.3f} flips"
                        for p, n, r in rescued
                    ) + ")."
                )
        for k, (name, (_, _, role)) in enumerate(zip(fixed_names, FIXED_PRESETS)):
            scores = [(c, *c.fixed[k]) for c in target_rows]
            if not any(math.isfinite(ratio) for _, ratio, _ in scores):
                continue
            fx_met = [c for c, ratio, ok in scores if ratio <= TARGET_RATIO and ok]
            fixed_cells = [f"{c.problem} {c.nfe}: {ratio:.2f}{'' if ok else '*'}" for c, ratio, ok in scores]
            lines.append(
                f"\nThe fixed preset {name}, {role} (chosen in advance on held-out mixtures, "
                "`bench/_tune.py`), "
                f"meets it in {len(fx_met)} of {len(target_rows)} cells; its median ratio to the best {base} "
                f"per cell: " + ", ".join(fixed_cells) + " (* = more flips)."
            )
    if overhead:
        if "ratio" in overhead:
            lines.append(
                "\nHost overhead per step (trivial model `x * 0.5`, 1x4x64x64 float32, 200 steps, "
                "best of 15, the two in turn): "
                f"ours {overhead['ours_us']:.1f} us, ComfyUI dpmpp_2m {overhead['comfy_us']:.1f} us, ratio "
                f"{overhead['ratio']:.2f} (target <= {OVERHEAD_TARGET})."
            )
        else:
            lines.append(f"\nHost overhead per step of our 2M (trivial model): {overhead['ours_us']:.1f} us "
                         "(ComfyUI not available for the comparison).")
    if plot_name:
        lines += ["", f"![median error vs NFE]({plot_name})"]
    lines += ["", END]
    return "\n".join(lines) + "\n"


def plot(results: list[Result], problems, nfes, path: Path, with_comfy: bool) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(problems), figsize=(4.2 * len(problems), 3.6), squeeze=False)
    for ax, prob in zip(axes[0], problems):
        series = [("ours (best preset)", "ours", None), ("local Euler (best schedule)", "local", "euler")]
        if with_comfy:
            series.insert(1, ("ComfyUI (best)", "comfy", None))
            series.append(("ComfyUI dpmpp_2m / karras", "comfy", ("dpmpp_2m", "karras")))
        for name, source, which in series:
            ys = []
            for n in nfes:
                pool = [r for r in results if r.problem == prob and r.source == source and r.target_nfe == n
                        and r.within_budget and not r.stochastic]
                if isinstance(which, str):
                    pool = [r for r in pool if r.method == which]
                elif isinstance(which, tuple):
                    pool = [r for r in pool if (r.method, r.schedule) == which]
                ys.append(min((r.median for r in pool), default=math.nan))
            ax.plot(nfes, ys, marker="o", label=name)
        ax.set_yscale("log")
        ax.set_xlabel("NFE")
        ax.set_title(prob, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("median RMS error at sigma = 0")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 problems, 256 samples, a reduced ComfyUI grid")
    ap.add_argument("--out", type=Path, default=None, help="markdown file to update (e.g. docs/benchmarks.md)")
    ap.add_argument("--plot", type=Path, default=None, help="PNG plot path (default: next to --out)")
    ap.add_argument("--samples", type=int, default=None,
                    help=f"trajectories per problem ({QUICK_SAMPLES} quick, {FULL_SAMPLES} full)")
    ap.add_argument("--stochastic", action="store_true",
                    help="also run ComfyUI's stochastic samplers with their default noise (slow, never 'best')")
    ap.add_argument("--no-tier2", action="store_true", help="skip tier 2 (the tiny trained teacher)")
    args = ap.parse_args(argv)
    check_out(args.out)

    torch.set_num_threads(1)  # small tensors: the intra-op pool only adds overhead
    t0 = time.time()
    pkg = import_package()
    from comfyui_fewstep.samplers import analytic

    comfy = _comfy.import_comfy()
    nfes = NFES
    n_samples = args.samples or (QUICK_SAMPLES if args.quick else FULL_SAMPLES)
    problems_spec = QUICK_PROBLEMS if args.quick else FULL_PROBLEMS
    bench = Bench(pkg, nfes)
    samplers, skipped, schedulers = [], [], []
    if comfy is not None:
        samplers, skipped = _comfy.sampler_list(comfy, include_stochastic=args.stochastic)
        schedulers = _comfy.scheduler_names(comfy)
        if args.quick:
            samplers = [s for s in samplers if s.name in QUICK_COMFY_SAMPLERS]
            schedulers = [s for s in schedulers if s in QUICK_COMFY_SCHEDULERS]
    problems = []
    for range_name, mixture_name in problems_spec:
        problem = analytic.make_problem(range_name, mixture_name, n_samples=n_samples, seed=0)
        problems.append(problem.name)
        bench.run_presets(problem)
        bench.run_local(problem)
        if comfy is not None:
            with warnings.catch_warnings():  # torchsde's float32 interval-boundary warnings
                warnings.simplefilter("ignore", UserWarning)
                bench.run_comfy(problem, comfy, samplers, schedulers)
            bench.run_presets_on_comfy_schedules(problem, comfy, schedulers)
        print(f"[{time.time() - t0:6.1f} s] {problem.name} done", file=sys.stderr)
    if not args.no_tier2:
        teacher = make_teacher_problem(pkg, n_samples=32 if args.quick else 128)
        problems.append(teacher.name)
        bench.run_presets(teacher)
        bench.run_local(teacher)
        if comfy is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                bench.run_comfy(teacher, comfy, samplers, schedulers)
            bench.run_presets_on_comfy_schedules(teacher, comfy, schedulers)
        print(f"[{time.time() - t0:6.1f} s] {teacher.name} (tier 2) done", file=sys.stderr)
    overhead = time_overhead(pkg, comfy, steps=50 if args.quick else 200)
    elapsed = time.time() - t0

    command = "python bench/solver_benchmark.py" + (" --quick" if args.quick else "")
    command += (f" --samples {args.samples}" if args.samples else "") + (" --stochastic" if args.stochastic else "")
    if args.out is not None:
        command += f" --out {args.out.as_posix()}"
    if comfy is not None:
        command = "COMFYUI_PATH=<ComfyUI 0.3.64 checkout> " + command
    plot_path = args.plot
    if plot_path is None and args.out is not None:
        plot_path = args.out.parent / ("solver_benchmark_quick.png" if args.quick else "solver_benchmark.png")
    plot_name = None
    if plot_path is not None and plot(bench.results, problems, nfes, plot_path, comfy is not None):
        plot_name = os.path.relpath(plot_path, args.out.parent if args.out else Path.cwd())
    section = report(bench.results, problems, nfes, overhead, command, comfy is not None, skipped, elapsed,
                     n_samples, plot_name)
    print(section)
    if args.out is not None:
        write_section(args.out, section, BEGIN, END)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
