"""Adaptive step-size DPM-Solver++-12 / -23 with error control in lambda.

Lu et al. 2022 (DPM-Solver, arXiv 2206.00927, §4.3 and Alg. 4 "DPM-Solver-12/23"): at each
step of size ``h`` in half log-SNR, a lower-order solution ``x_low`` (order 1 for "12", the
2S step with ``r1 = 1/3`` for "23") and a higher-order one ``x_high`` (2S with ``r1 = 1/2``,
or 3S with ``r1 = 1/3, r2 = 2/3``) are computed from shared model evaluations, and

    delta = max(atol, rtol * max(|x_low|, |x_prev|))        (elementwise)
    E     = max over the batch of RMS((x_high - x_low) / delta)

The paper works with variance-preserving states (``alpha_t^2 + sigma_t^2 = 1``), for which
``atol = 0.0078`` (1/128 of the data range [-1, 1]) and ``rtol`` have a fixed meaning. A VE state
grows like sigma and a flow state has ``alpha_t + sigma_t = 1``, so the norm is evaluated on the
same states rescaled to VP form, ``x / sqrt(alpha_t^2 + sigma_t^2)`` (exact for a DDPM model
in VE coordinates; ``x_prev`` is scaled at its own noise level).

The step is accepted when ``E <= 1`` (then ``x <- x_high``, ``x_prev <- x_low``), and the next
step size is ``h <- min(h * min(theta * E^(-1/order), FACTOR_MAX), lambda_end - lambda_s)``. The
paper has no growth limit; the one here (``FACTOR_MAX = 5``, the usual ``facmax`` of embedded
Runge-Kutta controllers, Hairer, Norsett and Wanner, *Solving ODEs I*, §II.4) matters where the
data prediction is flat: from a flow model's sigma = 1 the first steps measure an error of about
0, and an unlimited update would take the next step across the whole range, where the two
embedded solutions agree only because both see the flat start. Here the updates are
the data-prediction (DPM-Solver++) ones of :mod:`.singlestep` by default (arXiv 2211.01095);
``algorithm="dpmsolver"`` gives the original noise-prediction solver.

Only ``sigmas[0]`` and the last non-zero sigma of the schedule are used: the solver picks its
own intermediate noise levels. When ``sigmas`` ends in 0 and ``final_step="zero"`` one more model
evaluation at the last non-zero sigma returns the data prediction.

NFE: an accepted or first attempt at a step costs ``order`` evaluations; a retry after a
rejection reuses the data prediction at the start and costs ``order - 1``. The count is written
into ``info`` and logged once at INFO level.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch

from ._loop import Denoiser, ModelEvaluator, X0Correction, check_final_step, sigma_list
from .parameterization import Parameterization
from .singlestep import (
    VE_DEFAULT,
    Algorithm,
    FinalStep,
    SolverType,
    validate_options,
    apply_row,
    build_tableau,
    run_step,
    solver_sigma,
)

logger = logging.getLogger(__name__)

__all__ = ["FACTOR_MAX", "AdaptiveBudgetError", "error_norm", "sample_dpmpp_adaptive", "schedule_position",
           "vp_scale"]

#: default tolerances of DPM-Solver++12/23 for image data (module docstring)
ATOL = 0.0078
RTOL = 0.05
#: largest growth of the step size from one step to the next (module docstring)
FACTOR_MAX = 5.0


class AdaptiveBudgetError(RuntimeError):
    """The adaptive solver reached ``max_nfe`` before the end of the schedule."""


def error_norm(
    x_high: torch.Tensor,
    x_low: torch.Tensor,
    x_prev: torch.Tensor,
    atol: float,
    rtol: float,
    scale: float = 1.0,
    scale_prev: float = 1.0,
) -> float:
    """Scaled local error ``E`` (arXiv 2206.00927, §4.3): per-sample RMS, max over the batch.

    ``delta = max(atol, rtol * max(|x_low|, |x_prev|))`` with the states multiplied by their VP
    scale factors (``scale`` for ``x_high``/``x_low``, ``scale_prev`` for ``x_prev``); tensors (B, ...).
    """
    delta = torch.maximum(x_low.abs() * scale, x_prev.abs() * scale_prev).mul_(rtol).clamp_(min=atol)
    scaled = ((x_high - x_low) * scale / delta).reshape(x_high.shape[0], -1)
    return float(scaled.square().mean(dim=1).sqrt().max())


def schedule_position(done: float, total: float, segments: int) -> int:
    """Index of the schedule interval reached after covering ``done`` of ``total`` half log-SNR.

    ComfyUI sizes its progress bar from the sigmas it is given (``len(sigmas) - 1`` steps) and
    sets it to ``i + 1`` at each callback. The adaptive solver chooses its own steps, so it
    reports how far it has come in log-SNR as a position on those ``segments`` intervals: the
    bar advances with the solution and reaches the end only when the solver does.
    """
    if total <= 0.0:
        return segments - 1
    return min(segments - 1, max(0, math.ceil(segments * done / total - 1e-9) - 1))


def vp_scale(parameterization: Parameterization, sigma: float) -> float:
    """``1 / sqrt(alpha_t^2 + sigma_t^2)``: multiplies a state into variance-preserving form."""
    return 1.0 / math.hypot(parameterization.alpha(sigma), sigma)


def _check_tolerances(order: int, atol: float, rtol: float, h_init: float, theta: float, t_err: float,
                      max_nfe: int) -> None:
    if order not in (2, 3):
        raise ValueError(f"adaptive order must be 2 (DPM-Solver++12) or 3 (DPM-Solver++23), got {order!r}")
    if not (atol >= 0.0 and rtol >= 0.0 and atol + rtol > 0.0):
        raise ValueError(f"need atol >= 0, rtol >= 0 and not both 0, got atol={atol!r}, rtol={rtol!r}")
    if not h_init > 0.0:
        raise ValueError(f"h_init (initial step in half log-SNR) must be > 0, got {h_init!r}")
    if not 0.0 < theta <= 1.0:
        raise ValueError(f"theta (step-size safety factor) must be in (0, 1], got {theta!r}")
    if not t_err >= 0.0:
        raise ValueError(f"t_err must be >= 0, got {t_err!r}")
    if isinstance(max_nfe, bool) or not isinstance(max_nfe, int) or max_nfe < order:
        raise ValueError(f"max_nfe must be an integer >= order ({order}), got {max_nfe!r}")


@torch.no_grad()
def sample_dpmpp_adaptive(
    model: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: dict[str, Any] | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    disable: bool | None = None,
    *,
    parameterization: Parameterization | None = None,
    order: int = 3,
    atol: float = ATOL,
    rtol: float = RTOL,
    h_init: float = 0.05,
    t_err: float = 1e-5,
    theta: float = 0.9,
    max_nfe: int = 1000,
    solver_type: SolverType = "midpoint",
    algorithm: Algorithm = "dpmsolver++",
    final_step: FinalStep = "zero",
    info: dict[str, Any] | None = None,
    x0_correction: X0Correction | None = None,
    check_finite: bool = True,
) -> torch.Tensor:
    """Adaptive DPM-Solver++-12 (``order=2``) or -23 (``order=3``) from ``sigmas[0]`` to the end.

    Args:
        model, x, sigmas, extra_args, callback: k-diffusion sampler contract. ``callback`` is
            called once per accepted step, with ``sigma`` the noise level reached, ``step``
            counting accepted steps, and ``i`` the position reached on the given schedule
            (:func:`schedule_position`), so that ComfyUI's progress bar, sized from ``sigmas``,
            follows the solution. The final denoising evaluation reports the last position.
            ``disable`` is accepted for the contract (no console bar: the number of steps is
            not known in advance).
        parameterization: VE (default) or flow coordinates.
        order: 2 or 3.
        atol, rtol: absolute and relative tolerance of the local error (defaults as in the paper
            for data in [-1, 1]; latents have a larger scale, so ``atol`` matters less there).
        h_init: first step size in half log-SNR.
        t_err: stop when the remaining half log-SNR distance is at most this.
        theta: safety factor of the step-size update.
        max_nfe: budget; :class:`AdaptiveBudgetError` is raised when it would be exceeded.
        solver_type, algorithm: as in :func:`.singlestep.sample_dpmpp_singlestep`.
        final_step: ``"zero"`` adds the final denoising evaluation when ``sigmas`` ends in 0;
            ``"sigma_min"`` returns x at the last non-zero sigma.
        info: if given, receives ``nfe``, ``steps_accepted`` and ``steps_rejected``.
        x0_correction: hook applied to every data prediction.
        check_finite: stop with an error when the model returns NaN/inf.
    """
    validate_options(algorithm, solver_type, final_step)
    _check_tolerances(order, atol, rtol, h_init, theta, t_err, max_nfe)
    p = VE_DEFAULT if parameterization is None else parameterization
    values = sigma_list(sigmas, p)
    check_final_step(values, final_step, p.sigma_max)
    nonzero = [s for s in values if s > 0.0]
    # error messages name the position on the given schedule, as the progress bar shows it
    evaluator = ModelEvaluator(model, extra_args, x0_correction, max(1, len(values) - 1), check_finite)
    accepted = rejected = 0
    if len(values) >= 2 and nonzero:
        sigma_s, sigma_end = solver_sigma(p, values[0]), nonzero[-1]
        r1 = 1.0 / 3.0 if order == 3 else 0.5
        lambda_s, lambda_end = p.lambda_(sigma_s), p.lambda_(sigma_end)
        denoise_last = values[-1] == 0.0 and final_step == "zero"
        lambda_0, segments = lambda_s, max(1, len(values) - 1 - denoise_last)
        h = min(h_init, lambda_end - lambda_s)
        x_prev, denoised_s, scale_prev = x, None, vp_scale(p, sigma_s)
        while lambda_end - lambda_s > t_err:
            cost = order - (denoised_s is not None)
            if evaluator.nfe + cost > max_nfe:
                raise AdaptiveBudgetError(
                    f"adaptive DPM-Solver++ used {evaluator.nfe} model evaluations ({accepted} accepted, "
                    f"{rejected} rejected steps) and reached sigma={sigma_s:.6g} of {sigma_end:.6g}; "
                    f"max_nfe={max_nfe}. Loosen rtol={rtol}/atol={atol} (or raise max_nfe when calling "
                    "the sampler from code)."
                )
            last = h >= lambda_end - lambda_s
            sigma_t = sigma_end if last else p.sigma_from_lambda(lambda_s + h)
            high = build_tableau(order, sigma_s, sigma_t, p, algorithm, solver_type, r1, 2.0 / 3.0)
            low = build_tableau(order - 1, sigma_s, sigma_t, p, algorithm, solver_type, r1)
            start = min(segments - 1, int(segments * (lambda_s - lambda_0) / (lambda_end - lambda_0)))
            x_high, m, denoised = run_step(high, x, lambda xs, s: evaluator(xs, s, start), denoised_s)
            x_low = apply_row(low.rows[-1], x, m[: order - 1])
            scale_t = vp_scale(p, sigma_t)
            error = error_norm(x_high, x_low, x_prev, atol, rtol, scale_t, scale_prev)
            if error <= 1.0:
                x, x_prev, denoised_s, scale_prev = x_high, x_low, None, scale_t
                sigma_s = sigma_t
                lambda_s = lambda_end if last else p.lambda_(sigma_t)
                accepted += 1
                if callback is not None:
                    position = schedule_position(lambda_s - lambda_0, lambda_end - lambda_0, segments)
                    sigma = sigmas.new_tensor(sigma_t)
                    callback({"x": x, "i": position, "sigma": sigma, "sigma_hat": sigma,
                              "denoised": denoised, "step": accepted - 1})
            else:
                denoised_s = denoised
                rejected += 1
            if error == 0.0:
                factor = FACTOR_MAX
            elif math.isfinite(error):
                factor = min(theta * error ** (-1.0 / order), FACTOR_MAX)
            else:
                factor = 0.1
            h = min(h * factor, lambda_end - lambda_s)
        if denoise_last:
            x = evaluator(x, sigma_end, len(values) - 2)
            if callback is not None:
                sigma = sigmas.new_tensor(sigma_end)
                callback({"x": x, "i": len(values) - 2, "sigma": sigma, "sigma_hat": sigma,
                          "denoised": x, "step": accepted})
    stats = {"nfe": evaluator.nfe, "steps_accepted": accepted, "steps_rejected": rejected}
    if info is not None:
        info.update(stats)
    logger.info(
        "adaptive DPM-Solver++%d%d: %d NFE (%d accepted, %d rejected steps; rtol=%g, atol=%g)",
        order - 1, order, stats["nfe"], accepted, rejected, rtol, atol,
    )
    return x
