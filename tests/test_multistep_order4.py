"""Order-4 multistep (exponential Adams-Bashforth in lambda, data prediction): weights, exactness, order.

Closed-form checks: the weights integrate ``e^(-(h-u)) u^q`` exactly for ``q <= 3`` (against
scipy quadrature), the order-3 case equals the Taylor-weighted 3M update, an order-4 step is exact
for a denoiser that is a cubic polynomial in lambda, and the measured convergence order is 4.
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy.integrate import quad

from comfyui_fewstep.samplers._coefficients import adams_weights, plan_multistep
from comfyui_fewstep.samplers.multistep import sample_dpmpp_multistep
from comfyui_fewstep.samplers.parameterization import Parameterization

EDM = Parameterization("ve", 0.002, 80.0, family="edm")
FLOW = Parameterization("flow", 0.001, 0.999, family="flow")
# an uneven VE grid (in lambda: steps of 0.6, 0.9, 0.5, 1.2, 0.7)
LAMBDAS = [-2.0, -1.4, -0.5, 0.0, 1.2, 1.9]
SIGMAS = [math.exp(-lam) for lam in LAMBDAS]


@pytest.mark.parametrize("h", [0.05, 0.7, 2.5])
@pytest.mark.parametrize("rhos", [(0.0, -1.0, -2.0, -3.0), (0.0, -0.4, -1.7, -2.2), (0.0, -1.3)])
def test_weights_integrate_polynomials_exactly(h, rhos):
    w = adams_weights(h, rhos)
    for q in range(len(rhos)):
        exact = quad(lambda u, q=q: math.exp(-(h - u)) * u**q, 0.0, h, epsabs=0.0, epsrel=1e-13)[0]
        approx = sum(wj * (rho * h) ** q for wj, rho in zip(w, rhos))
        assert approx == pytest.approx(exact, rel=1e-10, abs=1e-14)


def test_order_three_weights_are_the_taylor_3m_update():
    plan = plan_multistep(SIGMAS, Parameterization("ve", 1e-3, 1e3), order=3, third_order="taylor",
                          lower_order_final=False)
    c = plan[3]  # a full third-order step: from lambda 0.0 to 1.2 with history at -0.5, -1.4
    assert c.order == 3
    h = LAMBDAS[4] - LAMBDAS[3]
    rhos = (0.0, (LAMBDAS[2] - LAMBDAS[3]) / h, (LAMBDAS[1] - LAMBDAS[3]) / h)
    assert c.c_m == pytest.approx(adams_weights(h, rhos), rel=1e-12)


def test_order_four_step_is_exact_for_a_cubic_denoiser():
    """D(lambda) = cubic, independent of x: the exponential Adams-Bashforth step of order 4 is exact."""
    p = Parameterization("ve", 1e-3, 1e3)

    def cubic(lam):
        return 0.3 - 0.8 * lam + 0.25 * lam**2 - 0.1 * lam**3

    plan = plan_multistep(SIGMAS, p, order=4, lower_order_final=False)
    c = plan[4]  # from lambda 1.2 to 1.9 with history at 0.0, -0.5, -1.4
    assert c.order == 4 and len(c.c_m) == 4
    x_s = 0.77
    ms = [cubic(LAMBDAS[4 - j]) for j in range(4)]
    x_t = c.c_x * x_s + sum(w * m for w, m in zip(c.c_m, ms))
    lam_s, lam_t = LAMBDAS[4], LAMBDAS[5]
    integral = quad(lambda lam: math.exp(-(lam_t - lam)) * cubic(lam), lam_s, lam_t, epsabs=0.0, epsrel=1e-13)[0]
    exact = math.exp(-(lam_t - lam_s)) * x_s + integral  # VE: alpha = 1, sigma_t / sigma_s = e^(-h)
    assert x_t == pytest.approx(exact, rel=1e-11)


def test_order_four_with_unic_corrects_with_five_outputs():
    plan = plan_multistep(SIGMAS, Parameterization("ve", 1e-3, 1e3), order=4, corrector="bh2",
                          lower_order_final=False)
    assert [c.order for c in plan] == [1, 2, 3, 4, 4]
    assert len(plan[4].corrector_m) == 4 + 1  # corrects x_4 (made by the order-4 step 3) with m_4


C = 0.5


def _alpha(p, s):
    return 1.0 if p.kind == "ve" else 1.0 - s


def _v(p, s):
    return _alpha(p, s) ** 2 * C * C + s * s


def _ode_error(p, n, **options):
    """Gaussian data N(0, C^2): exact denoiser and ODE solution; uniform-lambda steps, stop at sigma_min."""
    lambdas = torch.linspace(p.lambda_(p.sigma_max), p.lambda_(p.sigma_min), n + 1, dtype=torch.float64)
    sigmas = torch.tensor([p.sigma_from_lambda(float(v)) for v in lambdas] + [0.0], dtype=torch.float64)
    x = torch.linspace(-2.0, 2.0, 9, dtype=torch.float64).reshape(9, 1) * math.sqrt(_v(p, p.sigma_max))

    def model(x, sigma, **extra):
        s = float(sigma[0])
        return _alpha(p, s) * C * C / _v(p, s) * x

    out = sample_dpmpp_multistep(model, x, sigmas, parameterization=p, final_step="sigma_min",
                                 lower_order_final=False, resume_history=False, disable=True, **options)
    exact = x * math.sqrt(_v(p, p.sigma_min) / _v(p, p.sigma_max))
    return float((out - exact).abs().max())


@pytest.mark.parametrize("p", [EDM, FLOW], ids=["edm", "flow"])
def test_order_four_converges_at_fourth_order(p):
    # 40 -> 160 steps (from 20 the lower-order warm-up steps still weigh in)
    slope = math.log(_ode_error(p, 40, order=4) / _ode_error(p, 160, order=4)) / math.log(4.0)
    assert 3.6 <= slope <= 4.6, f"measured order {slope:.3f}"
