"""UniC, the corrector of UniPC (Zhao et al. 2023, arXiv 2302.04867), in data and noise prediction.

After a multistep predictor has produced ``x_t`` from ``x_s`` and the model has been evaluated at
``x_t`` (an evaluation the next step needs anyway), UniC-p recomputes ``x_t`` from ``x_s`` with the
new model output included (Alg. 1, data-prediction form, eq. 8):

    x_t^c = (sigma_t / sigma_s) x_s + alpha_t [ h phi_1(-h) m_s + B(h) sum_k a_k D_k / r_k ]

with ``D_k = m_(s_k) - m_s`` for the ``p - 1`` earlier points at ``lambda_s + r_k h`` (``r_k < 0``)
and the new point ``r_p = 1``. The ``a_k`` solve ``R_p a = g_p / B(h)`` with ``R_p[j, k] = r_k^j``
(``j = 0..p-1``) and ``g_p[j] = (j+1)! h phi_(j+2)(-h)`` (matching the Taylor expansion of the
exponential integral, Theorem 3.1). ``B(h) = h`` (``bh1``) or ``B(h) = 1 - e^(-h)`` (``bh2``); for
``p = 1`` the paper takes ``a_1 = 1/2``, so the two variants differ there (for ``p >= 2`` the
system is solved exactly and ``B(h) a`` does not depend on ``B``). UniC-p raises the order of an
order-p predictor by one without an extra model evaluation (Theorem 3.2); the model output kept
for later steps is the one at the uncorrected point.

In noise prediction (the original DPM-Solver's variable) the same construction runs with ``h`` in
place of ``-h``: ``x_t^c = (alpha_t / alpha_s) x_s - sigma_t [(e^h - 1) eps_s + B(h) sum_k a_k D_k / r_k]``,
``g_p[j] = (j+1)! h phi_(j+2)(h)`` and ``B(h) = h`` or ``e^h - 1``.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

from .phi import phi

CorrectorVariant = Literal["none", "bh1", "bh2"]
CORRECTOR_VARIANTS: tuple[str, ...] = get_args(CorrectorVariant)

__all__ = ["CORRECTOR_VARIANTS", "CorrectorVariant", "b_of_h", "solve_linear", "unic_weights"]


def b_of_h(h: float, variant: CorrectorVariant, data_prediction: bool = True) -> float:
    """``B(h)`` of UniPC's ``bh1`` and ``bh2`` variants (arXiv 2302.04867, §3.3), as a positive number:
    ``h`` and ``1 - e^(-h)`` in data prediction, ``h`` and ``e^h - 1`` in noise prediction."""
    if variant == "bh1":
        return h
    if variant == "bh2":
        return -math.expm1(-h) if data_prediction else math.expm1(h)
    raise ValueError(f"UniC variant must be 'bh1' or 'bh2', got {variant!r}")


def solve_linear(matrix: list[list[float]], rhs: list[float]) -> list[float]:
    """Solve a small dense linear system by Gaussian elimination with partial pivoting (float64)."""
    n = len(rhs)
    a = [row[:] + [b] for row, b in zip(matrix, rhs)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(a[r][col]))
        if a[pivot][col] == 0.0:
            raise ValueError("singular solver system: two evaluation points share the same lambda")
        a[col], a[pivot] = a[pivot], a[col]
        for row in range(col + 1, n):
            f = a[row][col] / a[col][col]
            for c in range(col, n + 1):
                a[row][c] -= f * a[col][c]
    x = [0.0] * n
    for row in reversed(range(n)):
        x[row] = (a[row][n] - sum(a[row][c] * x[c] for c in range(row + 1, n))) / a[row][row]
    return x


def unic_weights(h: float, rks: tuple[float, ...], variant: CorrectorVariant,
                 data_prediction: bool = True) -> tuple[float, ...]:
    """``B(h) a_k`` for the UniC-p update with points ``rks`` (earlier ones, then ``1.0``).

    Returns the weights ``w_k`` of ``D_k / r_k`` in ``x_t^c``: to be multiplied by ``alpha_t`` in
    data prediction, by ``-sigma_t`` in noise prediction, where the update is
    ``x_t^c = (alpha_t / alpha_s) x_s - sigma_t [(e^h - 1) eps_s + sum_k w_k D_k / r_k]`` and
    ``g_p[j] = (j+1)! h phi_(j+2)(h)`` (Alg. 1 with ``h`` in place of ``-h``).
    """
    p = len(rks)
    if p == 0 or rks[-1] != 1.0:
        raise ValueError(f"UniC needs the new point last with r = 1, got rks={rks!r}")
    if not (h > 0.0 and math.isfinite(h)):
        raise ValueError(f"UniC needs a finite positive step h, got {h!r}")
    bh = b_of_h(h, variant, data_prediction)
    if p == 1:
        return (0.5 * bh,)
    z = -h if data_prediction else h
    g = [math.factorial(j + 1) * h * phi(j + 2, z) for j in range(p)]
    matrix = [[rk**j for rk in rks] for j in range(p)]
    return tuple(solve_linear(matrix, g))
