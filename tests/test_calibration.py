"""Calibrated schedules: teacher accuracy, DP cost tables, closed-form optimum, never worse than fixed schedules."""

from __future__ import annotations

import math
import time

import pytest
import torch
from comfyui_fewstep.samplers import analytic
from comfyui_fewstep.samplers import calibration as cal
from comfyui_fewstep.samplers._calibration_dp import GridCosts
from comfyui_fewstep.samplers.parameterization import Parameterization
from comfyui_fewstep.samplers.schedules import get_sigmas

pytest.importorskip("scipy")

pytestmark = pytest.mark.usefixtures("one_thread")

EDM = Parameterization("ve", 0.002, 80.0, "edm")
FLOW = Parameterization("flow", 0.001, 1.0, "flow")



@pytest.mark.parametrize("form,p", [("ve", EDM), ("flow", FLOW)])
@pytest.mark.parametrize("nfe", [3, 4])
def test_ddim_on_gaussian_data_recovers_uniform_arctan_optimum(form, p, nfe):
    """DDIM on N(0, c^2) data: the end error factor is prod cos(dtheta_i) with theta = arctan(sigma_ve / c),
    so the optimum with sigma_max fixed and a final step to 0 is uniform in theta (exact closed form)."""
    c = 0.5
    data = analytic.GaussianData(c=c, dim=8)
    x = data.sample(4, p.sigma_max, form, generator=torch.Generator().manual_seed(0))
    res = cal.calibrate(analytic.CountingDenoiser(data, form), x, p, nfe,
                        cal.SolverSpec("multistep", {"order": 1}), search_nfe=400)
    sve = [s if form == "ve" else s / (1.0 - s) if s < 1.0 else math.inf for s in res.sigmas[:-1]]
    theta = [math.atan(s / c) for s in sve]
    expected = [theta[0] * (nfe - i) / nfe for i in range(nfe)]
    assert res.sigmas[-1] == 0.0 and len(res.sigmas) == nfe + 1
    assert max(abs(a - b) for a, b in zip(theta, expected)) < 0.01
    # and the end error is the closed form |1 - prod cos(dtheta)| relative to the exact end point
    end = data.ode_solution(x, p.sigma_max, 0.0, form)
    rel = float(cal.end_error(cal.SolverSpec("multistep", {"order": 1}).run(
        analytic.CountingDenoiser(data, form), x, torch.tensor(res.sigmas, dtype=torch.float64), p), end))
    optimum = 1.0 - math.cos(theta[0] / nfe) ** nfe
    scale = float(end.pow(2).mean(1).sqrt().log().mean().exp())
    assert rel / scale == pytest.approx(optimum, rel=1e-3)


@pytest.mark.parametrize("range_name", ["sd15", "flow_shift3"])
def test_teacher_matches_exact_ode_and_counts_calls(range_name):
    rng = analytic.RANGE_PRESETS[range_name]
    mixture = analytic.MIXTURE_PRESETS["gmm16"].build()
    p = rng.parameterization()
    x = mixture.sample(8, rng.sigma_max, rng.form, generator=torch.Generator().manual_seed(3))
    model = analytic.CountingDenoiser(mixture, rng.form)
    teacher = cal.run_teacher(model, x, p, grid_points=60, substeps=3)
    assert teacher.nfe == model.nfe == 59 * 3 + 1
    assert teacher.sigmas[0] == rng.sigma_max and teacher.sigmas[-1] == pytest.approx(p.sigma_min)
    exact = mixture.ode_solution(x, rng.sigma_max, teacher.sigmas[30], rng.form)
    err = analytic.per_sample_rms(teacher.xs[30], exact)
    assert float(err.median()) < 1e-4 and float(err.max()) < 2e-3  # solvers at 4-8 NFE: errors > 1e-2
    # the default end point is the ODE's solution at sigma = 0 (extrapolated below sigma_min) ...
    err = analytic.per_sample_rms(teacher.end, mixture.ode_solution(x, rng.sigma_max, 0.0, rng.form))
    assert teacher.end_rule == "ode" and float(err.median()) < 3e-4 and float(err.max()) < 2e-3
    # ... and with end="sigma_min" the data prediction at the last grid point, as samplers end
    at_min = cal.run_teacher(model, x, p, grid_points=60, substeps=3, end="sigma_min")
    end = mixture.denoise(mixture.ode_solution(x, rng.sigma_max, teacher.sigmas[-1], rng.form),
                          teacher.sigmas[-1], rng.form)
    err = analytic.per_sample_rms(at_min.end, end)
    assert float(err.median()) < 1e-4 and float(err.max()) < 2e-3


def test_ode_limit_removes_the_sigma_min_floor():
    """On SD1.5's range (sigma_min 0.029) D at sigma_min is far from the ODE's solution at 0 for data
    with structure at that scale; the extrapolation recovers it."""
    rng = analytic.RANGE_PRESETS["sd15"]
    mixture = analytic.MIXTURE_PRESETS["gmm16"].build()
    p = rng.parameterization()
    x = mixture.sample(64, rng.sigma_max, rng.form, generator=torch.Generator().manual_seed(4))
    s_min = p.sigma_min
    sigmas = [4 * s_min, 2 * s_min, 2**0.5 * s_min, s_min]
    states = [mixture.ode_solution(x, rng.sigma_max, s, "ve") for s in sigmas]
    ds = torch.stack([mixture.denoise(xs, s, "ve") for xs, s in zip(states, sigmas)])
    exact = mixture.ode_solution(x, rng.sigma_max, 0.0, "ve")
    limit = cal.ode_limit(sigmas, ds, p)
    # exact for D = x_0 + beta sigma^2 + gamma sigma^3 along the grid
    x0, beta, gamma = torch.randn(3, 5, dtype=torch.float64)
    poly = torch.stack([x0 + beta * s**2 + gamma * s**3 for s in sigmas])
    torch.testing.assert_close(cal.ode_limit(sigmas, poly, p), x0, rtol=0, atol=1e-9)
    # a coarse grid (one point per unit of lambda) still gets three distinct points
    coarse = [s_min * math.e**k for k in (3, 2, 1, 0)]
    poly = torch.stack([x0 + beta * s**2 + gamma * s**3 for s in coarse])
    torch.testing.assert_close(cal.ode_limit(coarse, poly, p), x0, rtol=0, atol=1e-9)
    floor = float(analytic.per_sample_rms(ds[-1], exact).median())
    assert floor > 2e-3  # the floor every sampler stopping at sigma_min keeps
    assert float(analytic.per_sample_rms(limit, exact).median()) < floor / 10


def test_grid_costs_equal_direct_linear_combinations():
    mixture = analytic.MIXTURE_PRESETS["gmm16"].build()
    p = analytic.RANGE_PRESETS["sd15"].parameterization()
    x = mixture.sample(6, p.sigma_max, "ve", generator=torch.Generator().manual_seed(1))
    t = cal.run_teacher(analytic.CountingDenoiser(mixture, "ve"), x, p, grid_points=20, substeps=2)
    costs = GridCosts(t.sigmas, t.xs, t.ds, t.end, p)

    def rms(e):
        return float(e.reshape(e.shape[0], -1).pow(2).mean(1).sqrt().mean())

    s, lam = t.sigmas, [p.lambda_(v) for v in t.sigmas]
    i, j, k = 7, 12, 3
    a = s[j] / s[i]
    first = a * t.xs[i] + (1 - a) * t.ds[i] - t.xs[j]
    w_j = float(costs.weight[j])
    assert float(costs.first_order()[i, j]) == pytest.approx(rms(first) * w_j, rel=1e-9)
    h, r = lam[j] - lam[i], (lam[i] - lam[k]) / (lam[j] - lam[i])
    second = first + (-math.expm1(-h)) / (2 * r) * (t.ds[i] - t.ds[k])
    assert float(costs.second_order()[k, i, j]) == pytest.approx(rms(second) * w_j, rel=1e-9)
    assert float(costs.final[i]) == pytest.approx(rms(t.ds[i] - t.end), rel=1e-9)
    idx = torch.tensor([[i, 20 + i, 20 + k]])
    coef = torch.tensor([[0.3, -1.2, 0.7]], dtype=torch.float64)
    combo = 0.3 * t.xs[i] - 1.2 * t.ds[i] + 0.7 * t.ds[k]
    assert float(costs.combination_error(idx, coef)[0]) == pytest.approx(rms(combo), rel=1e-9)


@pytest.mark.parametrize("range_name,label,options,nfe", [
    ("sd15", "2M", {"order": 2}, 5),
    ("sd15", "3M+bh2", {"order": 3, "corrector": "bh2"}, 8),
    ("flow_shift3", "2M", {"order": 2}, 4),
    ("flow_shift3", "3M+bh2", {"order": 3, "corrector": "bh2"}, 6),
])
def test_never_worse_than_best_fixed_schedule(range_name, label, options, nfe):
    """On the calibration seeds by construction; on 256 held-out seeds measured against the exact ODE."""
    problem = analytic.make_problem(range_name, "gmm16", n_samples=256, seed=0)
    p = problem.range.parameterization()
    x = problem.mixture.sample(32, problem.range.sigma_max, problem.form, generator=torch.Generator().manual_seed(77))
    spec = cal.SolverSpec("multistep", options, label)
    res = cal.calibrate(problem.denoiser(), x, p, nfe, spec, grid_points=80, substeps=3, search_nfe=600)
    assert res.error <= min(res.baselines.values()) + 1e-12
    assert res.cost["total_nfe"] == res.cost["teacher_nfe"] + res.cost["search_nfe"]
    assert res.cost["search_nfe"] <= 600 + nfe * (1 + len(cal.BASELINE_SCHEDULES))
    expected = cal.expected_calls(spec, nfe, grid_points=80, substeps=3, search_nfe=600)
    assert res.cost["teacher_nfe"] == 79 * 3 + 1 and res.cost["total_nfe"] <= expected

    def held_out(sigmas):
        model = problem.denoiser()
        out = spec.run(model, problem.x_start, sigmas, p, nfe=nfe)
        assert model.nfe == nfe
        return float(analytic.per_sample_rms(out, problem.reference).median())

    ours = held_out(torch.tensor(res.sigmas, dtype=torch.float64))
    fixed = [held_out(get_sigmas(name, nfe, p).double()) for name in cal.BASELINE_SCHEDULES]
    assert ours <= min(fixed)


def test_a_second_start_escapes_where_the_first_search_ends(monkeypatch):
    """The local search ends where its start leads it: on the flow mixture at 4 calls the best
    start's search converges (its error stays put with twice the budget) at 1.5x the error that
    the second-best start's search reaches, so the search refines two starts, each with half the
    budget, and keeps the better result."""
    problem = analytic.make_problem("flow_shift1", "gmm16", n_samples=8, seed=0)
    p = problem.range.parameterization()
    g = torch.Generator().manual_seed(9)
    x = problem.mixture.sample(32, problem.range.sigma_max, problem.form, generator=g)
    spec = cal.SolverSpec("fitted", {}, "2M fitted")
    teacher = cal.run_teacher(problem.denoiser(), x, p, 100, 3)
    errors = {}
    for starts in (1, 2):
        monkeypatch.setattr(cal, "SEARCH_STARTS", starts)
        res = cal.calibrate(problem.denoiser(), x, p, 4, spec, search_nfe=640, teacher=teacher)
        errors[starts] = res.error
        assert res.cost["search_nfe"] <= 640 + 4 * (2 + len(cal.BASELINE_SCHEDULES))
    assert errors[2] < 0.75 * errors[1]


@pytest.mark.parametrize("search_nfe", [5, 9, 15])
def test_a_small_search_budget_is_spent_whole(monkeypatch, search_nfe):
    """Runs the two starts cannot share evenly are not lost: a budget for one run searches from
    the best start alone, an odd number of runs gives the first start the extra one."""
    problem = analytic.make_problem("sd15", "gmm16", n_samples=8, seed=0)
    p = problem.range.parameterization()
    spec = cal.SolverSpec("multistep", {"order": 2})
    teacher = cal.run_teacher(problem.denoiser(), problem.x_start, p, grid_points=40, substeps=1)
    res = cal.calibrate(problem.denoiser(), problem.x_start, p, 5, spec, grid_points=40, substeps=1,
                        search_nfe=search_nfe, teacher=teacher)
    starting_runs = 5 * (1 + len(res.baselines))  # the DP schedule and the fixed schedules
    assert res.cost["search_nfe"] - starting_runs == 5 * (search_nfe // 5)


def test_singlestep_result_carries_its_orders_and_budget():
    problem = analytic.make_problem("sd15", "gmm16", n_samples=8, seed=0)
    p = problem.range.parameterization()
    spec = cal.SolverSpec("singlestep", {"order": 3})
    res = cal.calibrate(problem.denoiser(), problem.x_start, p, 6, spec, grid_points=40, search_nfe=60)
    assert res.orders == [3, 2, 1] and len(res.sigmas) == 4
    assert res.error <= min(res.baselines.values())


def test_reported_seconds_count_the_teacher_once():
    """The reported time is the wall time of the call, the teacher run included once."""
    problem = analytic.make_problem("sd15", "gmm16", n_samples=8, seed=0)
    p = problem.range.parameterization()
    slow = problem.denoiser()

    def model(x, sigma, **kw):  # every call takes >= 2 ms, so the teacher's 118 calls dominate
        time.sleep(0.002)
        return slow(x, sigma, **kw)

    t0 = time.perf_counter()
    res = cal.calibrate(model, problem.x_start, p, 4, grid_points=40, search_nfe=8)
    wall = time.perf_counter() - t0
    assert res.cost["teacher_nfe"] == 118 and res.cost["seconds"] <= wall + 0.001  # rounded to ms
    assert res.cost["seconds"] >= 0.9 * wall


def test_bad_inputs_have_clear_messages():
    data = analytic.GaussianData(c=1.0, dim=4)
    x = data.sample(2, 80.0)
    model = analytic.CountingDenoiser(data)
    with pytest.raises(cal.CalibrationError, match="nfe must be an integer >= 2"):
        cal.calibrate(model, x, EDM, 1)
    with pytest.raises(cal.CalibrationError, match="too few calibration evaluations"):
        cal.calibrate(model, x, EDM, 8, grid_points=12)
    with pytest.raises(cal.CalibrationError, match="stochastic"):
        cal.SolverSpec("multistep", {"order": 2, "eta": 1.0})
    with pytest.raises(cal.CalibrationError, match="solver must be one of"):
        cal.SolverSpec("adaptive")

    def nan_model(x, sigma, **kw):
        out = x * 0.5
        return out if float(sigma[0]) > 5.0 else out * math.nan

    with pytest.raises(cal.CalibrationError, match="NaN/inf.*nothing was calibrated|nothing was calibrated.*NaN/inf"):
        cal.calibrate(nan_model, x, EDM, 4, grid_points=20)


def test_relocation_moves_a_crowded_point_into_the_widest_gap(monkeypatch):
    from comfyui_fewstep.samplers.calibration import _Box, _refine, _relocations

    p = analytic.RANGE_PRESETS["edm"].parameterization()  # lambda from -ln 80 to -ln 0.002
    box = _Box([80.0, 1.0, 0.002], p)
    lams = [-2.0, 0.0, 0.01, 5.0]  # 0.0 and 0.01 crowd each other; the widest gap is 0.0 .. 5.0 once 0.01 is out
    trials = _relocations(lams, box)
    assert trials[0] == [-2.0, 0.0, 2.5, 5.0]
    assert all(box.feasible(t) and len(t) == 4 for t in trials)
    # a local optimum: separating the crowded pair step by step costs a penalty on the way
    # (gaps between 0.015 and 0.5), so coordinate moves stay put; one relocation gets out
    target = [-2.0, 0.0, 2.5, 5.0]

    def objective(points):
        lam = box.lambdas(points)
        barrier = sum(10.0 for a, b in zip(lam, lam[1:]) if 0.015 < b - a < 0.5)
        return sum((a - b) ** 2 for a, b in zip(lam, target)) + barrier

    start = box.points(lams)
    found, error = _refine(objective, box, start, objective(start), 0.1, 0.01, 200)
    assert error < 1e-3 and box.lambdas(found) == pytest.approx(target, abs=0.02)
    monkeypatch.setattr(cal, "RELOCATIONS", 0)
    _, stuck = _refine(objective, box, start, objective(start), 0.1, 0.01, 200)
    assert stuck == objective(start)  # no single-point move helps


def test_fitted_calibration_never_worse_than_fitting_on_a_fixed_schedule():
    """The default preset: schedule and coefficients calibrated together beat coefficients fitted on
    the best fixed schedule, on 256 held-out seeds against the exact ODE (SD1.5 range, 5 NFE)."""
    from comfyui_fewstep.samplers.fitted import fit_fitted_multistep

    nfe = 5
    problem = analytic.make_problem("sd15", "gmm16", n_samples=256, seed=0)
    p = problem.range.parameterization()
    x = problem.mixture.sample(32, problem.range.sigma_max, problem.form, generator=torch.Generator().manual_seed(77))
    teacher = cal.run_teacher(problem.denoiser(), x, p, grid_points=80, substeps=3)
    spec = cal.SolverSpec("fitted", {}, "2M fitted")
    res = cal.calibrate(problem.denoiser(), x, p, nfe, spec, grid_points=80, substeps=3, search_nfe=300,
                        teacher=teacher)

    def held_out(sigmas, coefficients):
        model = problem.denoiser()
        out = spec.run(model, problem.x_start, torch.tensor(sigmas, dtype=torch.float64), p, nfe=nfe,
                       coefficients=coefficients)
        assert model.nfe == nfe
        return float(analytic.per_sample_rms(out, problem.reference).median())

    fixed = []
    for name in cal.BASELINE_SCHEDULES:
        sigmas = [float(s) for s in get_sigmas(name, nfe, p).double()]
        _, coefficients = fit_fitted_multistep(problem.denoiser(), x, sigmas, lambda n, s: teacher.state_at(s, p), p)
        fixed.append(held_out(sigmas, coefficients))
    assert held_out(res.sigmas, res.coefficients) <= min(fixed)
