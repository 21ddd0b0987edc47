"""Adaptive DPM-Solver++-12/23 on the closed-form Gaussian problem (x0 ~ N(0, c^2 I))."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from comfyui_fewstep.samplers.adaptive import (
    FACTOR_MAX,
    AdaptiveBudgetError,
    error_norm,
    sample_dpmpp_adaptive,
    schedule_position,
)
from comfyui_fewstep.samplers._loop import NonFiniteModelOutputError
from comfyui_fewstep.samplers.parameterization import for_family
from comfyui_fewstep.samplers.schedules import get_sigmas
from comfyui_fewstep.samplers.singlestep import sample_dpmpp_singlestep, solver_sigma

C = 0.5


class Gaussian:
    """Exact denoiser ``D = alpha C^2 / v * x`` and ODE solution ``x * sqrt(v(to) / v(from))``,
    ``v = alpha^2 C^2 + sigma^2`` (VE: alpha = 1; flow: alpha = 1 - sigma). Counts calls."""

    def __init__(self, kind: str) -> None:
        self.kind, self.calls = kind, 0

    def alpha(self, sigma: float) -> float:
        return 1.0 if self.kind == "ve" else 1.0 - sigma

    def v(self, sigma: float) -> float:
        return self.alpha(sigma) ** 2 * C * C + sigma * sigma

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        s = float(sigma[0])
        return self.alpha(s) * C * C / self.v(s) * x

    def exact(self, x: torch.Tensor, sigma_from: float, sigma_to: float) -> torch.Tensor:
        return x * math.sqrt(self.v(sigma_to) / self.v(sigma_from))


CASES = {
    "ve-eps": (for_family("eps"), None),
    "ve-edm": (for_family("edm"), None),
    "flow": (for_family("flow"), 0.999),
}


def run(case: str, order: int, tol: float, **kw):
    p, start = CASES[case]
    sigma_max, sigma_min = start or p.sigma_max, p.sigma_min
    problem = Gaussian(p.kind)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, generator=gen, dtype=torch.float64) * math.sqrt(problem.v(sigma_max))
    sigmas = torch.tensor([sigma_max, 1.0 if p.kind == "ve" else 0.5, sigma_min, 0.0], dtype=torch.float64)
    info: dict = {}
    out = sample_dpmpp_adaptive(problem, x, sigmas, parameterization=p, order=order, rtol=tol, atol=tol,
                                info=info, final_step="sigma_min", **kw)
    exact = problem.exact(x, sigma_max, sigma_min)
    error = float((out - exact).abs().max() / exact.abs().max())
    return error, info, problem.calls


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("order", [2, 3])
def test_tolerance_controls_error_and_nfe(case, order):
    errors, nfes = [], []
    for tol in (1e-2, 1e-3, 1e-4):
        error, info, calls = run(case, order, tol)
        assert info["nfe"] == calls  # reported NFE is the number of model calls
        assert info["steps_accepted"] >= 1
        errors.append(error)
        nfes.append(info["nfe"])
        if tol <= 1e-3:  # the global error stays within a small multiple of the local tolerance
            assert error < 10 * tol, (tol, error, info)
    assert errors[0] > errors[1] > errors[2], errors
    assert nfes[0] < nfes[1] < nfes[2], nfes


@pytest.mark.parametrize("order", [2, 3])
def test_nfe_accounting_with_rejections_and_final_step(order):
    p = for_family("edm")
    problem = Gaussian("ve")
    x = torch.randn(1, 16, dtype=torch.float64) * 80.0
    info: dict = {}
    seen = []
    sample_dpmpp_adaptive(problem, x, torch.tensor([80.0, 0.002, 0.0], dtype=torch.float64),
                          parameterization=p, order=order, rtol=1e-3, atol=1e-3, info=info,
                          callback=seen.append)
    accepted, rejected = info["steps_accepted"], info["steps_rejected"]
    assert rejected > 0
    # every attempt costs `order`, except that a retry reuses the prediction at its start; plus the final step
    assert info["nfe"] == problem.calls == order * accepted + (order - 1) * rejected + 1
    assert [d["step"] for d in seen] == list(range(accepted + 1))  # accepted steps, then the final call
    assert [d["i"] for d in seen] == [0] * accepted + [1]  # one interval before the final denoise
    reached = [float(d["sigma"]) for d in seen[:-1]]
    assert all(a > b for a, b in zip(reached, reached[1:])) and reached[-1] == pytest.approx(0.002, rel=1e-12)
    assert float(seen[-1]["sigma"]) == pytest.approx(0.002, rel=1e-12)


@pytest.mark.parametrize("final_step", ["zero", "sigma_min"])
def test_progress_follows_log_snr_on_the_given_schedule(final_step):
    """ComfyUI's bar has len(sigmas) - 1 steps and shows i + 1: it must not fill at the first step."""
    p = for_family("edm")
    sigmas = torch.cat([torch.exp(torch.linspace(math.log(80.0), math.log(0.002), 20, dtype=torch.float64)),
                        torch.zeros(1, dtype=torch.float64)])
    seen = []
    x = torch.randn(1, 16, dtype=torch.float64) * 80.0
    sample_dpmpp_adaptive(Gaussian("ve"), x, sigmas, parameterization=p, order=3, rtol=1e-3, atol=1e-3,
                          callback=seen.append, final_step=final_step)
    total = len(sigmas) - 1
    positions = [d["i"] for d in seen]
    assert len(seen) > 5 and positions[0] < total // 4
    assert all(0 <= a <= b < total for a, b in zip(positions, positions[1:]))
    assert positions[-1] == total - 1  # the bar is full only at the end
    # position = the fraction of the log-SNR range covered, mapped onto the schedule's intervals
    lambda_0, lambda_end = p.lambda_(80.0), p.lambda_(0.002)
    segments = total - (final_step == "zero")
    for d in seen[: len(seen) - (final_step == "zero")]:
        done = (p.lambda_(float(d["sigma"])) - lambda_0) / (lambda_end - lambda_0)
        assert d["i"] == min(segments - 1, max(0, math.ceil(segments * done - 1e-9) - 1))


def test_schedule_position_edges():
    assert schedule_position(0.0, 1.0, 10) == 0
    assert schedule_position(0.05, 1.0, 10) == 0
    assert schedule_position(0.1, 1.0, 10) == 0
    assert schedule_position(0.1000001, 1.0, 10) == 1
    assert schedule_position(1.0, 1.0, 10) == 9
    assert schedule_position(0.0, 0.0, 3) == 2


def test_one_step_equals_singlestep_update():
    """With a huge tolerance and h_init the whole range is one accepted 3S (or 2S) step."""
    p = for_family("eps")
    sigmas = torch.tensor([14.6, 0.03], dtype=torch.float64)
    x = torch.randn(2, 8, dtype=torch.float64) * 14.6
    for order in (2, 3):
        problem = Gaussian("ve")
        info: dict = {}
        out = sample_dpmpp_adaptive(problem, x, sigmas, parameterization=p, order=order, rtol=1e9, atol=1e9,
                                    h_init=100.0, info=info)
        ref = sample_dpmpp_singlestep(Gaussian("ve"), x, sigmas, disable=True, parameterization=p,
                                      order=order)
        assert info == {"nfe": order, "steps_accepted": 1, "steps_rejected": 0}
        assert torch.allclose(out, ref, rtol=1e-13, atol=0)


def test_error_norm_definition():
    x_low = torch.tensor([[1.0, -4.0], [0.0, 0.0]])
    x_prev = torch.tensor([[2.0, 1.0], [0.0, 0.0]])
    x_high = x_low + torch.tensor([[0.1, 0.2], [0.01, 0.0]])
    # sample 0: delta = [0.1 * 2, 0.1 * 4] -> scaled [0.5, 0.5]; sample 1: delta = atol = 0.01 -> [1, 0]
    expected = max(math.sqrt((0.5**2 + 0.5**2) / 2), math.sqrt((1.0**2 + 0.0) / 2))
    assert error_norm(x_high, x_low, x_prev, atol=0.01, rtol=0.1) == pytest.approx(expected, rel=1e-6)


def test_budget_guard():
    problem = Gaussian("ve")
    with pytest.raises(AdaptiveBudgetError, match="max_nfe=12"):
        sample_dpmpp_adaptive(problem, torch.ones(1, 4, dtype=torch.float64) * 80,
                              torch.tensor([80.0, 0.002, 0.0]), rtol=1e-8, atol=1e-8, max_nfe=12)
    assert problem.calls <= 12


def test_logs_one_info_line(caplog):
    with caplog.at_level(logging.INFO, logger="comfyui_fewstep.samplers.adaptive"):
        sample_dpmpp_adaptive(Gaussian("ve"), torch.ones(1, 4), torch.tensor([14.6, 0.03, 0.0]), order=2)
    lines = [r.getMessage() for r in caplog.records if r.name.endswith("samplers.adaptive")]
    assert len(lines) == 1 and "NFE" in lines[0] and "DPM-Solver++12" in lines[0]


def test_end_points_no_nan():
    problem = Gaussian("ve")
    x = torch.tensor([[3.0, -1.0]], dtype=torch.float64)
    info: dict = {}
    out = sample_dpmpp_adaptive(problem, x, torch.tensor([5.0, 0.0], dtype=torch.float64), info=info)
    assert torch.allclose(out, problem(x, torch.tensor([5.0]))) and info["nfe"] == 1
    assert torch.equal(sample_dpmpp_adaptive(problem, x, torch.tensor([5.0])), x)
    # flow from sigma = 1 (lambda = -inf) to 0: finite and close to the exact ODE solution
    p = for_family("flow")
    flow = Gaussian("flow")
    info = {}
    out = sample_dpmpp_adaptive(flow, x, torch.tensor([1.0, p.sigma_min, 0.0], dtype=torch.float64),
                                parameterization=p, rtol=1e-4, atol=1e-4, info=info)
    exact = flow(flow.exact(x, 1.0, p.sigma_min), torch.tensor([p.sigma_min], dtype=torch.float64))
    assert torch.isfinite(out).all()
    assert float((out - exact).abs().max() / exact.abs().max()) < 1e-3
    assert info["nfe"] == flow.calls - 1  # our own call above


def test_option_validation():
    problem, x, sigmas = Gaussian("ve"), torch.ones(1, 2), torch.tensor([5.0, 0.0])
    with pytest.raises(ValueError, match="order"):
        sample_dpmpp_adaptive(problem, x, sigmas, order=1)
    with pytest.raises(ValueError, match="atol"):
        sample_dpmpp_adaptive(problem, x, sigmas, atol=0.0, rtol=0.0)
    with pytest.raises(ValueError, match="h_init"):
        sample_dpmpp_adaptive(problem, x, sigmas, h_init=0.0)
    with pytest.raises(ValueError, match="final_step"):
        sample_dpmpp_adaptive(problem, x, sigmas, final_step="last")


class TwoModes:
    """Elementwise ``x0 ~ N(-1, s^2) / 2 + N(1, s^2) / 2``: exact posterior mean (VE or flow)."""

    def __init__(self, kind: str, s: float = 0.3) -> None:
        self.kind, self.s = kind, s

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sig = float(sigma.reshape(-1)[0])
        a = 1.0 if self.kind == "ve" else 1.0 - sig
        var = a * a * self.s**2 + sig * sig
        logw = torch.stack([-((x - a * m) ** 2) / (2 * var) for m in (-1.0, 1.0)])
        post = torch.stack([m + a * self.s**2 * (x - a * m) / var for m in (-1.0, 1.0)])
        return (torch.softmax(logw, 0) * post).sum(0)


def reference_sigmas(p, sigma_max: float) -> torch.Tensor:
    """A 300-step log-SNR-uniform reference schedule from ``sigma_max`` (flow: from sigma = 1)."""
    sigmas = get_sigmas("logsnr_uniform", 300, p)
    sigmas[0] = sigma_max
    return sigmas


@pytest.mark.parametrize("family", ["flow", "eps"])
@pytest.mark.parametrize("order", [2, 3])
def test_default_tolerances_where_the_prediction_starts_flat(family, order):
    """From a flow model's sigma = 1 the data prediction is flat, so the first steps measure an
    error of about 0. The step size may grow at most FACTOR_MAX-fold per step; without the limit,
    order 2 took the next step across the whole range (5 model calls, error 0.9)."""
    p = for_family(family)
    problem = TwoModes(p.kind)
    x = torch.randn(2, 4, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sigma_max = 1.0 if p.kind == "flow" else p.sigma_max
    x = x * (1.0 if p.kind == "flow" else math.sqrt(1.0 + sigma_max**2))
    sigmas = torch.tensor([sigma_max, p.sigma_min, 0.0], dtype=torch.float64)
    reached: list[float] = []
    out = sample_dpmpp_adaptive(problem, x, sigmas, parameterization=p, order=order,
                                callback=lambda d: reached.append(float(d["sigma"])))
    reference = sample_dpmpp_singlestep(problem, x, reference_sigmas(p, sigma_max), parameterization=p,
                                        order=3)
    assert float((out - reference).square().mean().sqrt()) < 0.03
    # accepted steps in half log-SNR, but the last (cut to reach the end) and the final denoise
    lambdas = [p.lambda_(solver_sigma(p, sigma_max))] + [p.lambda_(s) for s in reached[:-2]]
    steps = [b - a for a, b in zip(lambdas, lambdas[1:])]
    assert len(steps) >= 3 and all(b <= FACTOR_MAX * a * (1 + 1e-9) for a, b in zip(steps, steps[1:]))


@pytest.mark.parametrize("at_last", [False, True])
def test_nan_message_names_the_progress_bar_position(at_last):
    """The adaptive solver picks its own steps; a NaN is reported at the position on the given
    schedule that the progress bar shows, never past its end (was "step 9 of 8")."""
    problem = Gaussian("ve")
    reference = Gaussian("ve")
    sigmas = torch.tensor([80.0, 10.0, 1.0, 0.1, 0.002, 0.0], dtype=torch.float64)
    x = torch.ones(1, 4, dtype=torch.float64) * 80
    sample_dpmpp_adaptive(reference, x, sigmas)
    bad_call = reference.calls if at_last else 1

    def model(x, sigma):
        out = problem(x, sigma)
        return out * math.nan if problem.calls == bad_call else out

    with pytest.raises(NonFiniteModelOutputError) as caught:
        sample_dpmpp_adaptive(model, x, sigmas)
    assert (caught.value.step + 1, caught.value.total_steps) == ((5, 5) if at_last else (1, 5))
