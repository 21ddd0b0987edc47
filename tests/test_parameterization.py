"""Parameterisations and phi functions against closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from comfyui_fewstep.samplers.parameterization import (
    Parameterization,
    discrete_vp_sigmas,
    flow_sigmas,
    for_family,
    rescale_zero_terminal_snr,
)
from comfyui_fewstep.samplers.phi import h_phi, phi


def test_sd15_discrete_sigma_range():
    sigmas = discrete_vp_sigmas()
    # Stable Diffusion: scaled-linear betas 0.00085 .. 0.012 over 1000 steps
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)
    assert torch.allclose(sigmas, ((1 - abar) / abar).sqrt())
    assert sigmas[0].item() == pytest.approx(0.029167, rel=1e-4)
    assert sigmas[-1].item() == pytest.approx(14.6146, rel=1e-4)
    p = for_family("eps")
    assert p.kind == "ve" and p.sigma_min == pytest.approx(0.029167, rel=1e-4)


def test_zero_terminal_snr_keeps_first_and_makes_last_huge():
    base = discrete_vp_sigmas()
    z = rescale_zero_terminal_snr(base)
    assert z[0].item() == pytest.approx(base[0].item(), rel=1e-9)
    assert z[-1].item() == pytest.approx(math.sqrt((1 - 4.8973451890853435e-08) / 4.8973451890853435e-08))
    assert torch.all(z[1:] > z[:-1])
    p = for_family("v", timestep_sigmas=z)
    assert math.isfinite(p.lambda_(p.sigma_max))


@pytest.mark.parametrize("family", ["eps", "edm", "flow"])
def test_lambda_round_trip(family):
    p = for_family(family)
    for sigma in torch.logspace(math.log10(p.sigma_min), math.log10(p.sigma_max), 17, dtype=torch.float64):
        s = float(sigma)
        assert p.sigma_from_lambda(p.lambda_(s)) == pytest.approx(s, rel=1e-12)
        alpha, sig = p.alpha(s), p.sigma_t(s)
        expected = math.log(alpha / sig) if alpha > 0 else -math.inf
        assert p.lambda_(s) == pytest.approx(expected, rel=1e-12, abs=1e-12)
    lambda_min = max(p.lambda_min, p.lambda_(0.999))  # flow: sigma_max = 1 has lambda = -inf
    t = torch.linspace(lambda_min, p.lambda_max, 9, dtype=torch.float64)
    assert torch.allclose(p.lambda_tensor(p.sigma_from_lambda_tensor(t)), t, rtol=1e-10, atol=1e-10)


def test_endpoints_are_exact_limits():
    ve, flow = for_family("edm"), for_family("flow")
    assert ve.lambda_(0.0) == math.inf and ve.sigma_from_lambda(math.inf) == 0.0
    assert flow.lambda_(0.0) == math.inf and flow.lambda_(1.0) == -math.inf
    assert flow.sigma_from_lambda(-math.inf) == 1.0 and flow.sigma_from_lambda(math.inf) == 0.0
    assert flow.alpha(1.0) == 0.0 and flow.alpha(0.0) == 1.0
    assert flow.sigma_from_lambda(-800.0) == 1.0 and flow.sigma_from_lambda(800.0) == pytest.approx(0.0)
    with pytest.raises(ValueError):
        ve.lambda_(-1.0)


def test_flow_shift_matches_sd3_formula():
    s = flow_sigmas(1000, shift=3.0)
    t = 0.25
    assert s[249].item() == pytest.approx(3 * t / (1 + 2 * t))
    assert s[-1].item() == pytest.approx(1.0)


def test_invalid_parameterizations():
    with pytest.raises(ValueError, match="sigma_min"):
        Parameterization("ve", 1.0, 0.5)
    with pytest.raises(ValueError, match="flow"):
        Parameterization("flow", 0.01, 2.0)
    with pytest.raises(ValueError, match="family"):
        for_family("nope")


@pytest.mark.parametrize("z", [-30.0, -3.0, -0.7, -0.4, -1e-3, -1e-9, 0.0, 1e-6, 0.3, 2.0])
def test_phi_against_quadrature(z):
    # phi_k(z) = int_0^1 exp((1 - tau) z) tau^(k-1) / (k-1)! dtau, by Gauss-Legendre quadrature
    import numpy as np

    nodes, weights = np.polynomial.legendre.leggauss(60)
    tau, w = (nodes + 1) / 2, weights / 2
    for k in (1, 2, 3, 4):
        expected = float(np.sum(w * np.exp((1 - tau) * z) * tau ** (k - 1))) / math.factorial(k - 1)
        assert phi(k, z) == pytest.approx(expected, rel=1e-12, abs=1e-300)
    assert phi(0, z) == pytest.approx(math.exp(z))


def test_h_phi_limits_and_identities():
    for h in (1e-8, 1e-3, 0.5, 2.0, 40.0):
        assert h_phi(1, h) == pytest.approx(-math.expm1(-h), rel=1e-14)
        # h^2 phi_2(-h) = h - (1 - e^-h), h^3 phi_3(-h) = h^2/2 - h^2 phi_2(-h)
        assert h_phi(2, h) == pytest.approx(h - h_phi(1, h), rel=1e-9)
        assert h_phi(3, h) == pytest.approx(h * h / 2 - h_phi(2, h), rel=1e-6)
    assert h_phi(1, math.inf) == 1.0
    assert phi(2, -math.inf) == 0.0 and math.isinf(h_phi(2, math.inf))
    assert h_phi(2, 1e-8) == pytest.approx(0.5e-16, rel=1e-6)  # no cancellation near 0
