"""UniC corrector (Zhao et al. 2023, arXiv 2302.04867) on the multistep DPM-Solver++ predictor."""

from __future__ import annotations

import math

import pytest
import torch

from comfyui_fewstep.samplers._coefficients import plan_multistep
from comfyui_fewstep.samplers.multistep import sample_dpmpp_multistep
from comfyui_fewstep.samplers.parameterization import Parameterization
from comfyui_fewstep.samplers.unipc import b_of_h, unic_weights



def _load_tier0():
    """The Gaussian tier-0 helpers of ``test_convergence_multistep.py`` (tests are not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).with_name("test_convergence_multistep.py")
    spec = importlib.util.spec_from_file_location("_tier0_multistep", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tier0 = _load_tier0()

VE = Parameterization("ve", 0.0292, 14.61)


def _g(h):
    """``(j+1)! h phi_(j+2)(-h)`` for j = 0, 1, 2, written with exponentials."""
    e = math.exp(-h)
    return [(e - 1 + h) / h, 2 * (1 - h + h * h / 2 - e) / (h * h), 6 * (e - 1 + h - h * h / 2 + h**3 / 6) / h**3]


@pytest.mark.parametrize("h", [0.05, 0.7, 3.0])
def test_first_order_corrector_uses_the_papers_half(h):
    assert unic_weights(h, (1.0,), "bh1") == pytest.approx((h / 2,))
    assert unic_weights(h, (1.0,), "bh2") == pytest.approx(((1 - math.exp(-h)) / 2,))
    assert b_of_h(h, "bh2") == pytest.approx(1 - math.exp(-h))


@pytest.mark.parametrize("h,r", [(0.3, -0.8), (1.2, -1.5), (0.01, -1.0)])
def test_second_order_weights_solve_the_order_conditions(h, r):
    g0, g1, _ = _g(h)
    w1 = (g0 - g1) / (1 - r)  # w1 + w2 = g0, w1 r + w2 = g1
    for variant in ("bh1", "bh2"):
        assert unic_weights(h, (r, 1.0), variant) == pytest.approx((w1, g0 - w1), rel=1e-6)


def test_third_order_weights_solve_the_vandermonde_system():
    h, rks = 0.4, (-0.9, -2.1, 1.0)
    w = unic_weights(h, rks, "bh2")
    g = _g(h)
    for j in range(3):
        assert sum(wk * rk**j for wk, rk in zip(w, rks)) == pytest.approx(g[j], rel=1e-9)


def _reference_unipc_2m(model, x, sigmas):
    """DPM-Solver++(2M, midpoint) + UniC-bh2 written out (VE form), corrector skipped on the last step."""
    lam = [-math.log(s) if s > 0 else math.inf for s in sigmas]
    ms, x_prev = [], None
    for i in range(len(sigmas) - 1):
        D = model(x, torch.full((x.shape[0],), sigmas[i], dtype=torch.float64))
        ms.insert(0, D)
        if i >= 1 and sigmas[i + 1] > 0:
            h = lam[i] - lam[i - 1]
            base = (sigmas[i] / sigmas[i - 1]) * x_prev + (1 - math.exp(-h)) * ms[1]
            if i == 1:  # predictor was first order: UniC-1 with a_1 = 1/2, B(h) = 1 - e^-h
                x = base + 0.5 * (1 - math.exp(-h)) * (ms[0] - ms[1])
            else:  # UniC-2: points r = (lam[i-2] - lam[i-1]) / h and 1
                r = (lam[i - 2] - lam[i - 1]) / h
                g0, g1, _ = _g(h)
                w1 = (g0 - g1) / (1 - r)
                w2 = g0 - w1
                x = base + w1 * (ms[2] - ms[1]) / r + w2 * (ms[0] - ms[1])
        x_prev = x
        if sigmas[i + 1] == 0:
            x = D
            continue
        h = lam[i + 1] - lam[i]
        x = (sigmas[i + 1] / sigmas[i]) * x + (1 - math.exp(-h)) * D
        if i >= 1:
            r = (lam[i] - lam[i - 1]) / h
            x = x + 0.5 * (1 - math.exp(-h)) * (ms[0] - ms[1]) / r
    return x


def test_unipc_2m_matches_transcription():
    model = tier0.gaussian_model(VE)

    def nonlinear(x, sigma, **extra):
        return model(x, sigma) + 0.2 * torch.sin(x) * float(sigma[0]) / (1 + float(sigma[0]))

    sigmas = [14.61, 7.0, 3.0, 1.4, 0.6, 0.25, 0.1, 0.0292]
    x = torch.linspace(-20, 20, 7, dtype=torch.float64).reshape(7, 1)
    ref = _reference_unipc_2m(nonlinear, x, sigmas)
    out = sample_dpmpp_multistep(nonlinear, x, torch.tensor(sigmas, dtype=torch.float64), order=2,
                                 corrector="bh2", lower_order_final=False, resume_history=False, disable=True)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(tier0.RANGES))
@pytest.mark.parametrize(
    "options,nominal",
    [({"order": 1, "corrector": "bh1"}, 2), ({"order": 1, "corrector": "bh2"}, 2),
     ({"order": 2, "corrector": "bh1"}, 3), ({"order": 2, "solver_type": "heun", "corrector": "bh2"}, 3)],
)
def test_corrector_raises_the_order_by_one(name, options, nominal):
    slope = tier0.measured_order(tier0.RANGES[name], **options)
    assert abs(slope - nominal) <= 0.2, f"measured order {slope:.3f}, nominal {nominal}"


@pytest.mark.parametrize("name", list(tier0.RANGES))
def test_corrector_on_third_order_gives_fourth_order(name):
    """UniC-3 on the Taylor-weighted 3M: order 4 (measured 160 -> 640 steps; pre-asymptotic below)."""
    p = tier0.RANGES[name]
    opts = {"order": 3, "third_order": "taylor", "corrector": "bh2"}
    slope = math.log(tier0.ode_error(p, 160, **opts) / tier0.ode_error(p, 640, **opts)) / math.log(4.0)
    assert abs(slope - 4.0) <= 0.2, f"measured order {slope:.3f}"


def test_corrector_costs_no_extra_model_calls():
    calls = []
    model = tier0.gaussian_model(VE)

    def counting(x, sigma, **extra):
        calls.append(float(sigma[0]))
        return model(x, sigma)

    sigmas = tier0.logsnr_sigmas(VE, 12)
    x = torch.ones(2, 3, dtype=torch.float64)
    for corrector in ("none", "bh1", "bh2"):
        calls.clear()
        sample_dpmpp_multistep(counting, x, sigmas, order=3, corrector=corrector, disable=True,
                               resume_history=False)
        assert len(calls) == len(sigmas) - 1


def test_corrector_is_skipped_where_no_model_call_follows():
    sigmas = [14.61, 5.0, 1.0, 0.3, 0.0]
    plan = plan_multistep(sigmas, VE, order=2, corrector="bh2")
    assert plan[0].corrector_m == ()  # nothing to correct at the start
    assert plan[1].corrector_m and plan[2].corrector_m
    assert plan[3].corrector_m == ()  # the final step returns the data prediction: x is unused
    # sigma_min: the last state is returned without a model call, hence uncorrected
    plan = plan_multistep(sigmas[:-1], VE, order=2, corrector="bh2")
    assert len(plan) == 3 and plan[2].corrector_m


def test_corrector_weights_are_consistent():
    """Weights on (m_t, m_s, older) sum to alpha_t (1 - e^-h): exact for a constant data prediction."""
    sigmas = [14.61, 5.0, 2.0, 1.0, 0.3]
    plan = plan_multistep(sigmas, VE, order=3, corrector="bh1", third_order="taylor")
    for prev, c in zip(plan, plan[1:]):
        if c.corrector_m:
            assert sum(c.corrector_m) == pytest.approx(1 - math.exp(-prev.h), rel=1e-12)
            assert c.corrector_x == pytest.approx(prev.sigma_next / prev.sigma)


def _reference_unipc_noise_2m(model, x, sigmas):
    """DPM-Solver(2M, noise prediction, midpoint) + UniC-bh2 written out in the VE form (alpha = 1,
    sigma_t = sigma, eps = (x - D) / sigma), corrector skipped on the last step (UniPC, Alg. 1 with
    h in place of -h: B(h) = e^h - 1, g = (j+1)! h phi_(j+2)(h))."""
    lam = [-math.log(s) for s in sigmas[:-1]] + [math.inf]

    def phi2(h):
        return (math.expm1(h) - h) / h**2

    def phi3(h):
        return (math.expm1(h) - h - h * h / 2) / h**3

    es, x_prev = [], None
    for i in range(len(sigmas) - 1):
        D = model(x, torch.full((x.shape[0],), sigmas[i], dtype=torch.float64))
        es.insert(0, (x - D) / sigmas[i])
        if i >= 1 and sigmas[i + 1] > 0:
            h = lam[i] - lam[i - 1]
            base = x_prev - sigmas[i] * math.expm1(h) * es[1]
            if i == 1:
                x = base - sigmas[i] * 0.5 * math.expm1(h) * (es[0] - es[1])
            else:
                r = (lam[i - 2] - lam[i - 1]) / h
                g0, g1 = 1 * h * phi2(h), 2 * h * phi3(h)
                w1 = (g0 - g1) / (1 - r)
                w2 = g0 - w1
                x = base - sigmas[i] * (w1 * (es[2] - es[1]) / r + w2 * (es[0] - es[1]))
        x_prev = x
        if sigmas[i + 1] == 0:
            x = D
            continue
        h = lam[i + 1] - lam[i]
        x = x - sigmas[i + 1] * math.expm1(h) * es[0]
        if i >= 1:
            r = (lam[i] - lam[i - 1]) / h
            x = x - sigmas[i + 1] * 0.5 * math.expm1(h) * (es[0] - es[1]) / r
    return x


def test_unipc_noise_prediction_2m_matches_transcription():
    model = tier0.gaussian_model(VE)

    def nonlinear(x, sigma, **extra):
        return model(x, sigma) + 0.2 * torch.sin(x) * float(sigma[0]) / (1 + float(sigma[0]))

    sigmas = [14.61, 7.0, 3.0, 1.4, 0.6, 0.25, 0.1, 0.0292, 0.0]
    x = torch.linspace(-20, 20, 7, dtype=torch.float64).reshape(7, 1)
    ref = _reference_unipc_noise_2m(nonlinear, x, sigmas)
    out = sample_dpmpp_multistep(nonlinear, x, torch.tensor(sigmas, dtype=torch.float64), order=2,
                                 algorithm="dpmsolver", corrector="bh2", lower_order_final=False,
                                 resume_history=False, disable=True)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(tier0.RANGES))
@pytest.mark.parametrize("options,nominal", [({"order": 1}, 2), ({"order": 2}, 3)])
def test_corrector_raises_the_order_of_the_noise_prediction_solver(name, options, nominal):
    slope = tier0.measured_order(tier0.RANGES[name], algorithm="dpmsolver", corrector="bh2", **options)
    assert abs(slope - nominal) <= 0.2, f"measured order {slope:.3f}, nominal {nominal}"


FLOW = Parameterization("flow", 0.001, 1.0, family="flow")


def _flow_gaussian(mu: float, c: float):
    """Exact flow-form denoiser of N(mu, c^2) data, and its ODE trajectory from pure noise z."""

    def model(x, sigma, **extra):
        s = float(sigma[0])
        a = 1.0 - s
        return mu + a * c * c / (a * a * c * c + s * s) * (x - a * mu)

    def exact(z, s):  # x_bar(sigma_bar) = mu + z sqrt(c^2 + sigma_bar^2), x = alpha x_bar
        sb = s / (1.0 - s)
        return (1.0 - s) * (mu + z * math.sqrt(c * c + sb * sb))

    return model, exact


@pytest.mark.parametrize("sigma_1", [0.95, 0.9, 0.8])
def test_first_step_from_pure_noise_is_corrected(sigma_1):
    """A flow run from sigma = 1: the predictor's first step takes D = D_0 (the data mean) over an
    infinite log-SNR step; the correction adds alpha_1 (D_1 - D_0) / 2. On Gaussian data its
    remaining error is c^2 / (c^2 + sigma_bar_1^2) of the predictor's, as the docstring says."""
    mu, c = 0.3, 0.5
    model, exact = _flow_gaussian(mu, c)
    z = torch.linspace(-2.0, 2.0, 9, dtype=torch.float64).reshape(9, 1)
    sigmas = torch.tensor([1.0, sigma_1, 0.5 * sigma_1, 0.0], dtype=torch.float64)
    states = {}
    for corrector in ("none", "bh2"):
        seen = []
        sample_dpmpp_multistep(model, z.clone(), sigmas, parameterization=FLOW, corrector=corrector,
                               disable=True, callback=lambda d: seen.append(d["x"].clone()))
        states[corrector] = seen[1]  # the state at sigma_1 (corrected where a corrector runs)
    target = exact(z, sigma_1)
    err_predictor = float((states["none"] - target).abs().max())
    err_corrected = float((states["bh2"] - target).abs().max())
    sb = sigma_1 / (1.0 - sigma_1)
    assert err_predictor > 1e-4
    assert err_corrected < 1.2 * c * c / (c * c + sb * sb) * err_predictor


def test_pure_noise_correction_only_for_data_prediction_from_sigma_one():
    plan = plan_multistep([1.0, 0.8, 0.5, 0.2, 0.0], FLOW, order=2, corrector="bh2")
    assert plan[1].corrector_x == pytest.approx(0.8)
    assert plan[1].corrector_m == pytest.approx((0.1, 0.1))  # alpha_1 / 2 on D_1 and on D_0
    ve = plan_multistep([80.0, 10.0, 1.0, 0.1, 0.0], Parameterization("ve", 0.002, 80.0), order=2,
                        corrector="bh2")
    assert len(ve[1].corrector_m) == 2 and ve[1].corrector_m != pytest.approx((0.5, 0.5))  # UniC's own
    noise = plan_multistep([1.0, 0.8, 0.5, 0.2, 0.0], FLOW, order=2, corrector="bh2", algorithm="dpmsolver")
    assert noise[1].corrector_m == ()  # noise prediction: not derived, not applied


def test_pure_noise_correction_is_the_limit_of_the_bh2_correction():
    """From sigma = 1 - 1e-9 (a finite but huge first step) UniC-bh2's weights approach those
    used from sigma = 1, so a schedule that starts just below 1 samples like one that starts at 1."""
    near = plan_multistep([1.0 - 1e-9, 0.8, 0.5, 0.2, 0.0], FLOW, order=2, corrector="bh2")
    exact = plan_multistep([1.0, 0.8, 0.5, 0.2, 0.0], FLOW, order=2, corrector="bh2")
    assert near[1].corrector_m == pytest.approx(exact[1].corrector_m, rel=1e-6)
    assert near[1].corrector_x == pytest.approx(exact[1].corrector_x, rel=1e-6)
