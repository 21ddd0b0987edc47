"""Singlestep DPM-Solver++ (2S, 3S) and DPM-Solver (noise prediction), in lambda-space.

Each interval ``[sigmas[i], sigmas[i+1]]`` of the schedule is one *outer step* of order
``k`` in {1, 2, 3}: the model is evaluated at the start ``s`` and at ``k - 1`` intermediate
points placed in half log-SNR at ``lambda_s + r1 h`` (and ``lambda_s + r2 h``), where
``h = lambda_t - lambda_s``; a step of order ``k`` costs ``k`` model evaluations (NFE).

* ``algorithm="dpmsolver++"`` integrates the data prediction ``x0 = D(x, sigma)``
  (Lu et al. 2022, arXiv 2211.01095: Alg. 1 "DPM-Solver++(2S)", and the third-order
  singlestep update of the authors' reference implementation);
* ``algorithm="dpmsolver"`` integrates the noise prediction ``eps = (x - alpha_t x0) / sigma_t``
  (Lu et al. 2022, arXiv 2206.00927: Alg. 1 "DPM-Solver-2", Alg. 2 "DPM-Solver-3").

Both are exponential integrators of the probability-flow ODE with a Taylor expansion of the
prediction in lambda (arXiv 2211.01095, eq. 9; arXiv 2206.00927, eq. 3.6):

    data:  x_t = (sigma_t / sigma_s) x_s + alpha_t * sum_k h^(k+1) phi_(k+1)(-h) x0^(k)(lambda_s)
    noise: x_t = (alpha_t / alpha_s) x_s - sigma_t * sum_k h^(k+1) phi_(k+1)(+h) eps^(k)(lambda_s)

The derivatives are replaced by differences of the predictions at the intermediate points.
``solver_type`` chooses how (the reference implementation's ``dpmsolver``/``taylor``,
diffusers' ``midpoint``/``heun``): ``"midpoint"`` puts the first-order weight on one difference
(the papers' algorithms), ``"heun"`` uses the phi_2 (and phi_3) Taylor weights.

All coefficients are computed on the host in float64 before the loop, as a small tableau per
outer step (:class:`StepTableau`): every stage is ``x_next = a * x_s + sum_j b_j * m_j`` with
``m_j`` the prediction (data or noise) at evaluation point ``j``.

A step from a flow model's ``sigma = 1`` (``alpha_s = 0``, ``lambda_s = -inf``) starts just below
it (:data:`FLOW_START_OFFSET`), integrates the data prediction with either algorithm (the
noise-prediction weights grow without bound there), and places its stages in the log-SNR window
where the denoiser changes (:func:`flow_start_ratios`), so its result does not hang on the offset.

Only the ODE (``eta = 0``) is implemented: a stochastic singlestep solver needs noise that is
consistent between the intermediate points and the full step (a Brownian bridge), which the
papers do not specify for 2S/3S; use the multistep SDE samplers for stochastic sampling.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ._coefficients import ALGORITHMS, FINAL_STEPS, SOLVER_TYPES, Algorithm, FinalStep, SolverType
from ._loop import (
    Denoiser,
    ModelEvaluator,
    X0Correction,
    check_final_step,
    emit_callback,
    log_lowered_order,
    progress,
    sigma_list,
)
from .budget import singlestep_orders
from .parameterization import Parameterization
from .phi import h_phi, phi
from .schedules import FLOW_LAMBDA_MIN

__all__ = [
    "ALGORITHMS",
    "FINAL_STEPS",
    "FLOW_START_OFFSET",
    "SOLVER_TYPES",
    "Algorithm",
    "FinalStep",
    "SolverType",
    "VE_DEFAULT",
    "StepTableau",
    "apply_row",
    "build_tableau",
    "flow_start_ratios",
    "run_step",
    "default_r",
    "sample_dpmpp_singlestep",
    "singlestep_orders",
    "solver_sigma",
    "validate_options",
]

FLOW_START_OFFSET = 1e-4
"""A flow model's ``sigma = 1`` has ``lambda = -inf``; a step from there starts at ``1 - offset``.

The Taylor expansion of a singlestep/adaptive solver is taken around ``lambda_s`` and needs it
finite. The state at ``sigma = 1`` and at ``1 - 1e-4`` differs by ``O(1e-4)`` along the flow ODE;
ComfyUI's DPM++ SDE samplers use the same offset.
"""

VE_DEFAULT = Parameterization("ve", 0.002, 80.0, family="edm")
"""The coordinates used when a sampler gets ``parameterization=None`` (VE: ``alpha_t = 1``)."""


def solver_sigma(parameterization: Parameterization, sigma: float, sigma_next: float | None = None) -> float:
    """``sigma`` moved off a flow model's ``lambda = -inf`` end point (see :data:`FLOW_START_OFFSET`),
    to at most half-way to ``sigma_next``, so that a schedule whose next sigma lies within the offset
    of 1 (a large shift at many steps: 0.99992 for shift 12 at 1000 steps) still has a forward step."""
    if parameterization.kind == "flow" and sigma >= 1.0:
        offset = FLOW_START_OFFSET if sigma_next is None else min(FLOW_START_OFFSET, 0.5 * (1.0 - sigma_next))
        return 1.0 - offset
    return sigma


def flow_start_ratios(p: Parameterization, sigma_s: float, sigma_t: float, r1: float,
                      r2: float) -> tuple[float, float]:
    """Stage ratios for a step that starts at a flow model's sigma = 1 (moved to ``sigma_s``, see
    :func:`solver_sigma`). The default ratios ``r1, r2`` of ``lambda_s + r h`` would put the stages
    at log-SNR that runs to ``-inf`` with the start offset: near-pure noise, and a result that
    depends on the offset. Instead they are applied to the window ``[lambda_w, lambda_t]`` with
    ``lambda_w = min(FLOW_LAMBDA_MIN, lambda_t - 1)`` (not below ``lambda_s``): below
    ``logsnr_uniform``'s flow clip the denoiser is close to constant, where the
    exponential-integrator step is exact without a stage. They are returned as ratios of the whole
    step, so the update's weights (arXiv 2211.01095, Alg. 1; 2206.00927, Alg. 2 for general
    ``r1, r2``) stay those of the true interval."""
    lam_s, lam_t = p.lambda_(sigma_s), p.lambda_(sigma_t)
    lam_w = max(lam_s, min(FLOW_LAMBDA_MIN, lam_t - 1.0))
    h = lam_t - lam_s
    return (lam_w + r1 * (lam_t - lam_w) - lam_s) / h, (lam_w + r2 * (lam_t - lam_w) - lam_s) / h


def default_r(order: int) -> tuple[float, float]:
    """Intermediate-point ratios ``(r1, r2)``: 1/2 for 2S, (1/3, 2/3) for 3S (arXiv 2206.00927, Alg. 1-2)."""
    return (0.5, 1.0) if order <= 2 else (1.0 / 3.0, 2.0 / 3.0)


@dataclass(frozen=True)
class StepTableau:
    """Host-side float64 coefficients of one outer step of order ``k``.

    Attributes:
        order: ``k``, the number of model evaluations.
        eval_sigmas: the ``k`` sigmas where the model is evaluated (start, then intermediate points).
        eval_alphas: ``alpha`` at those sigmas (turns a data prediction into a noise prediction).
        rows: ``k`` pairs ``(a, b)``; row ``j`` gives ``a * x_s + sum_i b[i] * m_i`` (``i <= j``),
            the state at evaluation point ``j + 1``, and the last row the state at ``sigma_t``.
        sigma_t: the end of the step.
        prediction: ``"data"`` (``m`` = x0) or ``"noise"`` (``m`` = eps).
    """

    order: int
    eval_sigmas: tuple[float, ...]
    eval_alphas: tuple[float, ...]
    rows: tuple[tuple[float, tuple[float, ...]], ...]
    sigma_t: float
    prediction: Literal["data", "noise"]


def build_tableau(
    order: int,
    sigma_s: float,
    sigma_t: float,
    parameterization: Parameterization,
    algorithm: Algorithm = "dpmsolver++",
    solver_type: SolverType = "midpoint",
    r1: float | None = None,
    r2: float | None = None,
) -> StepTableau:
    """Coefficients of one singlestep update from ``sigma_s`` to ``sigma_t`` (float64, host).

    Order 1 is DDIM / DPM-Solver-1 (arXiv 2206.00927, eq. 4.1; arXiv 2211.01095, eq. 10).
    Order 2 is DPM-Solver++(2S) (arXiv 2211.01095, Alg. 1) / DPM-Solver-2 (arXiv 2206.00927,
    Alg. 1); order 3 is the third-order singlestep update (arXiv 2206.00927, Alg. 2 and its
    data-prediction counterpart). With ``solver_type="heun"`` the last row uses the Taylor
    weights ``h^2 phi_2`` (and ``h^3 phi_3`` with the two-point second-difference estimate).
    A step to ``sigma_t = 0`` must be first order; it returns the data prediction exactly.
    """
    p = parameterization
    from_flow_start = p.kind == "flow" and sigma_s >= 1.0
    sigma_s = solver_sigma(p, sigma_s, sigma_t)
    if not 0.0 <= sigma_t < sigma_s:
        raise ValueError(f"a step needs 0 <= sigma_t < sigma_s, got sigma_s={sigma_s!r}, sigma_t={sigma_t!r}")
    if order not in (1, 2, 3):
        raise ValueError(f"step order must be 1, 2 or 3, got {order!r}")
    if sigma_t == 0.0 and order != 1:
        raise ValueError(
            f"a step ending at sigma=0 must be first order (lambda is infinite there), got order {order}; "
            "lower the last order to 1 or use final_step='sigma_min'"
        )
    r1_default, r2_default = default_r(order)
    if from_flow_start and r1 is None and r2 is None and order > 1:
        r1_default, r2_default = flow_start_ratios(p, sigma_s, sigma_t, r1_default, r2_default)
    r1 = r1_default if r1 is None else float(r1)
    r2 = r2_default if r2 is None else float(r2)
    if order == 2 and not 0.0 < r1 < 1.0:
        raise ValueError(f"2S needs 0 < r1 < 1, got r1={r1!r}")
    if order == 3 and not 0.0 < r1 < r2 < 1.0:
        raise ValueError(f"3S needs 0 < r1 < r2 < 1, got r1={r1!r}, r2={r2!r}")

    # a first-order step to sigma = 0 is x_t = alpha_0 x0 in both algorithms (the exact limit of
    # -sigma_t expm1(h) eps); write it with the data prediction to avoid the 0 * inf form. A step
    # from a flow model's sigma = 1 (alpha_s = 0, lambda_s = -inf) uses the data prediction too: the
    # noise-prediction weights grow like e^h ~ 1 / alpha_s, so its higher-order terms would scale the
    # change of eps by 1 / FLOW_START_OFFSET (a 2S/3S run on a flow model went far off)
    data = algorithm == "dpmsolver++" or sigma_t == 0.0 or from_flow_start
    lambda_s = p.lambda_(sigma_s)
    h = p.lambda_(sigma_t) - lambda_s
    alpha_s = p.alpha(sigma_s)

    def w(k: int, hk: float) -> float:
        """``h^k phi_k(-h)`` (data) or ``h^k phi_k(h)`` (noise)."""
        return h_phi(k, hk) if data else hk**k * phi(k, hk)

    def point(r: float) -> tuple[float, float, float]:
        """Sigma, ratio ``a`` and scale of the point ``lambda_s + r h`` (``r = 1``: the end)."""
        sigma = sigma_t if r == 1.0 else p.sigma_from_lambda(lambda_s + r * h)
        alpha = p.alpha(sigma)
        if data:
            return sigma, sigma / sigma_s, alpha
        return sigma, alpha / alpha_s, -sigma

    def first_order_row(r: float) -> tuple[float, tuple[float, ...]]:
        _, a, scale = point(r)
        return a, (scale * w(1, r * h),)

    rows: list[tuple[float, tuple[float, ...]]] = []
    eval_sigmas = [sigma_s]
    if order == 1:
        rows.append(first_order_row(1.0))
    else:
        rows.append(first_order_row(r1))
        eval_sigmas.append(point(r1)[0])
        _, a_t, scale_t = point(1.0)
        w1 = w(1, h)
        if order == 2:
            c1 = w1 / (2.0 * r1) if solver_type == "midpoint" else w(2, h) / (r1 * h)
            rows.append((a_t, (scale_t * (w1 - c1), scale_t * c1)))
        else:
            sigma_2, a_2, scale_2 = point(r2)
            eval_sigmas.append(sigma_2)
            c1 = w(2, r2 * h) / (r1 * h)
            rows.append((a_2, (scale_2 * (w(1, r2 * h) - c1), scale_2 * c1)))
            if solver_type == "midpoint":
                c1, c2 = 0.0, w(2, h) / (r2 * h)
            else:
                # D1 = (r2 D1_0 - r1 D1_1)/(r2 - r1), D2 = 2 (D1_1 - D1_0)/(r2 - r1),
                # D1_0 = (m1 - m0)/r1, D1_1 = (m2 - m0)/r2; weights h phi_2 and h phi_3 on D1, D2.
                g2, g3 = w(2, h) / h, w(3, h) / (h * h)
                c1 = (g2 * r2 - 2.0 * g3) / ((r2 - r1) * r1)
                c2 = (2.0 * g3 - g2 * r1) / ((r2 - r1) * r2)
            rows.append((a_t, (scale_t * (w1 - c1 - c2), scale_t * c1, scale_t * c2)))
    return StepTableau(
        order=order,
        eval_sigmas=tuple(eval_sigmas),
        eval_alphas=tuple(p.alpha(s) for s in eval_sigmas),
        rows=tuple(rows),
        sigma_t=sigma_t,
        prediction="data" if data else "noise",
    )


def apply_row(
    row: tuple[float, tuple[float, ...]], x: torch.Tensor, m: Sequence[torch.Tensor]
) -> torch.Tensor:
    """``a * x + sum_i b[i] * m[i]`` for one tableau row (host scalars, device tensors)."""
    a, b = row
    out = x * a
    for coeff, mi in zip(b, m):
        if coeff != 0.0:
            out.add_(mi, alpha=coeff)
    return out


def run_step(
    tableau: StepTableau,
    x: torch.Tensor,
    evaluate: Callable[[torch.Tensor, float], torch.Tensor],
    first: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """Run one outer step; returns ``(x_t, predictions m, data prediction at the start)``.

    ``first`` is an already computed data prediction at the start (reused by the adaptive solver
    after a rejected step); ``evaluate(x, sigma)`` returns the data prediction.
    """
    m: list[torch.Tensor] = []
    x_stage = x
    denoised0 = first
    for j in range(tableau.order):
        sigma_j = tableau.eval_sigmas[j]
        denoised = first if (j == 0 and first is not None) else evaluate(x_stage, sigma_j)
        if j == 0:
            denoised0 = denoised
        if tableau.prediction == "data":
            m.append(denoised)
        else:
            m.append((x_stage - tableau.eval_alphas[j] * denoised) / sigma_j)
        x_stage = apply_row(tableau.rows[j], x, m)
    assert denoised0 is not None
    return x_stage, m, denoised0


def _step_orders(
    n_steps: int, n_intervals: int, order: int, orders: Sequence[int] | None, ends_at_zero: bool
) -> list[int]:
    """The validated order of each integrated interval."""
    if orders is None:
        result = [order] * n_steps
        if ends_at_zero and n_steps == n_intervals and n_steps > 0:
            result[-1] = 1
        return result
    orders = list(orders)
    if len(orders) not in (n_steps, n_intervals):
        raise ValueError(
            f"orders needs one entry per step of the schedule ({n_intervals} intervals in sigmas, "
            f"{n_steps} integrated), got {len(orders)}: {orders}"
        )
    orders = orders[:n_steps]
    for i, k in enumerate(orders):
        if isinstance(k, bool) or k not in (1, 2, 3):
            raise ValueError(f"orders[{i}] must be 1, 2 or 3, got {k!r}")
    if ends_at_zero and n_steps == n_intervals and n_steps > 0 and orders[-1] != 1:
        raise ValueError(
            f"the last step ends at sigma=0 and must be first order, got orders[-1]={orders[-1]}; "
            "end the orders with 1 (for a budget of nfe calls: "
            "steps_for_nfe('singlestep', nfe, order).orders) "
            "or use final_step='sigma_min'"
        )
    return orders


def validate_options(algorithm: str, solver_type: str, final_step: str) -> None:
    """Raise ``ValueError`` for an unknown algorithm, solver type or final step."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"solver_type must be one of {SOLVER_TYPES}, got {solver_type!r}")
    if final_step not in FINAL_STEPS:
        raise ValueError(f"final_step must be one of {FINAL_STEPS}, got {final_step!r}")


@torch.no_grad()
def sample_dpmpp_singlestep(
    model: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: dict[str, Any] | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    disable: bool | None = None,
    *,
    parameterization: Parameterization | None = None,
    order: int = 2,
    r1: float | None = None,
    r2: float | None = None,
    orders: Sequence[int] | None = None,
    solver_type: SolverType = "midpoint",
    algorithm: Algorithm = "dpmsolver++",
    final_step: FinalStep = "zero",
    x0_correction: X0Correction | None = None,
    check_finite: bool = True,
) -> torch.Tensor:
    """Singlestep DPM-Solver++ (2S/3S) or DPM-Solver-2/3 over a sigma schedule.

    Args:
        model: denoiser ``model(x, sigma_batch, **extra_args) -> x0``.
        x: the noisy state at ``sigmas[0]``, (B, ...) in the model's coordinates.
        sigmas: descending 1-D schedule; each interval is one outer step.
        callback: called once per outer step, after it, with ``i`` the step index and
            ``denoised`` the data prediction at the step's start.
        parameterization: VE (default) or flow coordinates, for ``alpha`` and ``lambda``.
        order: order of every outer step (1, 2, 3) when ``orders`` is not given; the step
            ending at sigma = 0 is first order (it returns the data prediction).
        r1, r2: intermediate points at ``lambda_s + r1 h`` (``+ r2 h``) for steps of order
            ``order``; defaults 1/2 (2S) and 1/3, 2/3 (3S). Lower-order steps use their defaults.
        orders: explicit order per interval (``len(sigmas) - 1`` entries; with
            ``final_step="sigma_min"`` and a trailing 0 one fewer is also accepted), for
            example ``singlestep_orders(nfe, 3)`` with a matching schedule.
        solver_type: ``"midpoint"`` (the papers' algorithms) or ``"heun"`` (Taylor weights).
        algorithm: ``"dpmsolver++"`` (data prediction) or ``"dpmsolver"`` (noise prediction).
        final_step: ``"zero"`` integrates the last interval to sigma = 0; ``"sigma_min"`` stops
            at the last non-zero sigma and returns x there.
        x0_correction: hook applied to every data prediction.
        check_finite: stop with an error when the model returns NaN/inf.

    NFE: ``sum(orders)`` over the integrated intervals (the step to sigma = 0 costs one).
    """
    validate_options(algorithm, solver_type, final_step)
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order!r}")
    p = VE_DEFAULT if parameterization is None else parameterization
    values = sigma_list(sigmas, p)
    check_final_step(values, final_step, p.sigma_max)
    n_intervals = max(len(values) - 1, 0)
    ends_at_zero = n_intervals > 0 and values[-1] == 0.0
    n_steps = n_intervals - 1 if (ends_at_zero and final_step == "sigma_min") else n_intervals
    step_orders = _step_orders(n_steps, n_intervals, order, orders, ends_at_zero)
    if orders is None and step_orders and ends_at_zero:  # a part ending above 0 is judged with the whole run
        log_lowered_order(f"DPM-Solver++({order}S)", order, max(step_orders), n_steps)
    tableaus = [
        build_tableau(
            k, values[i], values[i + 1], p, algorithm, solver_type,
            r1 if k == order else None, r2 if k == order else None,
        )
        for i, k in enumerate(step_orders)
    ]
    evaluator = ModelEvaluator(model, extra_args, x0_correction, n_steps, check_finite)
    for i in progress(n_steps, disable):
        x, _, denoised = run_step(tableaus[i], x, lambda xs, s, i=i: evaluator(xs, s, i))
        emit_callback(callback, i, x, values[i], denoised, sigmas)
    if 0 < n_steps < n_intervals:  # stopped at sigma_min: the skipped step to 0 completes the bar
        emit_callback(callback, n_steps, x, values[n_steps], denoised, sigmas)
    return x
