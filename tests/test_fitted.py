"""The fitted multistep solver: its base is 2M, it is exact where a linear fit can be, and it beats calibrated 2M."""

from __future__ import annotations

import math

import pytest
import torch
from comfyui_fewstep.samplers import analytic
from comfyui_fewstep.samplers import calibration as cal
from comfyui_fewstep.samplers.fitted import fit_fitted_multistep, regressor_count, sample_fitted_multistep
from comfyui_fewstep.samplers.multistep import sample_dpmpp_multistep
from comfyui_fewstep.samplers.parameterization import Parameterization
from comfyui_fewstep.samplers.schedule_store import ScheduleRecord

pytest.importorskip("scipy")

pytestmark = pytest.mark.usefixtures("one_thread")

EDM = Parameterization("ve", 0.002, 80.0, "edm")
FLOW = Parameterization("flow", 0.001, 1.0, "flow")



def _zeros(n_steps: int) -> list[list[float]]:
    return [[0.0] * regressor_count(n, n_steps) for n in range(n_steps)]


@pytest.mark.parametrize("range_name", ["edm", "flow_shift3"])
def test_zero_coefficients_are_dpmpp_2m(range_name):
    """With every weight 0 the update is DPM-Solver++(2M) (midpoint, no lower-order final step)."""
    problem = analytic.make_problem(range_name, "gmm16", n_samples=16, seed=0)
    p = problem.range.parameterization()
    sigmas = torch.tensor(cal.teacher_grid(p, 7) + [0.0], dtype=torch.float64)
    x = problem.x_start.double()
    ours = sample_fitted_multistep(problem.denoiser(), x, sigmas, coefficients=_zeros(7), parameterization=p)
    ref = sample_dpmpp_multistep(problem.denoiser(), x, sigmas, parameterization=p, order=2, lower_order_final=False,
                                 resume_history=False)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("form,p", [("ve", EDM), ("flow", FLOW)])
def test_exact_on_gaussian_data_from_two_calls(form, p):
    """On N(0, c^2) data every state and prediction is a multiple of the starting noise, so the fitted
    weights reproduce the teacher's trajectory exactly, also on noise the fit never saw."""
    data = analytic.GaussianData(c=0.5, dim=16)
    model = analytic.CountingDenoiser(data, form)
    x_cal = data.sample(4, p.sigma_max, form, generator=torch.Generator().manual_seed(0))
    teacher = cal.run_teacher(model, x_cal, p, grid_points=40, substeps=3)
    sigmas = [p.sigma_max, teacher.sigmas[25], 0.0]
    _, coefficients = fit_fitted_multistep(model, x_cal, sigmas, lambda n, s: teacher.state_at(s, p), p)
    x = data.sample(64, p.sigma_max, form, generator=torch.Generator().manual_seed(1))
    exact = data.ode_solution(x, p.sigma_max, 0.0, form)  # the teacher ends at the ODE's solution at 0
    model.nfe = 0
    out = sample_fitted_multistep(model, x, torch.tensor(sigmas, dtype=torch.float64), coefficients=coefficients,
                                  parameterization=p)
    assert model.nfe == 2
    plain = sample_dpmpp_multistep(model, x, torch.tensor(sigmas, dtype=torch.float64), parameterization=p, order=2)
    rel = float((out - exact).norm() / exact.norm())
    assert rel < 1e-5 < float((plain - exact).norm() / exact.norm())


@pytest.mark.parametrize("range_name", ["sd15", "flow_shift3"])
def test_teacher_state_between_grid_points_follows_the_exact_ode(range_name):
    problem = analytic.make_problem(range_name, "gmm16", n_samples=8, seed=0)
    p = problem.range.parameterization()
    teacher = cal.run_teacher(problem.denoiser(), problem.x_start, p, grid_points=80, substeps=3)
    g = teacher.sigmas
    for k in (5, 30, 60):
        sigma = math.sqrt(g[k] * g[k + 1])  # off the grid
        exact = problem.mixture.ode_solution(problem.x_start, problem.range.sigma_max, sigma, problem.form)
        err = (teacher.state_at(sigma, p) - exact).norm() / exact.norm()
        assert float(err) < 1e-4
    torch.testing.assert_close(teacher.state_at(g[10], p), teacher.xs[10].double())
    torch.testing.assert_close(teacher.state_at(0.0, p), teacher.end.double())


@pytest.mark.parametrize("range_name,nfe", [("sd15", 5), ("flow_shift3", 6)])
def test_fitted_beats_calibrated_2m_on_held_out_noise(range_name, nfe):
    """Same teacher, same budget: schedule + coefficients vs schedule alone, against the exact ODE on 256 other seeds."""
    problem = analytic.make_problem(range_name, "gmm16", n_samples=256, seed=0)
    p = problem.range.parameterization()
    x = problem.mixture.sample(32, problem.range.sigma_max, problem.form, generator=torch.Generator().manual_seed(77))
    teacher = cal.run_teacher(problem.denoiser(), x, p, grid_points=80, substeps=3)
    results = {}
    for label, spec in (("2M", cal.SolverSpec("multistep", {"order": 2})), ("fitted", cal.SolverSpec("fitted"))):
        res = cal.calibrate(problem.denoiser(), x, p, nfe, spec, grid_points=80, search_nfe=240, teacher=teacher)
        model = problem.denoiser()
        out = spec.run(model, problem.x_start, torch.tensor(res.sigmas, dtype=torch.float64), p, nfe=nfe,
                       coefficients=res.coefficients)
        assert model.nfe == nfe
        results[label] = (res, float(analytic.per_sample_rms(out, problem.reference).median()))
    fitted, plain = results["fitted"], results["2M"]
    assert fitted[0].coefficients is not None and len(fitted[0].coefficients) == nfe
    assert plain[0].coefficients is None
    assert fitted[0].error < 0.5 * plain[0].error  # on the calibration seeds
    assert fitted[1] < 0.5 * plain[1]  # held out


def test_sigmas_and_coefficients_are_checked():
    data = analytic.GaussianData(c=1.0, dim=4)
    model = analytic.CountingDenoiser(data)
    x = data.sample(2, 80.0)
    sigmas = [80.0, 5.0, 0.5, 0.0]
    coefficients = _zeros(3)
    with pytest.raises(ValueError, match="calibrated for the sigmas"):
        sample_fitted_multistep(model, x, torch.tensor([80.0, 4.0, 0.5, 0.0]), coefficients=coefficients,
                                fitted_sigmas=sigmas, parameterization=EDM)
    with pytest.raises(ValueError, match="coefficients for 2 steps but the schedule has 3"):
        sample_fitted_multistep(model, x, torch.tensor(sigmas), coefficients=coefficients[:2], parameterization=EDM)
    with pytest.raises(ValueError, match="step 2: expected 3 finite numbers"):
        bad = [list(r) for r in coefficients]
        bad[1][0] = math.nan
        sample_fitted_multistep(model, x, torch.tensor(sigmas), coefficients=bad, parameterization=EDM)
    with pytest.raises(ValueError, match="must end in 0"):
        sample_fitted_multistep(model, x, torch.tensor([80.0, 5.0]), coefficients=[[0.0, 0.0]], parameterization=EDM)
    # float32 SIGMAS of the same schedule are accepted (the float64 values are used), one callback per step
    seen = []
    out = sample_fitted_multistep(model, x, torch.tensor(sigmas, dtype=torch.float32), callback=seen.append,
                                  coefficients=coefficients, fitted_sigmas=sigmas, parameterization=EDM)
    assert torch.isfinite(out).all() and [s["i"] for s in seen] == [0, 1, 2] and model.nfe == 3


def test_store_keeps_the_coefficients_and_refuses_bad_ones(tmp_path):
    record = ScheduleRecord(sigmas=[80.0, 5.0, 0.0], nfe=2, solver={"solver": "fitted", "options": {"history": 3}},
                            coefficients=[[0.1, -0.2], [0.3]])
    again = ScheduleRecord.from_json(record.to_json())
    assert again.coefficients == [[0.1, -0.2], [0.3]] and again.solver["solver"] == "fitted"
    with pytest.raises(ValueError, match="one entry per step"):
        ScheduleRecord(sigmas=[80.0, 5.0, 0.0], nfe=2, solver={}, coefficients=[[0.1]])
    with pytest.raises(ValueError, match="step 2 must be a list of finite numbers"):
        ScheduleRecord.from_json('{"sigmas": [80, 5, 0], "coefficients": [[0.1, 0.2], ["x"]]}')
