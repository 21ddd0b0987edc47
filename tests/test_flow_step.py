"""The second step in flow-equivalent coordinates (``second_step="flow"``, :mod:`samplers.flow_step`).

Closed-form checks, against a transcription written here: the flow-equivalent coordinates of VE and
flow points; with a data prediction linear in ``tau = softplus(lambda)`` along the run the second
step (``heun`` weight) is exact, and with one quadratic in ``tau`` so is its UniC correction, in VE
and flow form, while the log-SNR step is not; only that step and its correction change. In the
sampler: a split schedule gives the unsplit result, img2img keeps the log-SNR step (its refusals are
checked with the other start option's in ``test_gaussian_start.py``), on held-out Gaussian mixtures fewer samples change mixture component, and under guidance the
documented limit (better at cfg 3, unstable at cfg 12 with 5 calls).
"""

from __future__ import annotations

import math

import pytest
import torch

from comfyui_fewstep.samplers import analytic, schedules
from comfyui_fewstep.samplers._coefficients import plan_multistep
from comfyui_fewstep.samplers.flow_step import flow_equivalent, with_flow_second_step
from comfyui_fewstep.samplers.multistep import sample_dpmpp_multistep
from comfyui_fewstep.samplers.parameterization import Parameterization

VE = Parameterization("ve", 0.002, 80.0, family="edm")
FLOW = Parameterization("flow", 1e-4, 1.0, family="flow")
# a run from pure noise: EDM's sigma_max, and a flow model's sigma = 1
SIGMAS = {"ve": [80.0, 6.0, 1.5, 0.4, 0.1, 0.0], "flow": [1.0, 0.85, 0.6, 0.3, 0.1, 0.0]}


def _tau(p: Parameterization, sigma: float) -> float:
    """``softplus(lambda)``, written out: ``log(1 + alpha / sigma_t)``."""
    return math.log1p(p.alpha(sigma) / p.sigma_t(sigma))


class _PolynomialInTau:
    """A data prediction that depends on sigma only: ``a + b tau + c tau^2`` (per element)."""

    def __init__(self, p: Parameterization, coefficients: tuple[torch.Tensor, ...]) -> None:
        self.p, self.coefficients, self.nfe = p, coefficients, 0

    def value(self, tau: float) -> torch.Tensor:
        return sum(c * tau**j for j, c in enumerate(self.coefficients))

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        self.nfe += 1
        return self.value(_tau(self.p, float(sigma[0]))).expand_as(x).clone()

    def exact_step(self, x: torch.Tensor, s: float, t: float) -> torch.Tensor:
        """The ODE from ``s`` to ``t`` in flow-equivalent coordinates: ``x_f = x / (alpha + sigma_t)``,
        ``d(x_f / sigma_f) = e^tau D dtau`` with ``sigma_f = e^(-tau)``, integrated in closed form."""
        a, b, c = (list(self.coefficients) + [torch.zeros(())] * 3)[:3]

        def antiderivative(tau: float) -> torch.Tensor:  # of e^tau (a + b tau + c tau^2)
            return math.exp(tau) * (a + b * (tau - 1.0) + c * (tau * tau - 2.0 * tau + 2.0))

        p = self.p
        tau_s, tau_t = _tau(p, s), _tau(p, t)
        x_f = x / (p.alpha(s) + p.sigma_t(s))
        x_f_t = math.exp(-tau_t) * (x_f * math.exp(tau_s) + antiderivative(tau_t) - antiderivative(tau_s))
        return x_f_t * (p.alpha(t) + p.sigma_t(t))


def _states(model, p, x, **options) -> list[torch.Tensor]:
    states: list[torch.Tensor] = []
    sigmas = torch.tensor(SIGMAS[p.kind], dtype=torch.float64)
    sample_dpmpp_multistep(model, x, sigmas, parameterization=p, disable=True, resume_history=False,
                           callback=lambda d: states.append(d["x"].clone()), **options)
    return states


def test_flow_equivalent_coordinates():
    # a flow model's own coordinates
    for sigma in (1.0, 0.7, 0.2, 0.0):
        assert flow_equivalent(FLOW, sigma) == pytest.approx((sigma, 1.0), rel=1e-15)
    # VE: x_f = x / (1 + sigma), sigma_f = sigma / (1 + sigma), and -log sigma_f = softplus(lambda)
    for sigma in (80.0, 1.0, 0.05):
        sigma_f, kappa = flow_equivalent(VE, sigma)
        assert (sigma_f, kappa) == pytest.approx((sigma / (1 + sigma), 1 / (1 + sigma)), rel=1e-15)
        assert -math.log(sigma_f) == pytest.approx(math.log1p(math.exp(VE.lambda_(sigma))), rel=1e-12)
    assert flow_equivalent(VE, 0.0) == (0.0, 1.0)


@pytest.mark.parametrize("p", [VE, FLOW], ids=["ve", "flow"])
def test_second_step_is_exact_for_a_prediction_linear_in_softplus_lambda(p):
    torch.manual_seed(0)
    model = _PolynomialInTau(p, (torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)))
    x = torch.randn(2, 6, dtype=torch.float64) * SIGMAS[p.kind][0]
    s1, s2 = SIGMAS[p.kind][1:3]
    errors = {}
    for second_step in ("flow", "log_snr"):
        states = _states(model, p, x, order=2, solver_type="heun", second_step=second_step)
        errors[second_step] = float((states[2] - model.exact_step(states[1], s1, s2)).abs().max())
    assert errors["flow"] < 1e-12 * SIGMAS[p.kind][0]
    assert errors["log_snr"] > 1e-4


@pytest.mark.parametrize("corrector", ["bh1", "bh2"])
@pytest.mark.parametrize("p", [VE, FLOW], ids=["ve", "flow"])
def test_corrected_second_step_is_exact_for_a_prediction_quadratic_in_softplus_lambda(p, corrector):
    torch.manual_seed(1)
    model = _PolynomialInTau(p, tuple(torch.randn(6, dtype=torch.float64) for _ in range(3)))
    x = torch.randn(2, 6, dtype=torch.float64) * SIGMAS[p.kind][0]
    s1, s2 = SIGMAS[p.kind][1:3]
    errors = {}
    for second_step in ("flow", "log_snr"):
        states = _states(model, p, x, order=2, corrector=corrector, second_step=second_step)
        errors[second_step] = float((states[2] - model.exact_step(states[1], s1, s2)).abs().max())
    assert errors["flow"] < 1e-12 * SIGMAS[p.kind][0]
    assert errors["log_snr"] > 1e-4


@pytest.mark.parametrize("p", [VE, FLOW], ids=["ve", "flow"])
def test_only_the_second_step_and_its_correction_change(p):
    sigmas = SIGMAS[p.kind]
    options = dict(order=3, solver_type="midpoint", lower_order_final=True, lower_order_final_steps=10,
                   euler_at_final=False, corrector="bh2", third_order="taylor")
    plan = plan_multistep(sigmas, p, **options)
    flow = with_flow_second_step(plan, sigmas, p, **options)
    assert flow[0] == plan[0] and flow[3:] == plan[3:]
    assert flow[1].order == 2 and (flow[1].c_x, flow[1].c_m) != (plan[1].c_x, plan[1].c_m)
    assert flow[2].c_m == plan[2].c_m and flow[2].corrector_m != plan[2].corrector_m
    # a first-order second step (order 1, or a run too short for the correction) is left alone
    assert with_flow_second_step(plan_multistep(sigmas, p, order=1), sigmas, p, order=1) == plan_multistep(
        sigmas, p, order=1)
    short = plan_multistep(sigmas[-3:], p, **options)
    assert with_flow_second_step(short, sigmas[-3:], p, **options) == short


def test_a_run_that_starts_below_sigma_max_keeps_the_log_snr_step():
    """img2img (denoise < 1): the first call is not near the data mean, so the step stays in log-SNR;
    from sigma_max the same schedule's second step changes."""
    rng = analytic.RANGE_PRESETS["edm"]
    mixture = analytic.GaussianMixture.random(16, 8, (0.05, 0.30), 4)
    p = rng.parameterization()
    full = schedules.get_sigmas("logsnr_window", 8, p, **schedules.FEWSTEP_WINDOW)

    def run(sigmas: torch.Tensor, second_step: str) -> torch.Tensor:
        x = mixture.sample(32, float(sigmas[0]), rng.form, generator=torch.Generator().manual_seed(3))
        return sample_dpmpp_multistep(analytic.CountingDenoiser(mixture, rng.form), x, sigmas, parameterization=p,
                                      order=2, corrector="bh2", second_step=second_step, disable=True,
                                      resume_history=False)

    torch.testing.assert_close(run(full[2:], "flow"), run(full[2:], "log_snr"), rtol=0, atol=0)
    assert not torch.equal(run(full, "flow"), run(full, "log_snr"))


def _mixture_run(range_name: str, nfe: int, second_step: str, n: int = 256, mixture_seed: int = 11):
    rng = analytic.RANGE_PRESETS[range_name]
    mixture = analytic.GaussianMixture.random(16, 8, (0.05, 0.30), mixture_seed)
    x = mixture.sample(n, rng.sigma_max, rng.form, generator=torch.Generator().manual_seed(1))
    p = rng.parameterization()
    sigmas = schedules.get_sigmas("logsnr_window", nfe, p, **schedules.FEWSTEP_WINDOW)
    model = analytic.CountingDenoiser(mixture, rng.form)
    out = sample_dpmpp_multistep(model, x.float(), sigmas, parameterization=p, order=2, corrector="bh2",
                                 final_order=4, final_weights="gaussian", second_step=second_step, disable=True)
    return mixture, x, rng, out, model.nfe


def test_split_schedule_gives_the_unsplit_result():
    rng = analytic.RANGE_PRESETS["edm"]
    mixture = analytic.GaussianMixture.random(16, 8, (0.05, 0.30), 3)
    x = mixture.sample(64, rng.sigma_max, rng.form, generator=torch.Generator().manual_seed(2))
    p = rng.parameterization()
    sigmas = schedules.get_sigmas("logsnr_window", 8, p, **schedules.FEWSTEP_WINDOW)
    options = dict(parameterization=p, order=2, corrector="bh2", second_step="flow", disable=True)
    whole = sample_dpmpp_multistep(analytic.CountingDenoiser(mixture, rng.form), x, sigmas,
                                   history_source="split-test", **options)
    model = analytic.CountingDenoiser(mixture, rng.form)
    first = sample_dpmpp_multistep(model, x, sigmas[:5], history_source="split-test", **options)
    second = sample_dpmpp_multistep(model, first, sigmas[4:], history_source="split-test", **options)
    torch.testing.assert_close(second, whole, rtol=0, atol=1e-12)
    assert model.nfe == 8


@pytest.mark.parametrize("mixture_seed", [11, 12])
@pytest.mark.parametrize("range_name", ["sd15", "edm", "flow_shift1"])
def test_flow_second_step_changes_the_mode_of_fewer_samples(range_name, mixture_seed):
    """Held-out mixtures (not the benchmark's, no guidance): the few-step preset (2M + UniC with the
    gaussian last step on the few-step window) at 5, 6 and 8 calls. With the flow second step, no more
    samples end in another mixture component than the exact ODE's at any of them and fewer in all,
    the 90th-percentile error is lower, and the calls are the same."""
    flips, p90 = {}, {}
    for second_step in ("log_snr", "flow"):
        for nfe in (5, 6, 8):
            mixture, x, rng, out, calls = _mixture_run(range_name, nfe, second_step, mixture_seed=mixture_seed)
            assert calls == nfe
            reference = mixture.ode_solution(x, rng.sigma_max, 0.0, rng.form)
            changed = mixture.nearest_component(out) != mixture.nearest_component(reference)
            flips[second_step, nfe] = int(changed.sum())
            p90[second_step, nfe] = float(analytic.per_sample_rms(out.double(), reference).quantile(0.9))
    assert all(flips["flow", n] <= flips["log_snr", n] for n in (5, 6, 8)), flips
    assert sum(flips["flow", n] for n in (5, 6, 8)) < sum(flips["log_snr", n] for n in (5, 6, 8)), flips
    assert sum(p90["flow", n] for n in (5, 6, 8)) < sum(p90["log_snr", n] for n in (5, 6, 8)), p90


def test_guidance_limits_the_flow_second_step(guided_preset_errors):
    """The documented limit: with weak guidance (cfg 3) the flow second step is more accurate at 6 and
    8 calls; with strong guidance (cfg 12) at 5 calls it blows up, which is why the few-step preset
    keeps the log-SNR step."""
    weak = guided_preset_errors("edm", 3.0, (6, 8), "second_step", ("log_snr", "flow"))
    for nfe in (6, 8):
        assert weak[nfe, "flow"] < 0.95 * weak[nfe, "log_snr"], weak
    strong = guided_preset_errors("edm", 12.0, (5,), "second_step", ("log_snr", "flow"))
    assert strong[5, "log_snr"] < 0.05 and strong[5, "flow"] > 10 * strong[5, "log_snr"], strong
