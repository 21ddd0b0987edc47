"""End-to-end refinement of a fitted solver: its coefficients and step sizes by gradient descent.

The fit of :mod:`.fitted` is greedy: each step's weights make that step land on the teacher's
trajectory, so an error one step makes and a later step could cancel is never traded off.
Differentiable Solver Search (Wang et al. 2025, arXiv 2505.21114) optimises the timesteps and
multistep coefficients of a solver for the end point instead. Started from the least-squares fit,
this minimises the calibration objective of :func:`.calibration.end_error` in log form::

    L(w, lambda) = (1 / B) sum_b log || x_N(w, lambda; x_T^b) - x_0^b ||_rms

over every fitted weight ``w`` and the interior half log-SNRs ``lambda_1 .. lambda_(N-1)`` (the
first point stays at ``sigma_max``, the last step ends at 0), with Adam and a cosine learning-rate
decay, back-propagating through the model calls of the run. The step coefficients are those of
:func:`.fitted.combine_step_weights`, computed from ``lambda`` as tensors. After each update the
``lambda``'s are projected back into ``[floor + gap, top]`` in increasing order with a minimum gap.
The parameters with the lowest loss seen are returned, so the result is never worse on the
calibration noise than the start.

Cost: ``iterations`` forward and backward passes of the model on the calibration batch per model
call of the run. The model must be differentiable with respect to its input (a ComfyUI model,
whose weights are loaded as inference tensors, is not).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch

from ._loop import Denoiser
from .fitted import HISTORY, _apply_step, check_first_prediction, combine_step_weights, final_step_weights
from .parameterization import Parameterization

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_ITERATIONS", "refine_fitted"]

_F64 = torch.float64
#: Adam iterations of :func:`refine_fitted` (the loss is flat after about 100 on the tiny teacher)
DEFAULT_ITERATIONS = 150
#: learning rates of the weights and of the lambdas
LR_WEIGHTS, LR_LAMBDA = 1e-2, 3e-2
#: minimum gap between consecutive lambdas after projection
LAMBDA_GAP = 1e-2


def _project(lam: torch.Tensor, floor: float, top: float, gap: float) -> None:
    """In place: increasing, at least ``gap`` apart, within ``[floor + gap, top]``."""
    values = lam.tolist()
    low = floor
    for i, v in enumerate(values):
        values[i] = max(v, low + gap)
        low = values[i]
    high = top + gap
    for i in range(len(values) - 1, -1, -1):
        values[i] = min(values[i], high - gap)
        high = values[i]
    lam.copy_(torch.tensor(values, dtype=lam.dtype))


def _run(model: Denoiser, x: torch.Tensor, lam_first: float, sigma_first: float, lam: torch.Tensor,
         weights: Sequence[torch.Tensor], p: Parameterization, history: int,
         first_prediction: torch.Tensor | None, extra_args: dict[str, Any]) -> torch.Tensor:
    """The fitted run as a differentiable function of the weights and interior lambdas."""
    sigma_int = p.sigma_from_lambda_tensor(lam)
    sigmas = [torch.tensor(sigma_first, dtype=_F64), *sigma_int]
    lams = [lam_first, *lam]
    n_steps = len(sigmas)
    first_finite = math.isfinite(lam_first)  # flow's sigma = 1 has lambda = -inf: no step ratio after it
    state = x.to(_F64)
    outputs: list[torch.Tensor] = []
    for n in range(n_steps):
        if n == 0 and first_prediction is not None:
            denoised = first_prediction.to(_F64).expand_as(state)
        else:
            sigma = sigmas[n].to(x.dtype).expand(x.shape[0])
            denoised = model(state.to(x.dtype), sigma, **extra_args).to(_F64)
        outputs = [denoised, *outputs][: history + 1]
        k = len(outputs) - 1
        if n == n_steps - 1:
            step = final_step_weights(k)
        else:
            s, t = sigmas[n], sigmas[n + 1]
            h = lams[n + 1] - lams[n]
            r = None
            if k and (n > 1 or first_finite):
                r = (lams[n] - lams[n - 1]) / h
            step = combine_step_weights(-torch.expm1(-h), t / s, p.alpha_tensor(t), r, k)
        state = _apply_step(state, outputs, step, weights[n])
    return state


def refine_fitted(
    model: Denoiser,
    x: torch.Tensor,
    sigmas: Sequence[float],
    coefficients: Sequence[Sequence[float]],
    target: torch.Tensor,
    parameterization: Parameterization,
    *,
    floor: float,
    top: float | None = None,
    history: int = HISTORY,
    first_prediction: torch.Tensor | None = None,
    iterations: int = DEFAULT_ITERATIONS,
    extra_args: dict[str, Any] | None = None,
) -> tuple[list[float], list[list[float]], float]:
    """Refine a fitted solver's ``coefficients`` and interior ``sigmas`` end to end (module docstring).

    Args:
        x: the calibration noise at ``sigmas[0]``; ``target``: the teacher's end points.
        sigmas: the schedule (descending, ending in 0) and ``coefficients`` its fit.
        floor, top: the lowest and highest half log-SNR an interior point may take (the search
            box's; ``top`` defaults to ``lambda(sigma_min)``).
        first_prediction: the mean first step's prediction, as in the run being refined.
        iterations: Adam iterations (each one differentiable run on the batch).

    Returns:
        ``(sigmas, coefficients, error)``: the best parameters seen and their calibration error
        (geometric mean of the per-sample RMS end-point errors).
    """
    p = parameterization
    values = [float(v) for v in sigmas]
    check_first_prediction(first_prediction, x)
    if len(values) < 3:  # a single step has no interior point; its weights are fitted exactly already
        raise ValueError(f"refine_fitted needs at least two steps, got sigmas {values}")
    lam_first = p.lambda_(values[0])
    top = p.lambda_(p.sigma_min) if top is None else float(top)
    lam = torch.tensor([p.lambda_(v) for v in values[1:-1]], dtype=_F64)
    weights = [torch.tensor(row, dtype=_F64) for row in coefficients]
    end = target.to(_F64).reshape(x.shape[0], -1)
    extra = dict(extra_args or {})
    best: tuple[float, list[float], list[list[float]]] = (math.inf, values, [list(r) for r in coefficients])
    with torch.inference_mode(False), torch.enable_grad():
        lam = lam.clone().requires_grad_(True)
        weights = [w.clone().requires_grad_(True) for w in weights]
        x_run = x.clone()
        opt = torch.optim.Adam([{"params": weights, "lr": LR_WEIGHTS}, {"params": [lam], "lr": LR_LAMBDA}])
        decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(iterations, 1))
        for it in range(iterations + 1):
            out = _run(model, x_run, lam_first, values[0], lam, weights, p, history, first_prediction, extra)
            rms = (out.reshape(x.shape[0], -1) - end).pow(2).mean(1).sqrt().clamp_min(1e-12)
            loss = rms.log().mean()
            value = math.exp(float(loss.detach()))
            if not math.isfinite(value):
                logger.warning("end-to-end refinement stopped at iteration %d: non-finite loss", it)
                break
            if value < best[0]:
                best = (value, [values[0], *(p.sigma_from_lambda(float(v)) for v in lam.detach()), 0.0],
                        [[float(v) for v in w.detach()] for w in weights])
            if it == iterations:
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
            decay.step()
            with torch.no_grad():
                _project(lam, floor, top, LAMBDA_GAP)
    logger.debug("refined fitted solver: error %.4g after %d iterations", best[0], iterations)
    return best[1], best[2], best[0]
