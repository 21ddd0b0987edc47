"""The numbers a recipe implies: timesteps, sigmas, first-step noise scale, re-noising.

All latent students share Stable Diffusion's DDPM schedule (``scaled_linear`` betas 0.00085 to
0.012, 1000 steps; Ho et al. 2020 eq. 4): ``abar_t = prod_{s<=t} (1 - beta_s)`` and ComfyUI's
(k-diffusion's) noise level ``sigma_t = sqrt((1 - abar_t) / abar_t)``. In those VE coordinates a
DDPM sample ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) z`` is ``x = x_t / sqrt(abar_t) = x0 + sigma_t z``
and an eps network sees ``x / sqrt(1 + sigma_t^2) = x_t``.

Everything here is float64 host arithmetic (Python floats / float64 tensors). torch is imported
only where a tensor is returned, so ``python -m comfyui_fewstep inspect`` never loads it.
"""

from __future__ import annotations

import math
import struct
from functools import lru_cache
from typing import TYPE_CHECKING

from .specs import Recipe, get_recipe

if TYPE_CHECKING:
    import torch

__all__ = [
    "DDPM_TIMESTEPS",
    "alphas_cumprod",
    "ddpm_sigma",
    "first_step_noise_scale",
    "lcm_boundary_scalings",
    "network_input_std",
    "recipe_sigma_values",
    "recipe_sigmas",
    "recipe_timesteps",
    "renoise",
    "timestep_from_sigma",
]

DDPM_TIMESTEPS = 1000
LCM_ORIGINAL_STEPS = 50
TURBO_TIMESTEPS = (999, 899, 799, 699)


#: SD's ``scaled_linear`` betas: linear in sqrt(beta) from 0.00085 to 0.012
BETA_START, BETA_END = 0.00085, 0.012


@lru_cache(maxsize=1)
def _sigmas() -> tuple[float, ...]:
    """``sigma_t`` for t = 0..999 in float64 Python arithmetic, the same numbers as
    ``samplers.parameterization.discrete_vp_sigmas`` (torch's linspace: each half from its end)."""
    n, a, b = DDPM_TIMESTEPS, BETA_START**0.5, BETA_END**0.5
    step = (b - a) / (n - 1)
    abar, out = 1.0, []
    for i in range(n):
        root = a + i * step if i < n // 2 else b - (n - 1 - i) * step
        abar *= 1.0 - root * root
        out.append(math.sqrt((1.0 - abar) / abar))
    return tuple(out)


def alphas_cumprod(t: int) -> float:
    """``abar_t`` of SD's scaled-linear DDPM schedule at integer timestep ``t`` (0..999)."""
    sigma = ddpm_sigma(t)
    return 1.0 / (1.0 + sigma * sigma)


def ddpm_sigma(t: float) -> float:
    """``sigma_t = sqrt((1 - abar_t)/abar_t)``; fractional ``t`` interpolates ``log sigma`` linearly
    (as ComfyUI's ``ModelSamplingDiscrete.sigma`` does)."""
    if not 0 <= t <= DDPM_TIMESTEPS - 1:
        raise ValueError(f"timestep must lie in [0, {DDPM_TIMESTEPS - 1}], got {t}")
    sigmas = _sigmas()
    lo = math.floor(t)
    hi = min(lo + 1, DDPM_TIMESTEPS - 1)
    w = t - lo
    return math.exp((1.0 - w) * math.log(sigmas[lo]) + w * math.log(sigmas[hi]))


def timestep_from_sigma(sigma: float) -> int:
    """Nearest integer DDPM timestep in ``log sigma`` (ComfyUI's ``ModelSamplingDiscrete.timestep``)."""
    log_sigma = math.log(sigma)
    sigmas = _sigmas()
    return min(range(DDPM_TIMESTEPS), key=lambda t: abs(math.log(sigmas[t]) - log_sigma))


def _trailing(n: int) -> list[int]:
    """diffusers ``timestep_spacing="trailing"``: ``round(arange(1000, 0, -1000/n)) - 1``.

    ``numpy.arange`` computes its i-th value as ``start + i * delta`` with ``delta`` the float
    difference of its first two values (not ``-1000/n`` itself), and ``round`` is half-to-even as
    in ``numpy.round``; both matter where a value lands on .5 (e.g. n = 48).
    """
    start = float(DDPM_TIMESTEPS)
    delta = (start - start / n) - start
    return [round(start + i * delta) - 1 for i in range(n)]


def _float32(x: float) -> float:
    """``x`` rounded to the nearest IEEE single, as a Python float."""
    return struct.unpack("f", struct.pack("f", x))[0]


def _linear_from(t0: float, i: int, n: int) -> int:
    """SiD-LSG's multi-step timestep ``(t0 * (1 - i/n)).to(torch.long)`` on an integer tensor:
    a float32 product (exact here: two singles multiply exactly in a double, then round once)
    truncated toward zero, e.g. t0 = 625, n = 3 gives 625, 416, 208 (not 417)."""
    return math.trunc(_float32(_float32(t0) * _float32(1.0 - i / n)))


def _lcm50(n: int) -> list[int]:
    """LCM/TCD grid (diffusers ``LCMScheduler.set_timesteps``): the 50-step skip grid
    ``19, 39, ..., 999`` read backwards at ``floor(linspace(0, 50, n, endpoint=False))``."""
    origin = [(k + 1) * (DDPM_TIMESTEPS // LCM_ORIGINAL_STEPS) - 1 for k in range(LCM_ORIGINAL_STEPS)][::-1]
    return [origin[math.floor(i * LCM_ORIGINAL_STEPS / n)] for i in range(n)]


def _check_steps(recipe: Recipe, steps: int) -> None:
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if recipe.allowed_steps and steps not in recipe.allowed_steps:
        raise ValueError(
            f"recipe {recipe.name!r} ({recipe.student}) is distilled for {list(recipe.allowed_steps)} steps, "
            f"got {steps}; use one of those step counts or pick another recipe"
        )
    if recipe.schedule == "lcm50" and steps > LCM_ORIGINAL_STEPS:
        # diffusers' LCMScheduler refuses this too: the 50-step grid would repeat timesteps
        raise ValueError(f"recipe {recipe.name!r} samples on LCM's {LCM_ORIGINAL_STEPS}-step grid: at most "
                         f"{LCM_ORIGINAL_STEPS} steps, got {steps} (more would repeat timesteps)")
    if recipe.schedule == "turbo" and steps > len(TURBO_TIMESTEPS):
        raise ValueError(f"recipe {recipe.name!r} supports at most {len(TURBO_TIMESTEPS)} steps, got {steps}")
    if recipe.schedule == "fixed" and steps != len(recipe.timesteps):
        raise ValueError(
            f"recipe {recipe.name!r} has fixed timesteps {list(recipe.timesteps)}; steps must be "
            f"{len(recipe.timesteps)}, got {steps}"
        )


def recipe_timesteps(recipe: Recipe | str, steps: int | None = None) -> list[float]:
    """The timesteps the student is evaluated at, first to last (DDPM integer timesteps, or
    ``1000 sigma`` for rectified flows). EDM recipes return ``[]`` (they use sigma directly)."""
    recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
    steps = recipe.steps if steps is None else steps
    _check_steps(recipe, steps)
    schedule = recipe.schedule
    if schedule == "fixed":
        return [float(t) for t in recipe.timesteps]
    if schedule == "trailing":
        return [float(t) for t in _trailing(steps)]
    if schedule == "lcm50":
        return [float(t) for t in _lcm50(steps)]
    if schedule == "turbo":
        return [float(t) for t in TURBO_TIMESTEPS[:steps]]
    if schedule == "linear_from":
        return [float(_linear_from(recipe.timesteps[0], i, steps)) for i in range(steps)]
    if schedule == "flow_linear":
        return [DDPM_TIMESTEPS * (1.0 - i / steps) for i in range(steps)]
    return []  # edm_sigma


def recipe_sigmas(recipe: Recipe | str, steps: int | None = None) -> torch.Tensor:
    """ComfyUI SIGMAS for the recipe: :func:`recipe_sigma_values` as a float64 tensor."""
    import torch

    return torch.tensor(recipe_sigma_values(recipe, steps), dtype=torch.float64)


def recipe_sigma_values(recipe: Recipe | str, steps: int | None = None) -> list[float]:
    """The recipe's noise levels, one per step plus the final 0 (Python floats).

    DDPM students: ``sigma_t`` of each timestep. Rectified flows: ``sigma = t / 1000`` (so
    ``sigma = 1 - i/N``). EDM generators: ``[sigma_init, 0]``.
    """
    recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
    timesteps = recipe_timesteps(recipe, steps)
    if recipe.schedule == "edm_sigma":
        values = [float(recipe.sigma_init)]
    elif recipe.schedule == "flow_linear":
        values = [t / DDPM_TIMESTEPS for t in timesteps]
    else:
        values = [ddpm_sigma(t) for t in timesteps]
    return [*values, 0.0]


def network_input_std(recipe: Recipe | str, sigma0: float) -> float:
    """Standard deviation of the first network input (pure noise, no image) under the recipe.

    ``unit``: 1 (e.g. DMD2-SDXL at t=399, Hyper-SDXL at t=800). ``ddpm``: ``sqrt(1 - abar_t)
    = sigma / sqrt(1 + sigma^2)`` (SiD-LSG's ``add_noise(0, z, 625)``). ``edm``: ``c_in sigma_init
    = sigma / sqrt(sigma^2 + sigma_data^2)`` with sigma_data 0.5.
    """
    recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
    if recipe.first_noise == "unit":
        return 1.0
    if recipe.first_noise == "ddpm":
        return sigma0 / math.sqrt(1.0 + sigma0 * sigma0)
    return sigma0 / math.sqrt(sigma0 * sigma0 + 0.25)


def first_step_noise_scale(recipe: Recipe | str, sigma0: float) -> float:
    """Multiplier ``s`` with ``x_init = s z`` in the sampler's coordinates (``z`` unit Gaussian).

    VE/eps coordinates: the eps network sees ``x / sqrt(1 + sigma0^2)``, so ``unit`` needs
    ``s = sqrt(1 + sigma0^2)`` and ``ddpm`` needs ``s = sigma0`` (ComfyUI's default below
    ``sigma_max`` is the latter, which gives DMD2-SDXL's t=399 input a std of 0.758 instead of 1).
    Rectified flow: ``x = sigma z + (1 - sigma) x0`` so ``s = sigma0`` (1 at the start). EDM:
    ``s = sigma_init``.
    """
    recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
    if recipe.prediction in ("flow_reversed", "edm") or recipe.first_noise in ("ddpm", "edm"):
        return float(sigma0)
    return math.sqrt(1.0 + sigma0 * sigma0)


def renoise(denoised: torch.Tensor, sigma_next: float, noise: torch.Tensor) -> torch.Tensor:
    """LCM-style re-noising in VE coordinates: ``x_next = x0 + sigma_next z`` with fresh ``z``.

    Equals diffusers ``DDPMScheduler.add_noise(x0, z, t_next) / sqrt(abar_{t_next})``
    (Luo et al. 2023, Alg. 3 line 'x_{tau_{n+1}} = sqrt(abar) x0 + sqrt(1-abar) z').
    """
    return denoised + sigma_next * noise if sigma_next > 0 else denoised


def lcm_boundary_scalings(
    timestep: float, sigma_data: float = 0.5, timestep_scaling: float = 10.0
) -> tuple[float, float]:
    """LCM consistency boundary condition ``(c_skip, c_out)`` (Luo et al. 2023 eq. 9;
    diffusers ``LCMScheduler.get_scalings_for_boundary_condition_discrete``)."""
    scaled = timestep * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / math.sqrt(scaled**2 + sigma_data**2)
    return c_skip, c_out
