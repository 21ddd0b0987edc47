"""Multistep DPM-Solver(++) update rules against step-by-step transcriptions of the papers' formulas.

The references below are written from the equations (DPM-Solver++ arXiv 2211.01095 Alg. 2 and the
3rd-order multistep update; DPM-Solver arXiv 2206.00927 eq. 3.6; SDE-DPM-Solver++ §4) with
explicit exponentials, independently of the package's phi functions and step planner.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch

from comfyui_fewstep.samplers import history
from comfyui_fewstep.samplers._coefficients import plan_multistep, step_orders
from comfyui_fewstep.samplers._loop import NonFiniteModelOutputError
from comfyui_fewstep.samplers.multistep import (
    sample_dpmpp_2m,
    sample_dpmpp_3m_sde,
    sample_dpmpp_multistep,
)
from comfyui_fewstep.samplers.noise import PerSampleNoiseSampler
from comfyui_fewstep.samplers.parameterization import Parameterization

VE = Parameterization("ve", 0.0292, 14.61, family="eps")
FLOW = Parameterization("flow", 0.001, 1.0, family="flow")


def _alpha(p, s):
    return 1.0 if p.kind == "ve" else 1.0 - s


def _lam(p, s):
    return math.log(_alpha(p, s) / s)


class Model:
    """A nonlinear denoiser (so every difference term matters) that records its calls."""

    def __init__(self, p: Parameterization, c: float = 0.6):
        self.p, self.c, self.calls = p, c, []

    def __call__(self, x, sigma, **extra):
        s = float(sigma[0])
        self.calls.append(s)
        a = _alpha(self.p, s)
        return a * self.c**2 / (a * a * self.c**2 + s * s) * x + 0.3 * torch.tanh(x) * s / (1 + s)


def reference(p, model, x, sigmas, order, solver_type, w3=1.0, eta=0.0, noises=None, algorithm="++"):
    """Transcription of the multistep formulas; no lower-order-final, last step to 0 returns D."""
    ms, lams = [], []
    noises = list(noises or [])
    for i in range(len(sigmas) - 1):
        s, t = sigmas[i], sigmas[i + 1]
        D = model(x, torch.full((x.shape[0],), s, dtype=torch.float64))
        m = D if algorithm == "++" else (x - _alpha(p, s) * D) / s
        ms.insert(0, m)
        lams.insert(0, _lam(p, s))
        if t == 0.0:
            x = D
            continue
        lt = _lam(p, t)
        h = lt - lams[0]
        k = min(order, len(ms))
        at, as_ = _alpha(p, t), _alpha(p, s)
        if algorithm == "++":
            hh = (1 + eta) * h
            x_new = (t / s) * math.exp(-eta * h) * x + at * (1 - math.exp(-hh)) * m
            if k >= 2:
                r0 = (lams[0] - lams[1]) / h
                d1_0 = (ms[0] - ms[1]) / r0
                if k == 2:
                    if solver_type == "midpoint":
                        x_new = x_new + 0.5 * at * (1 - math.exp(-hh)) * d1_0
                    else:
                        x_new = x_new + at * (math.exp(-hh) - 1 + hh) / hh * d1_0
                else:
                    r1 = (lams[1] - lams[2]) / h
                    d1_1 = (ms[1] - ms[2]) / r1
                    d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
                    d2 = (d1_0 - d1_1) / (r0 + r1)
                    phi2 = (math.exp(-hh) - 1 + hh) / hh  # h phi_2(-h)
                    phi3 = (math.exp(-hh) - 1 + hh - hh * hh / 2) / (-hh * hh)  # h phi_3(-h)
                    x_new = x_new + at * phi2 * d1 + w3 * at * phi3 * d2
            if eta > 0:
                x_new = x_new + t * math.sqrt(1 - math.exp(-2 * eta * h)) * noises.pop(0)
        else:
            x_new = (at / as_) * x - t * (math.exp(h) - 1) * m
            if k >= 2:
                r0 = (lams[0] - lams[1]) / h
                d1_0 = (ms[0] - ms[1]) / r0
                if k == 2:
                    coef = 0.5 * (math.exp(h) - 1) if solver_type == "midpoint" else (math.exp(h) - 1 - h) / h
                    x_new = x_new - t * coef * d1_0
                else:
                    r1 = (lams[1] - lams[2]) / h
                    d1_1 = (ms[1] - ms[2]) / r1
                    d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
                    d2 = (d1_0 - d1_1) / (r0 + r1)
                    phi2 = (math.exp(h) - 1 - h) / h
                    phi3 = (math.exp(h) - 1 - h - h * h / 2) / (h * h)
                    x_new = x_new - t * phi2 * d1 - w3 * t * phi3 * d2
        x = x_new
    return x


SIGMAS_VE = [14.61, 9.0, 5.2, 3.1, 1.9, 1.1, 0.62, 0.3, 0.12, 0.0292, 0.0]
SIGMAS_FLOW = [0.97, 0.9, 0.8, 0.66, 0.5, 0.36, 0.22, 0.12, 0.05, 0.01, 0.0]


@pytest.fixture(autouse=True)
def _no_history():
    history.clear()
    yield
    history.clear()


def _x(p, n=6, d=5):
    g = torch.Generator().manual_seed(1)
    scale = SIGMAS_VE[0] if p.kind == "ve" else 1.0
    return torch.randn(n, d, generator=g, dtype=torch.float64) * scale


@pytest.mark.parametrize("p,sig", [(VE, SIGMAS_VE), (FLOW, SIGMAS_FLOW)], ids=["ve", "flow"])
@pytest.mark.parametrize(
    "order,solver_type,third_order",
    [(1, "midpoint", "official"), (2, "midpoint", "official"), (2, "heun", "official"),
     (3, "midpoint", "official"), (3, "heun", "official"), (3, "heun", "taylor")],
)
def test_dpmpp_ode_matches_paper_transcription(p, sig, order, solver_type, third_order):
    x = _x(p)
    ref = reference(p, Model(p), x, sig, order, solver_type, w3=2.0 if third_order == "taylor" else 1.0)
    out = sample_dpmpp_multistep(
        Model(p), x, torch.tensor(sig, dtype=torch.float64), parameterization=p, order=order,
        solver_type=solver_type, third_order=third_order, lower_order_final=False, disable=True,
    )
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("order,solver_type", [(1, "midpoint"), (2, "midpoint"), (2, "heun"), (3, "heun")])
def test_dpmsolver_noise_prediction_matches_transcription(order, solver_type):
    p = VE
    x = _x(p)
    ref = reference(p, Model(p), x, SIGMAS_VE, order, solver_type, algorithm="eps")
    out = sample_dpmpp_multistep(
        Model(p), x, torch.tensor(SIGMAS_VE, dtype=torch.float64), parameterization=p, order=order,
        solver_type=solver_type, algorithm="dpmsolver", lower_order_final=False, third_order="official",
        disable=True,
    )
    torch.testing.assert_close(out, ref, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("order,solver_type,eta,third_order", [
    (1, "midpoint", 1.0, "official"), (2, "midpoint", 0.5, "official"), (2, "heun", 1.0, "official"),
    (3, "heun", 0.7, "official"), (3, "heun", 0.7, "taylor"),
])
def test_sde_dpmpp_matches_transcription(order, solver_type, eta, third_order):
    p = FLOW
    x = _x(p)
    g = torch.Generator().manual_seed(7)
    noises = [torch.randn(x.shape, generator=g, dtype=torch.float64) for _ in SIGMAS_FLOW]
    w3 = 2.0 if third_order == "taylor" else 1.0
    ref = reference(p, Model(p), x, SIGMAS_FLOW, order, solver_type, w3=w3, eta=eta, noises=noises)
    it = iter(noises)
    out = sample_dpmpp_multistep(
        Model(p), x, torch.tensor(SIGMAS_FLOW, dtype=torch.float64), parameterization=p, order=order,
        solver_type=solver_type, eta=eta, noise_sampler=lambda s, t: next(it), lower_order_final=False,
        third_order=third_order, disable=True,
    )
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_sde_eta1_first_order_is_ddpm_posterior_step():
    """SDE-DPM-Solver++1 with eta=1: x_t = (s_t^2/s_s^2) x_s + a_t (1 - s_t^2 a_s^2/(s_s^2 a_t^2)) D + ..."""
    p = VE
    s, t = 2.0, 1.0
    x = torch.ones(1, 3, dtype=torch.float64)
    z = torch.full_like(x, 0.5)
    D = Model(p)(x, torch.tensor([s]))
    out = sample_dpmpp_multistep(Model(p), x, torch.tensor([s, t]), parameterization=p, order=1, eta=1.0,
                                 noise_sampler=lambda a, b: z, disable=True)
    # DDPM posterior mean and std in VE form: mean = t^2/s^2 x + (1 - t^2/s^2) D, std = t sqrt(1 - t^2/s^2)
    expected = (t * t / (s * s)) * x + (1 - t * t / (s * s)) * D + t * math.sqrt(1 - t * t / (s * s)) * z
    torch.testing.assert_close(out, expected, rtol=1e-13, atol=1e-13)


def test_sde_default_noise_is_seeded_and_batch_independent():
    p = VE
    x = _x(p, n=3)
    sig = torch.tensor(SIGMAS_VE, dtype=torch.float64)
    a = sample_dpmpp_multistep(Model(p), x, sig, extra_args={"seed": 5}, eta=1.0, disable=True)
    b = sample_dpmpp_multistep(Model(p), x, sig, extra_args={"seed": 5}, eta=1.0, disable=True)
    c = sample_dpmpp_multistep(Model(p), x[:1], sig, extra_args={"seed": 5}, eta=1.0, disable=True)
    d = sample_dpmpp_multistep(Model(p), x, sig, extra_args={"seed": 6}, eta=1.0, disable=True)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a[:1], c, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(a, d)


@pytest.mark.parametrize("order", [1, 2])
def test_sde_split_run_draws_the_unsplit_runs_noise(order):
    """A schedule split in two (SplitSigmas, a refiner hand-off) and sampled with the same seed
    draws, in each part, the noise the unsplit run draws at the same sigmas: the second part
    does not replay the first part's noise."""
    p = VE
    x = _x(p, n=2)
    sig = torch.tensor(SIGMAS_VE, dtype=torch.float64)
    k = len(SIGMAS_VE) // 2

    def run(x_in, sigmas, seen, **options):
        sampler = PerSampleNoiseSampler(x_in, 7)  # a new sampler per run, as the default is

        def draw(sigma, sigma_next):
            seen[float(sigma)] = sampler(sigma, sigma_next)
            return seen[float(sigma)]
        return sample_dpmpp_multistep(Model(p), x_in, sigmas, eta=1.0, order=order, noise_sampler=draw,
                                      disable=True, **options)

    full, part = {}, {}
    out = run(x, sig, full)
    end = run(run(x, sig[: k + 1], part), sig[k:], part, resume_history=False)
    assert set(part) == set(full) and len(full) == len(SIGMAS_VE) - 2  # no noise on the step to 0
    for sigma, noise in full.items():
        assert torch.equal(part[sigma], noise), sigma
    firsts = sorted(full, reverse=True)
    assert not torch.allclose(full[firsts[0]], full[firsts[k]])
    if order == 1:  # no history to lose at the split: the split run is the unsplit run
        torch.testing.assert_close(end, out, rtol=1e-12, atol=1e-12)
        options = {"extra_args": {"seed": 7}, "eta": 1.0, "order": 1, "disable": True}  # default noise
        mid = sample_dpmpp_multistep(Model(p), x, sig[: k + 1], **options)
        torch.testing.assert_close(
            sample_dpmpp_multistep(Model(p), mid, sig[k:], **options),
            sample_dpmpp_multistep(Model(p), x, sig, **options),
            rtol=1e-12, atol=1e-12,
        )


def test_s_noise_zero_equals_no_noise_at_same_eta():
    p = VE
    x = _x(p)
    sig = torch.tensor(SIGMAS_VE, dtype=torch.float64)
    a = sample_dpmpp_multistep(Model(p), x, sig, eta=0.5, s_noise=0.0, disable=True)
    ref = reference(p, Model(p), x, SIGMAS_VE, 2, "midpoint", eta=0.5, noises=[torch.zeros_like(x)] * 20)
    torch.testing.assert_close(a, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "n,order,hist,lof,lof_steps,euler,expected",
    [
        (5, 3, 0, True, 10, False, [1, 2, 3, 2, 1]),
        (5, 3, 0, False, 10, False, [1, 2, 3, 3, 3]),
        (12, 3, 0, True, 10, False, [1, 2] + [3] * 10),
        (12, 3, 0, True, 15, False, [1, 2] + [3] * 8 + [2, 1]),
        (4, 2, 0, True, 10, False, [1, 2, 2, 1]),
        (4, 2, 0, False, 10, True, [1, 2, 2, 1]),
        (3, 3, 2, False, 10, False, [3, 3, 3]),
        (3, 3, 1, False, 10, False, [2, 3, 3]),
        (1, 3, 0, True, 10, False, [1]),
    ],
)
def test_step_order_policy(n, order, hist, lof, lof_steps, euler, expected):
    assert step_orders(n, order, hist, lower_order_final=lof, lower_order_final_steps=lof_steps,
                       euler_at_final=euler) == expected


def test_flow_start_at_one_is_exact_first_order_then_degrades():
    sig = [1.0, 0.8, 0.6, 0.4, 0.2, 0.0]
    plan = plan_multistep(sig, FLOW, order=3, lower_order_final=False)
    assert [c.order for c in plan] == [1, 1, 2, 3, 1]
    assert plan[0].c_x == pytest.approx(0.8) and plan[0].c_m == (pytest.approx(0.2),)
    assert all(math.isfinite(w) for c in plan for w in (c.c_x, c.c_noise, *c.c_m))
    x = torch.randn(2, 4, dtype=torch.float64)
    out = sample_dpmpp_multistep(Model(FLOW), x, torch.tensor(sig, dtype=torch.float64), parameterization=FLOW,
                                 order=3, eta=0.5, noise_sampler=lambda s, t: torch.zeros_like(x), disable=True)
    assert torch.isfinite(out).all()
    # first step from sigma=1: x_1 = sigma_1 x + (1 - sigma_1) D(x, 1)
    seen = []
    sample_dpmpp_multistep(Model(FLOW), x, torch.tensor(sig[:2], dtype=torch.float64), parameterization=FLOW,
                           callback=seen.append, final_step="zero", disable=True)
    step = sample_dpmpp_multistep(Model(FLOW), x, torch.tensor(sig[:2], dtype=torch.float64),
                                  parameterization=FLOW, disable=True)
    torch.testing.assert_close(step, 0.8 * x + 0.2 * seen[0]["denoised"])


def test_final_step_zero_returns_denoised_and_counts_nfe():
    p = VE
    x = _x(p)
    model, seen = Model(p), []
    sig = torch.tensor(SIGMAS_VE, dtype=torch.float64)
    out = sample_dpmpp_multistep(model, x, sig, order=3, callback=seen.append, disable=True)
    assert len(model.calls) == len(SIGMAS_VE) - 1 == len(seen)
    assert [d["i"] for d in seen] == list(range(len(SIGMAS_VE) - 1))
    assert torch.equal(out, seen[-1]["denoised"])


def test_final_step_sigma_min_stops_at_last_nonzero_sigma():
    p = VE
    x = _x(p)
    model = Model(p)
    sig = torch.tensor(SIGMAS_VE, dtype=torch.float64)
    out = sample_dpmpp_multistep(model, x, sig, order=2, final_step="sigma_min", lower_order_final=False,
                                 disable=True)
    assert len(model.calls) == len(SIGMAS_VE) - 2
    assert model.calls == SIGMAS_VE[:-2]
    # same as running the schedule without its trailing zero
    same = sample_dpmpp_multistep(Model(p), x, sig[:-1], order=2, lower_order_final=False, disable=True,
                                  resume_history=False)
    torch.testing.assert_close(out, same, rtol=0, atol=0)


@pytest.mark.parametrize("solver", ["multistep", "singlestep", "adaptive"])
def test_final_step_sigma_min_on_a_one_step_schedule_is_refused(solver):
    """[sigma_max, 0] with final_step='sigma_min' has no step to run: the output would be the
    input noise, returned as if it were an image. The last part of a split schedule, [sigma, 0]
    below sigma_max, returns its input, as the unsplit run stops there too."""
    from comfyui_fewstep.samplers.adaptive import sample_dpmpp_adaptive
    from comfyui_fewstep.samplers.singlestep import sample_dpmpp_singlestep

    fn = {"multistep": sample_dpmpp_multistep, "singlestep": sample_dpmpp_singlestep,
          "adaptive": sample_dpmpp_adaptive}[solver]
    model = Model(VE)
    kw = {"parameterization": VE, "final_step": "sigma_min", "disable": True}
    with pytest.raises(ValueError, match="final_step='zero'"):
        fn(model, _x(VE), torch.tensor([14.61, 0.0], dtype=torch.float64), **kw)
    x = _x(VE)
    assert torch.equal(fn(model, x, torch.tensor([2.0, 0.0], dtype=torch.float64), **kw), x)
    assert model.calls == []
    # two steps stop at the middle sigma after one model call; [sigma] alone is an empty run
    out = fn(model, _x(VE), torch.tensor([14.61, 2.0, 0.0], dtype=torch.float64), **kw)
    assert torch.isfinite(out).all() and model.calls[0] == 14.61
    assert torch.equal(fn(Model(VE), x, torch.tensor([14.61], dtype=torch.float64), **kw), x)


@pytest.mark.parametrize("p,sig", [(VE, [14.61, 0.0]), (FLOW, [1.0, 0.0]), (FLOW, [1.0, 0.5])])
def test_one_step_runs_are_finite(p, sig):
    x = _x(p)
    for order in (1, 2, 3):
        for eta in (0.0, 1.0):
            out = sample_dpmpp_multistep(Model(p), x, torch.tensor(sig, dtype=torch.float64), parameterization=p,
                                         order=order, eta=eta, noise_sampler=lambda s, t: torch.ones_like(x),
                                         disable=True)
            assert torch.isfinite(out).all()


def test_nan_model_output_names_the_step():
    calls = []

    def model(x, sigma, **extra):
        calls.append(1)
        return x * (float("nan") if len(calls) == 3 else 0.5)

    with pytest.raises(NonFiniteModelOutputError, match="step 3 of 10"):
        sample_dpmpp_2m(model, torch.ones(1, 2), torch.tensor(SIGMAS_VE), disable=True)


def test_x0_correction_is_applied_to_every_prediction():
    seen = []
    out = sample_dpmpp_multistep(Model(VE), _x(VE), torch.tensor(SIGMAS_VE, dtype=torch.float64),
                                 x0_correction=lambda d, s: (seen.append(s), d.clamp(-0.1, 0.1))[1], disable=True)
    assert seen == SIGMAS_VE[:-1]
    assert out.abs().max() <= 0.1


@pytest.mark.parametrize(
    "kwargs",
    [{"order": 5}, {"order": 0}, {"order": 4, "eta": 0.5}, {"order": 4, "algorithm": "dpmsolver"},
     {"solver_type": "euler"}, {"algorithm": "ddim"}, {"final_step": "none"}, {"eta": -1.0},
     {"corrector": "bh3"}, {"algorithm": "dpmsolver", "eta": 1.0}, {"corrector": "bh2", "eta": 0.5},
     {"s_noise": float("nan")}],
)
def test_invalid_options_raise_value_error(kwargs):
    with pytest.raises(ValueError):
        sample_dpmpp_multistep(Model(VE), _x(VE), torch.tensor(SIGMAS_VE), disable=True, **kwargs)


def test_increasing_sigmas_raise():
    with pytest.raises(ValueError, match="strictly decreasing"):
        sample_dpmpp_multistep(Model(VE), _x(VE), torch.tensor([0.0, 1.0, 2.0]), disable=True)


def test_alias_3m_sde_eta0_is_3m_heun():
    x = _x(VE)
    sig = torch.tensor(SIGMAS_VE, dtype=torch.float64)
    a = sample_dpmpp_3m_sde(Model(VE), x, sig, eta=0.0, disable=True)
    b = sample_dpmpp_multistep(Model(VE), x, sig, order=3, solver_type="heun", disable=True)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# -- resume across split schedules -----------------------------------------------------------------------


@pytest.mark.parametrize("p,sig", [(VE, SIGMAS_VE), (FLOW, SIGMAS_FLOW)], ids=["ve", "flow"])
@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("options", [{"lower_order_final": False}, {}, {"corrector": "bh2"},
                                     {"corrector": "bh1", "lower_order_final_steps": 20}],
                         ids=["plain", "lower-order-final", "unic", "unic-lof"])
def test_split_schedule_resumes_with_history(p, sig, order, options):
    """A split schedule gives the unsplit result: the second part keeps its order with the first
    part's model outputs, gets the UniC correction at the split point, and the lower-order-final
    rule applies once, at the end of the whole schedule (not at the split)."""
    x = _x(p)
    kw = {"parameterization": p, "order": order, "disable": True, **options}
    full = sample_dpmpp_multistep(Model(p), x, torch.tensor(sig, dtype=torch.float64), **kw)
    split = 4
    first = sample_dpmpp_multistep(Model(p), x, torch.tensor(sig[: split + 1], dtype=torch.float64), **kw)
    handed = first
    if p.kind == "flow":  # ComfyUI: inverse_noise_scaling, then noise_scaling of the next pass
        s = sig[split]
        handed = (first.float() / (1.0 - s) * (1.0 - s)).double()
    second = sample_dpmpp_multistep(Model(p), handed, torch.tensor(sig[split:], dtype=torch.float64), **kw)
    torch.testing.assert_close(second, full, rtol=1e-5, atol=1e-5)
    if p.kind != "flow":  # no float32 round trip: the same arithmetic as the unsplit run
        torch.testing.assert_close(second, full, rtol=1e-12, atol=1e-12)
    history.clear()
    restarted = sample_dpmpp_multistep(Model(p), handed, torch.tensor(sig[split:], dtype=torch.float64), **kw)
    assert (restarted - full).abs().max() > 1e-4


def test_history_needs_matching_x_and_sigma():
    x = _x(VE)
    sig = torch.tensor(SIGMAS_VE, dtype=torch.float64)
    first = sample_dpmpp_2m(Model(VE), x, sig[:5], disable=True)
    assert history.lookup(first, float(sig[4]), "dpmsolver++") is not None
    assert history.lookup(first + 1e-2, float(sig[4]), "dpmsolver++") is None
    assert history.lookup(first, float(sig[3]), "dpmsolver++") is None
    assert history.lookup(first, float(sig[4]), "dpmsolver") is None


def test_history_is_bounded():
    sig = torch.tensor(SIGMAS_VE[:4], dtype=torch.float64)
    outs = [sample_dpmpp_2m(Model(VE), _x(VE) + k, sig, disable=True) for k in range(history.MAX_ENTRIES + 3)]
    assert len(history._entries) == history.MAX_ENTRIES
    assert history.lookup(outs[0], SIGMAS_VE[3], "dpmsolver++") is None
    assert history.lookup(outs[-1], SIGMAS_VE[3], "dpmsolver++") is not None


def test_history_is_kept_in_cpu_memory_within_its_byte_budget(monkeypatch):
    """End states live in CPU memory (no VRAM held between runs); a budget in bytes bounds them
    as well as the entry count, the oldest going first."""
    sig = torch.tensor(SIGMAS_VE[:4], dtype=torch.float64)
    first = sample_dpmpp_2m(Model(VE), _x(VE), sig, disable=True)
    (entry,) = history._entries.values()
    assert entry.x.device.type == "cpu" and all(o.device.type == "cpu" for o in entry.outputs)
    per_entry = history._nbytes(entry)
    monkeypatch.setattr(history, "MAX_BYTES", 3 * per_entry)
    outs = [first] + [sample_dpmpp_2m(Model(VE), _x(VE) + k, sig, disable=True) for k in range(1, 5)]
    assert len(history._entries) == 3
    assert history.lookup(outs[1], SIGMAS_VE[3], "dpmsolver++") is None
    assert history.lookup(outs[-1], SIGMAS_VE[3], "dpmsolver++") is not None


def test_runs_ending_at_zero_store_nothing():
    sample_dpmpp_2m(Model(VE), _x(VE), torch.tensor(SIGMAS_VE, dtype=torch.float64), disable=True)
    assert len(history._entries) == 0


def test_start_below_sigma_max_without_history_logs_once_per_situation(caplog, monkeypatch):
    """Once per latent shape and start sigma (it was once per process, so after one img2img run a
    split part that lost its history was never reported)."""
    from comfyui_fewstep.samplers import multistep

    monkeypatch.setattr(multistep, "_logged_first_order_starts", set())
    sig = torch.tensor(SIGMAS_VE[3:], dtype=torch.float64)
    with caplog.at_level(logging.INFO, logger=multistep.__name__):
        sample_dpmpp_2m(Model(VE), _x(VE), sig, parameterization=VE, disable=True)
        sample_dpmpp_2m(Model(VE), _x(VE) * 2, sig, parameterization=VE, disable=True)
        sample_dpmpp_2m(Model(VE), _x(VE), sig[1:], parameterization=VE, disable=True)
    infos = [r.getMessage() for r in caplog.records
             if r.levelno == logging.INFO and "history" in r.getMessage()]
    assert len(infos) == 2 and all("lower order" in m and "img2img" in m for m in infos)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=multistep.__name__):  # history not asked for: nothing to report
        sample_dpmpp_2m(Model(VE), _x(VE), sig[2:], parameterization=VE, disable=True, resume_history=False)
    assert not [r for r in caplog.records if "history" in r.getMessage()]


def test_a_part_made_by_another_model_is_not_resumed(caplog):
    """A refiner after a base model: the latent matches the base run's end, but its model outputs
    are the base model's, so the refiner starts at first order (and says why) instead of
    extrapolating through them."""
    sig = torch.tensor(SIGMAS_VE, dtype=torch.float64)
    base = Model(VE)
    first = sample_dpmpp_2m(base, _x(VE), sig[:4], disable=True, history_source="base")
    with caplog.at_level(logging.INFO, logger=history.__name__):
        refined = sample_dpmpp_2m(Model(VE), first, sig[3:], disable=True, history_source="refiner")
    fresh = sample_dpmpp_2m(Model(VE), first, sig[3:], disable=True, resume_history=False)
    assert torch.equal(refined, fresh)
    assert any("used another model" in r.getMessage() for r in caplog.records)
    resumed = sample_dpmpp_2m(Model(VE), first, sig[3:], disable=True, history_source="base")
    assert not torch.equal(resumed, fresh)
