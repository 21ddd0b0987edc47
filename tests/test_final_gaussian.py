"""The ``gaussian`` weights of the last step to sigma = 0 (:mod:`samplers.final_gaussian`).

Closed-form checks: the weights integrate a constant and a linear noise prediction exactly (so
two calls give the Adams-Bashforth step), they are the constrained least-squares optimum of the
error over the Gaussian family above the floor (checked against an independent, finer
quadrature and against feasible perturbations), that error is below the Adams-Bashforth step's
at the few-step window's step sizes, they scale with sigma, and they stay bounded on a schedule
whose last step is very long. In the sampler: on held-out Gaussian mixtures the few-step
preset is more accurate with them at 5-8 model calls, with no extra call.
"""

from __future__ import annotations

import math

import pytest
import torch

from comfyui_fewstep.samplers import analytic, schedules
from comfyui_fewstep.samplers.final_adams import final_adams_weights
from comfyui_fewstep.samplers.final_gaussian import SCALE_FLOOR, final_gaussian_weights, gaussian_family_error
from comfyui_fewstep.samplers.multistep import sample_dpmpp_multistep


def _geometric(h: float, k: int, sigma_s: float = 0.09) -> list[float]:
    """The last ``k`` calls of a grid uniform in log-SNR with step ``h``, newest first."""
    return [sigma_s * math.exp(h * j) for j in range(k)]


def _objective(omega: list[float], u: list[float], points: int = 40001) -> float:
    """``integral (error)^2 d log q`` from the floor on, with a finer grid and a longer span than
    the module (independent of its quadrature)."""
    log_q_lo = 2.0 * math.log(SCALE_FLOOR / u[1])
    y = torch.linspace(log_q_lo, log_q_lo + 40.0, points, dtype=torch.float64)
    err = gaussian_family_error(omega, u, torch.exp(y))
    return float(torch.trapezoid(err**2, y))


@pytest.mark.parametrize(
    "nodes",
    [(0.03, 0.05), (0.03, 0.07, 0.2), (0.029, 0.06, 0.15, 0.4), (0.09, 0.27, 0.8, 2.4),
     tuple(_geometric(0.02, 4))],
)
def test_constant_and_linear_noise_predictions_are_integrated_exactly(nodes):
    w = final_gaussian_weights(nodes)
    s = nodes[0]
    for q in (0, 1):
        assert sum(wj * sj**q for wj, sj in zip(w, nodes)) == pytest.approx(s ** (q + 1) / (q + 1), rel=1e-9)


def test_dense_grids_stay_better_than_the_adams_step():
    """At 0.01-0.2 units of log-SNR per step the fit stays the optimum (solved by QR, not the
    normal equations) and its weights below the Adams step's."""
    for h in (0.01, 0.05, 0.2):
        nodes = _geometric(h, 4)
        u = [v / nodes[0] for v in nodes]
        ours = [w / nodes[0] for w in final_gaussian_weights(nodes)]
        adams = [w / nodes[0] for w in final_adams_weights(nodes)]
        assert _objective(ours, u) < 0.1 * _objective(adams, u)
        assert sum(map(abs, ours)) < sum(map(abs, adams))


@pytest.mark.parametrize("nodes", [(0.05,), (0.05, 0.11)])
def test_one_and_two_calls_are_the_adams_step(nodes):
    assert final_gaussian_weights(nodes) == pytest.approx(final_adams_weights(nodes), rel=1e-12)


@pytest.mark.parametrize("h", [0.37, 0.55, 0.92, 1.1])
@pytest.mark.parametrize("k", [3, 4])
def test_weights_are_the_least_squares_optimum_over_the_gaussian_family(h, k):
    nodes = _geometric(h, k)
    u = [v / nodes[0] for v in nodes]
    omega = [w / nodes[0] for w in final_gaussian_weights(nodes)]
    best = _objective(omega, u)
    # feasible perturbations keep sum(omega) and sum(omega u): any other such rule does worse
    g = torch.Generator().manual_seed(k)
    basis = torch.linalg.svd(torch.tensor([[1.0] * k, u], dtype=torch.float64)).Vh[2:]
    for _ in range(8):
        step = (torch.randn(k - 2, generator=g, dtype=torch.float64) @ basis) * 1e-2
        assert _objective([o + float(d) for o, d in zip(omega, step)], u) > best
    adams = [w / nodes[0] for w in final_adams_weights(nodes)]
    assert best < 0.8 * _objective(adams, u)


def test_error_on_the_family_is_smaller_than_the_adams_steps_where_it_matters():
    """At the few-step window's 5-call step (h = 1.1), for variances from the floor to 10x it:
    data whose finest scale is near the last call, where the Adams step overshoots most."""
    nodes = _geometric(1.1, 4)
    u = [v / nodes[0] for v in nodes]
    q_lo = (SCALE_FLOOR / u[1]) ** 2
    q = q_lo * torch.logspace(0, 1, 11, dtype=torch.float64)
    ours = gaussian_family_error([w / nodes[0] for w in final_gaussian_weights(nodes)], u, q).abs()
    adams = gaussian_family_error([w / nodes[0] for w in final_adams_weights(nodes)], u, q).abs()
    assert float(ours.max()) < 0.7 * float(adams.max())
    assert float(ours.pow(2).mean().sqrt()) < 0.6 * float(adams.pow(2).mean().sqrt())


def test_weights_scale_with_sigma():
    nodes = _geometric(0.92, 4)
    for c in (1e-3, 7.0):
        scaled = final_gaussian_weights([c * v for v in nodes])
        assert scaled == pytest.approx([c * w for w in final_gaussian_weights(nodes)], rel=1e-9)


def test_weights_stay_bounded_after_a_very_long_last_step():
    """kl_optimal at 5 steps on the EDM range ends with a call at 0.002 after one at 0.41."""
    nodes = (0.002, 0.41, 0.99, 2.36)
    omega = [w / nodes[0] for w in final_gaussian_weights(nodes)]
    assert sum(abs(o) for o in omega) < 2.5, omega


@pytest.mark.parametrize("bad", [(), (0.0, 1.0), (0.1, 0.1), (0.2, 0.1), (0.1, math.inf), (math.nan,)])
def test_bad_nodes_are_refused(bad):
    with pytest.raises(ValueError, match="final_gaussian_weights"):
        final_gaussian_weights(bad)


@pytest.mark.parametrize("floor", [0.0, -1.0, math.inf, math.nan])
def test_bad_floor_is_refused(floor):
    with pytest.raises(ValueError, match="scale_floor"):
        final_gaussian_weights((0.1, 0.2, 0.4), scale_floor=floor)


@pytest.mark.parametrize("mixture_seed", [11, 12])
@pytest.mark.parametrize("range_name", ["sd15", "edm", "flow_shift3"])
def test_few_step_preset_is_more_accurate_with_the_gaussian_weights(range_name, mixture_seed):
    """Held-out mixtures (not the benchmark's): 2M + UniC, final order 4 on the few-step window,
    gaussian against adams weights: lower median error at 5 and 6 calls by a tenth, and not
    higher at 8 (same model calls)."""
    rng = analytic.RANGE_PRESETS[range_name]
    mixture = analytic.GaussianMixture.random(16, 8, (0.05, 0.30), mixture_seed)
    x = mixture.sample(256, rng.sigma_max, rng.form, generator=torch.Generator().manual_seed(1))
    reference = mixture.ode_solution(x, rng.sigma_max, 0.0, rng.form)
    p = rng.parameterization()
    ratios = {}
    for nfe in (5, 6, 8):
        sigmas = schedules.get_sigmas("logsnr_window", nfe, p, **schedules.FEWSTEP_WINDOW)
        medians = {}
        for weights in ("adams", "gaussian"):
            model = analytic.CountingDenoiser(mixture, rng.form)
            out = sample_dpmpp_multistep(model, x.float(), sigmas, parameterization=p, order=2,
                                         corrector="bh2", final_order=4, final_weights=weights, disable=True)
            assert model.nfe == nfe
            medians[weights] = float(analytic.per_sample_rms(out.double(), reference).median())
        ratios[nfe] = medians["gaussian"] / medians["adams"]
    assert ratios[5] < 0.9 and ratios[6] < 0.9 and ratios[8] < 1.0, ratios
