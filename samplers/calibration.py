"""Per-model calibrated step schedules: teacher trajectories, grid DP, local search with the true solver.

A schedule (the sigmas a solver steps through) can be fitted to one model and one solver at one
NFE from a handful of accurate trajectories of that model, in three stages:

1. **Teacher.** From the calibration noise ``x`` (a few seeds, batched), integrate the
   probability-flow ODE accurately with multistep DPM-Solver++(3M) on a fine grid: ``G`` points
   uniform in the half log-SNR ``lambda`` from ``sigma_max`` to ``sigma_min`` (a flow model's
   ``sigma = 1`` is the first point, the uniform part starting at :data:`FLOW_TEACHER_LAMBDA_MIN`),
   each interval split into ``substeps`` solver steps. The states ``x_i`` and data predictions
   ``D_i`` at the ``G`` grid points are kept. The teacher's end point is the ODE's solution at
   ``sigma = 0``, extrapolated from ``D`` at ``sigma_min`` and two larger grid points
   (:func:`ode_limit`), or, with ``end="sigma_min"``, ``D`` at ``sigma_min`` itself (what a
   sampler that stops calling the model there returns). Cost: ``(G - 1) * substeps + 1`` model
   calls on the batch.
2. **Dynamic programming** over the grid (GITS, Chen et al. 2024, arXiv 2405.11326): the coarse
   points minimising the summed local error of the solver's steps measured from teacher states,
   no model calls (see :mod:`._calibration_dp` for the step models and the error weighting).
3. **Local search.** The DP schedule and a few fixed schedules (``logsnr_uniform``,
   ``time_uniform``, ``karras``, ``exponential``) are run with the true solver on the calibration
   noise; from each of the :data:`SEARCH_STARTS` best, coordinate descent on the interior
   ``lambda`` values (step halving, with a relocation of the most crowded step when a sweep finds
   nothing) minimises the true end-point error against the teacher, within an equal share of a
   budget of model calls; the best result is kept.
4. **Fitted coefficients** (solver ``"fitted"``, :mod:`.fitted`): every run of the search fits
   the solver's per-step coefficients to the teacher's trajectory (weighted least squares, no
   extra model calls), so schedule and coefficients are calibrated together, and the result
   carries the coefficients. With the option ``first_step="mean"`` the first step uses the
   teacher's mean prediction at ``sigma_max`` instead of a model call (``nfe`` calls run
   ``nfe + 1`` steps), and the result carries that prediction too.
5. **End-to-end refinement** (optional, ``refine_iterations``; :mod:`.fitted_refine`):
   Levenberg-Marquardt on the fitted weights and interior steps together, with Jacobians from
   forward differences of the sampler's own runs (no gradients of the model), for at least
   :data:`MIN_REFINE_SEEDS` calibration seeds.

By construction the result's calibration error is never above that of the fixed schedules tried.
The AYS paper (Sabour et al. 2024, arXiv 2404.14507) optimises a KL bound instead and reports
GPU-hours; this procedure costs a few hundred model calls (see :class:`CalibrationResult`.cost).
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch

from ._calibration_dp import GridCosts, dp_multistep, dp_singlestep
from ._coefficients import step_orders
from ._loop import Denoiser, NonFiniteModelOutputError
from .budget import steps_for_nfe
from .fitted import HISTORY, fit_fitted_multistep, sample_fitted_multistep
from .fitted_refine import FD_STEP, jacobian_calls, refine_fitted
from .multistep import sample_dpmpp_multistep
from .parameterization import Parameterization
from .schedules import get_sigmas
from .singlestep import sample_dpmpp_singlestep

logger = logging.getLogger(__name__)

SolverKind = Literal["multistep", "singlestep", "fitted"]
SOLVER_KINDS: tuple[str, ...] = get_args(SolverKind)
#: how a fitted solver's first step gets its data prediction: a model call, or the teacher's mean
#: prediction at sigma_max (no call; :mod:`.fitted`, "Mean first step")
FirstStep = Literal["model", "mean"]
FIRST_STEPS: tuple[str, ...] = get_args(FirstStep)

#: half log-SNR where a flow model's teacher grid starts after the point sigma = 1 (sigma ~0.9975)
FLOW_TEACHER_LAMBDA_MIN = -6.0
#: fixed schedules tried as starting points of the local search (and reported)
BASELINE_SCHEDULES: tuple[str, ...] = ("logsnr_uniform", "time_uniform", "karras", "exponential")
MIN_GRID_POINTS = 16
#: relocation trials of the local search after a sweep without improvement
RELOCATIONS = 1
DEFAULTS: dict[str, int] = {"grid_points": 100, "substeps": 3, "search_nfe": 640}
#: How many of the best starting schedules the local search refines, each with an equal share of
#: ``search_nfe``. The search is local and its result depends on the start: on the benchmark's
#: four mixtures (``dpmpp_2m_fitted``, NFE 4-10), two starts with 320 calls each gave a lower
#: calibration error than one start with 320 in 9 of 20 cells (never a higher one), and 32 % fewer
#: mode flips on the held-out trajectories over all cells.
SEARCH_STARTS: int = 2
#: Fewest calibration seeds for the end-to-end refinement. It fits every weight and step of the
#: run (about 6 per step) to the seeds' end points. With 32 seeds it lowered the held-out median
#: error in 18 of 20 cells of the benchmark's mixtures and tiny teacher at 4-8 calls (two equal),
#: and the calibration error stayed close to the held-out one (tiny teacher, 8 calls: 0.0063 and
#: 0.0070). With 16 it still lowered the held-out medians measured, but the two parted (0.0044
#: and 0.0071). An earlier gradient-descent version overfit 32 seeds.
MIN_REFINE_SEEDS = 32
TeacherEnd = Literal["ode", "sigma_min"]
TEACHER_ENDS: tuple[str, ...] = get_args(TeacherEnd)
#: the extrapolation of :func:`ode_limit` uses D at about sigma_min times these factors
ODE_LIMIT_FACTORS: tuple[float, ...] = (1.0, math.sqrt(2.0), 2.0)

__all__ = [
    "BASELINE_SCHEDULES",
    "DEFAULTS",
    "FLOW_TEACHER_LAMBDA_MIN",
    "MIN_REFINE_SEEDS",
    "SOLVER_KINDS",
    "TEACHER_ENDS",
    "CalibrationError",
    "CalibrationResult",
    "SolverSpec",
    "Teacher",
    "calibrate",
    "end_error",
    "expected_calls",
    "ode_limit",
    "run_teacher",
    "teacher_grid",
]


class CalibrationError(ValueError):
    """Calibration could not produce a schedule (bad settings, or a model returning NaN/inf)."""


@dataclass(frozen=True)
class SolverSpec:
    """The solver a schedule is calibrated for: a family and its options.

    Args:
        solver: ``"multistep"`` (:func:`.multistep.sample_dpmpp_multistep`, one call per step),
            ``"singlestep"`` (:func:`.singlestep.sample_dpmpp_singlestep`, orders from the budget) or
            ``"fitted"`` (:func:`.fitted.sample_fitted_multistep`: 2M plus per-step coefficients
            fitted together with the schedule; options ``history`` and ``first_step``: ``"mean"``
            replaces the first model call by the teacher's mean prediction at ``sigma_max``, so
            ``nfe`` calls run ``nfe + 1`` steps).
        options: keyword options of that sampler (``order``, ``corrector``, ``solver_type``,
            ``lower_order_final``, ...). Stochastic sampling (``eta > 0``) cannot be calibrated
            against an ODE teacher and is refused.
        label: a display name (e.g. the node preset name).
    """

    solver: SolverKind = "multistep"
    options: Mapping[str, Any] = field(default_factory=dict)
    label: str = ""

    def __post_init__(self) -> None:
        if self.solver not in SOLVER_KINDS:
            raise CalibrationError(f"solver must be one of {SOLVER_KINDS}, got {self.solver!r}")
        if float(self.options.get("eta", 0.0)) != 0.0:
            raise CalibrationError(
                f"eta={self.options['eta']!r}: a stochastic (SDE) solver has no single trajectory to match; "
                "calibrate the deterministic solver (eta=0) instead"
            )
        if self.order not in (1, 2, 3):
            raise CalibrationError(f"order must be 1, 2 or 3, got {self.order!r}")
        if self.first_step not in FIRST_STEPS:
            raise CalibrationError(f"first_step must be one of {FIRST_STEPS}, got {self.first_step!r}")
        if self.first_step == "mean" and self.solver != "fitted":
            raise CalibrationError("first_step='mean' needs the fitted solver, whose coefficients absorb the "
                                   f"mean prediction; got solver {self.solver!r}")

    @property
    def first_step(self) -> str:
        return str(self.options.get("first_step", "model"))

    @property
    def order(self) -> int:
        return int(self.options.get("order", 2))

    def step_orders(self, nfe: int) -> list[int]:
        """Order of each step of a schedule ending in 0 that costs ``nfe`` model calls."""
        if self.solver == "fitted":  # the 2M base, no lower-order final step; the last step returns D
            return step_orders(nfe + (self.first_step == "mean"), 2, 0, lower_order_final=False)
        if self.solver == "multistep":
            o = self.options
            return step_orders(nfe, self.order, 0, lower_order_final=bool(o.get("lower_order_final", True)),
                               lower_order_final_steps=int(o.get("lower_order_final_steps", 10)),
                               euler_at_final=bool(o.get("euler_at_final", False)))
        return list(steps_for_nfe("singlestep", nfe, self.order).orders)

    def run(self, model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, parameterization: Parameterization,
            extra_args: dict[str, Any] | None = None, nfe: int | None = None,
            coefficients: Sequence[Sequence[float]] | None = None,
            first_prediction: torch.Tensor | None = None) -> torch.Tensor:
        """One deterministic run over ``sigmas``; a singlestep run needs the budget ``nfe`` for its
        orders, a fitted one its ``coefficients`` (and with ``first_step="mean"`` its
        ``first_prediction``)."""
        if self.solver == "fitted":
            if coefficients is None:
                raise CalibrationError("a fitted solver runs with the coefficients of its calibration")
            if (first_prediction is None) != (self.first_step == "model"):
                raise CalibrationError("a fitted solver with first_step='mean' runs with the "
                                       "first_prediction of its calibration, and only then")
            return sample_fitted_multistep(model, x, sigmas, extra_args, disable=True, coefficients=coefficients,
                                           history=self.history, parameterization=parameterization,
                                           first_prediction=first_prediction)
        if self.solver == "multistep":
            return sample_dpmpp_multistep(model, x, sigmas, extra_args, disable=True, parameterization=parameterization,
                                          resume_history=False, **self.options)
        if nfe is None:
            raise CalibrationError("a singlestep run needs nfe to allocate its step orders")
        return sample_dpmpp_singlestep(model, x, sigmas, extra_args, disable=True, parameterization=parameterization,
                                       **{**self.options, "orders": self.step_orders(nfe)})

    @property
    def history(self) -> int:
        return int(self.options.get("history", HISTORY))

    def to_dict(self) -> dict[str, Any]:
        return {"solver": self.solver, "options": dict(self.options), "label": self.label}


@dataclass
class Teacher:
    """An accurate trajectory per calibration sample, cached on a grid (see the module docstring)."""

    sigmas: list[float]
    xs: torch.Tensor  # [G, B, ...]
    ds: torch.Tensor  # [G, B, ...]
    end: torch.Tensor  # [B, ...]
    nfe: int
    seconds: float
    end_rule: str = "sigma_min"

    def state_at(self, sigma: float, parameterization: Parameterization) -> torch.Tensor:
        """The teacher's state at ``sigma`` (float64), its end point at 0; no model calls.

        Between grid points: one DPM-Solver++(2M) step (arXiv 2211.01095, Alg. 2) from the grid point
        ``g_i >= sigma`` with the cached ``D_i`` and ``D_(i-1)``; its error is third order in the
        grid spacing (a fraction of the teacher's own spacing in lambda).
        """
        if sigma == 0.0:
            return self.end.to(torch.float64)
        p, g = parameterization, self.sigmas
        i = max((k for k in range(len(g)) if g[k] >= sigma * (1.0 - 1e-12)), default=0)
        x_i, d_i = self.xs[i].to(torch.float64), self.ds[i].to(torch.float64)
        if abs(g[i] - sigma) <= 1e-12 * sigma:
            return x_i
        lam_i = p.lambda_(g[i])
        h = p.lambda_(sigma) - lam_i
        c = p.alpha(sigma) * -math.expm1(-h)
        x = (p.sigma_t(sigma) / p.sigma_t(g[i])) * x_i + c * d_i
        if i > 0 and math.isfinite(p.lambda_(g[i - 1])):
            r = (lam_i - p.lambda_(g[i - 1])) / h
            x = x + (c / (2.0 * r)) * (d_i - self.ds[i - 1].to(torch.float64))
        return x


@dataclass
class CalibrationResult:
    """A calibrated schedule and what it cost.

    Attributes:
        sigmas: the schedule, descending, ending in 0 (``len = steps + 1``).
        nfe: model calls one sampling run with it costs.
        orders: the order of each step (singlestep: pass as the sampler's ``orders``).
        solver: :meth:`SolverSpec.to_dict` of the solver it was fitted for.
        error: geometric mean of the per-sample RMS end-point error against the teacher on the
            calibration noise (:func:`end_error`).
        dp_error: the same for the schedule found by the grid DP alone.
        baselines: the same for each fixed schedule tried (name -> error).
        cost: ``teacher_nfe``, ``search_nfe``, ``total_nfe`` (model calls on the calibration batch),
            ``samples``, ``grid_points``, ``substeps``, ``seconds``.
        coefficients: for a ``"fitted"`` solver, its per-step weights on ``sigmas``; else None.
        first_prediction: with ``first_step="mean"``, the first step's data prediction
            (``[1, ...]``, float32 values); else None.
    """

    sigmas: list[float]
    nfe: int
    orders: list[int]
    solver: dict[str, Any]
    error: float
    dp_error: float
    baselines: dict[str, float]
    cost: dict[str, float]
    coefficients: list[list[float]] | None = None
    first_prediction: torch.Tensor | None = None

    def sigmas_tensor(self) -> torch.Tensor:
        return torch.tensor(self.sigmas, dtype=torch.float32)


class _Counter:
    def __init__(self, model: Denoiser) -> None:
        self.model, self.nfe = model, 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **kw: Any) -> torch.Tensor:
        self.nfe += 1
        return self.model(x, sigma, **kw)


def end_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    """Geometric mean over samples of the per-sample RMS difference (float64); inf when not finite.

    The geometric mean weighs every sample's relative accuracy alike: a sample that lands in a
    different mode (a large error, common at 4-6 NFE) cannot dominate the objective as it would
    an arithmetic mean over a few calibration seeds.
    """
    diff = (out.to(torch.float64) - reference.to(torch.float64)).reshape(out.shape[0], -1)
    value = float(diff.pow(2).mean(1).sqrt().clamp_min(1e-12).log().mean().exp())
    return value if math.isfinite(value) else math.inf


def teacher_grid(parameterization: Parameterization, points: int, sigma_min: float | None = None,
                 sigma_max: float | None = None) -> list[float]:
    """``points`` sigmas from ``sigma_max`` to ``sigma_min``, uniform in lambda (flow: see module doc)."""
    p = parameterization
    hi = p.sigma_max if sigma_max is None else float(sigma_max)
    lo = p.sigma_min if sigma_min is None else float(sigma_min)
    if not 0.0 < lo < hi:
        raise CalibrationError(f"need 0 < sigma_min < sigma_max, got {lo!r}, {hi!r}")
    lam_hi, lam_lo = p.lambda_(lo), p.lambda_(hi)
    if math.isfinite(lam_lo):
        lambdas = torch.linspace(lam_lo, lam_hi, points, dtype=torch.float64)
        grid = [hi] + [p.sigma_from_lambda(float(v)) for v in lambdas[1:]]
    else:
        lambdas = torch.linspace(min(FLOW_TEACHER_LAMBDA_MIN, lam_hi - 1.0), lam_hi, points - 1, dtype=torch.float64)
        grid = [hi] + [p.sigma_from_lambda(float(v)) for v in lambdas]
    grid[-1] = lo
    return grid


def _fine_grid(grid: list[float], p: Parameterization, substeps: int) -> list[float]:
    fine: list[float] = []
    for a, b in itertools.pairwise(grid):
        la, lb = p.lambda_(a), p.lambda_(b)
        for k in range(substeps):
            if k == 0:
                fine.append(a)
            elif math.isfinite(la):
                fine.append(p.sigma_from_lambda(la + (lb - la) * k / substeps))
            else:  # from flow's sigma = 1: split linearly in sigma
                fine.append(a + (b - a) * k / substeps)
    return fine + [grid[-1], 0.0]


def ode_limit(sigmas: Sequence[float], ds: torch.Tensor, parameterization: Parameterization,
              factors: Sequence[float] = ODE_LIMIT_FACTORS) -> torch.Tensor:
    """The ODE's solution at ``sigma = 0`` from the data predictions along an accurate trajectory.

    In VE coordinates (``sigma = e^-lambda``) a smooth trajectory is ``x(sigma) = x_0 + a sigma +
    b sigma^2 + c sigma^3 + O(sigma^4)``, and the probability-flow ODE ``dx/dsigma = (x - D) / sigma``
    (Karras et al. 2022, eq. 4) gives ``D(x(sigma), sigma) = x - sigma dx/dsigma = x_0 - b sigma^2 -
    2 c sigma^3 + O(sigma^4)``: no linear term, and the data prediction at the last model call is
    off by about ``b sigma_min^2``, which every sampler ending at a discrete model's ``sigma_min``
    (0.029 on SD1.5) keeps. This fits ``D = x_0 + beta sigma^2 + gamma sigma^3`` through ``D`` at
    the grid points nearest to ``sigma_min * factors`` and returns ``x_0``: the error is
    ``O(sigma_min^4)``, and with ``sigma`` spread over a factor of 2 the weights stay small (about
    3.09, -2.64, 0.55), so the model's own noise is not amplified.
    """
    p = parameterization
    lam = [p.lambda_(s) for s in sigmas]
    idx: list[int] = []
    for f in factors:  # the nearest grid point not taken yet (distinct even on a coarse grid)
        target = lam[-1] - math.log(f)
        free = [k for k in range(len(lam)) if k not in idx and math.isfinite(lam[k])]
        if not free:
            raise ValueError(f"ode_limit needs {len(factors)} grid points with finite lambda, got {len(idx)}")
        idx.append(min(free, key=lambda k: abs(lam[k] - target)))
    sig = [math.exp(-lam[i]) for i in idx]  # VE sigma
    basis = torch.tensor([[1.0, v**2, v**3] for v in sig], dtype=torch.float64)
    weights = torch.linalg.inv(basis)[0].tolist()  # the x_0 row of the interpolation
    out = torch.zeros_like(ds[-1], dtype=torch.float64)
    for w, i in zip(weights, idx):
        out = out + w * ds[i].to(torch.float64)
    return out


def run_teacher(model: Denoiser, x: torch.Tensor, parameterization: Parameterization, grid_points: int = 100,
                substeps: int = 3, extra_args: dict[str, Any] | None = None,
                sigma_min: float | None = None, end: TeacherEnd = "ode") -> Teacher:
    """Integrate from ``x`` at ``sigma_max`` with DPM-Solver++(3M) on the refined grid; cache the grid points.

    ``end``: ``"ode"`` (the solution at sigma = 0, :func:`ode_limit`) or ``"sigma_min"`` (the data
    prediction at the last grid point) is the target every calibrated schedule is fitted to.
    """
    if end not in TEACHER_ENDS:
        raise CalibrationError(f"teacher end must be one of {TEACHER_ENDS}, got {end!r}")
    t0 = time.perf_counter()
    grid = teacher_grid(parameterization, grid_points, sigma_min)
    fine = _fine_grid(grid, parameterization, substeps)
    keep = {k * substeps: k for k in range(len(grid))}
    xs: list[torch.Tensor | None] = [None] * len(grid)
    ds: list[torch.Tensor | None] = [None] * len(grid)

    def record(info: dict[str, Any]) -> None:
        k = keep.get(info["i"])
        if k is not None:
            xs[k], ds[k] = info["x"].clone(), info["denoised"].clone()

    counter = _Counter(model)
    try:
        last = sample_dpmpp_multistep(counter, x, torch.tensor(fine, dtype=torch.float64), extra_args, record, True,
                                      parameterization=parameterization, order=3, resume_history=False)
    except NonFiniteModelOutputError as exc:
        raise CalibrationError(f"teacher run failed, nothing was calibrated: {exc}") from exc
    if any(v is None for v in xs) or not bool(torch.isfinite(last).all()):
        raise CalibrationError("teacher run produced no finite trajectory; nothing was calibrated")
    xs_all, ds_all = torch.stack(xs), torch.stack(ds)  # type: ignore[arg-type]
    target = ode_limit(grid, ds_all, parameterization).to(last.dtype) if end == "ode" else last
    return Teacher(grid, xs_all, ds_all, target, counter.nfe, time.perf_counter() - t0, end)


def _schedule(points: Sequence[float]) -> torch.Tensor:
    return torch.tensor([*points, 0.0], dtype=torch.float64)


def calibrate(
    model: Denoiser,
    x: torch.Tensor,
    parameterization: Parameterization,
    nfe: int,
    solver: SolverSpec | None = None,
    *,
    extra_args: dict[str, Any] | None = None,
    grid_points: int = DEFAULTS["grid_points"],
    substeps: int = DEFAULTS["substeps"],
    search_nfe: int = DEFAULTS["search_nfe"],
    baselines: Sequence[str] = BASELINE_SCHEDULES,
    teacher: Teacher | None = None,
    teacher_end: TeacherEnd = "ode",
    refine_iterations: int = 0,
    refine_fd_step: float = FD_STEP,
) -> CalibrationResult:
    """Calibrate a schedule for ``solver`` at ``nfe`` model calls on ``model`` (see the module docstring).

    Args:
        model: the denoiser (k-diffusion contract), evaluated on the whole batch ``x`` per call.
        x: calibration noise at ``parameterization.sigma_max`` (one sample per seed), ``[B, ...]``.
        parameterization: the model's coordinates and sigma range (the schedule's end points).
        nfe: model calls of one sampling run with the schedule (>= 2).
        solver: the solver (default DPM-Solver++(2M)).
        grid_points, substeps: teacher grid size and solver steps per grid interval.
        search_nfe: budget of model calls for the local search, shared equally by its
            :data:`SEARCH_STARTS` starts (0: DP and fixed schedules only).
        baselines: fixed schedules tried as starting points.
        teacher: a precomputed :class:`Teacher` for the same ``x`` (its cost is not counted again).
        teacher_end: the target at sigma = 0 (:func:`run_teacher`'s ``end``); a given ``teacher``
            must have been run with it.
        refine_iterations: for the fitted solver, Gauss-Newton iterations of the end-to-end
            refinement of its coefficients and steps after the search
            (:func:`.fitted_refine.refine_fitted`; each costs about one run per parameter, fewer
            calls for the later steps' parameters; ``x`` must hold at least
            :data:`MIN_REFINE_SEEDS` seeds). 0: none.
        refine_fd_step: its forward-difference step (:func:`.fitted_refine.fd_step_for` the
            dtype the model computes in).

    Raises:
        CalibrationError: unusable settings, or the model returned NaN/inf in the teacher run.
    """
    t0 = time.perf_counter()
    spec = solver or SolverSpec("multistep", {"order": 2})
    p = parameterization
    if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 2:
        raise CalibrationError(f"nfe must be an integer >= 2 (a 1-call schedule [sigma_max, 0] has nothing to "
                               f"calibrate), got {nfe!r}")
    orders = spec.step_orders(nfe)
    n_points = len(orders)  # non-zero sigmas of the schedule
    need = max(MIN_GRID_POINTS, 3 * n_points)
    if not isinstance(grid_points, int) or grid_points < need or not isinstance(substeps, int) or substeps < 1:
        raise CalibrationError(
            f"too few calibration evaluations: grid_points={grid_points!r}, substeps={substeps!r}; a schedule "
            f"with {n_points} steps needs grid_points >= {need} and substeps >= 1 (teacher cost = "
            "(grid_points - 1) * substeps + 1 model calls). Raise grid_points or lower nfe."
        )
    if search_nfe < 0:
        raise CalibrationError(f"search_nfe must be >= 0, got {search_nfe!r}")
    if refine_iterations < 0 or (refine_iterations and spec.solver != "fitted"):
        raise CalibrationError(f"refine_iterations={refine_iterations!r}: the end-to-end refinement takes "
                               "a number >= 0 of iterations and refines the fitted solver only")
    if refine_iterations and x.shape[0] < MIN_REFINE_SEEDS:
        raise CalibrationError(f"the end-to-end refinement needs at least {MIN_REFINE_SEEDS} calibration seeds "
                               f"(it overfits fewer), got {x.shape[0]}; add seeds or set refine_iterations=0")
    if teacher is None:
        teacher = run_teacher(model, x, p, grid_points, substeps, extra_args, end=teacher_end)
        teacher_nfe = teacher.nfe
    else:
        if teacher.end_rule != teacher_end:
            raise CalibrationError(f"the given teacher ends at {teacher.end_rule!r}, not {teacher_end!r}")
        teacher_nfe = 0
    grid = teacher.sigmas
    costs = GridCosts(grid, teacher.xs, teacher.ds, teacher.end, p)
    solver_type = str(spec.options.get("solver_type", "midpoint"))
    if spec.solver in ("multistep", "fitted"):
        path, _ = dp_multistep(costs, orders, solver_type)
    else:
        path, _ = dp_singlestep(costs, orders, solver_type)

    counter = _Counter(model)
    # the mean first step: the teacher's mean prediction at sigma_max (grid[0]), as float32 values
    # so that a stored copy reproduces the fit exactly
    first_prediction = (teacher.ds[0].mean(0, keepdim=True).to(torch.float32).to(torch.float64)
                        if spec.first_step == "mean" else None)

    def fit(points: Sequence[float]) -> tuple[torch.Tensor, list[list[float]]]:
        return fit_fitted_multistep(counter, x, [*points, 0.0], lambda n, s: teacher.state_at(s, p), p,
                                    history=spec.history, extra_args=extra_args,
                                    first_prediction=first_prediction)

    def objective(points: Sequence[float]) -> float:
        try:
            out = fit(points)[0] if spec.solver == "fitted" else spec.run(counter, x, _schedule(points), p, extra_args, nfe)
        except NonFiniteModelOutputError:
            return math.inf
        return end_error(out, teacher.end)

    box = _Box(grid, p)
    dp_points = [grid[i] for i in path]
    dp_error = objective(dp_points)
    candidates: list[tuple[float, str, list[float]]] = [(dp_error, "dp", dp_points)]
    baseline_errors: dict[str, float] = {}
    for name in baselines:
        try:
            sig = get_sigmas(name, n_points, p)
        except (TypeError, ValueError):
            continue  # not defined for this model family
        pts = box.clamp([float(s) for s in sig[:-1].to(torch.float64)])
        if pts is None or len(pts) != n_points:
            continue
        baseline_errors[name] = objective(pts)
        candidates.append((baseline_errors[name], name, pts))
    ranked = sorted((c for c in candidates if math.isfinite(c[0])), key=lambda c: c[0])
    if not ranked:
        raise CalibrationError("every candidate schedule gave a non-finite result; nothing was calibrated")
    start_error, start_name, _ = ranked[0]
    step0 = (costs.lambdas[-1] - costs.lambdas[1]).item() / max(grid_points - 2, 1)
    # the search's solver runs, shared by the best starts (fewer starts when there are fewer runs)
    runs = search_nfe // nfe
    starts = ranked[: max(1, min(SEARCH_STARTS, runs))]
    best_error, best_points = math.inf, list(ranked[0][2])
    for k, (error, _, points) in enumerate(starts):
        share = runs // len(starts) + (k < runs % len(starts))
        found, value = _refine(objective, box, points, error, 4.0 * step0, step0 / 32.0, share)
        if value < best_error:
            best_error, best_points = value, found
    coefficients = fit(best_points)[1] if spec.solver == "fitted" else None
    refine_counter = _Counter(model)
    sigmas = [*best_points, 0.0]
    if refine_iterations and coefficients is not None and len(sigmas) > 2:
        sigmas, coefficients, best_error = _refine_end_to_end(
            refine_counter, spec, x, p, sigmas, coefficients, best_error, teacher, box,
            first_prediction, refine_iterations, refine_fd_step, extra_args)
    logger.info("calibrated %s at NFE %d: error %.4g (dp %.4g, start %s %.4g)", spec.label or spec.solver,
                nfe, best_error, dp_error, start_name, start_error)
    cost = {"teacher_nfe": teacher_nfe, "search_nfe": counter.nfe, "refine_nfe": refine_counter.nfe,
            "total_nfe": teacher_nfe + counter.nfe + refine_counter.nfe,
            "samples": int(x.shape[0]), "grid_points": len(grid), "substeps": substeps,
            "seconds": round(time.perf_counter() - t0, 3)}  # the teacher run included when it ran here
    first = None if first_prediction is None else first_prediction.to(torch.float32)
    return CalibrationResult(sigmas, nfe, orders, spec.to_dict(), best_error, dp_error, baseline_errors, cost,
                             coefficients, first)


def expected_calls(spec: SolverSpec, nfe: int, grid_points: int = DEFAULTS["grid_points"],
                   substeps: int = DEFAULTS["substeps"], search_nfe: int = DEFAULTS["search_nfe"],
                   refine_iterations: int = 0, baselines: int = len(BASELINE_SCHEDULES)) -> int:
    """Model calls :func:`calibrate` makes with these settings when its search uses its whole budget
    and each refinement iteration keeps its first step (a progress bar's total; the search may
    stop earlier, the refinement earlier or with more tried steps).

    Teacher ``(G - 1) substeps + 1``; scoring the DP schedule and the ``baselines``, the search's
    ``search_nfe // nfe`` runs and (fitted) the final fit, ``nfe`` calls each; per refinement
    iteration its Jacobian (:func:`.fitted_refine.jacobian_calls`) and one tried step.
    """
    runs = 1 + baselines + search_nfe // nfe + (spec.solver == "fitted")
    total = (grid_points - 1) * substeps + 1 + runs * nfe
    if refine_iterations:
        total += refine_iterations * (jacobian_calls(len(spec.step_orders(nfe)), spec.history) + nfe)
    return total


def _refine_end_to_end(counter: _Counter, spec: SolverSpec, x: torch.Tensor, p: Parameterization,
                       sigmas: list[float], coefficients: list[list[float]], error: float, teacher: Teacher,
                       box: _Box, first_prediction: torch.Tensor | None, iterations: int, fd_step: float,
                       extra_args: dict[str, Any] | None) -> tuple[list[float], list[list[float]], float]:
    """:func:`.fitted_refine.refine_fitted` from the search's result, kept when its error (of a run
    equal to the sampler's, to rounding) is lower."""
    new_sigmas, new_coefficients, new_error = refine_fitted(
        counter, x, sigmas, coefficients, teacher.end, p, floor=box.floor, top=box.top, history=spec.history,
        first_prediction=first_prediction, iterations=iterations, fd_step=fd_step, extra_args=extra_args)
    logger.info("end-to-end refinement: calibration error %.4g -> %.4g", error, new_error)
    if new_error < error:
        return new_sigmas, new_coefficients, new_error
    return sigmas, coefficients, error


class _Box:
    """The search domain: interior half log-SNRs between the grid's ends, increasing with a minimum gap."""

    gap = 1e-3

    def __init__(self, grid: Sequence[float], p: Parameterization) -> None:
        self.p, self.first = p, grid[0]
        self.top = p.lambda_(grid[-1])
        lam0 = p.lambda_(grid[0])
        self.floor = lam0 if math.isfinite(lam0) else p.lambda_(grid[1]) - 2.0

    def lambdas(self, points: Sequence[float]) -> list[float]:
        return [self.p.lambda_(s) for s in points[1:]]

    def points(self, lams: Sequence[float]) -> list[float]:
        return [self.first] + [self.p.sigma_from_lambda(v) for v in lams]

    def feasible(self, lams: Sequence[float]) -> bool:
        seq = [self.floor, *lams]
        return all(b - a >= self.gap for a, b in itertools.pairwise(seq)) and (not lams or lams[-1] <= self.top + 1e-12)

    def clamp(self, points: Sequence[float]) -> list[float] | None:
        """``points`` with the first set to sigma_max and the rest inside the box; None if impossible."""
        lams = [min(max(v, self.floor + self.gap), self.top) for v in self.lambdas(points)]
        return self.points(lams) if self.feasible(lams) else None


def _refine(objective: Callable[[Sequence[float]], float], box: _Box, start: Sequence[float], start_error: float,
            delta: float, min_delta: float, max_runs: int) -> tuple[list[float], float]:
    """Coordinate descent on the interior half log-SNRs (first point fixed at sigma_max), step halving.

    Each trial moves one point by ``+-delta`` in lambda and is kept when the true end error drops.
    After a sweep without improvement one relocation is tried (:func:`_relocations`), then
    ``delta`` halves. At most ``max_runs`` solver runs.
    """
    lams, best = box.lambdas(start), start_error
    runs = 0

    def first_better(trials: Sequence[list[float]]) -> bool:
        nonlocal lams, best, runs
        for trial in trials:
            if runs >= max_runs:
                return False
            value = objective(box.points(trial))
            runs += 1
            if value < best:
                best, lams = value, trial
                return True
        return False

    while runs < max_runs and delta >= min_delta and lams:
        improved = False
        for k in range(len(lams)):
            moves = []
            for sign in (1.0, -1.0):
                trial = list(lams)
                trial[k] = min(trial[k] + sign * delta, box.top)
                if trial[k] != lams[k] and box.feasible(trial):
                    moves.append(trial)
            improved = first_better(moves) or improved
        if not improved:
            improved = first_better(_relocations(lams, box)[:RELOCATIONS])
        if not improved:
            delta /= 2.0
    return box.points(lams) if lams else list(start), best


def _relocations(lams: Sequence[float], box: _Box) -> list[list[float]]:
    """Moves that single-point steps cannot make: the later point of the narrowest gap in lambda
    moved to the middle of another gap, widest first, so a step crowded next to its neighbour
    (a wasted model call) is not stuck there."""
    seq = [box.floor, *lams]
    k = min(range(len(lams)), key=lambda i: seq[i + 1] - seq[i])
    rest = [v for i, v in enumerate(lams) if i != k]
    gaps = sorted(itertools.pairwise([box.floor, *rest]), key=lambda ab: ab[1] - ab[0], reverse=True)
    trials = [sorted([*rest, 0.5 * (a + b)]) for a, b in gaps]
    return [t for t in trials if box.feasible(t) and t != list(lams)]
