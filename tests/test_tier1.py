"""Tier-1 accuracy: DPM-Solver++ samplers against Euler on an exact Gaussian-mixture problem.

Each problem draws noise from the exact marginal at the model family's ``sigma_max`` and
compares every sampler's output with the probability-flow ODE solution at sigma = 0
(DOP853 reference, :mod:`comfyui_fewstep.samplers.analytic`). Errors are per-sample RMS; the
median is reported, as mode flips make the mean noisy.
"""

from __future__ import annotations

import pytest
import torch

from comfyui_fewstep.samplers.analytic import (
    RANGE_PRESETS,
    CountingDenoiser,
    MixturePreset,
    per_sample_rms,
)

multistep = pytest.importorskip("comfyui_fewstep.samplers.multistep", reason="samplers/multistep.py not present")
schedules = pytest.importorskip("comfyui_fewstep.samplers.schedules", reason="samplers/schedules.py not present")
singlestep = pytest.importorskip("comfyui_fewstep.samplers.singlestep", reason="samplers/singlestep.py not present")

RANGES = ("sd15", "edm", "flow_shift1", "flow_shift3")
NFES = (5, 10, 20)
OUR_SCHEDULES = ("logsnr_uniform", "time_uniform")
EULER_SCHEDULES = ("logsnr_uniform", "time_uniform", "karras", "exponential")
MIXTURE = MixturePreset("tier1", dim=8, n_components=6, std_range=(0.05, 0.3), seed=3)


def euler(model, x, sigmas):
    """Euler on the probability-flow ODE ``dx/dsigma = (x - D) / sigma`` (same in VE and flow form)."""
    s = [float(v) for v in sigmas]
    for i in range(len(s) - 1):
        denoised = model(x, torch.full((x.shape[0],), s[i], dtype=x.dtype))
        x = x + (x - denoised) / s[i] * (s[i + 1] - s[i])
    return x


class Tier1:
    def __init__(self, range_name: str) -> None:
        self.range = RANGE_PRESETS[range_name]
        self.p = self.range.parameterization()
        self.mixture = MIXTURE.build()
        g = torch.Generator().manual_seed(0)
        self.x = self.mixture.sample(128, self.range.sigma_max, self.range.form, generator=g)
        self.reference = self.mixture.ode_solution(self.x, self.range.sigma_max, 0.0, self.range.form)

    def model(self) -> CountingDenoiser:
        return CountingDenoiser(self.mixture, self.range.form)

    def median(self, out: torch.Tensor) -> float:
        return float(per_sample_rms(out, self.reference).median())

    def euler(self, schedule: str, nfe: int) -> float:
        model = self.model()
        out = euler(model, self.x, schedules.get_sigmas(schedule, nfe, self.p))
        assert model.nfe == nfe
        return self.median(out)

    def multistep(self, schedule: str, nfe: int, order: int, **options) -> tuple[float, int]:
        model = self.model()
        sigmas = schedules.get_sigmas(schedule, nfe, self.p)
        out = multistep.sample_dpmpp_multistep(
            model, self.x, sigmas, parameterization=self.p, order=order, resume_history=False, disable=True, **options
        )
        return self.median(out), model.nfe

    def singlestep(self, schedule: str, nfe: int, order: int = 3) -> tuple[float, int]:
        model = self.model()
        orders = singlestep.singlestep_orders(nfe - 1, order) + [1]
        sigmas = schedules.get_sigmas(schedule, len(orders), self.p)
        out = singlestep.sample_dpmpp_singlestep(
            model, self.x, sigmas, parameterization=self.p, orders=orders, disable=True
        )
        return self.median(out), model.nfe


@pytest.fixture(scope="module", params=RANGES)
def problem(request) -> Tier1:
    torch.set_num_threads(1)  # tiny tensors: the thread pool only adds overhead
    return Tier1(request.param)


def test_multistep_beats_euler_at_equal_nfe(problem):
    # best of our 2M/3M presets against Euler on its best schedule, same NFE
    limits = {5: 0.95, 10: 0.75, 20: 0.35}
    for nfe in NFES:
        ours = min(problem.multistep(s, nfe, order)[0] for s in OUR_SCHEDULES for order in (2, 3))
        base = min(problem.euler(s, nfe) for s in EULER_SCHEDULES)
        assert ours < limits[nfe] * base, f"{problem.range.name} NFE {nfe}: ours {ours:.4f}, Euler {base:.4f}"


def test_each_multistep_order_beats_euler_on_the_same_schedule(problem):
    for nfe in (10, 20):
        base = problem.euler("logsnr_uniform", nfe)
        for order in (2, 3):
            err, _ = problem.multistep("logsnr_uniform", nfe, order)
            assert err < 0.8 * base, f"{problem.range.name} {order}M NFE {nfe}: {err:.4f} vs Euler {base:.4f}"


def test_errors_shrink_with_nfe(problem):
    for order in (2, 3):
        e5, e10, e20 = (problem.multistep("logsnr_uniform", n, order)[0] for n in NFES)
        assert e5 > e10 > e20, f"{problem.range.name} {order}M: {e5:.4f}, {e10:.4f}, {e20:.4f}"
        # second order or better: doubling the NFE cuts the error by more than 2x
        assert e10 / e20 > 2.0, f"{problem.range.name} {order}M: {e10:.4f} -> {e20:.4f}"
    s10, s20 = problem.singlestep("logsnr_uniform", 10)[0], problem.singlestep("logsnr_uniform", 20)[0]
    assert s20 < 0.6 * s10


def test_singlestep_and_corrector_beat_euler_at_20_nfe(problem):
    base = min(problem.euler(s, 20) for s in EULER_SCHEDULES)
    single = min(problem.singlestep(s, 20)[0] for s in ("logsnr_uniform", "karras"))
    assert single < 0.9 * base, f"{problem.range.name}: 3S {single:.4f} vs Euler {base:.4f}"
    unipc, _ = problem.multistep("logsnr_uniform", 20, 2, corrector="bh2")
    assert unipc < 0.35 * base, f"{problem.range.name}: 2M+UniC {unipc:.4f} vs Euler {base:.4f}"


@pytest.mark.parametrize("nfe", [4, 5, 8])
def test_nfe_consumed_equals_planned(problem, nfe):
    budget = pytest.importorskip("comfyui_fewstep.samplers.budget")
    for order in (1, 2, 3):
        plan = budget.steps_for_nfe("multistep", nfe, order)
        for corrector in ("none", "bh2"):
            _, used = problem.multistep("logsnr_uniform", plan.steps, order, corrector=corrector)
            assert used == plan.nfe == nfe
    for order in (2, 3):
        _, used = problem.singlestep("logsnr_uniform", nfe, order)
        assert used == nfe
    # the model is called at exactly the schedule's non-zero sigmas, in order
    model = problem.model()
    sigmas = schedules.get_sigmas("karras", nfe, problem.p)
    multistep.sample_dpmpp_multistep(model, problem.x, sigmas, parameterization=problem.p, order=2,
                                     resume_history=False, disable=True)
    assert model.sigmas == pytest.approx([float(s) for s in sigmas[:-1]], rel=1e-6)
