"""The benchmark's driver of ComfyUI's samplers: start states and deterministic sampler configurations."""

from __future__ import annotations

import pytest
import torch

from comfyui_fewstep.samplers import analytic

pytestmark = [pytest.mark.comfy, pytest.mark.usefixtures("one_thread")]


def _model_sampling(bench_comfy, range_name: str):
    return bench_comfy.model_sampling_for(bench_comfy.import_comfy(), analytic.RANGE_PRESETS[range_name])


@pytest.mark.parametrize("range_name", ["sd15", "edm", "flow_shift1", "flow_shift3"])
def test_a_schedule_from_sigma_max_starts_at_the_marginal_sample(bench_comfy, range_name):
    comfy = bench_comfy.import_comfy()
    ms = _model_sampling(bench_comfy, range_name)
    problem = analytic.make_problem(range_name, "gmm2", n_samples=8)
    sigmas = bench_comfy.comfy_sigmas(comfy, ms, "simple", 5, "euler")
    assert torch.equal(bench_comfy.start_state(ms, sigmas, problem.x_start, problem.noise), problem.x_start)


@pytest.mark.parametrize("range_name", ["sd15", "edm", "flow_shift1", "flow_shift3"])
def test_ddim_uniform_starts_lower_from_the_same_noise(bench_comfy, range_name):
    """ComfyUI's ``ddim_uniform`` starts below sigma_max; KSampler then starts from the noise times
    that sigma (an empty latent adds nothing), for eps, EDM and flow models alike."""
    comfy = bench_comfy.import_comfy()
    ms = _model_sampling(bench_comfy, range_name)
    problem = analytic.make_problem(range_name, "gmm2", n_samples=8)
    sigmas = bench_comfy.comfy_sigmas(comfy, ms, "ddim_uniform", 5, "euler")
    sigma0 = float(sigmas[0])
    assert sigma0 < 0.95 * problem.range.sigma_max
    x = bench_comfy.start_state(ms, sigmas, problem.x_start, problem.noise)
    torch.testing.assert_close(x, sigma0 * problem.noise, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="noise"):
        bench_comfy.start_state(ms, sigmas, problem.x_start, None)


@pytest.mark.parametrize("name", ["er_sde(ode)", "sa_solver(eta=0)", "sa_solver_pece(eta=0)"])
@pytest.mark.parametrize("range_name", ["edm", "flow_shift3"])
def test_deterministic_configurations_solve_the_ode(bench_comfy, name, range_name):
    """The ODE configurations of ER-SDE and SA-Solver that ComfyUI's nodes offer: the same output for
    any seed, converging to the exact ODE solution on Gaussian data as the steps grow."""
    comfy = bench_comfy.import_comfy()
    samplers, _ = bench_comfy.sampler_list(comfy)
    sampler = next(s for s in samplers if s.name == name)
    assert not sampler.stochastic
    fn, options = bench_comfy.sampler_function(comfy, sampler)
    rng = analytic.RANGE_PRESETS[range_name]
    ms = _model_sampling(bench_comfy, range_name)
    data = analytic.GaussianData(c=0.7, dim=4)
    x = data.sample(64, rng.sigma_max, rng.form, generator=torch.Generator().manual_seed(0))
    exact = data.ode_solution(x, rng.sigma_max, 0.0, rng.form)
    scheduler = "karras" if range_name == "edm" else "simple"
    errors = []
    for steps in (10, 40):
        sigmas = bench_comfy.comfy_sigmas(comfy, ms, scheduler, steps, name)
        model = bench_comfy.ComfyModel(analytic.CountingDenoiser(data, rng.form), ms)
        outs = [fn(model, x.float(), sigmas.clone(), extra_args={"seed": seed}, callback=None, disable=True,
                   **options) for seed in (0, 1)]
        assert torch.equal(outs[0], outs[1])
        errors.append(float((outs[0].double() - exact).abs().max()))
    assert errors[1] < 0.05
    assert errors[1] < errors[0] / 10  # 4x the steps: at least 10x closer (they are 2nd to 3rd order)
