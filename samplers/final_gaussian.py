"""Last-step weights fitted to Gaussian data of every scale (the ``gaussian`` rule of the step to 0).

The step from the last model call at ``sigma_s`` to ``sigma = 0`` integrates the noise prediction
(:mod:`.final_adams`): ``x_bar(0) = x_bar_s - integral_0^sigma_s eps d sigma_bar ~ x_bar_s -
sum_j w_j eps_j`` over the last ``k`` calls, VE sigmas ``sigma_bar_j = sigma_s u_j`` (``u_0 = 1``,
the others larger). The Adams-Bashforth weights make this exact when ``eps`` is a polynomial in
``sigma_bar``. Here they are chosen for the curve ``eps`` actually follows near the data.

For Gaussian data, along every eigen-direction of the covariance, with variance ``c``, the exact
trajectory has ``eps(sigma_bar) = z sigma_bar / sqrt(c + sigma_bar^2)`` with ``z`` constant
(Tweedie's formula, ``D = mu + c / (c + sigma_bar^2) (x_bar - mu)``, and the solution
``x_bar - mu ~ sqrt(c + sigma_bar^2)``), so with ``q = c / sigma_s^2``

    eps_j = z u_j / sqrt(q + u_j^2),    integral_0^sigma_s eps = z sigma_s (sqrt(1 + q) - sqrt(q)).

The noise prediction bends down to 0 below the data's scale, which no polynomial through points at
``sigma_bar >= sigma_s`` can see; at few steps the last call sits near that scale and the Adams
step overshoots (it integrates as if ``eps`` stayed near ``eps_s``). The weights ``w_j = sigma_s
omega_j`` here minimise the squared error over that family for every variance above a floor,
uniformly in ``log q`` (no preferred scale above it), subject to exactness for a constant and a
linear ``eps`` (so a region whose prediction does not change, such as the kept part of an
inpainting mask, and data much wider than ``sigma_s``, are integrated exactly):

    minimise    integral_(log q_lo)^inf  e(q)^2  d log q,
                e(q) = sum_j omega_j u_j / sqrt(q + u_j^2) - (sqrt(1 + q) - sqrt(q)),
    subject to  sum_j omega_j = 1,  sum_j omega_j u_j = 1/2.

The rule is linear in the model outputs, so it is the same on every eigen-direction: it does not
assume isotropic data. The floor is ``sqrt(c_lo) = SCALE_FLOOR sigma_s / u_1``: for a schedule
uniform in log-SNR, ``sigma_s / u_1 = sigma_s e^(-h)`` is where the grid would have continued
past the last call (the few-step window's ``sigma_end``), and that end is placed at about a third
of the data's finest scale. So the rule is made for schedules that end near that scale (the
few-step window, ``logsnr_uniform``, Karras); where the last call sits far above it
(``time_uniform``), the floor takes the data as wide and the Adams weights can be as good or
better (``docs/solver-experiments.md``). ``k = 1`` is the data prediction and ``k = 2`` the Adams-Bashforth
step (two constraints fix two weights); from ``k = 3`` on the rule differs. The weights depend only
on the ratios ``u_j`` (float64; the integral by the trapezoid rule over ``log q``, the constrained
least squares by QR in the constraints' null space).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ._last_step import sigma_ratios

__all__ = ["SCALE_FLOOR", "final_gaussian_weights", "gaussian_family_error"]

#: the smallest data scale the weights are fitted for, in units of ``sigma_s e^(-h)`` (see above)
SCALE_FLOOR = 3.0

# the fit runs over log q from log q_lo to log q_lo + _SPAN (beyond it every term is below 1e-13)
_SPAN = 30.0
_POINTS = 4001


def _family(u: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(eps_j / z, integral / (z sigma_s))`` of the Gaussian family at variances ``q sigma_s^2``."""
    g = u[None, :] / torch.sqrt(q[:, None] + u[None, :] ** 2)
    target = 1.0 / (torch.sqrt(1.0 + q) + torch.sqrt(q))  # sqrt(1 + q) - sqrt(q) without cancellation
    return g, target


def final_gaussian_weights(
    sigma_bars: Sequence[float], scale_floor: float = SCALE_FLOOR
) -> tuple[float, ...]:
    """Weights ``w_j`` of ``eps_j`` in the last step, fitted to the Gaussian family (module docstring).

    ``sigma_bars`` are the VE sigmas of the last calls, newest first (``sigma_bars[0] = sigma_s``,
    the others larger and distinct). Returns ``sigma_s omega_j``.
    """
    u = sigma_ratios(sigma_bars, "final_gaussian_weights")
    s = float(sigma_bars[0])
    k = len(u)
    if k == 1:
        return (s,)  # the data prediction
    if not (scale_floor > 0.0 and math.isfinite(scale_floor)):
        raise ValueError(
            f"final_gaussian_weights: scale_floor must be a finite number > 0, got {scale_floor!r}"
        )
    ut = torch.tensor(u, dtype=torch.float64)
    log_q_lo = 2.0 * math.log(scale_floor / u[1])
    y = torch.linspace(log_q_lo, log_q_lo + _SPAN, _POINTS, dtype=torch.float64)
    trapezoid = torch.full_like(y, float(y[1] - y[0]))
    trapezoid[0] = trapezoid[-1] = 0.5 * float(y[1] - y[0])
    g, target = _family(ut, torch.exp(y))
    root = trapezoid.sqrt()[:, None]
    # the constraints C omega = d (a constant and a linear eps exact): omega = omega_p + N z with the
    # least-norm omega_p and N spanning C's null space; z by least squares on the weighted family
    # (QR, not the normal equations, which would square the condition number on dense grids)
    c = torch.stack([torch.ones_like(ut), ut])
    d = torch.tensor([1.0, 0.5], dtype=torch.float64)
    omega_p = c.T @ torch.linalg.solve(c @ c.T, d)
    if k == 2:
        return tuple(s * float(w) for w in omega_p)
    q_full, _ = torch.linalg.qr(c.T, mode="complete")
    null = q_full[:, 2:]
    design = root * (g @ null)
    residual = root[:, 0] * (target - g @ omega_p)
    z = torch.linalg.lstsq(design, residual[:, None]).solution[:, 0]
    omega = omega_p + null @ z
    return tuple(s * float(w) for w in omega)


def gaussian_family_error(omega: Sequence[float], u: Sequence[float], q: torch.Tensor) -> torch.Tensor:
    """Error of the last step with unit-free weights ``omega`` at ratios ``u`` on the Gaussian family,
    per ``q = c / sigma_s^2``, in units of ``z sigma_s`` (for tests and the benchmark notes)."""
    g, target = _family(torch.tensor(list(u), dtype=torch.float64), q.to(torch.float64))
    return g @ torch.tensor(list(omega), dtype=torch.float64) - target
