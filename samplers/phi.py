"""Exponential-integrator phi functions in float64.

``phi_k(z) = int_0^1 exp((1 - tau) z) tau^(k-1) / (k-1)! dtau`` with ``phi_0(z) = exp(z)``;
they satisfy ``phi_{k+1}(z) = (phi_k(z) - 1/k!) / z`` and ``phi_k(0) = 1/k!``
(Hochbruck & Ostermann 2010, eq. 2.10). DPM-Solver++ (Lu et al. 2022, arXiv 2211.01095,
eq. 9) integrates the data prediction with ``z = -h``, ``h = lambda_t - lambda_s``:

    x_t = (sigma_t / sigma_s) x_s + alpha_t * sum_k  h^(k+1) phi_(k+1)(-h) * x0^(k)(lambda_s)

and DPM-Solver (noise prediction, arXiv 2206.00927, eq. 3.6) with ``z = +h``. Near
``z = 0`` the recurrence cancels catastrophically, so small arguments use the power series
``phi_k(z) = sum_j z^j / (j + k)!``. Infinite arguments (a step to sigma = 0, or from
sigma = 1 in flow models) return the exact limits, never NaN.
"""

from __future__ import annotations

import math

__all__ = ["h_phi", "phi"]

_SERIES_RADIUS = 0.5
_SERIES_TERMS = 24


def phi(k: int, z: float) -> float:
    """``phi_k(z)`` in float64 for ``k >= 0`` and any real ``z`` (``+-inf`` included)."""
    if k < 0:
        raise ValueError(f"phi_k needs k >= 0, got {k!r}")
    z = float(z)
    if math.isnan(z):
        raise ValueError("phi_k(z) got z = NaN")
    if k == 0:
        return math.exp(z) if z != math.inf else math.inf
    if z == -math.inf:
        return 0.0
    if z == math.inf:
        return math.inf
    if abs(z) < _SERIES_RADIUS:
        total, term = 0.0, 1.0 / math.factorial(k)
        for j in range(_SERIES_TERMS):
            total += term
            term *= z / (j + k + 1)
        return total
    value = math.expm1(z) / z  # phi_1
    for j in range(1, k):
        value = (value - 1.0 / math.factorial(j)) / z
    return value


def h_phi(k: int, h: float) -> float:
    """``h^k phi_k(-h)``: the weight of the ``(k-1)``-th lambda-derivative in a DPM-Solver++ step.

    ``h_phi(1, h) = 1 - exp(-h)`` (computed as ``-expm1(-h)``), which is 1 at ``h = inf``:
    a first-order step to sigma = 0 returns the data prediction exactly. For ``k >= 2`` the
    weight grows without bound as ``h -> inf``, which is why solvers lower their order for a
    step whose end point has lambda = inf.
    """
    h = float(h)
    if k == 1:
        return -math.expm1(-h) if h != math.inf else 1.0
    if h == math.inf:
        return math.inf
    return h**k * phi(k, -h)
