"""Tier-1 accuracy: DPM-Solver++ samplers against Euler on exact Gaussian-mixture problems.

Each problem draws noise from the exact marginal at the model family's ``sigma_max`` and
compares every sampler's output with the probability-flow ODE solution at sigma = 0
(DOP853 reference, :mod:`comfyui_fewstep.samplers.analytic`). Errors are per-sample RMS: the
median and the 90th percentile, and the mode-flip rate (samples that end nearest another
component than the reference). Two mixtures (8-D with widths 0.05-0.3, 32-D with widths
0.1-0.3) at four sigma ranges, and a narrow one (32-D, widths 0.02-0.1) where few-step
high-order extrapolation overshoots (at 5 NFE 2M/3M lose to Euler there: see the last test).
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
from comfyui_fewstep.samplers.budget import steps_for_nfe

multistep = pytest.importorskip("comfyui_fewstep.samplers.multistep", reason="samplers/multistep.py not present")
schedules = pytest.importorskip("comfyui_fewstep.samplers.schedules", reason="samplers/schedules.py not present")
singlestep = pytest.importorskip("comfyui_fewstep.samplers.singlestep", reason="samplers/singlestep.py not present")

RANGES = ("sd15", "edm", "flow_shift1", "flow_shift3")
NFES = (5, 10, 20)
OUR_SCHEDULES = ("logsnr_uniform", "time_uniform")
EULER_SCHEDULES = ("logsnr_uniform", "time_uniform", "karras", "exponential")
MIXTURES = (MixturePreset("tier1", dim=8, n_components=6, std_range=(0.05, 0.3), seed=3),
            MixturePreset("tier1_wide32", dim=32, n_components=8, std_range=(0.1, 0.3), seed=4))
NARROW = MixturePreset("tier1_narrow32", dim=32, n_components=8, std_range=(0.02, 0.1), seed=4)


def euler(model, x, sigmas):
    """Euler on the probability-flow ODE ``dx/dsigma = (x - D) / sigma`` (same in VE and flow form)."""
    s = [float(v) for v in sigmas]
    for i in range(len(s) - 1):
        denoised = model(x, torch.full((x.shape[0],), s[i], dtype=x.dtype))
        x = x + (x - denoised) / s[i] * (s[i + 1] - s[i])
    return x


class Tier1:
    def __init__(self, range_name: str, mixture: MixturePreset) -> None:
        self.range = RANGE_PRESETS[range_name]
        self.p = self.range.parameterization()
        self.mixture = mixture.build()
        self.name = f"{range_name}/{mixture.name}"
        g = torch.Generator().manual_seed(0)
        self.x = self.mixture.sample(128, self.range.sigma_max, self.range.form, generator=g)
        self.reference = self.mixture.ode_solution(self.x, self.range.sigma_max, 0.0, self.range.form)

    def model(self) -> CountingDenoiser:
        return CountingDenoiser(self.mixture, self.range.form)

    def median(self, out: torch.Tensor) -> float:
        return float(per_sample_rms(out, self.reference).median())

    def stats(self, out: torch.Tensor) -> tuple[float, float, float]:
        """Median and 90th-percentile error, and the mode-flip rate."""
        err = per_sample_rms(out, self.reference)
        flips = (self.mixture.nearest_component(out) != self.mixture.nearest_component(self.reference))
        return float(err.median()), float(torch.quantile(err, 0.9)), float(flips.to(torch.float64).mean())

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
        orders = list(steps_for_nfe("singlestep", nfe, order).orders)
        sigmas = schedules.get_sigmas(schedule, len(orders), self.p)
        out = singlestep.sample_dpmpp_singlestep(
            model, self.x, sigmas, parameterization=self.p, orders=orders, disable=True
        )
        return self.median(out), model.nfe


@pytest.fixture(scope="module", params=RANGES)
def problem(request) -> Tier1:
    """The 8-D mixture: the few-step claims (5-10 NFE) are checked on it."""
    torch.set_num_threads(1)  # tiny tensors: the thread pool only adds overhead
    return Tier1(request.param, MIXTURES[0])


@pytest.fixture(scope="module", params=[(r, m) for m in MIXTURES for r in RANGES],
                ids=[f"{r}-{m.name}" for m in MIXTURES for r in RANGES])
def any_problem(request) -> Tier1:
    """Both mixtures: on the 32-D one, Euler on its best schedule still beats 2M/3M at 5 NFE on
    EDM and 3M at 10 NFE on EDM and flow, so only the claims that hold on both are checked."""
    torch.set_num_threads(1)
    return Tier1(*request.param)


def test_multistep_beats_euler_at_equal_nfe(problem):
    # best of our 2M/3M presets against Euler on its best schedule, same NFE
    limits = {5: 0.95, 10: 0.75, 20: 0.35}
    for nfe in NFES:
        ours = min(problem.multistep(s, nfe, order)[0] for s in OUR_SCHEDULES for order in (2, 3))
        base = min(problem.euler(s, nfe) for s in EULER_SCHEDULES)
        assert ours < limits[nfe] * base, f"{problem.name} NFE {nfe}: ours {ours:.4f}, Euler {base:.4f}"


def test_each_multistep_order_beats_euler_on_the_same_schedule(problem):
    # the gain of a higher order grows with the NFE (3M on flow: 0.81x Euler at 10, 0.23x at 20)
    for nfe, limit in ((10, 0.85), (20, 0.5)):
        base = problem.euler("logsnr_uniform", nfe)
        for order in (2, 3):
            err, _ = problem.multistep("logsnr_uniform", nfe, order)
            assert err < limit * base, f"{problem.name} {order}M NFE {nfe}: {err:.4f} vs Euler {base:.4f}"


def test_errors_shrink_with_nfe(any_problem):
    for order in (2, 3):
        e5, e10, e20 = (any_problem.multistep("logsnr_uniform", n, order)[0] for n in NFES)
        # 3M is not yet in its asymptotic range at 10 NFE on the 32-D flow mixture (0.082 at 5,
        # 0.106 at 10, 0.009 at 20): there only 20 NFE has to beat both
        assert e5 > e20 and e10 > e20, f"{any_problem.name} {order}M: {e5:.4f}, {e10:.4f}, {e20:.4f}"
        assert order == 3 or e5 > e10, f"{any_problem.name} {order}M: {e5:.4f}, {e10:.4f}, {e20:.4f}"
        # second order or better: doubling the NFE cuts the error by more than 2x
        assert e10 / e20 > 2.0, f"{any_problem.name} {order}M: {e10:.4f} -> {e20:.4f}"
    # 3S: 10 -> 30 NFE (on the 32-D flow mixtures 3S at 20 NFE is no better than at 10: 0.0091 and
    # 0.0087 against 0.0135 and 0.0078, with 0.0048 and 0.0077 at 15 and 0.0021 and 0.0019 at 30)
    s10, s30 = any_problem.singlestep("logsnr_uniform", 10)[0], any_problem.singlestep("logsnr_uniform", 30)[0]
    assert s30 < 0.6 * s10


def test_singlestep_and_corrector_beat_euler_at_20_nfe(any_problem):
    base = min(any_problem.euler(s, 20) for s in EULER_SCHEDULES)
    single = min(any_problem.singlestep(s, 20)[0] for s in ("logsnr_uniform", "karras"))
    assert single < 0.9 * base, f"{any_problem.name}: 3S {single:.4f} vs Euler {base:.4f}"
    unipc, _ = any_problem.multistep("logsnr_uniform", 20, 2, corrector="bh2")
    assert unipc < 0.35 * base, f"{any_problem.name}: 2M+UniC {unipc:.4f} vs Euler {base:.4f}"


@pytest.mark.parametrize("nfe", [4, 5, 8])
def test_nfe_consumed_equals_planned(any_problem, nfe):
    problem = any_problem
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


def _tails_and_flips_against_euler(problem, nfes):
    for nfe in nfes:
        sigmas = schedules.get_sigmas("logsnr_uniform", nfe, problem.p)
        model = problem.model()
        ours = problem.stats(multistep.sample_dpmpp_multistep(model, problem.x, sigmas, parameterization=problem.p,
                                                              order=2, resume_history=False, disable=True))
        assert model.nfe == nfe
        base = problem.stats(euler(problem.model(), problem.x, sigmas))
        assert ours[1] < base[1], f"{problem.name} NFE {nfe}: p90 {ours[1]:.4f} vs Euler {base[1]:.4f}"
        assert ours[2] <= base[2] + 1 / 128, f"{problem.name} NFE {nfe}: flips {ours[2]:.3f} vs Euler {base[2]:.3f}"
        assert ours[0] < base[0], f"{problem.name} NFE {nfe}: median {ours[0]:.4f} vs Euler {base[0]:.4f}"


def test_tails_and_mode_flips_no_worse_than_euler(any_problem):
    """Beyond the median: our 2M's 90th-percentile error is below Euler's on the same schedule,
    and it sends no more samples into another mixture component (one sample of slack in 128)."""
    _tails_and_flips_against_euler(any_problem, (10, 20))


@pytest.mark.parametrize("range_name", RANGES)
def test_narrow_components_need_more_steps_for_high_order_to_pay(range_name):
    """Components 0.02-0.1 wide: the data prediction turns sharply at low noise, and a 2-step
    extrapolation overshoots. At 5 NFE 2M on logsnr_uniform is worse than Euler (a recorded
    property, not a target); from 20 NFE on it is better in median, tail and flips. On the SD1.5
    range both end on the same floor (sigma_min 0.029 is as wide as the components)."""
    torch.set_num_threads(1)
    problem = Tier1(range_name, NARROW)
    if range_name != "sd15":
        assert problem.multistep("logsnr_uniform", 5, 2)[0] > problem.euler("logsnr_uniform", 5)
    _tails_and_flips_against_euler(problem, (20, 40))
