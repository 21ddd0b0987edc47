"""Host-side float64 plan of a multistep DPM-Solver(++) run: one coefficient record per step.

Every step of :func:`.multistep.sample_dpmpp_multistep` is a fixed linear combination

    x_next = c_x * x + c_denoised * D_i + sum_k c_m[k] * m_(i-k) + c_noise * z

of the state ``x``, the current data prediction ``D_i``, the working model outputs ``m`` (the data
prediction ``D`` for DPM-Solver++, the noise prediction ``eps = (x - alpha_t D) / sigma_t`` for
DPM-Solver, newest first) and fresh noise ``z``. All weights depend only on the schedule, so they
are computed here, in float64 Python arithmetic, before the loop (no device sync, no branching on
tensors inside the loop).

Formulas (``h = lambda_t - lambda_s``, ``r_k = h_k / h`` with ``h_k`` the earlier step sizes):

* DPM-Solver++ multistep, data prediction (Lu et al. 2022, arXiv 2211.01095, eq. 9 and Alg. 2;
  third order as in the authors' reference implementation): with ``H = (1 + eta) h``,
  ``x_t = (sigma_t / sigma_s) e^(-eta h) x_s + alpha_t [H phi_1(-H) m_0 + c1 * D1 + c2 * D2]``
  where ``D1 ~ h m'`` and ``D2 ~ h^2 m'' / 2`` are backward divided differences; in a second-order
  step ``c1 = 1/2 H phi_1(-H)`` (``midpoint``, the paper's ``1 / (2 r)`` form) or ``H phi_2(-H)``
  (``heun``, the official ``taylor`` solver type), and ``c2 = 0``; a third-order step always
  uses ``c1 = H phi_2(-H)`` and ``c2 = H phi_3(-H)``. ``eta = 0`` is the ODE solver;
  ``eta > 0`` is SDE-DPM-Solver++ (arXiv 2211.01095, §4, eq. 12 with ``eta = 1``), generalised
  with ``eta`` as in k-diffusion's ``dpmpp_2m_sde``/``dpmpp_3m_sde``; noise weight
  ``sigma_t sqrt(1 - e^(-2 eta h))``.
* DPM-Solver multistep, noise prediction (Lu et al. 2022, arXiv 2206.00927, eq. 3.6 and its
  multistep variant): ``x_t = (alpha_t / alpha_s) x_s - sigma_t [h phi_1(h) eps_0 + c1 D1 + c2 D2]``.
  A step with an infinite ``h`` (to ``sigma = 0``, or from ``sigma = 1`` for flow) uses the
  equivalent data form ``x_t = (sigma_t / sigma_s) x_s + alpha_t D_s`` (DDIM), avoiding ``0 * inf``.

The third-order weight ``c2 = H phi_3(-H)`` on ``D2 = h^2 m''/2`` is the authors' published choice
(also diffusers' and ComfyUI's ``dpmpp_3m_sde``). A plain Taylor expansion of the exponential
integral gives twice that (``2 H phi_3(-H)``); ``third_order="taylor"`` selects it. Both are
consistent; see :data:`THIRD_ORDER_WEIGHTS`.

Order 4 (``order=4``, data prediction, ``eta = 0``) is the exponential Adams-Bashforth step of
order ``k``: ``D`` is replaced by its polynomial interpolant through the last ``k`` model outputs
(at ``u_j = lambda_(i-j) - lambda_s = rho_j h``, ``rho_0 = 0``) and integrated exactly against
``e^(-(lambda_t - lambda))``; the weights ``w_j`` of ``m_(i-j)`` solve the moment conditions
``sum_j w_j rho_j^q = q! h phi_(q+1)(-h)``, ``q = 0..k-1`` (the variable-step lambda form of DEIS,
Zhang and Chen 2023, arXiv 2204.13902, eq. 15, with data prediction; UniP-k of Zhao et al. 2023,
arXiv 2302.04867). For ``k <= 3`` this is exactly the ``heun`` / ``taylor`` update above (the
divided differences are those of the same interpolant); :func:`adams_weights` computes it for any
``k`` and the tests check the identity.

Order selection per step: ``min(order, 1 + usable history, lower-order-final cap)``. History is
usable while every earlier step size involved is finite: after a step from ``sigma = 1`` in flow
form (``lambda = -inf``, an exact first-order step) the ratio ``r = inf / h`` makes the difference
term vanish, so the next step is first order, and the one after at most second order. With a
corrector, that first step is corrected by its low-SNR limit (``_with_pure_noise_correction``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

from .parameterization import Parameterization
from .phi import h_phi, phi
from .unipc import CorrectorVariant, solve_linear, unic_weights

SolverType = Literal["midpoint", "heun"]
SOLVER_TYPES: tuple[str, ...] = get_args(SolverType)
Algorithm = Literal["dpmsolver++", "dpmsolver"]
ALGORITHMS: tuple[str, ...] = get_args(Algorithm)
FinalStep = Literal["zero", "sigma_min"]
FINAL_STEPS: tuple[str, ...] = get_args(FinalStep)
ThirdOrder = Literal["official", "taylor"]
THIRD_ORDER_WEIGHTS: dict[str, float] = {"official": 1.0, "taylor": 2.0}
"""Weight on ``H phi_3(-H) D2`` in the third-order update: the published one, or the Taylor one."""

__all__ = [
    "ALGORITHMS",
    "FINAL_STEPS",
    "MAX_ORDER",
    "SOLVER_TYPES",
    "THIRD_ORDER_WEIGHTS",
    "Algorithm",
    "FinalStep",
    "MultistepCoefficients",
    "SolverType",
    "ThirdOrder",
    "adams_weights",
    "plan_multistep",
    "step_orders",
]

#: highest multistep order (order 4 only for the deterministic data-prediction solver)
MAX_ORDER = 4


@dataclass(frozen=True)
class MultistepCoefficients:
    """The float64 weights of one step ``sigma -> sigma_next`` (see the module docstring).

    Attributes:
        step: index ``i`` of the step (and of the model call at ``sigma``).
        sigma, sigma_next: ComfyUI sigmas of the step's ends.
        lambda_, lambda_next: half log-SNR at both ends (``+-inf`` allowed).
        h: ``lambda_next - lambda_``.
        order: order of this step's update (1, 2 or 3).
        m_x, m_d: the working model output is ``m = m_x * x + m_d * D`` (``0, 1`` for data
            prediction; ``1/sigma_t, -alpha_t/sigma_t`` for noise prediction).
        c_x, c_denoised, c_m, c_noise: weights of the update.
        corrector_x, corrector_m: UniC correction of ``x`` at this step, applied right after the
            model call: ``x <- corrector_x * x_prev + sum_k corrector_m[k] * m_(i-k)`` with
            ``x_prev`` the state at the previous step; ``corrector_m`` is empty when no
            correction applies.
    """

    step: int
    sigma: float
    sigma_next: float
    lambda_: float
    lambda_next: float
    h: float
    order: int
    m_x: float
    m_d: float
    c_x: float
    c_denoised: float
    c_m: tuple[float, ...]
    c_noise: float
    corrector_x: float = 0.0
    corrector_m: tuple[float, ...] = ()


def step_orders(
    n_steps: int,
    order: int,
    history: int = 0,
    *,
    lower_order_final: bool = True,
    lower_order_final_steps: int = 10,
    euler_at_final: bool = False,
    steps_before: int = 0,
    partial: bool = False,
) -> list[int]:
    """Requested order of each of ``n_steps`` steps (before infinite-step degradation).

    Warm-up: step ``i`` has at most ``1 + history + i`` (the official multistep warm-up
    1, 2, 3, ...). With ``lower_order_final`` and fewer than ``lower_order_final_steps`` steps in
    the whole schedule (``steps_before`` taken by earlier runs of a split schedule plus
    ``n_steps``) the order of step ``i`` is also capped at ``n_steps - i`` (the official rule
    ``min(order, steps + 1 - step)``: last step first order, the one before at most second
    order). ``euler_at_final`` makes the last step first order. A ``partial`` run (its schedule
    ends above 0 and continues in another run) has no final steps: neither rule applies.
    """
    orders = []
    for i in range(n_steps):
        p = min(order, 1 + history + i)
        if not partial and lower_order_final and steps_before + n_steps < lower_order_final_steps:
            p = min(p, n_steps - i)
        if not partial and euler_at_final and i == n_steps - 1:
            p = 1
        orders.append(max(p, 1))
    return orders


def _exp_neg(x: float) -> float:
    """``exp(-x)`` with ``exp(-inf) = 0`` and ``0 * inf`` read as 0 (eta = 0 never damps)."""
    return math.exp(-x) if x != math.inf else 0.0


def _difference_weights(order: int, r: tuple[float, ...], c1: float, c2: float) -> tuple[float, ...]:
    """Weights on ``(m_0, m_1, m_2)`` of ``c1 * D1 + c2 * D2`` (backward divided differences).

    Order 2: ``D1 = (m_0 - m_1) / r0``. Order 3: ``D1_0 = (m_0 - m_1) / r0``,
    ``D1_1 = (m_1 - m_2) / r1``, ``D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1)``,
    ``D2 = (D1_0 - D1_1) / (r0 + r1)`` (Lu et al. 2022, arXiv 2211.01095, multistep update).
    """
    if order == 1:
        return (0.0,)
    if order == 2:
        (r0,) = r
        return (c1 / r0, -c1 / r0)
    r0, r1 = r
    w10 = c1 * (1.0 + r0 / (r0 + r1)) + c2 / (r0 + r1)  # weight on D1_0
    w11 = -c1 * r0 / (r0 + r1) - c2 / (r0 + r1)  # weight on D1_1
    return (w10 / r0, -w10 / r0 + w11 / r1, -w11 / r1)


def adams_weights(h: float, rhos: tuple[float, ...]) -> tuple[float, ...]:
    """Weights ``w_j`` of ``m_(i-j)`` in ``integral_0^h e^(-(h-u)) p(u) du`` (exponential Adams-Bashforth).

    ``p`` interpolates the model outputs at ``u_j = rho_j h`` (``rho_0 = 0`` the current point,
    ``rho_j < 0`` the earlier ones, distinct). The weights solve ``sum_j w_j rho_j^q = q! h
    phi_(q+1)(-h)`` for ``q = 0..k-1`` (moments of ``e^(-(h-u)) u^q``, divided by ``h^q``).
    Multiply by ``alpha_t`` for the update of :func:`plan_multistep`.
    """
    if not rhos or rhos[0] != 0.0:
        raise ValueError(f"adams_weights needs the current point first (rho_0 = 0), got {rhos!r}")
    if not (h > 0.0 and math.isfinite(h)):
        raise ValueError(f"adams_weights needs a finite positive step h, got {h!r}")
    k = len(rhos)
    moments = [math.factorial(q) * h * phi(q + 1, -h) for q in range(k)]
    vandermonde = [[rho**q for rho in rhos] for q in range(k)]
    return tuple(solve_linear(vandermonde, moments))


def plan_multistep(
    sigmas: list[float],
    parameterization: Parameterization,
    *,
    order: int = 2,
    solver_type: SolverType = "midpoint",
    algorithm: Algorithm = "dpmsolver++",
    lower_order_final: bool = True,
    lower_order_final_steps: int = 10,
    euler_at_final: bool = False,
    eta: float = 0.0,
    s_noise: float = 1.0,
    corrector: CorrectorVariant = "none",
    third_order: ThirdOrder = "official",
    history_lambdas: tuple[float, ...] = (),
    steps_before: int = 0,
    partial: bool = False,
    resumed_step: tuple[float, int] | None = None,
) -> list[MultistepCoefficients]:
    """Coefficients of every step of a multistep run over ``sigmas`` (host floats, validated).

    ``sigmas`` are the points actually stepped through (the caller drops a trailing 0 for
    ``final_step="sigma_min"``). ``history_lambdas`` are the half log-SNRs of model outputs
    carried over from a previous run, newest first (for a resumed run; ``m`` values are
    supplied to the loop in the same order). ``steps_before`` and ``partial`` place the run in
    a split schedule (see :func:`step_orders`). ``resumed_step`` is ``(sigma, order)`` of the
    previous run's last step, which ended at ``sigmas[0]``: with a corrector, the state there
    gets its UniC correction in this run, as in the unsplit run.
    """
    p = parameterization
    lambdas = [p.lambda_(s) for s in sigmas]
    n_steps = len(sigmas) - 1
    requested = step_orders(
        n_steps,
        order,
        len(history_lambdas),
        lower_order_final=lower_order_final,
        lower_order_final_steps=lower_order_final_steps,
        euler_at_final=euler_at_final,
        steps_before=steps_before,
        partial=partial,
    )
    w3 = THIRD_ORDER_WEIGHTS[third_order]
    # lambdas of all model evaluations, oldest first: carried history, then this run's points
    eval_lambdas = list(reversed(history_lambdas)) + lambdas[:-1]
    offset = len(history_lambdas)
    plan: list[MultistepCoefficients] = []
    for i in range(n_steps):
        s, t = sigmas[i], sigmas[i + 1]
        lam_s, lam_t = lambdas[i], lambdas[i + 1]
        h = lam_t - lam_s
        alpha_s, alpha_t = p.alpha(s), p.alpha(t)
        # earlier step sizes h_1 = lambda_s - lambda_(s-1), h_2 = ..., while finite
        k = offset + i
        prev_h: list[float] = []
        for j in range(1, max(order, 3)):
            if k - j < 0:
                break
            hj = eval_lambdas[k - j + 1] - eval_lambdas[k - j]
            if not math.isfinite(hj):
                break
            prev_h.append(hj)
        step_order = min(requested[i], 1 + len(prev_h))
        if not math.isfinite(h):
            step_order = 1
        r = tuple(hj / h for hj in prev_h[: step_order - 1])
        m_x, m_d = 0.0, 1.0
        c_denoised = 0.0
        c_noise = 0.0
        if algorithm == "dpmsolver++" and step_order == 4:
            rhos = [0.0]
            for hj in prev_h[:3]:
                rhos.append(rhos[-1] - hj / h)
            c_x = t / s
            c_m = tuple(alpha_t * w for w in adams_weights(h, tuple(rhos)))
        elif algorithm == "dpmsolver++":
            eta_h = 0.0 if eta == 0.0 else eta * h
            c_x = (t / s) * _exp_neg(eta_h)
            big_h = (1.0 + eta) * h
            c0 = alpha_t * h_phi(1, big_h)
            if step_order > 1:
                midpoint = solver_type == "midpoint" and step_order == 2
                c1 = alpha_t * (0.5 * h_phi(1, big_h) if midpoint else big_h * phi(2, -big_h))
                c2 = w3 * alpha_t * big_h * phi(3, -big_h)
            else:
                c1 = c2 = 0.0
            diff = _difference_weights(step_order, r, c1, c2)
            c_m = (c0 + diff[0],) + diff[1:]
            if eta > 0.0 and s_noise > 0.0:
                damped = 1.0 if eta_h == math.inf else -math.expm1(-2.0 * eta_h)
                c_noise = t * math.sqrt(damped) * s_noise
        elif not math.isfinite(h):
            # data-form first-order step (DDIM): exact, and no 0 * inf at lambda = +-inf
            c_x, c_m, c_denoised = t / s, (), alpha_t * h_phi(1, h)
            m_x, m_d = 1.0 / s, -alpha_s / s
        else:
            m_x, m_d = 1.0 / s, -alpha_s / s
            c_x = alpha_t / alpha_s
            c0 = -t * h * phi(1, h)
            midpoint = solver_type == "midpoint" and step_order == 2
            c1 = -t * (0.5 * h * phi(1, h) if midpoint else h * phi(2, h))
            c2 = -w3 * t * h * phi(3, h)
            diff = _difference_weights(step_order, r, c1, c2)
            c_m = (c0 + diff[0],) + diff[1:]
        plan.append(
            MultistepCoefficients(
                step=i, sigma=s, sigma_next=t, lambda_=lam_s, lambda_next=lam_t, h=h, order=step_order,
                m_x=m_x, m_d=m_d, c_x=c_x, c_denoised=c_denoised, c_m=c_m, c_noise=c_noise,
            )
        )
    if corrector != "none":
        previous = None
        if resumed_step is not None and plan:
            sigma_prev, order_prev = resumed_step
            h_prev = lambdas[0] - p.lambda_(sigma_prev)
            previous = _PreviousStep(float(sigma_prev), sigmas[0], h_prev, int(order_prev))
        plan = _with_corrector(plan, parameterization, corrector, eval_lambdas, offset,
                               data_prediction=algorithm == "dpmsolver++", previous=previous)
    return plan


def _with_pure_noise_correction(
    cur: MultistepCoefficients, prev: MultistepCoefficients, p: Parameterization
) -> MultistepCoefficients:
    """The correction of a first step from pure noise (a flow model's ``sigma = 1``, ``lambda = -inf``).

    The step is ``x_1 = sigma_1 x_0 + sigma_1 integral_(-inf)^(lambda_1) e^lambda D(lambda) dlambda``
    (DPM-Solver++, arXiv 2211.01095, eq. 9), and the predictor takes ``D = D_0``, the data mean.
    For any data of finite covariance ``C`` the prediction leaves the mean as
    ``D - D_0 = C z e^lambda + O(e^(2 lambda))`` (Tweedie's formula at low SNR, with ``x / sigma ->
    z``), so with ``D - D_0 = (D_1 - D_0) e^(lambda - lambda_1)`` the integral is exact to that
    order and adds ``alpha_1 (D_1 - D_0) / 2``: ``x_1 = sigma_1 x_0 + alpha_1 (D_0 + D_1) / 2``. A
    Gaussian's remaining error is ``C / (C + sigma_bar_1^2)`` times the uncorrected one. It is the
    ``h -> inf`` limit of UniC-bh2's correction of a first-order step, ``alpha_1 (1 - e^(-h))
    (D_1 - D_0) / 2``, and like UniC it reuses the model call at ``x_1`` (no extra NFE).
    """
    alpha_1 = p.alpha(prev.sigma_next)
    corrector_m = (0.5 * alpha_1, 0.5 * alpha_1)  # weights of m_1 (new) and m_0
    return MultistepCoefficients(**{**cur.__dict__, "corrector_x": prev.sigma_next / prev.sigma,
                                    "corrector_m": corrector_m})


@dataclass(frozen=True)
class _PreviousStep:
    """The last step of the run a resumed run continues: what its first correction needs."""

    sigma: float
    sigma_next: float
    h: float
    order: int


def _with_corrector(
    plan: list[MultistepCoefficients],
    p: Parameterization,
    variant: CorrectorVariant,
    eval_lambdas: list[float],
    offset: int,
    data_prediction: bool = True,
    previous: _PreviousStep | None = None,
) -> list[MultistepCoefficients]:
    """Attach UniC weights (Zhao et al. 2023, arXiv 2302.04867, Alg. 1) to steps ``1..n-1``, and
    to step 0 when ``previous`` (the last step of the run this one resumes) is given.

    The correction of ``x_i`` reuses the model call at ``x_i`` (no extra NFE) and has the order of
    the predictor step that produced ``x_i`` (so the pair is one order higher). It is skipped
    when ``x_i`` does not influence the result (the next step returns the data prediction, as
    the final step to ``sigma = 0`` does), after the infinite step to ``sigma = 0``, and at step
    0 when the carried history is too short for the previous step's order. The infinite first
    step from a flow model's pure noise gets the low-SNR correction of
    :func:`_with_pure_noise_correction` instead (data prediction).
    """
    out = list(plan)
    first = 0 if previous is not None and offset >= previous.order else 1
    for i in range(first, len(plan)):
        prev, cur = (plan[i - 1] if i > 0 else previous), plan[i]
        if cur.c_x == 0.0:
            continue
        if not math.isfinite(prev.h):
            if data_prediction and prev.lambda_ == -math.inf and i > 0:
                out[i] = _with_pure_noise_correction(cur, prev, p)
            continue
        # points of the predictor step: s = lambda_(i-1), earlier ones, and t = lambda_i
        k = offset + i - 1
        lam_s = eval_lambdas[k]
        earlier = [eval_lambdas[k - j] for j in range(1, prev.order)]
        rks = tuple((lam - lam_s) / prev.h for lam in earlier) + (1.0,)
        weights = unic_weights(prev.h, rks, variant, data_prediction)
        if data_prediction:
            # x_i = (sigma_t/sigma_s) x_s + alpha_t [h phi_1(-h) m_s + sum_k w_k (m_k - m_s) / r_k]
            scale, base = p.alpha(prev.sigma_next), h_phi(1, prev.h)
            corrector_x = prev.sigma_next / prev.sigma
        else:
            # x_i = (alpha_t/alpha_s) x_s - sigma_t [(e^h - 1) m_s + sum_k w_k (m_k - m_s) / r_k]
            scale, base = -p.sigma_t(prev.sigma_next), math.expm1(prev.h)
            corrector_x = p.alpha(prev.sigma_next) / p.alpha(prev.sigma)
        w_new = scale * weights[-1]  # r = 1 for the new point
        w_old = [scale * w / rk for w, rk in zip(weights[:-1], rks[:-1])]
        w_s = scale * base - w_new - sum(w_old)
        corrector_m = (w_new, w_s, *w_old)
        out[i] = MultistepCoefficients(**{**cur.__dict__, "corrector_x": corrector_x, "corrector_m": corrector_m})
    return out
