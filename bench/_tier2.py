"""Tier 2 of the solver benchmark: the pack's tiny trained teacher (a real learned model).

The demo's 8x8 digits teacher (``comfyui_fewstep.demo.load_teacher``, an EDM-preconditioned
UNet, sigma 0.002..80) stands in for the exact mixtures of tier 1. It has no closed-form
solution, so the reference is the same noise integrated with DPM-Solver++(3M, Taylor weight)
over 500 log-SNR-uniform steps (converged: the 250-step run differs by far less than any cell);
errors are per-sample RMS against it. Mode flips are not defined for it, so that column reads 0.
The object below has the attributes the benchmark's runners use from a tier-1 ``Problem``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch


class CountingTeacher:
    """``model(x, sigma, **extra_args)`` around the teacher, counting model calls (``nfe``)."""

    def __init__(self, teacher: Any) -> None:
        self.teacher, self.nfe = teacher, 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **extra_args: Any) -> torch.Tensor:
        self.nfe += 1
        return self.teacher(x.to(torch.float32), sigma.to(torch.float32)).to(x.dtype)


class _NoComponents:
    """Mode flips are undefined for a learned model: every sample is its own 'component'."""

    @staticmethod
    def nearest_component(x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x.shape[0], dtype=torch.long)


@dataclass
class TeacherProblem:
    name: str
    range: Any
    x_start: torch.Tensor
    reference: torch.Tensor
    teacher: Any
    mixture: Any = _NoComponents()
    noise: torch.Tensor | None = None

    @property
    def form(self) -> str:
        return "ve"

    @property
    def reference_component(self) -> torch.Tensor:
        return torch.zeros(self.x_start.shape[0], dtype=torch.long)

    def denoiser(self) -> CountingTeacher:
        return CountingTeacher(self.teacher)


def make_teacher_problem(pkg: Any, n_samples: int, seed: int = 0, reference_steps: int = 500) -> TeacherProblem:
    """Noise at sigma_max = 80 for ``n_samples`` 8x8 images and its 500-step reference."""
    from comfyui_fewstep.demo import load_teacher
    from comfyui_fewstep.samplers import analytic, schedules
    from comfyui_fewstep.samplers.multistep import sample_dpmpp_multistep

    teacher = load_teacher()
    rng = replace(analytic.RANGE_PRESETS["edm"], sigma_data=teacher.sigma_data)  # its data scale, 0.5
    p = rng.parameterization()
    g = torch.Generator().manual_seed(seed)
    x_start = torch.randn(n_samples, 1, 8, 8, generator=g, dtype=torch.float64) * rng.sigma_max
    sigmas = schedules.get_sigmas("logsnr_uniform", reference_steps, p)
    with torch.no_grad():
        reference = sample_dpmpp_multistep(
            CountingTeacher(teacher), x_start.clone(), sigmas.to(torch.float64), parameterization=p, order=3,
            resume_history=False, disable=True,
        )
    flat = x_start.reshape(n_samples, -1)
    return TeacherProblem("tiny_teacher/digits8", rng, flat, reference.reshape(n_samples, -1), _Flat(teacher),
                          noise=flat / rng.sigma_max)


class _Flat:
    """The teacher on flattened (B, 64) states, as the benchmark's runners hold them."""

    def __init__(self, teacher: Any) -> None:
        self.teacher = teacher

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return self.teacher(x.reshape(-1, 1, 8, 8), sigma).reshape(x.shape[0], -1)
