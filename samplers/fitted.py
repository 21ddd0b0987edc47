"""A multistep solver whose per-step coefficients are fitted to one model (with its schedule).

At 4-8 model calls the fixed weights of Adams-type solvers (DPM-Solver++, UniPC, iPNDM) come from
polynomial interpolation, which is a poor model of the data prediction over steps of one or more
units of log-SNR. Improved Integration Approximation (IIA; Zhang, Niwa and Kleijn 2023, arXiv
2304.11328, eqs. 10-14) keeps the solver's update and adds a few terms whose coefficients are
fitted, per step, by least squares against an accurate integration; Differentiable Solver Search
(Wang et al. 2025, arXiv 2505.21114) searches timesteps and multistep coefficients together.
This module is the update both calibrations use (:mod:`.calibration` fits it):

For a step from ``s = sigma_n`` to ``t = sigma_(n+1) > 0`` with ``h = lambda_t - lambda_s`` and
``r = h_(n-1) / h``, the base is DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095, Alg. 2,
midpoint form)::

    x_base = (sigma_t / sigma_s) x_n + alpha_t (1 - e^-h) D_n + alpha_t (1 - e^-h) / (2 r) (D_n - D_(n-1))

and the fitted step adds a linear combination of ``K + 2`` regressors::

    x_(n+1) = x_base + w_0 alpha_t D_n + w_1 (sigma_t / sigma_s) x_n + sum_(k=1..K) w_(k+1) alpha_t (D_n - D_(n-k))

(only the history that exists: the first step has two regressors). The last step to ``sigma = 0``
returns ``D_n + sum_k w_k (D_n - D_(n-k))``. With every ``w = 0`` this is 2M without a
lower-order final step. The weights depend on the schedule, so a fitted solver is always used
with the sigmas it was fitted on (:func:`sample_fitted_multistep` checks).

**Mean first step.** At ``sigma_max`` the data prediction carries little about the sample: for
data of mean ``m`` and covariance ``C``, ``D(x, sigma) = m + C (C + sigma^2 I)^-1 (x - m)``
(Tweedie's formula for a Gaussian), which tends to ``m`` as ``sigma`` grows. The analytical first
step of AMED-Solver (Zhou et al. 2024, arXiv 2312.00094, sec. 3.3) saves that model call by
taking ``D = 0`` (the noise prediction ``x / sigma``); with ``first_prediction`` the first step
instead uses a given ``D_0``, the teacher's mean prediction at ``sigma_max`` over the calibration
noise (:mod:`.calibration`), and makes no model call: ``N`` model calls then buy ``N + 1``
steps. The step's fitted weight on ``x_n`` absorbs the linear term.

Fitting (:func:`fit_fitted_multistep`) runs the solver on calibration noise and, at each step,
chooses the step's ``w`` so that ``x_(n+1)`` lands on the teacher's trajectory at ``t`` (the
teacher's end point for the last step): a weighted least-squares problem over every sample and
element, solved in float64. The weights are iteratively reweighted by each sample's inverse
residual (IRLS for the sum of per-sample RMS errors), so the rare calibration sample that falls
into another mode does not drag the fit. Model calls are those of one sampling run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ._loop import Denoiser, ModelEvaluator, X0Correction, emit_callback, progress, sigma_list
from .parameterization import Parameterization

__all__ = ["HISTORY", "IRLS_ITERATIONS", "check_first_prediction", "fit_fitted_multistep", "regressor_count",
           "sample_fitted_multistep"]

#: number of history differences ``D_n - D_(n-k)`` among the regressors
HISTORY = 3
#: reweighting passes of the per-step least-squares fit
IRLS_ITERATIONS = 3
#: relative tolerance when comparing a run's sigmas with the fitted ones (SIGMAS travel as float32)
SIGMA_RTOL = 1e-5

_F64 = torch.float64
_VE_DEFAULT = Parameterization("ve", 1e-12, 1e12, family="edm")

Targets = Callable[[int, float], torch.Tensor]
"""``targets(n, sigma)``: the teacher's state after step ``n`` (at ``sigma``; its end point at 0)."""


def regressor_count(step: int, n_steps: int, history: int = HISTORY) -> int:
    """Number of fitted weights of step ``step`` (0-based) in a run of ``n_steps`` ending at 0."""
    k = min(history, step)
    return k if step == n_steps - 1 else k + 2


def _step_weights(s: float, t: float, s_prev: float | None, p: Parameterization,
                  k: int) -> tuple[list[float], list[float | None]]:
    """One step as scalars on the atoms ``[D_n, x_n, D_n - D_(n-1), ..., D_n - D_(n-k)]``: the base
    update's coefficients and each regressor's scale (None: not a regressor), in the regressors'
    order of the module docstring. Float64 host values."""
    if t == 0.0:
        return final_step_weights(k)
    h = p.lambda_(t) - p.lambda_(s)
    r = None
    if k and s_prev is not None and math.isfinite(p.lambda_(s_prev)):
        r = (p.lambda_(s) - p.lambda_(s_prev)) / h
    return combine_step_weights(-math.expm1(-h), p.sigma_t(t) / p.sigma_t(s), p.alpha(t), r, k)


def final_step_weights(k: int) -> tuple[list[float], list[float | None]]:
    """The last step (to ``sigma = 0``): ``D_n`` plus the history regressors."""
    return [1.0, 0.0] + [0.0] * k, [None, None] + [1.0] * k


def combine_step_weights(c1: Any, ratio: Any, alpha_t: Any, r: Any, k: int) -> tuple[list[Any], list[Any]]:
    """:func:`_step_weights` from ``c1 = 1 - e^-h``, ``sigma_t / sigma_s``, ``alpha_t`` and the step
    ratio ``r`` (None without a usable previous step): floats, or tensors when differentiated."""
    base = [alpha_t * c1, ratio] + [0.0] * k
    if k and r is not None:
        base[2] = alpha_t * c1 / (2.0 * r)
    return base, [alpha_t, ratio] + [alpha_t] * k


def _step_terms(x: torch.Tensor, outputs: list[torch.Tensor], weights: tuple[list[float], list[float | None]]
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The base update and the regressor tensors of one step (for fitting)."""
    d = outputs[0]
    atoms = [d, x, *(d - outputs[j] for j in range(1, len(outputs)))]
    base_coef, scales = weights
    base = sum((c * v for c, v in zip(base_coef, atoms) if c != 0.0), torch.zeros_like(d))
    return base, [c * v for c, v in zip(scales, atoms) if c is not None]


def _apply_step(x: torch.Tensor, outputs: list[torch.Tensor], weights: tuple[list[float], list[float | None]],
                w: Sequence[float]) -> torch.Tensor:
    """``x_base + sum_k w_k R_k`` folded into one combination of ``x_n`` and the stored ``D``'s
    (sampling: no regressor tensors, ``k + 2`` scaled adds)."""
    base_coef, scales = weights
    it = iter(w)
    coef = [b + next(it) * c if c is not None else b for b, c in zip(base_coef, scales)]
    # D_n - D_(n-j) atoms: their coefficients move onto D_n and (negated) onto D_(n-j)
    c_d = coef[0] + sum(coef[2:])
    state = c_d * outputs[0]
    if coef[1] != 0.0:
        state = state + coef[1] * x
    for j, c in enumerate(coef[2:], start=1):
        if c != 0.0:
            state = state - c * outputs[j]
    return state


def _fit_step(base: torch.Tensor, regressors: list[torch.Tensor], target: torch.Tensor,
              iterations: int) -> list[float]:
    """Weights ``w`` minimising the sum over samples of ``||base + sum w_k R_k - target||`` (IRLS)."""
    if not regressors:
        return []
    b = base.shape[0]
    a = torch.stack([r.reshape(b, -1).to(_F64) for r in regressors], -1)  # [B, d, P]
    y = (target.to(_F64) - base.to(_F64)).reshape(b, -1)
    weights = torch.ones(b, dtype=_F64, device=a.device)
    eye = torch.eye(a.shape[-1], dtype=_F64, device=a.device)
    w = torch.zeros(a.shape[-1], dtype=_F64, device=a.device)
    for _ in range(iterations + 1):
        gram = torch.einsum("b,bdp,bdq->pq", weights, a, a)
        rhs = torch.einsum("b,bdp,bd->p", weights, a, y)
        ridge = 1e-10 * float(torch.diagonal(gram).mean()) + 1e-300
        w = torch.linalg.solve(gram + ridge * eye, rhs)
        residual = (y - a @ w).pow(2).mean(1).sqrt()
        weights = 1.0 / residual.clamp_min(1e-6 * float(residual.median()) + 1e-30)
    return [float(v) for v in w]


def check_first_prediction(first_prediction: torch.Tensor | None, x: torch.Tensor,
                           extra_args: dict[str, Any] | None = None) -> None:
    """Raise unless ``first_prediction`` (``[1, ...]``) fits the latents ``x`` (``[B, ...]``)."""
    if first_prediction is None:
        return
    if tuple(first_prediction.shape) != (1, *x.shape[1:]):
        raise ValueError(
            f"this fitted sampler's first step was calibrated for latents of shape "
            f"{list(first_prediction.shape[1:])} but got {list(x.shape[1:])}: calibrate again at this "
            "image size")
    if extra_args and extra_args.get("denoise_mask") is not None:
        raise ValueError("a fitted sampler with a mean first step makes no model call at its first step, so "
                         "it cannot keep an inpainting mask's region there; calibrate dpmpp_2m_fitted for "
                         "inpainting")


def _run(model: Denoiser, x: torch.Tensor, values: list[float], p: Parameterization, *,
         coefficients: Sequence[Sequence[float]] | None, targets: Targets | None, history: int,
         irls_iterations: int, extra_args: dict[str, Any] | None, callback: Callable | None, disable: bool | None,
         sigmas: torch.Tensor, x0_correction: X0Correction | None, check_finite: bool,
         first_prediction: torch.Tensor | None = None) -> tuple[torch.Tensor, list[list[float]]]:
    n_steps = len(values) - 1
    check_first_prediction(first_prediction, x, extra_args)
    evaluate = ModelEvaluator(model, extra_args, x0_correction, n_steps, check_finite)
    work = torch.float32 if x.device.type == "mps" else _F64  # MPS has no float64
    state = x.to(work)
    outputs: list[torch.Tensor] = []
    fitted: list[list[float]] = []
    for n in progress(n_steps, disable):
        s, t = values[n], values[n + 1]
        x_n = state.to(x.dtype)  # the model and the callback see the caller's dtype
        if n == 0 and first_prediction is not None:  # the mean first step: no model call
            denoised = first_prediction.to(x_n).expand_as(x_n)
        else:
            denoised = evaluate(x_n, s, n)
        emit_callback(callback, n, x_n, s, denoised, sigmas)
        outputs = [denoised.to(work), *outputs][: history + 1]
        weights = _step_weights(s, t, values[n - 1] if n else None, p, len(outputs) - 1)
        if targets is not None:
            w = _fit_step(*_step_terms(state, outputs, weights), targets(n, t), irls_iterations)
            fitted.append(w)
        else:
            w = coefficients[n]  # type: ignore[index]
        state = _apply_step(state, outputs, weights, w)
    return state.to(x.dtype), fitted


def _check_coefficients(coefficients: Sequence[Sequence[float]], n_steps: int, history: int) -> None:
    if len(coefficients) != n_steps:
        raise ValueError(f"the fitted solver has coefficients for {len(coefficients)} steps but the schedule has "
                         f"{n_steps}; use the sigmas it was calibrated with")
    for n, row in enumerate(coefficients):
        want = regressor_count(n, n_steps, history)
        if len(row) != want or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in row):
            raise ValueError(f"fitted coefficients of step {n + 1}: expected {want} finite numbers, got {list(row)!r}")


@torch.no_grad()
def sample_fitted_multistep(
    model: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: dict[str, Any] | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    disable: bool | None = None,
    *,
    coefficients: Sequence[Sequence[float]] = (),
    fitted_sigmas: Sequence[float] | None = None,
    history: int = HISTORY,
    parameterization: Parameterization | None = None,
    x0_correction: X0Correction | None = None,
    check_finite: bool = True,
    first_prediction: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sample with fitted per-step coefficients (module docstring; k-diffusion sampler contract).

    Args:
        coefficients: the weights of every step, from :func:`fit_fitted_multistep` (or a saved
            calibration).
        fitted_sigmas: the schedule they were fitted on; ``sigmas`` must match it (relative
            tolerance :data:`SIGMA_RTOL`), and its float64 values are used.
        history: number of history differences (as when fitting).
        parameterization: VE (default) or flow coordinates and sigma range.
        first_prediction: ``[1, ...]``: the data prediction of the first step (mean first step,
            no model call there), as calibrated.

    Raises:
        ValueError: the sigmas do not end in 0, differ from ``fitted_sigmas``, the coefficients
            do not fit the schedule, or ``first_prediction`` does not fit the latents.
    """
    p = _VE_DEFAULT if parameterization is None else parameterization
    values = sigma_list(sigmas, p)
    if fitted_sigmas is not None:
        fitted = [float(v) for v in fitted_sigmas]
        if len(fitted) != len(values) or any(abs(a - b) > SIGMA_RTOL * max(abs(b), 1e-12) for a, b in zip(values, fitted)):
            raise ValueError(
                "this fitted sampler was calibrated for the sigmas "
                f"[{', '.join(f'{v:.5g}' for v in fitted)}] but got [{', '.join(f'{v:.5g}' for v in values)}]. "
                "Connect the SIGMAS output of the same FewStep Calibrate Steps / Load Schedule node (no split, "
                "no denoise < 1), or calibrate a plain preset such as dpmpp_2m for other schedules."
            )
        values = fitted
    if len(values) < 2:
        return x
    if values[-1] != 0.0:
        raise ValueError(f"the fitted solver's schedule must end in 0, got last sigma {values[-1]!r}")
    _check_coefficients(coefficients, len(values) - 1, history)
    out, _ = _run(model, x, values, p, coefficients=coefficients, targets=None, history=history, irls_iterations=0,
                  extra_args=extra_args, callback=callback, disable=disable, sigmas=sigmas,
                  x0_correction=x0_correction, check_finite=check_finite, first_prediction=first_prediction)
    return out


@torch.no_grad()
def fit_fitted_multistep(
    model: Denoiser,
    x: torch.Tensor,
    sigmas: Sequence[float],
    targets: Targets,
    parameterization: Parameterization,
    *,
    history: int = HISTORY,
    irls_iterations: int = IRLS_ITERATIONS,
    extra_args: dict[str, Any] | None = None,
    first_prediction: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[list[float]]]:
    """Run on the calibration noise ``x`` over ``sigmas`` (ending in 0), fitting each step to ``targets``.

    Returns the end point of the fitted run and the coefficients (one list per step). Costs one
    model call per step (none for the first with ``first_prediction``).
    """
    values = [float(v) for v in sigmas]
    if len(values) < 2 or values[-1] != 0.0:
        raise ValueError(f"a fitted schedule needs at least one step and must end in 0, got {values}")
    return _run(model, x, values, parameterization, coefficients=None, targets=targets, history=history,
                irls_iterations=irls_iterations, extra_args=extra_args, callback=None, disable=True,
                sigmas=torch.tensor(values, dtype=_F64), x0_correction=None, check_finite=True,
                first_prediction=first_prediction)
