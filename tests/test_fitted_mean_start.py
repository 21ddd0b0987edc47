"""The fitted solver's mean first step and its end-to-end refinement."""

from __future__ import annotations

import math

import pytest
import torch
from comfyui_fewstep.samplers import analytic
from comfyui_fewstep.samplers import calibration as cal
from comfyui_fewstep.samplers.fitted import fit_fitted_multistep, regressor_count, sample_fitted_multistep
from comfyui_fewstep.samplers.fitted_refine import _run as refine_run
from comfyui_fewstep.samplers.fitted_refine import (MAX_TRIALS, _jacobian, fd_step_for, jacobian_calls,
                                                    refine_fitted)
from comfyui_fewstep.samplers.parameterization import Parameterization
from comfyui_fewstep.samplers.schedule_store import ScheduleRecord, encode_first_prediction

pytestmark = pytest.mark.usefixtures("one_thread")

EDM = Parameterization("ve", 0.002, 80.0, "edm")
FLOW = Parameterization("flow", 0.001, 1.0, "flow")


def _f64(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


class ShiftedGaussian:
    """``x0 ~ N(m, c^2 I)`` in VE form: ``D(x, sigma) = m + c^2 / (c^2 + sigma^2) (x - m)`` and the
    ODE flow ``x(sigma) = m + sqrt((c^2 + sigma^2) / (c^2 + sigma_T^2)) (x_T - m)``; the model is
    differentiable in ``x`` and ``sigma``."""

    def __init__(self, dim: int = 16, c: float = 0.5) -> None:
        self.m = torch.linspace(-1.0, 2.0, dim, dtype=torch.float64)
        self.c, self.nfe = c, 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **_: object) -> torch.Tensor:
        self.nfe += 1
        k = self.c**2 / (self.c**2 + sigma.to(torch.float64).reshape(-1, 1) ** 2)
        return (self.m + k * (x.to(torch.float64) - self.m)).to(x.dtype)

    def solution(self, x: torch.Tensor, sigma_start: float) -> torch.Tensor:
        return self.m + self.c / math.sqrt(self.c**2 + sigma_start**2) * (x - self.m)


def test_mean_first_step_makes_no_model_call_and_runs_the_given_prediction():
    """The first step uses ``first_prediction`` for every sample; the run equals one whose model
    returns it at sigma_max, with one model call fewer."""
    model = ShiftedGaussian()
    x = torch.randn(5, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 80.0
    sigmas = torch.tensor([80.0, 6.0, 1.0, 0.1, 0.0], dtype=torch.float64)
    coefficients = [[0.1 * (n + 1)] * regressor_count(n, 4) for n in range(4)]
    mu = torch.randn(1, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def stand_in(xx, sigma, **kw):
        return mu.expand_as(xx) if float(sigma[0]) == 80.0 else model(xx, sigma, **kw)

    seen = []
    out = sample_fitted_multistep(model, x, sigmas, callback=seen.append, coefficients=coefficients,
                                  parameterization=EDM, first_prediction=mu)
    assert model.nfe == 3 and [s["i"] for s in seen] == [0, 1, 2, 3]
    torch.testing.assert_close(seen[0]["denoised"], mu.expand_as(x))
    ref = sample_fitted_multistep(stand_in, x, sigmas, coefficients=coefficients, parameterization=EDM)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_mean_first_step_is_exact_on_shifted_gaussian_data():
    """With data mean m != 0 the prediction at sigma_max is (1 - k) m + k x; from antithetic
    calibration noise the teacher's mean prediction is exactly (1 - k) m, the fitted weight on x
    absorbs the rest, and 2 model calls run 3 steps exactly on noise never seen."""
    model = ShiftedGaussian()
    half = torch.randn(4, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 80.0
    x_cal = torch.cat([half, -half])
    teacher = cal.run_teacher(model, x_cal, EDM, grid_points=40, substeps=3)
    mu = teacher.ds[0].mean(0, keepdim=True).to(torch.float64)
    k = model.c**2 / (model.c**2 + 80.0**2)
    torch.testing.assert_close(mu[0], (1 - k) * model.m, rtol=1e-5, atol=1e-7)
    sigmas = [80.0, teacher.sigmas[12], teacher.sigmas[25], 0.0]
    _, coefficients = fit_fitted_multistep(model, x_cal, sigmas, lambda n, s: teacher.state_at(s, EDM), EDM,
                                           first_prediction=mu)
    x = torch.randn(64, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 80.0
    model.nfe = 0
    out = sample_fitted_multistep(model, x, _f64(sigmas), coefficients=coefficients,
                                  parameterization=EDM, first_prediction=mu)
    exact = model.solution(x, 80.0)
    assert model.nfe == 2
    assert float((out - exact).norm() / exact.norm()) < 1e-5


@pytest.mark.parametrize("p", [EDM, FLOW], ids=["ve", "flow"])
@pytest.mark.parametrize("mean_first", [False, True])
def test_differentiable_run_is_the_sampler(p, mean_first):
    """The refinement's run (step coefficients from lambda tensors) gives the sampler's output."""
    problem = analytic.make_problem("edm" if p is EDM else "flow_shift3", "gmm16", n_samples=8, seed=0)
    grid = cal.teacher_grid(p, 9)
    sigmas = [grid[0], grid[3], grid[5], grid[8], 0.0]
    n_steps = len(sigmas) - 1
    coefficients = [[0.05 * (n + 1) * (-1) ** i for i in range(regressor_count(n, n_steps))]
                    for n in range(n_steps)]
    mu = problem.x_start[:1].clone() * 0.01 if mean_first else None
    x = problem.x_start.double()
    ours = sample_fitted_multistep(problem.denoiser(), x, _f64(sigmas),
                                   coefficients=coefficients, parameterization=p, first_prediction=mu)
    lam = torch.tensor([p.lambda_(s) for s in sigmas[1:-1]], dtype=torch.float64)
    weights = [torch.tensor(row, dtype=torch.float64) for row in coefficients]
    theirs = refine_run(problem.denoiser(), x, p.lambda_(sigmas[0]), sigmas[0], lam, weights, p, 3, mu, {})
    torch.testing.assert_close(theirs, ours, rtol=1e-9, atol=1e-9)


def test_refinement_lowers_the_calibration_error_and_keeps_the_constraints():
    problem = analytic.make_problem("edm", "gmm16", n_samples=8, seed=0)
    p = problem.range.parameterization()
    x = problem.mixture.sample(cal.MIN_REFINE_SEEDS, p.sigma_max, problem.form,
                               generator=torch.Generator().manual_seed(5))
    model = problem.denoiser()
    teacher = cal.run_teacher(model, x, p, grid_points=60, substeps=3)
    spec = cal.SolverSpec("fitted", {"first_step": "mean"})
    with pytest.raises(cal.CalibrationError, match=f"at least {cal.MIN_REFINE_SEEDS} calibration seeds"):
        cal.calibrate(model, x[:cal.MIN_REFINE_SEEDS - 1], p, 4, spec, grid_points=60, refine_iterations=5)
    plain = cal.calibrate(model, x, p, 4, spec, grid_points=60, search_nfe=80, teacher=teacher)
    model.reset()
    refined = cal.calibrate(model, x, p, 4, spec, grid_points=60, search_nfe=80, teacher=teacher,
                            refine_iterations=4)
    assert refined.error < 0.9 * plain.error
    # every call is counted: the search's and the refinement's (Jacobians, tried steps)
    jacobian = jacobian_calls(5)  # 4 calls, 5 steps with the mean first step
    assert jacobian + 4 <= refined.cost["refine_nfe"] <= 4 * (jacobian + MAX_TRIALS * 4)
    assert refined.cost["search_nfe"] + refined.cost["refine_nfe"] <= (
        cal.expected_calls(spec, 4, grid_points=60, search_nfe=80, refine_iterations=4) - 59 * 3 - 1
        + 4 * (MAX_TRIALS - 1) * 4)  # the expected count assumes one tried step per iteration
    assert refined.cost["search_nfe"] + refined.cost["refine_nfe"] == refined.cost["total_nfe"] == model.nfe
    s = refined.sigmas
    assert s[0] == plain.sigmas[0] == p.sigma_max and s[-1] == 0.0 and len(s) == 6
    assert all(a > b for a, b in zip(s, s[1:])) and s[-2] >= p.sigma_min * (1 - 1e-9)
    # the stored error is the sampler's own, on the calibration noise
    out = spec.run(problem.denoiser(), x, _f64(s), p, coefficients=refined.coefficients,
                   first_prediction=refined.first_prediction)
    assert cal.end_error(out, teacher.end) == pytest.approx(refined.error, rel=1e-9)


@pytest.mark.parametrize("mean_first", [False, True])
def test_jacobian_columns_resume_from_the_trace_at_the_cost_of_the_later_steps(mean_first):
    """Each forward-difference column equals one from a full run; a column of step n's weights or of
    lambda_(n+1) costs only the calls of the steps after n (none for the last step's weights)."""
    problem = analytic.make_problem("edm", "gmm16", n_samples=8, seed=0)
    p = problem.range.parameterization()
    grid = cal.teacher_grid(p, 9)
    sigmas = [grid[0], grid[3], grid[5], grid[8], 0.0]
    n_steps = len(sigmas) - 1
    sizes = [regressor_count(n, n_steps) for n in range(n_steps)]
    coefficients = [[0.02 * (n + 1) * (-1) ** i for i in range(k)] for n, k in enumerate(sizes)]
    mu = problem.x_start[:1].clone() * 0.01 if mean_first else None
    x = problem.x_start.double()
    model = problem.denoiser()
    theta = torch.tensor([*(v for row in coefficients for v in row), *(p.lambda_(v) for v in sigmas[1:-1])],
                         dtype=torch.float64)
    n_weights = sum(sizes)

    def run(params, trace=None, resume=None):
        weights = list(torch.split(params[:n_weights], sizes))
        return refine_run(model, x, p.lambda_(sigmas[0]), sigmas[0], params[n_weights:], weights, p, 3, mu,
                          {}, trace=trace, resume=resume).reshape(x.shape[0], -1)

    first_step = [n for n, k in enumerate(sizes) for _ in range(k)] + list(range(n_steps - 1))
    trace = []
    out = run(theta, trace)
    model.reset()
    jac = _jacobian(run, theta, out, trace, first_step, n_weights, 1e-4, p.lambda_(80.0), p.lambda_(0.002))
    calls_after = [n_steps - 1 - n for n in range(n_steps)]  # the model calls of the steps after step n
    assert model.nfe == sum(calls_after[n] for n in first_step) == jacobian_calls(n_steps)
    for j in (0, sizes[0], n_weights - 1, n_weights, theta.numel() - 1):
        trial = theta.clone()
        trial[j] += 1e-4
        full = ((run(trial) - out) / 1e-4).to(torch.float32)
        torch.testing.assert_close(jac[j], full, rtol=1e-4, atol=1e-6)
    assert float(jac[n_weights - 1].abs().max()) > 0.0  # the last step's weights move the end point


def test_refinement_never_returns_a_worse_start():
    """An exact fit has nothing to gain: the refinement returns it unchanged (or better)."""
    model = ShiftedGaussian()
    x = torch.randn(8, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 80.0
    teacher = cal.run_teacher(model, x, EDM, grid_points=30, substeps=3)
    sigmas = [80.0, teacher.sigmas[10], teacher.sigmas[20], 0.0]
    _, coefficients = fit_fitted_multistep(model, x, sigmas, lambda n, s: teacher.state_at(s, EDM), EDM)
    out = sample_fitted_multistep(model, x, _f64(sigmas), coefficients=coefficients,
                                  parameterization=EDM)
    start = cal.end_error(out, teacher.end)
    new_sigmas, new_coefficients, error = refine_fitted(model, x, sigmas, coefficients, teacher.end, EDM,
                                                        floor=EDM.lambda_(80.0), iterations=5)
    assert error <= start * (1 + 1e-12)
    out = sample_fitted_multistep(model, x, _f64(new_sigmas), coefficients=new_coefficients,
                                  parameterization=EDM)
    assert cal.end_error(out, teacher.end) == pytest.approx(error, rel=1e-9)


def test_refinement_needs_no_gradients_of_the_model():
    """Weights created under inference mode (as ComfyUI loads them) cannot be back-propagated
    through; the refinement runs forward only, inside inference mode too."""
    with torch.inference_mode():
        net = torch.nn.Linear(16, 16).double()
        net.weight.copy_(torch.eye(16, dtype=torch.float64) * 0.2)
        net.bias.zero_()
    base = ShiftedGaussian()

    def model(x, sigma, **kw):  # the exact denoiser plus a small term through inference-tensor weights
        return base(x, sigma) + 1e-3 * torch.tanh(net(x / 80.0))

    x = torch.randn(16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 80.0
    teacher = cal.run_teacher(model, x, EDM, grid_points=30, substeps=3)
    sigmas = [80.0, teacher.sigmas[8], teacher.sigmas[16], teacher.sigmas[24], 0.0]
    _, coefficients = fit_fitted_multistep(model, x, sigmas, lambda n, s: teacher.state_at(s, EDM), EDM)
    with pytest.raises(RuntimeError, match="[Ii]nference tensors"):
        x_grad = x.clone().requires_grad_(True)
        net(x_grad).sum().backward()
    for mode in (torch.inference_mode, torch.no_grad):
        with mode():
            _, _, error = refine_fitted(model, x, sigmas, coefficients, teacher.end, EDM,
                                        floor=EDM.lambda_(80.0), iterations=2)
        assert math.isfinite(error)


def test_forward_difference_step_follows_the_model_precision():
    """A model that computes in float16 rounds its output to about 1e-3: forward differences with
    float32's step mostly see that rounding, and the step for float16 refines much further."""
    assert fd_step_for(torch.float32) == fd_step_for(torch.float64) == 1e-3
    assert fd_step_for(torch.float16) == pytest.approx(math.sqrt(2.0**-10))
    assert fd_step_for(torch.bfloat16) == pytest.approx(math.sqrt(2.0**-7))
    problem = analytic.make_problem("edm", "gmm16", n_samples=8, seed=0)
    p = problem.range.parameterization()
    x = problem.mixture.sample(cal.MIN_REFINE_SEEDS, p.sigma_max, problem.form,
                               generator=torch.Generator().manual_seed(5))
    exact = problem.denoiser()

    def half_model(x, sigma, **_):
        return exact(x.half().double(), sigma).half().to(x.dtype)

    teacher = cal.run_teacher(half_model, x, p, grid_points=60, substeps=3)
    spec = cal.SolverSpec("fitted", {"first_step": "mean"})
    res = cal.calibrate(half_model, x, p, 6, spec, grid_points=60, search_nfe=80, teacher=teacher)
    errors = [refine_fitted(half_model, x, res.sigmas, res.coefficients, teacher.end, p, floor=p.lambda_(80.0),
                            first_prediction=res.first_prediction, fd_step=step)[2]
              for step in (fd_step_for(torch.float32), fd_step_for(torch.float16))]
    assert errors[1] < 0.8 * errors[0] < 0.8 * res.error


def test_calibrate_with_a_mean_first_step():
    """nfe calls run nfe + 1 steps; the result carries the first prediction in float32 values; the
    node's search budget is counted in model calls."""
    problem = analytic.make_problem("sd15", "gmm16", n_samples=8, seed=0)
    p = problem.range.parameterization()
    x = problem.mixture.sample(16, p.sigma_max, problem.form, generator=torch.Generator().manual_seed(5))
    spec = cal.SolverSpec("fitted", {"first_step": "mean"})
    assert spec.step_orders(5) == cal.SolverSpec("fitted").step_orders(6)
    res = cal.calibrate(problem.denoiser(), x, p, 5, spec, grid_points=40, search_nfe=100)
    assert res.nfe == 5 and len(res.sigmas) == 7 and len(res.coefficients) == 6
    assert res.first_prediction.shape == (1, *x.shape[1:]) and res.first_prediction.dtype == torch.float32
    model = problem.denoiser()
    spec.run(model, problem.x_start, _f64(res.sigmas), p, coefficients=res.coefficients,
             first_prediction=res.first_prediction)
    assert model.nfe == 5
    with pytest.raises(cal.CalibrationError, match="first_prediction"):
        spec.run(model, problem.x_start, _f64(res.sigmas), p,
                 coefficients=res.coefficients)
    with pytest.raises(cal.CalibrationError, match="needs the fitted solver"):
        cal.SolverSpec("multistep", {"first_step": "mean"})
    with pytest.raises(cal.CalibrationError, match="first_step must be one of"):
        cal.SolverSpec("fitted", {"first_step": "zero"})
    with pytest.raises(cal.CalibrationError, match="refines the fitted solver only"):
        cal.calibrate(problem.denoiser(), x, p, 5, cal.SolverSpec("multistep"), grid_points=40,
                      refine_iterations=3)


def test_first_prediction_is_checked_against_the_latents():
    model = ShiftedGaussian()
    x = torch.zeros(2, 16, dtype=torch.float64)
    sigmas = torch.tensor([80.0, 1.0, 0.0], dtype=torch.float64)
    coefficients = [[0.0, 0.0], [0.0]]
    with pytest.raises(ValueError, match=r"latents of shape \[8\] but got \[16\]: calibrate again"):
        sample_fitted_multistep(model, x, sigmas, coefficients=coefficients, parameterization=EDM,
                                first_prediction=torch.zeros(1, 8))
    with pytest.raises(ValueError, match="inpainting"):
        mask = {"denoise_mask": torch.ones(2, 16)}
        sample_fitted_multistep(model, x, sigmas, mask, coefficients=coefficients, parameterization=EDM,
                                first_prediction=torch.zeros(1, 16))


def test_store_keeps_the_first_prediction_bound_to_the_schedule():
    mu = torch.randn(1, 4, 3, 2, generator=torch.Generator().manual_seed(0))
    solver = {"solver": "fitted", "options": {"history": 3, "first_step": "mean"}}
    record = ScheduleRecord(sigmas=[80.0, 5.0, 0.0], nfe=1, solver=solver, coefficients=[[0.1, -0.2], [0.3]],
                            first_prediction=encode_first_prediction(mu))
    again = ScheduleRecord.from_json(record.to_json())
    assert torch.equal(again.first_prediction_tensor(), mu)
    data = record.to_json()
    other = encode_first_prediction(mu + 1.0)["float32_base64"]
    with pytest.raises(ValueError, match="fitted_digest does not match"):
        ScheduleRecord.from_json(data.replace(record.first_prediction["float32_base64"], other))
    with pytest.raises(ValueError, match="no 'first_prediction'"):
        ScheduleRecord(sigmas=[80.0, 5.0, 0.0], nfe=1, solver=solver, coefficients=[[0.1, -0.2], [0.3]])
    with pytest.raises(ValueError, match="holds 23 values, its shape"):
        bad = dict(encode_first_prediction(mu[..., :1].reshape(1, 12).repeat(1, 2)[:, :23]))
        bad["shape"] = [1, 4, 3, 2]
        ScheduleRecord(sigmas=[80.0, 5.0, 0.0], nfe=1, solver=solver, coefficients=[[0.1, -0.2], [0.3]],
                       first_prediction=bad)
    with pytest.raises(ValueError, match="not base64"):
        ScheduleRecord(sigmas=[80.0, 5.0, 0.0], nfe=1, solver=solver, coefficients=[[0.1, -0.2], [0.3]],
                       first_prediction={"shape": [1, 2], "float32_base64": "@@@"})
    nan = encode_first_prediction(torch.tensor([[math.nan, 1.0]]))
    with pytest.raises(ValueError, match="non-finite"):
        ScheduleRecord(sigmas=[80.0, 5.0, 0.0], nfe=1, solver=solver, coefficients=[[0.1, -0.2], [0.3]],
                       first_prediction=nan)


def test_refinement_stops_on_a_model_that_turns_non_finite(caplog):
    """NaN from a perturbed run (a model that breaks part-way) stops the refinement with a warning
    and returns the start, never NaN parameters."""
    base = ShiftedGaussian()
    calls = {"n": 0, "finite": 4}  # the unperturbed run: 4 steps, 4 calls

    def model(x, sigma, **_):
        calls["n"] += 1
        out = base(x, sigma)
        return out if calls["n"] <= calls["finite"] else out * float("nan")

    x = torch.randn(8, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 80.0
    teacher = cal.run_teacher(base, x, EDM, grid_points=30, substeps=3)
    sigmas = [80.0, teacher.sigmas[8], teacher.sigmas[16], teacher.sigmas[24], 0.0]
    _, coefficients = fit_fitted_multistep(base, x, sigmas, lambda n, s: teacher.state_at(s, EDM), EDM)
    out = sample_fitted_multistep(base, x, _f64(sigmas), coefficients=coefficients, parameterization=EDM)
    with caplog.at_level("WARNING"):
        new_sigmas, new_coefficients, error = refine_fitted(model, x, sigmas, coefficients, teacher.end, EDM,
                                                            floor=EDM.lambda_(80.0), iterations=3)
    assert calls["n"] > calls["finite"]  # the perturbed runs were made, and turned NaN
    assert "a perturbed run was not finite" in caplog.text
    assert new_sigmas == pytest.approx(sigmas, rel=1e-12)
    assert all(a == pytest.approx(b) for a, b in zip(new_coefficients, coefficients, strict=True))
    assert error == pytest.approx(cal.end_error(out, teacher.end), rel=1e-9)
