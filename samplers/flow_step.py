"""The second step of a multistep run taken in flow-equivalent coordinates (``second_step="flow"``).

Any model's state has a flow form: with ``x = alpha_t x0 + sigma_t eps``,

    x_f = x / (alpha_t + sigma_t) = (1 - sigma_f) x0 + sigma_f eps,    sigma_f = sigma_t / (alpha_t + sigma_t),

(a flow model's own coordinates, where ``alpha_t + sigma_t = 1``). In those coordinates the
probability-flow ODE has the VE form ``dx_f / dsigma_f = (x_f - D) / sigma_f``, and DPM-Solver++ on it
(data prediction, arXiv 2211.01095, eq. 9 with ``alpha = 1``) takes ``tau = -log sigma_f =
softplus(lambda)`` as its time: it interpolates ``D`` linearly in ``tau`` instead of ``lambda``. This is
what k-diffusion's samplers do on flow models, which ComfyUI hands them with ``sigma_f`` read as a VE
sigma.

``tau`` behaves as ``e^lambda`` at low SNR and as ``lambda`` at high SNR. That matters for one step of a
run from the model's ``sigma_max`` (the sampler applies it only there, not to an img2img run that starts
lower, whose first call is not near the data mean): the second, the first whose interpolant reaches back
to the start. The call at the start returns nearly the data mean, and for any data of finite covariance
the prediction leaves the mean as ``e^lambda`` (Tweedie's formula at low SNR). A line in ``lambda`` from
that point extrapolates the wrong shape across the step where the sample settles on a mode of the data;
for a flow model, whose start is at ``lambda = -inf``, DPM-Solver++ drops the point and takes that step
at first order. A line in ``tau`` follows the low-SNR shape and keeps the start's prediction. The later
steps, whose calls all lie where ``D`` is smooth in ``lambda``, stay in log-SNR: there ``tau`` bends and
is worse (measured, ``docs/solver-experiments.md``).

Under strong classifier-free guidance it is unstable at 4-6 steps: the guided prediction at the start
(``D_u + cfg (D_c - D_u)``) lies far outside the data, and a line in ``tau``, where the start is close
to the next call, extrapolates that difference with a large weight (in ``lambda`` the start is far and
weighs little). On guided mixtures (``bench/guidance_check.py``) it helps at cfg 1-3 from 6 steps on,
is worse at 4-5 steps, and at cfg 5 and above it can blow up at 4-6 steps. So it is an option for
unguided or weakly guided sampling (guidance-distilled models at cfg 1, cfg up to about 3), not part
of the few-step preset.

The step and the UniC correction of its result are the VE-form weights of :func:`.plan_multistep` on
the flow-equivalent sigmas, mapped back with ``x_f = kappa x``, ``kappa = 1 / (alpha_t + sigma_t)``:
a step ``x_f,t = c_x x_f,s + sum_k c_k D_k`` is ``x_t = c_x (kappa_s / kappa_t) x_s + sum_k (c_k /
kappa_t) D_k``. It adds no model call and needs no parameter.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Literal, get_args

from ._coefficients import MultistepCoefficients, plan_multistep
from .parameterization import Parameterization

SecondStep = Literal["log_snr", "flow"]
SECOND_STEPS: tuple[str, ...] = get_args(SecondStep)

#: the VE form in which a flow-equivalent schedule is planned (sigma_f lies in [0, 1])
_FLOW_EQUIVALENT = Parameterization("ve", 1e-12, 1e12, family="flow")

__all__ = ["SECOND_STEPS", "SecondStep", "flow_equivalent", "with_flow_second_step"]


def flow_equivalent(p: Parameterization, sigma: float) -> tuple[float, float]:
    """``(sigma_f, kappa)`` of the point ``sigma`` of ``p``: its flow-form sigma and the scale
    ``x_f = kappa x`` of its state (``sigma_f = sigma_t / (alpha_t + sigma_t)``, ``kappa = 1 /
    (alpha_t + sigma_t)``); ``sigma_f`` is 1 at pure noise and 0 at the data."""
    alpha, sigma_t = p.alpha(sigma), p.sigma_t(sigma)
    return sigma_t / (alpha + sigma_t), 1.0 / (alpha + sigma_t)


def with_flow_second_step(
    plan: list[MultistepCoefficients], sigmas: list[float], p: Parameterization, **plan_options: Any
) -> list[MultistepCoefficients]:
    """``plan`` (a fresh data-prediction ODE run over ``sigmas``) with its second step, and the UniC
    correction of that step's result, taken in flow-equivalent coordinates.

    ``plan_options`` are the options ``plan`` was made with (order, solver type, corrector,
    lower-order-final rule, ``partial``). Unchanged when the run has fewer than three steps (the
    correction of the second step's result must be part of it) or when its second step is first
    order (``order=1``, or lowered at the end of a short run).
    """
    if len(plan) < 3:
        return plan
    flow_sigmas, kappa = zip(*(flow_equivalent(p, s) for s in sigmas))
    flow_plan = plan_multistep(list(flow_sigmas), _FLOW_EQUIVALENT, **plan_options)
    step, corrected = flow_plan[1], flow_plan[2]
    if step.order < 2:
        return plan
    k1, k2 = kappa[1], kappa[2]
    out = list(plan)
    out[1] = replace(plan[1], order=step.order, c_x=step.c_x * k1 / k2, c_m=tuple(w / k2 for w in step.c_m))
    if corrected.corrector_m:
        out[2] = replace(plan[2], corrector_x=corrected.corrector_x * k1 / k2,
                         corrector_m=tuple(w / k2 for w in corrected.corrector_m))
    return out
