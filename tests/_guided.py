"""A guided Gaussian mixture and the few-step preset's error on it (``bench/guidance_check.py``'s
set-up, smaller): ``D = D_u + cfg (D_c - D_u)`` with ``D_u`` the exact denoiser of a 16-D,
8-component mixture (mixture seed 12) and ``D_c`` that of its first three components, against the
same guided ODE solved with 400 steps of 3M."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from comfyui_fewstep.samplers import analytic, schedules
from comfyui_fewstep.samplers.budget import steps_for_nfe
from comfyui_fewstep.samplers.multistep import sample_dpmpp_multistep

#: the few-step preset's solver, with the DDIM first step unless a choice sets it
PRESET = {"order": 2, "corrector": "bh2", "final_order": 4, "final_weights": "gaussian"}


def preset_errors(range_name: str, cfg: float, nfes: Sequence[int], option: str,
                  choices: Sequence[str]) -> dict[tuple[int, str], float]:
    """Median per-sample error of the preset at each NFE with each value of ``option`` (``first_step``
    ``skip`` on its own window, :data:`schedules.SKIP_WINDOW`, with one step more for the same calls)."""
    rng = analytic.RANGE_PRESETS[range_name]
    full = analytic.GaussianMixture.random(16, 8, (0.05, 0.30), 12)
    guided = analytic.CountingDenoiser(analytic.GuidedMixture(full, 3, cfg), rng.form)
    p = rng.parameterization()
    x = full.sample(128, rng.sigma_max, rng.form, generator=torch.Generator().manual_seed(1))
    fine = schedules.get_sigmas("logsnr_uniform", 400, p)
    reference = sample_dpmpp_multistep(guided, x, fine, parameterization=p, order=3, disable=True,
                                       resume_history=False)
    errors = {}
    for nfe in nfes:
        for choice in choices:
            # the start without a call at sigma_max: the NFE planner's steps on its own window
            skip = option == "first_step" and choice == "skip"
            window = schedules.SKIP_WINDOW if skip else schedules.FEWSTEP_WINDOW
            steps = steps_for_nfe("multistep", nfe, PRESET["order"], skip_start=skip).steps
            sigmas = schedules.get_sigmas("logsnr_window", steps, p, **window)
            out = sample_dpmpp_multistep(guided, x, sigmas, parameterization=p, disable=True,
                                         resume_history=False, **PRESET, **{option: choice})
            errors[nfe, choice] = float(analytic.per_sample_rms(out, reference).median())
    return errors
