"""NFE-first planning: from a budget of model calls to a step count and per-step orders.

NFE (number of function evaluations) counts calls of the sampler's ``model``; with
classifier-free guidance each call runs the network twice (cond + uncond), see
:func:`effective_nfe`. A multistep solver spends one call per step; a singlestep solver of
order k spends k calls per step and the DPM-Solver paper splits a budget into orders
(Lu et al. 2022, arXiv 2206.00927, Sec. 3.4, "DPM-Solver-fast"), see :func:`singlestep_orders`.
The adaptive solver picks its own steps (atol / rtol) and uses only the schedule's end points.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

SolverKind = Literal["multistep", "singlestep", "adaptive"]
SOLVER_KINDS: tuple[str, ...] = get_args(SolverKind)
FinalStep = Literal["zero", "sigma_min"]
FINAL_STEPS: tuple[str, ...] = get_args(FinalStep)

__all__ = [
    "FINAL_STEPS",
    "SOLVER_KINDS",
    "StepPlan",
    "effective_nfe",
    "singlestep_orders",
    "solver_label",
    "steps_for_nfe",
]


@dataclass(frozen=True)
class StepPlan:
    """How an NFE budget is spent.

    Attributes:
        steps: number of schedule steps to request (``len(sigmas) - 1``).
        orders: the solver order of each executed step (multistep: the order reached with the
            history available, before any lower-order-final policy of the sampler).
        nfe: model calls the plan uses (``sum(orders)`` for singlestep, steps run for multistep).
        notes: human-readable caveats (lowered order, final step handling), may be empty.
        solver: ``"multistep"``, ``"singlestep"`` or ``"adaptive"``.
        order: the requested solver order.
    """

    steps: int
    orders: tuple[int, ...]
    nfe: int
    notes: str = ""
    solver: str = "multistep"
    order: int = 2

    def summary(self, cfg: float = 1.0, label: str = "") -> str:
        """One line for a node to show, e.g. ``"8 model calls = 16 network evaluations (cfg 7.0):
        8 steps of DPM-Solver++(3M)"``; ``label`` names the method where solver and order do not
        (a corrector, SDE noise)."""
        calls = f"{self.nfe} model call{'s' if self.nfe != 1 else ''}"
        evals = effective_nfe(self.nfe, cfg)
        head = f"{calls} = {evals} network evaluations (cfg {float(cfg)})" if evals != self.nfe else calls
        label = label or solver_label(self.solver, self.order)
        if self.solver == "adaptive":
            body = f"{label}, step sizes chosen at run time"
        else:
            run = len(self.orders)
            body = f"{run} step{'s' if run != 1 else ''} of {label}"
            if self.solver == "singlestep":
                body += f", orders {'-'.join(str(k) for k in self.orders)}"
        return f"{head}: {body}" + (f" ({self.notes})" if self.notes else "")


def solver_label(solver: str, order: int) -> str:
    """Paper name of a solver: ``DPM-Solver++(2M)``, ``DPM-Solver++(3S)``, ``DPM-Solver++23``."""
    if solver == "multistep":
        return f"DPM-Solver++({order}M)" if order > 1 else "DPM-Solver++(1) (DDIM)"
    if solver == "singlestep":
        return f"DPM-Solver++({order}S)" if order > 1 else "DPM-Solver++(1) (DDIM)"
    return f"adaptive DPM-Solver++{order - 1}{order}"


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def singlestep_orders(nfe: int, order: int) -> list[int]:
    """Orders of the singlestep steps for an NFE budget (Lu et al. 2022, Sec. 3.4, DPM-Solver-fast).

    * order 3: ``K = nfe // 3 + 1`` steps; ``[3] * (K - 2) + [2, 1]`` if ``nfe % 3 == 0``,
      ``[3] * (K - 1) + [1]`` if ``nfe % 3 == 1``, ``[3] * (K - 1) + [2]`` if ``nfe % 3 == 2``;
    * order 2: ``[2] * (nfe // 2)``, plus a final ``1`` if ``nfe`` is odd;
    * order 1: ``[1] * nfe``.

    ``sum(orders) == nfe`` always; budgets below ``order + 1`` (order 3) or ``order`` reach a
    lower order only (e.g. order 3 with nfe 3 is ``[2, 1]``).
    """
    nfe = _check_int("nfe", nfe, 1)
    order = _check_int("order", order, 1)
    if order > 3:
        raise ValueError(f"singlestep order must be 1, 2 or 3, got {order}")
    if order == 1:
        return [1] * nfe
    if order == 2:
        return [2] * (nfe // 2) + ([1] if nfe % 2 else [])
    k = nfe // 3 + 1
    if nfe % 3 == 0:
        return [3] * (k - 2) + [2, 1]
    if nfe % 3 == 1:
        return [3] * (k - 1) + [1]
    return [3] * (k - 1) + [2]


def steps_for_nfe(
    solver: SolverKind, nfe: int, order: int, final_step: FinalStep = "zero", skip_start: bool = False
) -> StepPlan:
    """Plan the schedule for a budget of ``nfe`` model calls.

    * ``multistep``: one call per step, so ``nfe`` steps; the first ``order - 1`` steps warm up
      at lower order (Lu et al. 2022b, arXiv 2211.01095, Alg. 2). With ``skip_start``
      (``first_step="skip"``, :mod:`.gaussian_start`) the first step makes no call at ``sigma_max``,
      so ``nfe + 1`` steps (its first executed step is listed as order 1).
    * ``singlestep``: the steps and orders of :func:`singlestep_orders`; with ``final_step="zero"``
      the last step (to sigma = 0) is the first-order denoise, so an allocation that does not
      end in order 1 becomes ``singlestep_orders(nfe - 1, order) + [1]``, with a first-order
      step of the former moved to the start (``[1, 3, 1]`` for 3S at 5 calls).
    * ``adaptive``: one schedule step (the solver only uses its end points); the NFE it uses is
      set by atol / rtol at run time, so ``nfe`` is kept as the estimate.

    ``final_step="sigma_min"`` means the sampler stops at the last non-zero sigma and never runs
    the step to 0, so one more schedule step is requested than the solver executes.
    """
    if solver not in SOLVER_KINDS:
        raise ValueError(f"solver must be one of {SOLVER_KINDS}, got {solver!r}")
    if final_step not in FINAL_STEPS:
        raise ValueError(f"final_step must be one of {FINAL_STEPS}, got {final_step!r}")
    nfe = _check_int("nfe", nfe, 1)
    order = _check_int("order", order, 1)
    extra = 1 if final_step == "sigma_min" else 0
    notes: list[str] = []
    if solver == "adaptive":
        if order not in (2, 3):
            raise ValueError(f"adaptive order must be 2 (DPM-Solver++12) or 3 (DPM-Solver++23), got {order}")
        if nfe < order:
            raise ValueError(
                f"adaptive DPM-Solver++{order - 1}{order} needs at least {order} model calls per step, got nfe={nfe}"
            )
        notes.append("the adaptive solver picks its steps from atol/rtol; the NFE it uses is reported after sampling")
        return StepPlan(1, (), nfe, " ".join(notes), solver, order)
    max_order = 4 if solver == "multistep" else 3  # multistep order 4: exponential Adams-Bashforth
    if order > max_order:
        allowed = "1, 2, 3 or 4" if max_order == 4 else "1, 2 or 3"
        raise ValueError(f"{solver} order must be {allowed}, got {order}")
    if skip_start and (solver != "multistep" or nfe < 2):
        raise ValueError(
            f"skip_start (first_step='skip') is a start of the multistep solver and needs at least 2 model "
            f"calls; got solver={solver!r}, nfe={nfe}"
        )
    if solver == "multistep":
        orders = tuple(min(order, i + 1) for i in range(nfe))
        if skip_start:
            orders = (1, *orders)
            notes.append("no model call at sigma_max (first_step skip): one step more than calls")
        if nfe < order:
            reach = f"{nfe} steps reach" if nfe != 1 else "1 step reaches"
            notes.append(f"{reach} only order {max(orders)} (order {order} needs {order} steps of history)")
    else:
        orders = tuple(singlestep_orders(nfe, order))
        if final_step == "zero" and orders[-1] != 1:
            # the step to sigma = 0 returns the data prediction: one call, first order. A first-
            # order step left over in the rest goes first, where the data prediction is close to
            # the data mean and a first-order step nearly exact (3S at 5 calls: [1, 3, 1], not
            # [3, 1, 1]: about half the error on held-out Gaussian mixtures)
            body = singlestep_orders(nfe - 1, order)
            if len(body) > 1 and body[-1] == 1:
                body = [1] + body[:-1]
            orders = tuple(body) + (1,)
        if max(orders) < order:
            notes.append(f"{nfe} model calls reach only order {max(orders)}; order {order} needs nfe >= {order + 1 if order == 3 else order}")
    if extra:
        notes.append("final_step=sigma_min: the last schedule step (to 0) is not run")
    return StepPlan(len(orders) + extra, orders, nfe, "; ".join(notes), solver, order)


def effective_nfe(nfe: int, cfg: float = 1.0) -> int:
    """Network evaluations for ``nfe`` model calls: doubled under classifier-free guidance.

    ComfyUI skips the unconditional pass when ``cfg == 1`` (its ``cfg1_optimization``), so the
    count is ``nfe`` there and ``2 * nfe`` otherwise.
    """
    nfe = _check_int("nfe", nfe, 0)
    cfg = float(cfg)
    if not math.isfinite(cfg):
        raise ValueError(f"cfg must be finite, got {cfg!r}")
    return nfe if math.isclose(cfg, 1.0) else 2 * nfe
