"""Multistep DPM-Solver++ (2M, 3M), its SDE variants, DPM-Solver (noise prediction) and UniC.

One driver, :func:`sample_dpmpp_multistep`, runs every variant; the per-step weights come from
:func:`._coefficients.plan_multistep` (float64, computed before the loop) and the loop only
combines tensors with them. Variants are options, and the named samplers
(:func:`sample_dpmpp_2m`, :func:`sample_dpmpp_3m`, :func:`sample_dpmpp_2m_sde`,
:func:`sample_dpmpp_3m_sde`) are thin aliases.

References: DPM-Solver++ (Lu et al. 2022, arXiv 2211.01095, Alg. 2, §4 for SDE-DPM-Solver++),
DPM-Solver (Lu et al. 2022, arXiv 2206.00927), UniPC (Zhao et al. 2023, arXiv 2302.04867).

NFE: one model call per step. With ``final_step="zero"`` and sigmas ending in 0 a run over
``len(sigmas) - 1`` steps makes ``len(sigmas) - 1`` calls, the last step returning the (corrected)
data prediction exactly, as ComfyUI's samplers do. With ``final_step="sigma_min"`` the trailing 0
is ignored: the run stops at the last non-zero sigma after ``len(sigmas) - 2`` calls (the official
DPM-Solver accounting: N calls for N steps, no final denoise). The UniC corrector adds no calls,
nor does ``final_order > 1``, which takes the step to 0 as an Adams-Bashforth step in VE sigma
(:mod:`.final_adams`), or with weights fitted to Gaussian data (``final_weights="gaussian"``,
:mod:`.final_gaussian`), instead of returning the data prediction. ``first_step="gaussian"``
(:mod:`.gaussian_start`) and ``second_step="flow"`` (:mod:`.flow_step`) change only the weights of
the first two steps of a run from ``sigma_max``; ``first_step="skip"`` makes no call at ``sigma_max``
in such a run, so ``len(sigmas) - 1`` steps cost one call fewer.

Configured as ``order=2, solver_type="midpoint", lower_order_final=False, eta=0`` in VE form this is
k-diffusion's / ComfyUI's ``dpmpp_2m``; ``order=3, solver_type="heun", lower_order_final=False,
third_order="official"`` with ``eta`` and a flow parameterisation where needed is ``dpmpp_3m_sde``
(true half log-SNR), up to
float rounding (our weights are float64, theirs float32 tensors) and the noise source (ComfyUI
draws SDE noise from a Brownian tree). ComfyUI nudges a flow schedule's first sigma of 1 down to
``1 - 1e-4`` before ``dpmpp_3m_sde``; here a step from ``sigma = 1`` is the exact first-order step.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from typing import Any

import torch

from . import history as _history
from ._coefficients import (
    ALGORITHMS,
    FINAL_STEPS,
    MAX_ORDER,
    SOLVER_TYPES,
    THIRD_ORDER_WEIGHTS,
    Algorithm,
    FinalStep,
    MultistepCoefficients,
    SolverType,
    ThirdOrder,
    plan_multistep,
)
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
from .final_adams import FINAL_WEIGHTS, MAX_FINAL_ORDER, FinalAdamsStep, FinalWeights
from .flow_step import SECOND_STEPS, SecondStep, with_flow_second_step
from .gaussian_start import FIRST_STEPS, FirstStep, skip_start, with_gaussian_first_step
from .noise import PerSampleNoiseSampler
from .parameterization import Parameterization
from .unipc import CORRECTOR_VARIANTS, CorrectorVariant

logger = logging.getLogger(__name__)

__all__ = [
    "sample_dpmpp_2m",
    "sample_dpmpp_2m_sde",
    "sample_dpmpp_3m",
    "sample_dpmpp_3m_sde",
    "sample_dpmpp_multistep",
]

NoiseSampler = Callable[[float, float], torch.Tensor]

_VE_DEFAULT = Parameterization("ve", 1e-12, 1e12, family="edm")
_logged_first_order_starts: set[tuple] = set()


def _combine(terms: list[tuple[float, torch.Tensor]]) -> torch.Tensor:
    """``sum w * t`` over the terms with a non-zero weight (weights are host floats)."""
    terms = [(w, t) for w, t in terms if w != 0.0]
    if not terms:
        raise ValueError("internal error: a solver step with no terms")
    w0, t0 = terms[0]
    out = t0 * w0 if w0 != 1.0 else t0.clone()
    for w, t in terms[1:]:
        out.add_(t, alpha=w)
    return out


def _validate(
    order: int,
    solver_type: str,
    algorithm: str,
    final_step: str,
    corrector: str,
    third_order: str,
    eta: float,
    s_noise: float,
    lower_order_final_steps: int,
    final_order: int = 1,
    final_weights: str = "adams",
    second_step: str = "log_snr",
    first_step: str = "ddim",
) -> None:
    if isinstance(final_order, bool) or final_order not in range(1, MAX_FINAL_ORDER + 1):
        raise ValueError(f"final_order must be an integer from 1 to {MAX_FINAL_ORDER}, got {final_order!r}")
    if isinstance(order, bool) or order not in range(1, MAX_ORDER + 1):
        raise ValueError(f"order must be 1, 2, 3 or {MAX_ORDER}, got {order!r}")
    for name, value, allowed in (
        ("solver_type", solver_type, SOLVER_TYPES),
        ("algorithm", algorithm, ALGORITHMS),
        ("final_step", final_step, FINAL_STEPS),
        ("corrector", corrector, CORRECTOR_VARIANTS),
        ("third_order", third_order, tuple(THIRD_ORDER_WEIGHTS)),
        ("final_weights", final_weights, FINAL_WEIGHTS),
        ("second_step", second_step, SECOND_STEPS),
        ("first_step", first_step, FIRST_STEPS),
    ):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    if not (eta >= 0.0 and math.isfinite(eta)):
        raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
    if not (s_noise >= 0.0 and math.isfinite(s_noise)):
        raise ValueError(f"s_noise must be a finite number >= 0, got {s_noise!r}")
    if lower_order_final_steps < 0:
        raise ValueError(f"lower_order_final_steps must be >= 0, got {lower_order_final_steps!r}")
    problem = combination_problem(order, algorithm, eta, corrector, final_order, second_step, first_step)
    if problem:
        raise ValueError(problem)


def combination_problem(
    order: int,
    algorithm: str,
    eta: float,
    corrector: str,
    final_order: int = 1,
    second_step: str = "log_snr",
    first_step: str = "ddim",
) -> str | None:
    """Why these multistep options cannot run together, or None (checked before sampling, and by
    the sampler node when the workflow is queued)."""
    # the options that change a run's first steps are derived for the deterministic data prediction
    for name, value, default, what in (
        ("first_step", first_step, "ddim", "the first step exact for Gaussian data"),
        ("second_step", second_step, "log_snr", "the second step in flow-equivalent coordinates"),
    ):
        if value != default and (algorithm != "dpmsolver++" or eta != 0.0):
            return (
                f"{name} {value!r} ({what}) is implemented for the deterministic data-prediction solver "
                f"only; got algorithm={algorithm!r}, eta={eta!r}. Use 'dpmsolver++' with eta=0, or "
                f"{name}={default!r}."
            )
    if final_order > 1 and eta != 0.0:
        return (
            f"final_order {final_order} (a last step that integrates the noise prediction) needs the "
            f"deterministic solver: with eta={eta!r} fresh noise enters every step, so the noise "
            "prediction is not smooth between calls. Use eta=0, or final_order=1 for SDE sampling."
        )
    if algorithm == "dpmsolver" and eta != 0.0:
        return "eta > 0 (SDE sampling) needs algorithm='dpmsolver++'; set eta=0 for 'dpmsolver'"
    if order == MAX_ORDER and (algorithm != "dpmsolver++" or eta != 0.0):
        return (
            f"order {MAX_ORDER} (exponential Adams-Bashforth) is implemented for the deterministic "
            f"data-prediction solver only; got algorithm={algorithm!r}, eta={eta!r}. Use order <= 3 for "
            "'dpmsolver' or SDE sampling."
        )
    if corrector != "none" and eta != 0.0:
        return (
            f"the UniC corrector works on the deterministic (ODE) solvers; got corrector={corrector!r} with "
            f"eta={eta!r}. Use eta=0, or corrector='none' for SDE sampling."
        )
    return None


@torch.no_grad()
def sample_dpmpp_multistep(
    model: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: dict[str, Any] | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    disable: bool | None = None,
    *,
    parameterization: Parameterization | None = None,
    order: int = 2,
    solver_type: SolverType = "midpoint",
    algorithm: Algorithm = "dpmsolver++",
    lower_order_final: bool = True,
    lower_order_final_steps: int = 10,
    euler_at_final: bool = False,
    final_step: FinalStep = "zero",
    final_order: int = 1,
    final_weights: FinalWeights = "adams",
    second_step: SecondStep = "log_snr",
    first_step: FirstStep = "ddim",
    eta: float = 0.0,
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
    corrector: CorrectorVariant = "none",
    third_order: ThirdOrder = "taylor",
    x0_correction: X0Correction | None = None,
    check_finite: bool = True,
    resume_history: bool = True,
    history_source: str = "",
) -> torch.Tensor:
    """Multistep DPM-Solver++ of order 1-3 (Lu et al. 2022, arXiv 2211.01095, Alg. 2).

    Args:
        model: ``model(x, sigma_batch, **extra_args) -> denoised`` (k-diffusion contract).
        x: the noised start, ``(B, ...)``, in the model's coordinates at ``sigmas[0]``.
        sigmas: descending 1-D schedule, usually ending in 0.
        parameterization: VE (default) or flow; sets ``alpha_t`` and ``lambda_t``.
        order: 1 (DDIM), 2 (2M), 3 (3M) or 4 (exponential Adams-Bashforth of order 4 on the
            data prediction, the variable-step lambda form of DEIS; ``algorithm="dpmsolver++"``
            and ``eta=0`` only; see :mod:`._coefficients`).
        solver_type: second-order difference weight, ``midpoint`` (the paper's ``1 / (2r)`` form,
            official ``dpmsolver``) or ``heun`` (``phi_2``-weighted, official ``taylor``).
        algorithm: ``dpmsolver++`` (data prediction) or ``dpmsolver`` (noise prediction, for
            comparison; ODE only).
        lower_order_final: with fewer than ``lower_order_final_steps`` steps, cap step ``i``'s order
            at the number of steps left (the official rule). A run whose ``sigmas`` end above 0
            is a part of a split schedule and has no final steps; a run that resumes one counts
            the earlier parts' steps too.
        euler_at_final: make the last step first order (not in a part that ends above 0).
        final_step: ``zero`` (denoise to sigma 0 when the schedule ends in 0) or ``sigma_min``
            (ignore the trailing 0 and return ``x`` at the last non-zero sigma; no extra call).
        final_order: order of the step to sigma 0 (``final_step="zero"``). 1: return the data
            prediction (k-diffusion's and ComfyUI's last step). 2-4: integrate the noise prediction
            in VE sigma through the last ``final_order`` model calls of this run, with the weights
            of ``final_weights`` (:mod:`.final_adams`; no extra call, ``eta=0`` only). The x0
            correction, when given, is applied to its result as to a data prediction.
        final_weights: the weights of that last step for ``final_order >= 3``: ``adams``
            (exact when the noise prediction is a polynomial in sigma) or ``gaussian`` (fitted to
            the noise prediction of Gaussian data of every scale above the schedule's end; more
            accurate at 5-10 steps, :mod:`.final_gaussian`). Orders 1 and 2 are the same with both.
        second_step: ``log_snr`` (DPM-Solver++) or ``flow``: in a run from the model's
            ``sigma_max`` (not one resumed from a split schedule, nor an img2img run that starts
            lower), the second step and the UniC correction of its result interpolate the data
            prediction in the flow-equivalent time ``softplus(lambda)`` instead of ``lambda``
            (:mod:`.flow_step`; deterministic data prediction only, runs of three or more steps).
            Fewer mode changes at 5-10 steps; no extra call. For unguided or weakly guided
            sampling: with cfg 5 or more it can blow up at 4-6 steps (``bench/guidance_check.py``).
        first_step: ``ddim`` (DPM-Solver++: exact for a constant data prediction) or ``gaussian``:
            in a run from the model's ``sigma_max`` whose first step does not end at 0, that step
            is exact for Gaussian data of the parameterization's ``sigma_data``
            (:mod:`.gaussian_start`); with the UniC corrector only the point of the second model
            call moves. Fewer mode changes at 5-10 steps; no extra call; safe under guidance.
            ``skip``: in a run from ``sigma_max`` of two or more steps, no call at ``sigma_max``: the
            state at ``sigmas[1]`` comes from one call there under the same Gaussian model, which
            also gives the data mean (:func:`.gaussian_start.skip_start`), and the run goes on from
            ``sigmas[1]`` as with ``gaussian`` (one call fewer than steps). Far fewer mode changes at
            4-8 calls; for unguided or moderately guided sampling at 5 calls or more (cfg up to about
            5; at 4 calls, or from cfg 7 on, it can be several times worse, ``bench/guidance_check.py``).
            Deterministic data prediction only.
        eta: stochasticity of SDE-DPM-Solver++ (0: ODE; 1: the paper's SDE solver, whose first
            order is the DDPM ancestral step). ``s_noise`` scales the injected noise.
        noise_sampler: ``(sigma, sigma_next) -> noise``; default
            :class:`.noise.PerSampleNoiseSampler` seeded with ``extra_args["seed"]``.
        corrector: ``none`` or UniC (``bh1``/``bh2``, Zhao et al. 2023): corrects each state with
            the model call made there anyway, raising the order by one at no extra NFE.
        third_order: weight of the third-order term: ``taylor`` (default; the weight a Taylor
            expansion of the exponential integral gives, measured third order) or ``official`` (the
            authors' published code, also diffusers' and ComfyUI's ``dpmpp_3m_sde``: half that
            weight, which measures second order; use it for parity). See :mod:`._coefficients`.
        x0_correction: hook applied to every data prediction (clamp, dynamic thresholding).
        check_finite: stop with :class:`._loop.NonFiniteModelOutputError` on NaN/inf output.
        resume_history: continue with the stored model outputs of a previous run that ended at
            this ``x`` and ``sigmas[0]`` (split schedules; see :mod:`.history`), and with its
            state one step earlier for the UniC correction at ``x``.
        history_source: the caller's key for what makes the model outputs (model, patches,
            conditioning, cfg); a stored history resumes only with the same key.

    Returns:
        The sample at sigma 0 (``final_step="zero"`` and a schedule ending in 0) or at the last
        non-zero sigma.
    """
    _validate(order, solver_type, algorithm, final_step, corrector, third_order, eta, s_noise,
              lower_order_final_steps, final_order, final_weights, second_step, first_step)
    p = _VE_DEFAULT if parameterization is None else parameterization
    if not isinstance(p, Parameterization):
        raise TypeError(f"parameterization must be a Parameterization or None, got {type(p).__name__}")
    values = sigma_list(sigmas, p)
    check_final_step(values, final_step, p.sigma_max)
    points = values[:-1] if final_step == "sigma_min" and values and values[-1] == 0.0 else values
    if len(points) < 2:
        return x

    # a run whose schedule ends above 0 is a part of a split schedule: another run continues it
    partial = values[-1] > 0.0
    uses_history = resume_history and (order > 1 or corrector != "none")
    carried = _history.lookup(x, points[0], algorithm, history_source) if uses_history else None
    if carried is None and order > 1 and resume_history:  # without resume_history no history is expected
        _log_first_order_start(parameterization, points[0], tuple(x.shape))
    history_lambdas = carried.lambdas[:order] if carried is not None else ()
    resumed_step = None
    if carried is not None and carried.x_prev is not None and corrector != "none":
        resumed_step = (carried.sigma_prev, carried.last_order)
    # a generation from noise: the start call returns nearly the data mean (.flow_step, .gaussian_start)
    from_noise = carried is None and points[0] >= p.sigma_max * (1.0 - 1e-3)
    # first_step="skip": no call at sigma_max, the run goes on from points[1] (.gaussian_start)
    skip = first_step == "skip" and from_noise and len(points) > 2
    run = points[1:] if skip else points
    n_steps = len(run) - 1
    plan = plan_multistep(
        run, p, order=order, solver_type=solver_type, algorithm=algorithm,
        lower_order_final=lower_order_final, lower_order_final_steps=lower_order_final_steps,
        euler_at_final=euler_at_final, eta=eta, s_noise=s_noise, corrector=corrector,
        third_order=third_order, history_lambdas=history_lambdas,
        steps_before=carried.steps if carried is not None else 0, partial=partial, resumed_step=resumed_step,
    )
    if first_step != "ddim" and from_noise:
        plan = with_gaussian_first_step(plan, run, p)
    if second_step == "flow" and from_noise:
        plan = with_flow_second_step(
            plan, run, p, order=order, solver_type=solver_type, lower_order_final=lower_order_final,
            lower_order_final_steps=lower_order_final_steps, euler_at_final=euler_at_final,
            corrector=corrector, third_order=third_order, partial=partial,
        )
    if eta > 0.0 and s_noise > 0.0 and noise_sampler is None:
        noise_sampler = PerSampleNoiseSampler(x, (extra_args or {}).get("seed"))

    if not partial and carried is None:  # a part of a split schedule is judged with the whole run
        log_lowered_order(f"DPM-Solver++({order}M)", order, max(c.order for c in plan), n_steps)
    evaluate = ModelEvaluator(model, extra_args, x0_correction, len(points) - 1, check_finite)
    offset = 1 if skip else 0  # the index in ``sigmas`` of the run's first point
    if skip:
        noise = x
        x, start_denoised = skip_start(lambda x_call, sigma: evaluate(x_call, sigma, 1), x, p,
                                       points[0], points[1])
        emit_callback(callback, 0, noise, points[0], start_denoised, sigmas)
    outputs: list[torch.Tensor] = list(carried.outputs[:order]) if carried is not None else []
    lambdas: list[float] = list(history_lambdas)
    # the UniC correction of an order-k step combines k + 1 outputs (the new one included)
    depth = order + 1 if corrector != "none" else order
    x_prev = carried.x_prev if resumed_step is not None else x
    # the step to sigma 0 at higher order (in VE sigma, Adams or gaussian weights) when asked for
    final = FinalAdamsStep(final_order, p, final_weights) if final_order > 1 and points[-1] == 0.0 else None
    for i in progress(n_steps, disable):
        c = plan[i]
        denoised = start_denoised if skip and i == 0 else evaluate(x, c.sigma, i + offset)
        m = denoised if (c.m_x, c.m_d) == (0.0, 1.0) else _combine([(c.m_x, x), (c.m_d, denoised)])
        outputs = [m, *outputs][:depth]
        lambdas = [c.lambda_, *lambdas][:depth]
        if c.corrector_m:
            x = _combine([(c.corrector_x, x_prev), *zip(c.corrector_m, outputs)])
        emit_callback(callback, i + offset, x, c.sigma, denoised, sigmas)
        x_prev = x
        if final is not None and i >= n_steps - final_order:  # only the calls the last step uses
            final.record(x, denoised, c.sigma)
            if i == n_steps - 1:
                x = evaluate.finish(final.step(x, denoised, c.sigma), denoised, c.sigma)
                break
        x = _step(c, x, denoised, outputs, noise_sampler)
    if len(points) < len(values):  # stopped at sigma_min: the skipped step to 0 completes the bar
        emit_callback(callback, n_steps + offset, x, points[-1], denoised, sigmas)

    if uses_history and points[-1] > 0.0:
        keep = min(order, len(outputs))
        _history.store(
            _history.MultistepHistory(
                x=x, sigma=points[-1], algorithm=algorithm,
                outputs=tuple(outputs[:keep]), lambdas=tuple(lambdas[:keep]),
                x_prev=x_prev if corrector != "none" else None, sigma_prev=plan[-1].sigma,
                last_order=plan[-1].order,
                steps=(carried.steps if carried is not None else 0) + len(points) - 1,
                source=history_source,
            )
        )
    return x


def _step(
    c: MultistepCoefficients,
    x: torch.Tensor,
    denoised: torch.Tensor,
    outputs: list[torch.Tensor],
    noise_sampler: NoiseSampler | None,
) -> torch.Tensor:
    """One planned update ``x_next = c_x x + c_denoised D + sum c_m m + c_noise z``."""
    terms = [(c.c_x, x), (c.c_denoised, denoised), *zip(c.c_m, outputs)]
    if c.c_noise != 0.0 and noise_sampler is not None:
        terms.append((c.c_noise, noise_sampler(c.sigma, c.sigma_next)))
    return _combine(terms)


def _log_first_order_start(parameterization: Parameterization | None, sigma0: float, shape: tuple) -> None:
    """Log (INFO, once per latent shape and start sigma) that a run starting below sigma_max has
    no stored history and so begins at first order."""
    if parameterization is None or sigma0 >= parameterization.sigma_max * (1.0 - 1e-5):
        return
    situation = (shape, round(sigma0, 6))
    if situation in _logged_first_order_starts:
        return
    if len(_logged_first_order_starts) >= 256:
        _logged_first_order_starts.clear()
    _logged_first_order_starts.add(situation)
    logger.info(
        "multistep sampler starts at sigma=%.4g, below the model's sigma_max=%.4g, with no history from an "
        "earlier run ending at this latent, so its first steps are lower order. That is normal for img2img "
        "(denoise < 1) and for a scheduler that starts below sigma_max; for the second part of a split "
        "schedule it means the first part's history was not found (it ran in another process, the latent "
        "was saved and loaded, or many other split runs came in between)",
        sigma0, parameterization.sigma_max,
    )


sample_dpmpp_2m = functools.partial(sample_dpmpp_multistep, order=2)
sample_dpmpp_2m.__doc__ = "DPM-Solver++(2M): :func:`sample_dpmpp_multistep` with ``order=2``."
sample_dpmpp_3m = functools.partial(sample_dpmpp_multistep, order=3)
sample_dpmpp_3m.__doc__ = "DPM-Solver++(3M): :func:`sample_dpmpp_multistep` with ``order=3``."
sample_dpmpp_2m_sde = functools.partial(sample_dpmpp_multistep, order=2, eta=1.0)
sample_dpmpp_2m_sde.__doc__ = "SDE-DPM-Solver++(2M): ``order=2, eta=1`` (override ``eta``, ``solver_type``)."
sample_dpmpp_3m_sde = functools.partial(sample_dpmpp_multistep, order=3, solver_type="heun", eta=1.0)
sample_dpmpp_3m_sde.__doc__ = "SDE-DPM-Solver++(3M): ``order=3, solver_type='heun', eta=1``."
