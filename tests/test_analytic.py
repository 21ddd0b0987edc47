"""Exact denoisers and reference ODE solutions of the analytic benchmark problems."""

from __future__ import annotations

import math

import pytest
import torch

from comfyui_fewstep.samplers import analytic
from comfyui_fewstep.samplers.analytic import (
    MIXTURE_PRESETS,
    RANGE_PRESETS,
    CountingDenoiser,
    GaussianData,
    GaussianMixture,
    per_sample_rms,
)
from comfyui_fewstep.samplers.parameterization import for_family

F64 = torch.float64


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _single(c: float, dim: int) -> GaussianMixture:
    return GaussianMixture(torch.zeros(1, dim, dtype=F64), torch.tensor([c], dtype=F64), torch.tensor([1.0], dtype=F64))


@pytest.mark.parametrize("form, sigma", [("ve", 0.03), ("ve", 2.0), ("ve", 80.0), ("flow", 0.01), ("flow", 0.6), ("flow", 1.0)])
def test_gaussian_denoiser_matches_one_component_mixture_and_bayes(form, sigma):
    c, dim = 0.7, 5
    x = torch.randn(7, dim, dtype=F64, generator=_gen())
    gauss = GaussianData(c, dim)
    d = gauss.denoise(x, sigma, form)
    torch.testing.assert_close(_single(c, dim).denoise(x, sigma, form), d, rtol=1e-13, atol=1e-13)
    # Bayes for a scalar Gaussian: E[x0|x] = alpha c^2 / (alpha^2 c^2 + sigma^2) x
    alpha = 1.0 if form == "ve" else 1.0 - sigma
    torch.testing.assert_close(d, alpha * c**2 / (alpha**2 * c**2 + sigma**2) * x, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("form, sigma", [("ve", 0.4), ("ve", 1.5), ("flow", 0.3), ("flow", 0.7)])
def test_mixture_denoiser_matches_monte_carlo_posterior_mean(form, sigma):
    mix = MIXTURE_PRESETS["gmm2"].build()
    x = mix.sample(6, sigma, form, generator=_gen(1))
    x0, _ = mix.sample_data(400_000, generator=_gen(2))
    alpha = 1.0 if form == "ve" else 1.0 - sigma
    # self-normalised importance sampling with the prior as proposal: weights p(x | x0)
    log_w = -((x[:, None, :] - alpha * x0[None]) ** 2).sum(-1) / (2 * sigma**2)  # [6, N]
    w = torch.softmax(log_w, dim=1)
    mc = w @ x0
    ess = 1.0 / (w**2).sum(1)
    assert bool((ess > 500).all()), "Monte Carlo estimate too noisy for this check"
    torch.testing.assert_close(mix.denoise(x, sigma, form), mc, rtol=0, atol=0.02)


@pytest.mark.parametrize("sigma_ve", [0.01, 0.3, 1.0, 7.0])
def test_flow_and_ve_denoisers_agree_under_rescaling(sigma_ve):
    # x_flow = x_ve / (1 + sigma_ve) is the flow state at sigma_flow = sigma_ve / (1 + sigma_ve)
    mix = MIXTURE_PRESETS["gmm16"].build()
    x_ve = mix.sample(32, sigma_ve, "ve", generator=_gen(3))
    sigma_flow = sigma_ve / (1 + sigma_ve)
    d_ve = mix.denoise(x_ve, sigma_ve, "ve")
    d_flow = mix.denoise(x_ve / (1 + sigma_ve), sigma_flow, "flow")
    torch.testing.assert_close(d_flow, d_ve, rtol=1e-10, atol=1e-10)


def test_flow_denoiser_at_sigma_one_is_the_prior_mean():
    mix = MIXTURE_PRESETS["gmm16"].build()
    x = torch.randn(4, mix.dim, dtype=F64, generator=_gen())
    prior_mean = mix.weights @ mix.means
    torch.testing.assert_close(mix.denoise(x, 1.0, "flow"), prior_mean.expand(4, -1), rtol=1e-12, atol=1e-12)


def test_denoiser_per_sample_sigma_and_extreme_inputs_stay_finite():
    mix = MIXTURE_PRESETS["gmm16_narrow"].build()
    x = mix.sample(3, 0.5, "ve", generator=_gen())
    sig = torch.tensor([1e-8, 0.5, 1e3], dtype=F64)
    d = mix.denoise(x, sig, "ve")
    for i in range(3):
        torch.testing.assert_close(d[i : i + 1], mix.denoise(x[i : i + 1], float(sig[i]), "ve"))
    far = torch.full((2, mix.dim), 1e4, dtype=F64)
    assert torch.isfinite(mix.denoise(far, 1e-6, "ve")).all()
    lr = mix.log_responsibilities(far, 1e-6, "ve")
    torch.testing.assert_close(lr.exp().sum(1), torch.ones(2, dtype=F64))


def test_marginal_samples_have_the_mixture_moments():
    mix = MIXTURE_PRESETS["gmm2"].build()
    for form, sigma in (("ve", 2.0), ("flow", 0.5)):
        alpha = 1.0 if form == "ve" else 1.0 - sigma
        x = mix.sample(200_000, sigma, form, generator=_gen(5))
        mean = alpha * (mix.weights @ mix.means)
        second = (mix.weights * (alpha**2 * (mix.means**2).sum(1) + mix.dim * (alpha**2 * mix.stds**2 + sigma**2))).sum()
        torch.testing.assert_close(x.mean(0), mean, rtol=0, atol=0.02)
        assert abs(float((x**2).sum(1).mean()) / float(second) - 1.0) < 0.01


@pytest.mark.parametrize("form, sigma", [("ve", 0.02), ("ve", 3.0), ("flow", 0.05), ("flow", 0.9)])
def test_gaussian_closed_form_solves_the_probability_flow_ode(form, sigma):
    # d x / d sigma = (x - D(x, sigma)) / sigma, checked by a central difference
    gauss = GaussianData(0.4, 3)
    x1 = gauss.sample(5, 1.0 if form == "ve" else 0.95, form, generator=_gen())
    s1 = 1.0 if form == "ve" else 0.95
    h = 1e-5 * sigma
    xp = gauss.ode_solution(x1, s1, sigma + h, form)
    xm = gauss.ode_solution(x1, s1, sigma - h, form)
    x = gauss.ode_solution(x1, s1, sigma, form)
    torch.testing.assert_close((xp - xm) / (2 * h), (x - gauss.denoise(x, sigma, form)) / sigma, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize(
    "form, sigma_start, sigma_end",
    [("ve", 14.6, 0.0), ("ve", 80.0, 0.5), ("flow", 1.0, 0.0), ("flow", 0.9999, 0.03)],
)
def test_reference_ode_matches_gaussian_closed_form(form, sigma_start, sigma_end):
    c, dim = 0.3, 4
    gauss = GaussianData(c, dim)
    x = gauss.sample(16, sigma_start, form, generator=_gen(7))
    ref = _single(c, dim).ode_solution(x, sigma_start, sigma_end, form)
    exact = gauss.ode_solution(x, sigma_start, sigma_end, form)
    assert float((ref - exact).abs().max()) < 1e-8


def test_reference_ode_is_the_same_in_flow_and_ve_coordinates():
    mix = MIXTURE_PRESETS["gmm2"].build()
    s_start, s_end = 0.95, 0.1  # flow sigmas
    sv_start, sv_end = s_start / (1 - s_start), s_end / (1 - s_end)
    x_flow = mix.sample(24, s_start, "flow", generator=_gen(9))
    end_flow = mix.ode_solution(x_flow, s_start, s_end, "flow")
    end_ve = mix.ode_solution(x_flow / (1 - s_start), sv_start, sv_end, "ve")
    assert float((end_flow - (1 - s_end) * end_ve).abs().max()) < 1e-7
    # and both reach the same clean sample
    clean_flow = mix.ode_solution(x_flow, s_start, 0.0, "flow")
    clean_ve = mix.ode_solution(x_flow / (1 - s_start), sv_start, 0.0, "ve")
    assert float((clean_flow - clean_ve).abs().max()) < 1e-6


def test_reference_ode_ends_on_the_data_and_preserves_proportions():
    mix = MIXTURE_PRESETS["gmm2"].build()
    x = mix.sample(400, 14.6, "ve", generator=_gen(11))
    out = mix.ode_solution(x, 14.6, 0.0, "ve")
    k = mix.nearest_component(out)
    # every end point lies within a few component widths of its component's mean
    dist = (out - mix.means[k]).norm(dim=1) / mix.stds[k]
    assert float(dist.max()) < 6.0
    # the flow preserves the component proportions (binomial tolerance, 400 samples)
    freq = torch.bincount(k, minlength=mix.n_components).to(F64) / 400
    assert float((freq - mix.weights).abs().max()) < 0.08


def test_nearest_component_recovers_the_generating_component():
    mix = MIXTURE_PRESETS["gmm16_narrow"].build()
    x0, k = mix.sample_data(2000, generator=_gen(13))
    assert float((mix.nearest_component(x0) == k).to(F64).mean()) > 0.99


def test_counting_denoiser_contract():
    mix = MIXTURE_PRESETS["gmm2"].build()
    model = CountingDenoiser(mix, "flow")
    x = torch.randn(3, 2, generator=_gen()).to(torch.float32)
    out = model(x, 0.5 * x.new_ones([3]), model_options={}, seed=1)
    assert out.dtype == torch.float32 and out.shape == x.shape
    torch.testing.assert_close(out.to(F64), mix.denoise(x.to(F64), 0.5, "flow"), rtol=1e-6, atol=1e-6)
    model(x.reshape(3, 1, 2, 1), torch.tensor([0.2, 0.2, 0.2]))
    assert model.nfe == 2 and model.sigmas == pytest.approx([0.5, 0.2])
    model.reset()
    assert model.nfe == 0 and model.sigmas == []


def test_range_presets_match_model_families():
    sd = for_family("eps")
    assert RANGE_PRESETS["sd15"].sigma_min == pytest.approx(sd.sigma_min, rel=1e-12)
    assert RANGE_PRESETS["sd15"].sigma_max == pytest.approx(sd.sigma_max, rel=1e-12)
    assert RANGE_PRESETS["sd15"].sigma_max == pytest.approx(14.6146, abs=1e-4)
    assert RANGE_PRESETS["edm"].parameterization().kind == "ve"
    flow3 = RANGE_PRESETS["flow_shift3"]
    assert flow3.form == "flow" and flow3.sigma_max == 1.0
    assert flow3.sigma_min == pytest.approx(3 * 1e-3 / (1 + 2 * 1e-3), rel=1e-12)


def test_per_sample_rms_and_input_validation():
    a = torch.zeros(2, 4, dtype=F64)
    b = torch.tensor([[1.0, 1.0, 1.0, 1.0], [2.0, 0.0, 0.0, 0.0]], dtype=F64)
    torch.testing.assert_close(per_sample_rms(a, b), torch.tensor([1.0, 1.0], dtype=F64))
    with pytest.raises(ValueError, match="form"):
        GaussianData().denoise(a, 1.0, "vp")
    with pytest.raises(ValueError, match="<= 1"):
        GaussianData(1.0, 4).denoise(a, 1.5, "flow")
    with pytest.raises(ValueError, match="shape"):
        GaussianMixture(torch.zeros(2, 3), torch.ones(3), torch.ones(2))
    with pytest.raises(ValueError, match="unknown range"):
        analytic.make_problem("sdxl_turbo")
    with pytest.raises(ValueError, match="sigma_start"):
        _single(1.0, 2).ode_solution(a[:, :2], 1.0, 2.0)
    assert math.isfinite(float(GaussianData(1.0, 4).marginal_var(0.0, "flow")))


def test_guided_mixture_interpolates_and_extrapolates_the_two_denoisers():
    """cfg 0 is the unconditional mixture, cfg 1 the first components' own mixture (renormalised),
    and cfg 3 lies on the line through them, three times as far."""
    full = analytic.GaussianMixture.random(6, 5, (0.1, 0.3), 7)
    cond = analytic.GaussianMixture(full.means[:2], full.stds[:2], full.weights[:2])
    x = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2.0
    for form, sigma in (("ve", 1.7), ("flow", 0.6)):
        d_u, d_c = full.denoise(x, sigma, form), cond.denoise(x, sigma, form)
        for cfg, expected in ((0.0, d_u), (1.0, d_c), (3.0, d_u + 3.0 * (d_c - d_u))):
            torch.testing.assert_close(analytic.GuidedMixture(full, 2, cfg).denoise(x, sigma, form), expected)
    with pytest.raises(ValueError, match="n_cond"):
        analytic.GuidedMixture(full, 6, 2.0)


def test_the_noise_is_the_one_in_the_marginal_sample():
    """``x_start = alpha x0 + sigma_max noise``: at flow's sigma_max = 1 the sample is its noise."""
    problem = analytic.make_problem("flow_shift1", "gmm2", n_samples=16)
    torch.testing.assert_close(problem.x_start, problem.noise, rtol=0, atol=0)
    mixture = analytic.MIXTURE_PRESETS["gmm2"].build()
    x = mixture.sample(16, 14.6, "ve", generator=torch.Generator().manual_seed(3))
    x2, eps = mixture.sample_with_noise(16, 14.6, "ve", generator=torch.Generator().manual_seed(3))
    assert torch.equal(x, x2)
    assert 0.5 < float((x - 14.6 * eps).std()) < 1.5  # what is left is the data, x0, of order 1
