"""The first step from pure noise taken exactly for Gaussian data (``first_step="gaussian"``).

A run from the model's ``sigma_max`` starts with one model call, which returns nearly the data
mean, and DPM-Solver++ (like DDIM) takes the first step as exact for a constant data prediction:

    x_t = alpha_t D_s + (sigma_t / sigma_s) (x_s - alpha_s D_s).

The prediction does not stay constant: as the noise falls the sample moves away from the mean
along the directions in which the data varies, and at 5-10 steps the first step is long (from
sigma_max to a VE sigma of a few units), so the state at the next call lies too close to the mean,
and the call there sees the sample on the wrong side of the choice between the data's modes more
often (measured in ``docs/solver-experiments.md``: with the call made at the exact state, most of the mode
changes of the first step go away).

For data ``x0 ~ N(mu, c I)`` with ``c = sigma_data^2`` and ``x = alpha_t x0 + sigma_t eps``, the
probability-flow ODE keeps ``(x - alpha_t mu) / sqrt(alpha_t^2 c + sigma_t^2)`` constant (the
marginal is ``N(alpha_t mu, alpha_t^2 c + sigma_t^2)`` and the flow maps it onto itself by that
ratio; Song et al. 2021 eq. 13 for a Gaussian). The denoiser is ``D = mu + beta_s (x - alpha_s
mu)`` with ``beta_s = alpha_s c / (alpha_s^2 c + sigma_s^2)``; eliminating ``mu`` with the call at
``s`` gives the exact step in terms of ``x_s`` and ``D_s``,

    x_t = alpha_t D_s + K (x_s - alpha_s D_s),
    K = (k (alpha_s^2 c + sigma_s^2) - alpha_t alpha_s c) / sigma_s^2,
    k = sqrt((alpha_t^2 c + sigma_t^2) / (alpha_s^2 c + sigma_s^2)),

which is the DDIM step when ``c = 0`` (``K = sigma_t / sigma_s``) and for a flow model from
``sigma = 1`` reads ``x_t = alpha_t D_s + sqrt(alpha_t^2 c + sigma_t^2) x_s``. ``sigma_data`` is
the model's (:attr:`.Parameterization.sigma_data`: 1 for latents scaled to unit variance, 0.5 for
EDM's pixel models), a property of the model and not a tuned constant.

Only the first step of a run from ``sigma_max`` changes (not an img2img run, nor a resumed part of
a split schedule, whose first call is not at the data mean), and not when that step goes to sigma 0.
With the UniC corrector the state at the second call is then corrected from the two calls exactly
as before: the Gaussian step only moves the point where the model is called. Directions in which
the data varies by less than ``c`` are pushed out too far, but the prediction depends on a direction
of variance ``c_k`` with the weight ``alpha c_k / (alpha^2 c_k + sigma^2)``, which is small for them;
directions that vary more are pushed out too little, but less so than by DDIM. No extra model call;
no effect on the guided prediction's scale (the step is taken around ``D_s`` like DDIM's).

``first_step="skip"`` goes one step further and saves the call at ``sigma_max``, whose prediction is
nearly the data mean and so costs a model call for one vector. The same Gaussian model gives the
state at the next grid point from the noise and the mean, and the mean from one call there: with
``D = mu + beta (x - alpha mu)``, ``beta = alpha c / (alpha^2 c + sigma^2)``, a call at any point
``x'`` of that sigma gives ``mu = (D - beta x') / (1 - beta alpha)`` (``1 - beta alpha =
sigma^2 / (alpha^2 c + sigma^2) > 0``). :func:`skip_start` calls the model at the state the
transport gives for ``mu = 0`` (latents are roughly centred; the call only has to be made
somewhere near the state), solves the mean, moves the state to the transport of the solved mean
and the call's prediction to that state with the Gaussian's slope ``beta``. For Gaussian data of
the model's ``sigma_data`` and any mean this is exact; the run then goes on from ``sigmas[1]`` as a
run from noise whose first call is that one (its first step the Gaussian step of this module, its
second the flow step of :mod:`.flow_step` when asked for), so a schedule of ``n`` steps costs
``n - 1`` calls. The one call the start has is made where the prediction already depends on the
sample (the Tweedie regime, VE sigma of a few data scales), not at ``sigma_max``: at 5-8 calls
that call, moved into the steps that choose the data's modes, changes the mode of far fewer
samples (``docs/solver-experiments.md``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import Literal, get_args

import torch

from ._coefficients import MultistepCoefficients
from .parameterization import Parameterization

FirstStep = Literal["ddim", "gaussian", "skip"]
FIRST_STEPS: tuple[str, ...] = get_args(FirstStep)

__all__ = ["FIRST_STEPS", "FirstStep", "gaussian_step", "skip_start", "with_gaussian_first_step"]


def _marginal_var(p: Parameterization, sigma: float) -> float:
    """``alpha^2 c + sigma_t^2``: the per-dimension variance of the state at ``sigma`` for data of
    variance ``c = sigma_data^2``."""
    alpha = p.alpha(sigma)
    return alpha * alpha * p.sigma_data**2 + p.sigma_t(sigma) ** 2


def gaussian_step(p: Parameterization, sigma_s: float, sigma_t: float) -> tuple[float, float]:
    """``(c_x, c_d)`` of the exact step ``x_t = c_x x_s + c_d D_s`` for data ``N(mu, sigma_data^2 I)``
    (module docstring), for ``sigma_s > sigma_t > 0`` in ``p``'s coordinates; float64."""
    c = p.sigma_data**2
    alpha_s, alpha_t = p.alpha(sigma_s), p.alpha(sigma_t)
    var_s = _marginal_var(p, sigma_s)
    k = math.sqrt(_marginal_var(p, sigma_t) / var_s)
    c_x = (k * var_s - alpha_t * alpha_s * c) / (p.sigma_t(sigma_s) ** 2)
    return c_x, alpha_t - c_x * alpha_s


def with_gaussian_first_step(
    plan: list[MultistepCoefficients], sigmas: list[float], p: Parameterization
) -> list[MultistepCoefficients]:
    """``plan`` (a fresh data-prediction ODE run over ``sigmas`` from ``sigma_max``) with its first
    step exact for Gaussian data of the model's ``sigma_data``; unchanged when that step ends at 0."""
    if not plan or sigmas[1] <= 0.0:
        return plan
    first = plan[0]
    if first.order != 1 or len(first.c_m) != 1 or (first.m_x, first.m_d) != (0.0, 1.0):
        raise ValueError("internal error: the first step of a fresh data-prediction run is not a DDIM step")
    c_x, c_d = gaussian_step(p, sigmas[0], sigmas[1])
    return [replace(first, c_x=c_x, c_denoised=0.0, c_m=(c_d,)), *plan[1:]]


def skip_start(
    call: Callable[[torch.Tensor, float], torch.Tensor],
    x: torch.Tensor,
    p: Parameterization,
    sigma_s: float,
    sigma_t: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The state at ``sigma_t`` and the prediction there, from the noise ``x`` at ``sigma_s`` and one
    call ``call(x', sigma_t)`` (module docstring, ``first_step="skip"``); exact for data
    ``N(mu, sigma_data^2 I)`` of any mean. Coefficients in float64, for ``sigma_s > sigma_t > 0``."""
    alpha_s, alpha_t = p.alpha(sigma_s), p.alpha(sigma_t)
    var_t = _marginal_var(p, sigma_t)
    k = math.sqrt(var_t / _marginal_var(p, sigma_s))
    beta = alpha_t * p.sigma_data**2 / var_t
    x_call = x * k  # the transport of the noise for mu = 0
    denoised = call(x_call, sigma_t)
    mu = (denoised - x_call * beta) * (var_t / p.sigma_t(sigma_t) ** 2)  # 1 / (1 - beta alpha_t)
    x_t = x_call + mu * (alpha_t - k * alpha_s)
    return x_t, denoised + (x_t - x_call) * beta
