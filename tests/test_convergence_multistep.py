"""Tier 0: measured convergence orders on Gaussian data with an exact denoiser and ODE solution.

Data ``x0 ~ N(0, c^2 I)``, ``x = alpha x0 + sigma eps`` (VE: ``alpha = 1``; flow: ``alpha = 1 - sigma``).
Then ``x ~ N(0, v I)`` with ``v = alpha^2 c^2 + sigma^2``, the denoiser is ``D = alpha c^2 / v * x``
and every probability-flow ODE trajectory is ``x(sigma) = x(sigma') sqrt(v(sigma) / v(sigma'))``.
Runs stop at the schedule's smallest non-zero sigma (``final_step="sigma_min"``) so the error is
pure ODE discretisation error; the order is the slope of log error against log steps (20 -> 200
steps, uniform in lambda).
"""

from __future__ import annotations

import math

import pytest
import torch

from comfyui_fewstep.samplers.multistep import sample_dpmpp_multistep
from comfyui_fewstep.samplers.parameterization import Parameterization

C = 0.5
RANGES = {
    "ve-eps": Parameterization("ve", 0.0292, 14.61, family="eps"),
    "edm": Parameterization("ve", 0.002, 80.0, family="edm"),
    "flow": Parameterization("flow", 0.001, 0.999, family="flow"),
}


def _alpha(p, s):
    return 1.0 if p.kind == "ve" else 1.0 - s


def _v(p, s):
    return _alpha(p, s) ** 2 * C * C + s * s


def gaussian_model(p):
    def model(x, sigma, **extra):
        s = float(sigma[0])
        return _alpha(p, s) * C * C / _v(p, s) * x

    return model


def logsnr_sigmas(p, n):
    lambdas = torch.linspace(p.lambda_(p.sigma_max), p.lambda_(p.sigma_min), n + 1, dtype=torch.float64)
    return torch.tensor([p.sigma_from_lambda(float(l)) for l in lambdas] + [0.0], dtype=torch.float64)


def ode_error(p, n, **options):
    sigmas = logsnr_sigmas(p, n)
    x = torch.linspace(-2.0, 2.0, 9, dtype=torch.float64).reshape(9, 1) * math.sqrt(_v(p, p.sigma_max))
    out = sample_dpmpp_multistep(gaussian_model(p), x, sigmas, parameterization=p, final_step="sigma_min",
                                 lower_order_final=False, resume_history=False, disable=True, **options)
    exact = x * math.sqrt(_v(p, p.sigma_min) / _v(p, p.sigma_max))
    return float((out - exact).abs().max())


def measured_order(p, **options):
    e20, e200 = ode_error(p, 20, **options), ode_error(p, 200, **options)
    return math.log(e20 / e200) / math.log(10.0)


@pytest.mark.parametrize("name", list(RANGES))
@pytest.mark.parametrize(
    "options,nominal",
    [
        ({"order": 1}, 1),
        ({"order": 2, "solver_type": "midpoint"}, 2),
        ({"order": 2, "solver_type": "heun"}, 2),
        ({"order": 2, "algorithm": "dpmsolver"}, 2),
    ],
)
def test_convergence_order(name, options, nominal):
    slope = measured_order(RANGES[name], **options)
    assert nominal - 0.2 <= slope <= nominal + 0.2, f"measured order {slope:.3f}, nominal {nominal}"


@pytest.mark.parametrize("name", list(RANGES))
@pytest.mark.parametrize("options", [{"order": 3, "third_order": "taylor"},
                                     {"order": 3, "algorithm": "dpmsolver", "third_order": "taylor"}])
def test_third_order_on_the_closed_form_gaussian(name, options):
    """Order 3 on the closed-form problem itself, from a cold start, 20 -> 200 steps: within 0.2 of 3
    on the SD1.5 range; on the EDM and flow ranges the slope is about 4 (the h^3 term cancels on
    Gaussian data, below), so there it must be at least 2.8 and is checked to 3 +- 0.2 on the mixture."""
    slope = measured_order(RANGES[name], **options)
    assert 2.8 <= slope <= (3.2 if name == "ve-eps" else 4.2), f"measured order {slope:.3f}"


# Order 3 needs two things the single-Gaussian runs above do not give it. (1) Starting values: a
# cold start's first-order first step leaves an O(h^2) error that dominates the global error of an
# order-3 method once steps are small (3M's slope on ve-eps falls to 1.7-1.9 past 160 steps).
# (2) A problem without superconvergence: on Gaussian data the Taylor 3M's h^3 error term
# vanishes and its slope is 4. So these runs start from the exact trajectory's outputs at the two
# lambdas before the first step (the split-schedule history, ``samplers.history``) on a 2-D,
# two-component Gaussian mixture, against a DOP853 reference (rtol 1e-13).
MIXTURE_CASES = {
    "edm": (Parameterization("ve", 0.002, 80.0, family="edm"), "ve", 4.0, 0.05),
    "ve-eps": (Parameterization("ve", 0.0292, 14.61, family="eps"), "ve", 4.0, 0.05),
    "flow": (Parameterization("flow", 0.001, 0.999, family="flow"), "flow", 0.8, 0.05),
}


def _mixture():
    from comfyui_fewstep.samplers.analytic import GaussianMixture

    f64 = torch.float64
    return GaussianMixture(torch.tensor([[-0.6, 0.2], [0.5, -0.3]], dtype=f64), torch.tensor([0.35, 0.5], dtype=f64),
                           torch.tensor([0.4, 0.6], dtype=f64))


def warm_start_error(name, n, **options):
    """Max error at ``s1`` of an ``n``-step run from ``s0`` (uniform in lambda) started with the exact
    history of ``order - 1`` earlier outputs."""
    from comfyui_fewstep.samplers import history

    p, form, s0, s1 = MIXTURE_CASES[name]
    mix, order = _mixture(), options.get("order", 1)
    lam0, lam1 = p.lambda_(s0), p.lambda_(s1)
    h = (lam1 - lam0) / n
    top = p.sigma_from_lambda(lam0 - 3.5 * (lam1 - lam0) / 20)  # above every history point for n >= 20
    x_top = mix.sample(6, top, form, generator=torch.Generator().manual_seed(0))

    def solve(x, a, b):
        return mix.ode_solution(x, a, b, form, rtol=1e-13, atol=1e-14)

    def model(x, sigma, **extra):
        return mix.denoise(x, float(sigma[0]), form)

    algorithm = options.get("algorithm", "dpmsolver++")
    outputs, lambdas = [], []
    for k in range(1, order):
        s = p.sigma_from_lambda(lam0 - k * h)
        xs = solve(x_top, top, s)
        d = model(xs, torch.tensor([s]))
        outputs.append(d if algorithm == "dpmsolver++" else (xs - p.alpha(s) * d) / p.sigma_t(s))
        lambdas.append(lam0 - k * h)
    x0 = solve(x_top, top, s0)
    sigmas = torch.tensor([p.sigma_from_lambda(lam0 + i * h) for i in range(n + 1)], dtype=torch.float64)
    history.clear()
    if outputs:
        history.store(history.MultistepHistory(x=x0, sigma=float(sigmas[0]), algorithm=algorithm,
                                               outputs=tuple(outputs), lambdas=tuple(lambdas)))
    out = sample_dpmpp_multistep(model, x0.clone(), sigmas, parameterization=p, lower_order_final=False,
                                 disable=True, **options)
    history.clear()
    return float((out - solve(x0, s0, s1)).abs().max())


@pytest.mark.parametrize("name", list(MIXTURE_CASES))
@pytest.mark.parametrize(
    "options,nominal",
    [
        ({"order": 1}, 1),
        ({"order": 2, "solver_type": "midpoint"}, 2),
        ({"order": 2, "solver_type": "heun"}, 2),
        ({"order": 3, "third_order": "taylor"}, 3),
        ({"order": 3, "third_order": "official"}, 2),  # the published weight (see the test below)
        ({"order": 2, "algorithm": "dpmsolver"}, 2),
        ({"order": 3, "algorithm": "dpmsolver", "third_order": "taylor"}, 3),
    ],
)
def test_convergence_order_with_exact_starting_values(name, options, nominal):
    slope = math.log2(warm_start_error(name, 20, **options) / warm_start_error(name, 160, **options)) / 3.0
    assert nominal - 0.2 <= slope <= nominal + 0.2, f"measured order {slope:.3f}, nominal {nominal}"


@pytest.mark.parametrize("name", list(RANGES))
def test_published_third_order_weight_is_second_order(name):
    """The published 3M weight on D2 (half the Taylor weight) leaves an O(h^3) local error.

    Documented finding: with ``third_order="official"`` (the authors', diffusers' and ComfyUI's
    3M) the measured order is 2, with a smaller error constant than 2M; ``"taylor"`` is third order.
    """
    p = RANGES[name]
    official = measured_order(p, order=3, third_order="official")
    assert 1.8 <= official <= 2.5
    assert ode_error(p, 200, order=3) < ode_error(p, 200, order=2, solver_type="heun")
    assert ode_error(p, 200, order=3, third_order="taylor") < ode_error(p, 200, order=3, third_order="official")


def test_ddim_error_scales_with_step_size():
    """Sanity: DDIM's error shrinks tenfold with ten times the steps (order 1, not exact)."""
    p = RANGES["ve-eps"]
    assert 8.0 < ode_error(p, 20, order=1) / ode_error(p, 200, order=1) < 12.0


def sde_variance_ratio(p, order, eta, steps, n=20000, seed=1234):
    """Variance of SDE samples at sigma_min over the exact marginal variance ``v(sigma_min)``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, generator=g, dtype=torch.float64) * math.sqrt(_v(p, p.sigma_max))
    noise = lambda s, t: torch.randn(n, 1, generator=g, dtype=torch.float64)  # noqa: E731
    out = sample_dpmpp_multistep(gaussian_model(p), x, logsnr_sigmas(p, steps), parameterization=p, order=order,
                                 eta=eta, noise_sampler=noise, final_step="sigma_min", disable=True,
                                 resume_history=False)
    target = _v(p, p.sigma_min)
    assert abs(float(out.mean())) < 4.0 * math.sqrt(target / n)
    return float(out.var()) / target


@pytest.mark.parametrize("name", ["ve-eps", "flow"])
@pytest.mark.parametrize("order,eta", [(2, 1.0), (3, 1.0), (2, 0.5)])
def test_sde_sample_statistics_match_the_data_distribution(name, order, eta):
    """SDE-DPM-Solver++ from the exact marginal at sigma_max: x at sigma_min ~ N(0, v(sigma_min))."""
    assert sde_variance_ratio(RANGES[name], order, eta, 40) == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize("name", ["ve-eps", "flow"])
def test_sde_first_order_statistics_converge(name):
    """SDE-DPM-Solver++1 (the DDPM ancestral step) is weakly first order: 5x the steps, ~5x less bias."""
    p = RANGES[name]
    coarse, fine = sde_variance_ratio(p, 1, 1.0, 40), sde_variance_ratio(p, 1, 1.0, 200)
    assert abs(1.0 - fine) < 0.1
    assert abs(1.0 - fine) < abs(1.0 - coarse) / 3.0


def test_sde_noise_actually_randomises():
    p = RANGES["ve-eps"]
    x = torch.zeros(2000, 1, dtype=torch.float64)  # all start at the same point
    g = torch.Generator().manual_seed(0)
    out = sample_dpmpp_multistep(gaussian_model(p), x + 3.0, logsnr_sigmas(p, 30), parameterization=p, eta=1.0,
                                 noise_sampler=lambda s, t: torch.randn(2000, 1, generator=g, dtype=torch.float64),
                                 disable=True)
    assert float(out.std()) > 0.3 * C
