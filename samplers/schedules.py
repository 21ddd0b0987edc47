"""Step schedules (SIGMAS) for the DPM-Solver++ samplers.

Every ``get_sigmas_<name>(steps, parameterization, ..., sigma_min=None, sigma_max=None)``
returns ComfyUI's SIGMAS: a 1-D float32 CPU tensor of length ``steps + 1``, strictly
decreasing, ending in ``0.0``. A step is one interval ``sigmas[i] -> sigmas[i + 1]``; a
multistep sampler makes one model call per step. ``sigma_min`` / ``sigma_max`` override the
range of ``parameterization`` (see :mod:`.parameterization`).

Two conventions for the clean end exist in the literature, and each schedule keeps its own:

* **Grid schedules** (``logsnr_uniform``, ``logsnr_window``, ``time_uniform``, ``time_quadratic``, ``ays``,
  ``gits``): ``steps + 1`` grid points from ``sigma_max`` down to ``sigma_min``, as in
  DPM-Solver's ``get_time_steps`` (Lu et al. 2022, arXiv 2206.00927, Sec. 3.3 / App. D.1) and
  the AYS / GITS tables; the last point (``sigma_min``) is then replaced by 0 so the last
  model call denoises fully. No step is spent on the short ``sigma_min -> 0`` hop, which
  matters at the few-step counts this pack targets.
* **Range schedules** (``karras``, ``exponential``, ``polyexponential``): ``steps`` points
  from ``sigma_max`` to ``sigma_min`` inclusive, then 0 is appended (Karras et al. 2022,
  eq. 5; k-diffusion; ComfyUI's schedulers of the same names give the same numbers).
  Uniform-lambda spacing in this convention is ``exponential``.

``custom`` takes a user list. :func:`get_sigmas` dispatches by name and applies ComfyUI's
``denoise`` truncation.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Literal, get_args

import torch

from .parameterization import Parameterization
from .schedule_tables import AYS_TABLES, GITS_SD15_TABLES, loglinear_interp, parse_sigmas

logger = logging.getLogger(__name__)

ScheduleName = Literal[
    "logsnr_uniform",
    "logsnr_window",
    "time_uniform",
    "time_quadratic",
    "karras",
    "exponential",
    "polyexponential",
    "ays",
    "gits",
    "custom",
]
SCHEDULE_NAMES: tuple[str, ...] = get_args(ScheduleName)

AysModel = Literal["auto", "sd15", "sdxl", "svd"]
AYS_MODELS: tuple[str, ...] = get_args(AysModel)

#: Default half log-SNR where ``logsnr_uniform`` starts its uniform grid on a flow model
#: whose ``sigma_max`` is 1 (``lambda = -inf``): flow sigma ~0.953, the signal-to-noise
#: ratio of a VE sigma of 20 (SD 1.5 starts at 14.6, lambda -2.68). Above it the denoiser
#: output is close to the data mean, so the first step, stretched from pure noise over it, is
#: cheap. On held-out exact Gaussian-mixture denoisers (16-D, 8 components, flow shift 1 and 3,
#: DPM-Solver++(2M) and 3M+UniC, NFE 3..15) -3 gave the lowest mode-flip rates of the clips
#: -1.5..-4 at 4-15 NFE (-2.5 lower median errors at 5-10 NFE but more flips). At 2-4 NFE
#: ``time_uniform`` is better on flow models than any log-SNR grid (docs/solver-experiments.md).
FLOW_LAMBDA_MIN: float = -3.0

#: ``logsnr_window`` options for the few-step preset (DPM-Solver++(2M) + UniC with an order-4
#: last step, ``final_order=4``; chosen with the Adams weights, kept for the gaussian ones and the
#: gaussian first step, see
#: docs/solver-experiments.md). With an accurate last step the window can end
#: higher (its last call at VE sigma 0.03 rather than 0.02) and, with the first step from a flow
#: model's pure noise corrected, start later (-2 rather than -2.5). Chosen on held-out exact
#: Gaussian-mixture denoisers (``bench/_tune.py``: SD1.5, EDM and flow shift 1 / 3 ranges, two
#: mixtures each, 4-20 NFE), as the lowest geometric-mean median error ratio to ComfyUI's best at
#: 5-10 NFE (docs/solver-experiments.md). The plain defaults stay those of the first-order last step.
FEWSTEP_WINDOW: dict[str, float] = {"lambda_start": -2.0, "sigma_end": 0.03}

#: ``logsnr_window`` options for the few-step preset without the call at ``sigma_max``
#: (``first_step="skip"``, :mod:`.gaussian_start`; ``steps = calls + 1``). Its first call is the
#: grid's second point, so the window starts earlier (-3: the first call near VE sigma 7 at 5
#: calls) to keep that call where the prediction is still close to the Gaussian the start assumes.
#: Chosen on held-out exact Gaussian-mixture denoisers (``bench/_tune.py``: SD1.5, EDM and flow
#: shift 1 / 3 ranges, four mixtures each, 4-10 NFE) as the window that meets the benchmark's
#: target on the most held-out cells (docs/solver-experiments.md).
SKIP_WINDOW: dict[str, float] = {"lambda_start": -3.0, "sigma_end": 0.03}

#: GITS coefficients with published tables (hundredths: 80 = 0.80 .. 150 = 1.50).
GITS_COEFFS: tuple[float, ...] = tuple(k / 100.0 for k in sorted(GITS_SD15_TABLES))

#: Per-schedule options and their defaults (one source of truth for a node's widgets).
#: ``sigma_min`` / ``sigma_max`` overrides are accepted by every schedule in addition.
SCHEDULE_DEFAULTS: dict[str, dict[str, object]] = {
    "logsnr_uniform": {"lambda_min": None},
    "logsnr_window": {"lambda_start": -2.5, "sigma_end": 0.02},
    "time_uniform": {},
    "time_quadratic": {},
    "karras": {"rho": 7.0},
    "exponential": {},
    "polyexponential": {"rho": 1.0},
    "ays": {"model": "auto"},
    "gits": {"coeff": 1.20},
    "custom": {"sigmas": ""},
}

# Continuous VP-SDE of Song et al. 2021 (beta_min 0.1, beta_max 20), used as the
# "VP-equivalent time" of VE models without a timestep table (Karras et al. 2022, Table 1).
_VP_BETA_MIN = 0.1
_VP_BETA_D = 19.9

__all__ = [
    "AYS_MODELS",
    "FEWSTEP_WINDOW",
    "FLOW_LAMBDA_MIN",
    "GITS_COEFFS",
    "SCHEDULE_DEFAULTS",
    "SKIP_WINDOW",
    "SCHEDULE_NAMES",
    "ScheduleName",
    "get_sigmas",
    "get_sigmas_ays",
    "get_sigmas_custom",
    "get_sigmas_exponential",
    "get_sigmas_gits",
    "get_sigmas_karras",
    "get_sigmas_logsnr_uniform",
    "get_sigmas_logsnr_window",
    "get_sigmas_polyexponential",
    "get_sigmas_time_quadratic",
    "get_sigmas_time_uniform",
    "loglinear_interp",
    "parse_sigmas",
]


# -- helpers ---------------------------------------------------------------------------------


def _check_steps(steps: object, name: str) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise TypeError(f"{name}: steps must be an int, got {type(steps).__name__} {steps!r}")
    if steps < 1:
        raise ValueError(f"{name}: steps must be >= 1, got {steps}")
    return steps


def _range(
    name: str,
    parameterization: Parameterization | None,
    sigma_min: float | None,
    sigma_max: float | None,
) -> tuple[float, float]:
    """The ``(sigma_min, sigma_max)`` a schedule spans: overrides, else the parameterization's."""
    if parameterization is None and (sigma_min is None or sigma_max is None):
        raise ValueError(
            f"{name}: pass a Parameterization (or both sigma_min and sigma_max) to set the sigma range"
        )
    lo = float(parameterization.sigma_min if sigma_min is None else sigma_min)
    hi = float(parameterization.sigma_max if sigma_max is None else sigma_max)
    if not (math.isfinite(lo) and math.isfinite(hi) and 0.0 < lo < hi):
        raise ValueError(f"{name}: need finite 0 < sigma_min < sigma_max, got sigma_min={lo!r}, sigma_max={hi!r}")
    if parameterization is not None and parameterization.kind == "flow" and hi > 1.0:
        raise ValueError(f"{name}: a flow model has sigma <= 1, got sigma_max={hi!r}")
    return lo, hi


def _need(name: str, parameterization: Parameterization | None) -> Parameterization:
    if not isinstance(parameterization, Parameterization):
        raise TypeError(
            f"{name} needs the model's Parameterization (build one with samplers.for_family), "
            f"got {type(parameterization).__name__}"
        )
    return parameterization


def _finish(name: str, grid: Sequence[float] | torch.Tensor, *, append_zero: bool) -> torch.Tensor:
    """float64 grid -> SIGMAS: append or replace the final 0, cast to float32, check order."""
    sig = torch.as_tensor(grid, dtype=torch.float64).flatten().clone()
    if append_zero:
        sig = torch.cat([sig, sig.new_zeros(1)])
    else:
        sig[-1] = 0.0
    out = sig.to(torch.float32)
    if not bool(torch.isfinite(out).all()) or not bool((out[:-1] > out[1:]).all()):
        raise ValueError(
            f"{name}: the schedule is not strictly decreasing in float32 ({out.tolist()[:8]}...); "
            "use fewer steps or a wider sigma range"
        )
    return out


# -- time maps for time_uniform / time_quadratic ---------------------------------------------


def _time_map(p: Parameterization):
    """``(t_of_sigma, sigma_of_t)`` for DPM-Solver's model time ``t`` (float64 tensors).

    * Discrete tables (``timestep_sigmas``, ``T`` entries): ``t = (i + 1) / T`` at table index
      ``i`` (DPM-Solver's ``NoiseScheduleVP('discrete')``, ``t`` in ``[1/T, 1]``), the table
      interpolated linearly in ``log sigma`` for VE models (ComfyUI's ``sigma(t)``) and in
      ``sigma`` for flow models (where sigma is the shifted time itself).
    * VE without a table (EDM): the VP-equivalent time of the continuous linear VP-SDE,
      ``sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)`` (Karras et al. 2022, Table 1).
    * Flow without a table: ``t = sigma`` (shift unknown, treated as 1).
    """
    table = p.timestep_sigmas
    if table is not None and len(table) >= 2:
        tab = torch.tensor(table, dtype=torch.float64)
        if not bool((tab[1:] > tab[:-1]).all()):
            raise ValueError("parameterization.timestep_sigmas must be strictly ascending")
        n = tab.numel()
        ys = tab.log() if p.kind == "ve" else tab
        idx = torch.arange(n, dtype=torch.float64)

        def t_of_sigma(sigma: torch.Tensor) -> torch.Tensor:
            y = sigma.log() if p.kind == "ve" else sigma
            if bool((y < ys[0] - 1e-9).any()) or bool((y > ys[-1] + 1e-9).any()):
                raise ValueError(
                    f"sigma range {sigma.min().item():.6g}..{sigma.max().item():.6g} lies outside the "
                    f"model's timestep table {tab[0].item():.6g}..{tab[-1].item():.6g}"
                )
            y = y.clamp(ys[0], ys[-1])
            j = (torch.searchsorted(ys, y, right=True) - 1).clamp(0, n - 2)
            frac = (y - ys[j]) / (ys[j + 1] - ys[j])
            return (j + frac + 1.0) / n

        def sigma_of_t(t: torch.Tensor) -> torch.Tensor:
            pos = (t * n - 1.0).clamp(0.0, n - 1.0)
            j = pos.floor().long().clamp(0, n - 2)
            frac = pos - j
            y = ys[j] * (1.0 - frac) + ys[j + 1] * frac
            return y.exp() if p.kind == "ve" else y

        return t_of_sigma, sigma_of_t

    if p.kind == "ve":

        def t_of_sigma(sigma: torch.Tensor) -> torch.Tensor:
            return (torch.sqrt(_VP_BETA_MIN**2 + 2.0 * _VP_BETA_D * torch.log1p(sigma * sigma)) - _VP_BETA_MIN) / _VP_BETA_D

        def sigma_of_t(t: torch.Tensor) -> torch.Tensor:
            return torch.sqrt(torch.expm1(0.5 * _VP_BETA_D * t * t + _VP_BETA_MIN * t))

        return t_of_sigma, sigma_of_t

    return (lambda sigma: sigma.clone()), (lambda t: t.clone())


def _time_schedule(
    name: str, steps: int, p: Parameterization, power: float, sigma_min: float | None, sigma_max: float | None
) -> torch.Tensor:
    steps = _check_steps(steps, name)
    p = _need(name, p)
    lo, hi = _range(name, p, sigma_min, sigma_max)
    t_of_sigma, sigma_of_t = _time_map(p)
    t_ends = t_of_sigma(torch.tensor([hi, lo], dtype=torch.float64))
    t_T, t_0 = float(t_ends[0]), float(t_ends[1])
    u = torch.linspace(t_T ** (1.0 / power), t_0 ** (1.0 / power), steps + 1, dtype=torch.float64)
    sigmas = sigma_of_t(u**power)
    sigmas[0], sigmas[-1] = hi, lo  # exact ends, free of interpolation round-off
    return _finish(name, sigmas, append_zero=False)


# -- grid schedules ----------------------------------------------------------------------------


def get_sigmas_logsnr_uniform(
    steps: int,
    parameterization: Parameterization,
    lambda_min: float | None = None,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
) -> torch.Tensor:
    """Uniform steps in the true half log-SNR ``lambda_t = log(alpha_t / sigma_t)``.

    DPM-Solver's ``logSNR`` skip type (Lu et al. 2022, arXiv 2206.00927, Sec. 3.3): ``steps + 1``
    points with equal ``h = lambda_{i+1} - lambda_i`` from ``lambda(sigma_max)`` to
    ``lambda(sigma_min)``, the last replaced by 0. For VE models this is log-linear in sigma.

    For flow models ``lambda = log((1 - sigma) / sigma)`` is ``-inf`` at ``sigma = 1``, and a
    grid from ``sigma = 0.9999`` spends a large share of the steps at near-pure noise where the
    denoiser hardly changes (solvers reference, Sec. 6). The grid therefore starts at
    ``lambda_min`` (default :data:`FLOW_LAMBDA_MIN` for flow, no clip for VE) whenever
    ``lambda(sigma_max) < lambda_min``: ``steps + 1`` points uniform in lambda from
    ``lambda_min`` to ``lambda(sigma_min)``, the first of which is then moved to ``sigma_max``
    (the generation still starts from pure noise; the first step is stretched over the clipped
    part, an exponential-integrator step that is exact for a constant denoiser, so no model call
    is spent between ``sigma_max`` and ``lambda_min``). A ``denoise < 1`` run takes the tail of
    this longer grid, so on flow models it starts lower than with a grid whose second point is at
    ``lambda_min`` (denoise 0.5 at 4 steps: from sigma 0.124).
    """
    name = "logsnr_uniform"
    steps = _check_steps(steps, name)
    p = _need(name, parameterization)
    lo, hi = _range(name, p, sigma_min, sigma_max)
    lam_max = p.lambda_(lo)
    lam_start = p.lambda_(hi)
    clip = lambda_min if lambda_min is not None else (FLOW_LAMBDA_MIN if p.kind == "flow" else None)
    if clip is not None:
        clip = float(clip)
        if not math.isfinite(clip) or clip >= lam_max:
            raise ValueError(
                f"{name}: lambda_min must be finite and below lambda(sigma_min) = {lam_max:.4g}, got {clip!r}"
            )
    lam_first = lam_start if clip is None else max(lam_start, clip)
    sigmas = p.sigma_from_lambda_tensor(torch.linspace(lam_first, lam_max, steps + 1, dtype=torch.float64))
    sigmas[0] = hi
    return _finish(name, sigmas, append_zero=False)


def get_sigmas_logsnr_window(
    steps: int,
    parameterization: Parameterization,
    lambda_start: float = -2.5,
    sigma_end: float = 0.02,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
) -> torch.Tensor:
    """Uniform half log-SNR steps over a window, for few-step sampling (5-10 model calls).

    ``logsnr_uniform`` spreads its steps over the model's whole range. At a handful of steps two
    ends of it cost more than they give: at high noise (``lambda < -2``, VE sigma > 7.4 for data
    of unit scale) the denoiser output is close to the data mean and an exponential-integrator
    step across that part is nearly exact, and at very low noise (VE sigma below the data's
    finest scale) the final denoise is nearly the identity. This schedule places
    ``steps + 1`` points ``lambda_k = c + k h`` with ``c = max(lambda_start, lambda(sigma_max))``
    and ``h = (lambda_end - c) / steps``; the first point is then moved to ``sigma_max`` (the
    generation starts from pure noise; the first step is stretched over the skipped part) and
    the last is replaced by 0 (grid convention: the last model call is at ``lambda_end - h``).
    ``lambda_end = -log(sigma_end)`` with ``sigma_end`` in VE units (``sigma / alpha``, i.e.
    ``e^(-lambda)``); when that would put the last model call below the model's ``sigma_min``,
    the grid is stretched instead so that the last call is at ``sigma_min`` (a model is never
    evaluated outside its range; SD 1.5's ``sigma_min = 0.029`` sets the end from 16 steps on).

    Defaults (``lambda_start=-2.5``, VE sigma 12.2; ``sigma_end=0.02``) were chosen with
    DPM-Solver++(2M) + UniC on held-out Gaussian mixtures (unit-scale means, component widths
    0.05-0.3) at 4-10 NFE (``bench/_tune.py``; see ``docs/solver-experiments.md``): a later start
    (-2) lowers the median error at 4-6 NFE further but changes the mixture component of more
    samples on flow models, an earlier one (-3) the reverse. ``sigma_end`` is a data-scale
    choice (about a third of the finest feature scale). With ``lambda_start <= lambda(sigma_max)``
    and ``sigma_end = sigma_min`` this is ``logsnr_uniform`` (unclipped).
    """
    name = "logsnr_window"
    steps = _check_steps(steps, name)
    p = _need(name, parameterization)
    lo, hi = _range(name, p, sigma_min, sigma_max)
    sigma_end = float(sigma_end)
    lambda_start = float(lambda_start)
    if not (math.isfinite(sigma_end) and sigma_end > 0.0):
        raise ValueError(f"{name}: sigma_end must be a finite number > 0, got {sigma_end!r}")
    lam_end = -math.log(sigma_end)
    lam_floor = p.lambda_(lo)  # the last model call must not go below the model's sigma_min
    lam_first = p.lambda_(hi)
    if not (math.isfinite(lambda_start) and lambda_start < min(lam_end, lam_floor)):
        raise ValueError(
            f"{name}: lambda_start must be finite and below lambda(sigma_end) = {lam_end:.4g} and "
            f"lambda(sigma_min) = {lam_floor:.4g}, got {lambda_start!r}"
        )
    c = max(lambda_start, lam_first)
    if steps >= 2 and c + (steps - 1) * (lam_end - c) / steps > lam_floor:
        lam_end = c + steps * (lam_floor - c) / (steps - 1)  # last call exactly at sigma_min
    lambdas = torch.linspace(c, lam_end, steps + 1, dtype=torch.float64)
    sigmas = p.sigma_from_lambda_tensor(lambdas)
    sigmas[0] = hi
    return _finish(name, sigmas, append_zero=False)


def get_sigmas_time_uniform(
    steps: int,
    parameterization: Parameterization,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
) -> torch.Tensor:
    """Uniform steps in the model's time ``t`` (DPM-Solver's ``time_uniform`` skip type).

    ``t_i = linspace(t(sigma_max), t(sigma_min), steps + 1)`` (Lu et al. 2022, App. D.1), mapped
    back to sigma, the last point replaced by 0. The time of a discrete model (SD 1.5: ``t =
    (timestep + 1) / 1000``) gives UNet timesteps ``linspace(999, 0, steps + 1)``; EDM models
    use the VP-equivalent time, flow models their unshifted time (see ``_time_map``).
    """
    return _time_schedule("time_uniform", steps, parameterization, 1.0, sigma_min, sigma_max)


def get_sigmas_time_quadratic(
    steps: int,
    parameterization: Parameterization,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
) -> torch.Tensor:
    """Steps uniform in ``sqrt(t)`` (DPM-Solver's ``time_quadratic`` skip type, Lu et al. 2022).

    ``t_i = linspace(sqrt(t_T), sqrt(t_0), steps + 1) ** 2``: denser near the data end. The
    time variable is the one of :func:`get_sigmas_time_uniform`.
    """
    return _time_schedule("time_quadratic", steps, parameterization, 2.0, sigma_min, sigma_max)


# -- range schedules (k-diffusion convention: steps points to sigma_min, then 0) ---------------


def get_sigmas_karras(
    steps: int,
    parameterization: Parameterization | None,
    rho: float = 7.0,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
) -> torch.Tensor:
    """Karras et al. 2022 (EDM, arXiv 2206.00364) eq. 5.

    ``sigma_i = (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``
    for ``i = 0 .. N - 1`` with ``N = steps``, then ``sigma_N = 0``. Evaluated as
    ``rho * logaddexp(log(1 - r) + log(sigma_max) / rho, log(r) + log(sigma_min) / rho)`` in log
    space (``r = i / (N - 1)``): no cancellation and no overflow at small ``rho`` (at rho 0.1 the
    direct form ends at 0, not sigma_min; at 0.001 it overflows), and the end points are exact.
    """
    name = "karras"
    steps = _check_steps(steps, name)
    lo, hi = _range(name, parameterization, sigma_min, sigma_max)
    rho = float(rho)
    if not (math.isfinite(rho) and rho > 0.0):
        raise ValueError(f"{name}: rho must be > 0, got {rho!r}")
    ramp = torch.linspace(0.0, 1.0, steps, dtype=torch.float64)
    log_sigma = torch.logaddexp(torch.log1p(-ramp) + math.log(hi) / rho, ramp.log() + math.log(lo) / rho)
    return _finish(name, (rho * log_sigma).exp(), append_zero=True)


def get_sigmas_exponential(
    steps: int,
    parameterization: Parameterization | None,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
) -> torch.Tensor:
    """``steps`` points log-linear in sigma from ``sigma_max`` to ``sigma_min``, then 0 (k-diffusion)."""
    name = "exponential"
    steps = _check_steps(steps, name)
    lo, hi = _range(name, parameterization, sigma_min, sigma_max)
    log_s = torch.linspace(math.log(hi), math.log(lo), steps, dtype=torch.float64)
    return _finish(name, log_s.exp(), append_zero=True)


def get_sigmas_polyexponential(
    steps: int,
    parameterization: Parameterization | None,
    rho: float = 1.0,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
) -> torch.Tensor:
    """Polynomial in ``log sigma`` (k-diffusion): ``log sigma_i = log sigma_min + (1 - i/(N-1))^rho
    (log sigma_max - log sigma_min)`` for ``N = steps`` points, then 0. ``rho = 1`` is exponential."""
    name = "polyexponential"
    steps = _check_steps(steps, name)
    lo, hi = _range(name, parameterization, sigma_min, sigma_max)
    rho = float(rho)
    if not (math.isfinite(rho) and rho > 0.0):
        raise ValueError(f"{name}: rho must be > 0, got {rho!r}")
    ramp = torch.linspace(1.0, 0.0, steps, dtype=torch.float64) ** rho
    log_lo, log_hi = math.log(lo), math.log(hi)
    return _finish(name, torch.exp(log_lo + ramp * (log_hi - log_lo)), append_zero=True)


# -- table schedules ---------------------------------------------------------------------------

_DISCRETE_VP_FAMILIES = ("eps", "v", "x0")
TableModels = Literal["discrete", "continuous"]
#: which models a published table is for: discrete-time VP models (SD1.5, SDXL: a sigma per
#: integer timestep) or continuous-time VE models (SVD, EDM; its prediction may be eps, v or EDM)
_AYS_MODELS_FOR: dict[str, TableModels] = {"sd15": "discrete", "sdxl": "discrete", "svd": "continuous"}
_TABLE_MODELS_TEXT = {
    "discrete": "discrete-time eps/v/x0 (SD-style)",
    "continuous": "continuous-time (EDM/SVD-style)",
}
_TABLE_RTOL = 1e-3


def _table_models(p: Parameterization) -> TableModels | None:
    """The kind of model ``p`` is, as the published tables are keyed (None: neither, e.g. flow)."""
    if p.kind != "ve":
        return None
    if p.timestep_sigmas is None:
        return "continuous"
    return "discrete" if p.family in _DISCRETE_VP_FAMILIES else None


def _check_table_fits(
    name: str, table: Sequence[float], p: Parameterization, models: TableModels, label: str,
    sigma_min: float | None, sigma_max: float | None,
) -> None:
    """Refuse a table made for another kind of model or sigma range."""
    if _table_models(p) != models:
        time = "discrete-time" if p.timestep_sigmas is not None else "continuous-time"
        raise ValueError(
            f"{name}: the {label} table is for {_TABLE_MODELS_TEXT[models]} models, but this model is a "
            f"{time} {p.family!r} ({p.kind}) model; pick a schedule made for it (e.g. logsnr_uniform) or the "
            "matching table"
        )
    lo, hi = _range(name, p, sigma_min, sigma_max)
    if table[0] > hi * (1.0 + _TABLE_RTOL) or table[-1] < lo * (1.0 - _TABLE_RTOL):
        raise ValueError(
            f"{name}: the {label} table spans sigma {table[-1]:.6g}..{table[0]:.6g}, outside this model's "
            f"range {lo:.6g}..{hi:.6g}; use a schedule computed from the model (e.g. logsnr_uniform)"
        )
    if table[0] < 0.5 * hi:  # e.g. a zero-terminal-SNR model (sigma_max 4500 against the table's 14.6)
        logger.warning("%s: the %s table starts at sigma %.4g, far below this model's sigma_max %.4g (zero "
                       "terminal SNR?): sampling starts from that noise level, not from pure noise; use "
                       "logsnr_uniform or karras to start at the model's own", name, label, table[0], hi)


def get_sigmas_ays(
    steps: int,
    parameterization: Parameterization,
    model: AysModel = "auto",
    sigma_min: float | None = None,
    sigma_max: float | None = None,
) -> torch.Tensor:
    """Align Your Steps (Sabour, Fidler, Kreis, ICML 2024, arXiv 2404.14507, Table 3).

    The published 10-step table of ``model`` (``"sd15"``, ``"sdxl"``, ``"svd"``; ``"auto"``
    picks ``svd`` for continuous-time models (EDM, and SVD's continuous v-prediction) and
    ``sd15`` for discrete eps/v/x0 models), resampled to
    ``steps + 1`` points log-linearly as in the paper's appendix, last point replaced by 0.
    A table for another model family, or outside the model's sigma range (``sigma_min`` /
    ``sigma_max`` override it), raises ``ValueError``.
    """
    name = "ays"
    steps = _check_steps(steps, name)
    p = _need(name, parameterization)
    if model not in AYS_MODELS:
        raise ValueError(f"{name}: model must be one of {AYS_MODELS}, got {model!r}")
    if model == "auto":
        kind = _table_models(p)
        if kind == "continuous":
            model = "svd"
        elif kind == "discrete":
            model = "sd15"
        else:
            raise ValueError(
                f"{name}: no Align Your Steps table for {p.family!r} ({p.kind}) models; published tables "
                f"are sd15/sdxl (discrete eps/v) and svd (EDM). Use logsnr_uniform or time_uniform instead"
            )
    table = AYS_TABLES[model]
    _check_table_fits(name, table, p, _AYS_MODELS_FOR[model], f"AYS {model}", sigma_min, sigma_max)
    grid = torch.tensor(table, dtype=torch.float64) if steps + 1 == len(table) else loglinear_interp(table, steps + 1)
    return _finish(name, grid, append_zero=False)


def get_sigmas_gits(
    steps: int,
    parameterization: Parameterization,
    coeff: float = 1.20,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
) -> torch.Tensor:
    """Geometry-Inspired Time Scheduling (Chen et al., ICML 2024, arXiv 2405.11326), SD 1.5 tables.

    ``coeff`` selects the published table set (0.80 .. 1.50 in steps of 0.05; larger values
    spend more steps at high noise). Tables exist for 2 .. 20 steps; other step counts resample
    the nearest table (2 or 20 steps) log-linearly. The last point is replaced by 0. Only for
    discrete eps/v/x0 models with SD 1.5's sigma range.
    """
    name = "gits"
    steps = _check_steps(steps, name)
    p = _need(name, parameterization)
    key = round(float(coeff) * 100.0)
    if key not in GITS_SD15_TABLES or abs(float(coeff) * 100.0 - key) > 1e-6:
        raise ValueError(f"{name}: coeff must be one of {GITS_COEFFS}, got {coeff!r}")
    tables = GITS_SD15_TABLES[key]
    nearest = min(max(steps, min(tables)), max(tables))
    table = tables[nearest]
    _check_table_fits(name, table, p, "discrete", "GITS SD 1.5", sigma_min, sigma_max)
    grid = torch.tensor(table, dtype=torch.float64) if nearest == steps else loglinear_interp(table, steps + 1)
    return _finish(name, grid, append_zero=False)


# -- custom ------------------------------------------------------------------------------------

def get_sigmas_custom(
    steps: int | None,
    parameterization: Parameterization | None = None,
    sigmas: str | Sequence[float] | torch.Tensor = "",
    sigma_min: float | None = None,
    sigma_max: float | None = None,
) -> torch.Tensor:
    """A user-given sigma list (see :func:`parse_sigmas`).

    With ``steps`` None or equal to the list's step count (its number of non-zero values) the
    list is returned as given. Another ``steps`` resamples the non-zero part log-linearly to
    ``steps`` points keeping its first and last value (like the table schedules), then appends 0.
    A flow ``parameterization`` (or ``sigma_max`` / ``sigma_min``) bounds the values: sigmas
    above the model's ``sigma_max`` are an error for flow models and a warning otherwise.
    """
    name = "custom"
    values = parse_sigmas(sigmas)
    positive = values[:-1]
    if steps is None:
        steps = len(positive)
    steps = _check_steps(steps, name)
    if parameterization is not None or sigma_max is not None:
        hi = float(parameterization.sigma_max if sigma_max is None else sigma_max)
        if positive[0] > hi * (1.0 + 1e-6):
            msg = f"{name}: sigma {positive[0]!r} is above the model's sigma_max {hi!r}"
            if parameterization is not None and parameterization.kind == "flow":
                raise ValueError(msg + "; flow sigmas must be <= 1")
            logger.warning("%s; the model never saw that noise level", msg)
        elif positive[0] > hi and parameterization is not None and parameterization.kind == "flow":
            values[0] = positive[0] = hi  # a rounding error above 1 (1.0000001): the samplers need sigma <= 1
    if sigma_min is not None and positive[-1] < float(sigma_min) * (1.0 - 1e-6):
        logger.warning("%s: last non-zero sigma %r is below sigma_min %r", name, positive[-1], sigma_min)
    if steps == len(positive):
        return _finish(name, values, append_zero=False)
    logger.info("%s: resampling %d given steps to %d (log-linear)", name, len(positive), steps)
    return _finish(name, loglinear_interp(positive, steps), append_zero=True)


# -- dispatcher --------------------------------------------------------------------------------

_SCHEDULES = {
    "logsnr_uniform": get_sigmas_logsnr_uniform,
    "logsnr_window": get_sigmas_logsnr_window,
    "time_uniform": get_sigmas_time_uniform,
    "time_quadratic": get_sigmas_time_quadratic,
    "karras": get_sigmas_karras,
    "exponential": get_sigmas_exponential,
    "polyexponential": get_sigmas_polyexponential,
    "ays": get_sigmas_ays,
    "gits": get_sigmas_gits,
    "custom": get_sigmas_custom,
}


def get_sigmas(
    name: ScheduleName,
    steps: int | None,
    parameterization: Parameterization | None,
    denoise: float = 1.0,
    **params: object,
) -> torch.Tensor:
    """Build the schedule ``name`` (one of :data:`SCHEDULE_NAMES`) with ComfyUI's ``denoise``.

    ``params`` are the schedule's options (keys of :data:`SCHEDULE_DEFAULTS` ``[name]``) plus
    ``sigma_min`` / ``sigma_max``. ``denoise < 1`` builds ``int(steps / denoise)`` steps and keeps
    the last ``steps + 1`` sigmas (ComfyUI's BasicScheduler); ``denoise <= 0`` returns an empty
    tensor, which makes sampling return the input latent unchanged. ``steps`` may be None only
    for ``custom`` (the list's own step count); the list is then never resampled for ``denoise``:
    its last ``max(1, int(steps * denoise))`` steps are kept, values as given.
    """
    if name not in _SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; expected one of {SCHEDULE_NAMES}")
    allowed = set(SCHEDULE_DEFAULTS[name]) | {"sigma_min", "sigma_max"}
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise TypeError(f"schedule {name!r} got unknown option(s) {unknown}; it accepts {sorted(allowed)}")
    denoise = float(denoise)
    if math.isnan(denoise) or denoise > 1.0:
        raise ValueError(f"denoise must be in [0, 1], got {denoise!r}")
    fn = _SCHEDULES[name]
    list_steps = steps is None
    if list_steps:
        if name != "custom":
            raise ValueError(f"schedule {name!r} needs an integer steps >= 1")
        steps = len(parse_sigmas(params.get("sigmas", ""))) - 1  # type: ignore[arg-type]
    steps = _check_steps(steps, name)
    if denoise <= 0.0:
        return torch.zeros(0, dtype=torch.float32)
    if denoise >= 1.0:
        return fn(steps, parameterization, **params)
    if list_steps:
        kept = max(1, int(steps * denoise + 1e-9))
        return fn(steps, parameterization, **params)[-(kept + 1):].clone()
    total = int(steps / denoise)
    return fn(total, parameterization, **params)[-(steps + 1):].clone()
