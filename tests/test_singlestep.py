"""Singlestep DPM-Solver++ (2S/3S) and DPM-Solver-2/3.

Checked against (a) the closed-form Gaussian problem (x0 ~ N(0, c^2 I): exact linear
denoiser and exact probability-flow ODE solution) for the convergence order, and (b) a
step-by-step transcription of the papers' update formulas in plain float64 Python.
"""

from __future__ import annotations

import math

import pytest
import torch

from comfyui_fewstep.samplers.parameterization import Parameterization, for_family
from comfyui_fewstep.samplers.singlestep import sample_dpmpp_singlestep, singlestep_orders

C = 0.5  # data standard deviation


class Gaussian:
    """x0 ~ N(0, C^2 I) in VE (x = x0 + sigma eps) or flow (x = (1-sigma) x0 + sigma eps) form.

    With ``v = alpha^2 C^2 + sigma^2`` the posterior mean is ``D = alpha C^2 / v * x`` and every
    probability-flow ODE solution is ``x(sigma) = x(sigma') * sqrt(v(sigma) / v(sigma'))``.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.calls = 0

    def alpha(self, sigma: float) -> float:
        return 1.0 if self.kind == "ve" else 1.0 - sigma

    def v(self, sigma: float) -> float:
        return self.alpha(sigma) ** 2 * C * C + sigma * sigma

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        s = float(sigma[0])
        assert torch.all(sigma == s)
        return self.alpha(s) * C * C / self.v(s) * x

    def exact(self, x: torch.Tensor, sigma_from: float, sigma_to: float) -> torch.Tensor:
        return x * math.sqrt(self.v(sigma_to) / self.v(sigma_from))


def lambda_uniform(p: Parameterization, sigma_max: float, sigma_min: float, n: int) -> torch.Tensor:
    """``n`` steps uniform in half log-SNR from sigma_max to sigma_min, then 0."""
    lam = torch.linspace(p.lambda_(sigma_max), p.lambda_(sigma_min), n + 1, dtype=torch.float64)
    sigmas = p.sigma_from_lambda_tensor(lam)
    sigmas[0], sigmas[-1] = sigma_max, sigma_min
    return torch.cat([sigmas, sigmas.new_zeros(1)])


RANGES = {
    "ve-eps": (for_family("eps"), None),
    "ve-edm": (for_family("edm"), None),
    "flow": (for_family("flow"), 0.995),  # start below sigma = 1 (lambda = -inf, see the offset test)
}
CONFIGS = [
    (1, "midpoint", "dpmsolver++"),
    (2, "midpoint", "dpmsolver++"),
    (2, "heun", "dpmsolver++"),
    (3, "midpoint", "dpmsolver++"),
    (3, "heun", "dpmsolver++"),
    (2, "midpoint", "dpmsolver"),
    (2, "heun", "dpmsolver"),
    (3, "midpoint", "dpmsolver"),
    (3, "heun", "dpmsolver"),
]


@pytest.mark.parametrize("range_name", list(RANGES))
@pytest.mark.parametrize(("order", "solver_type", "algorithm"), CONFIGS)
def test_convergence_order_on_gaussian(range_name, order, solver_type, algorithm):
    p, sigma_start = RANGES[range_name]
    sigma_max, sigma_min = sigma_start or p.sigma_max, p.sigma_min
    problem = Gaussian(p.kind)
    x = torch.tensor([[1.0, -2.0]], dtype=torch.float64) * math.sqrt(problem.v(sigma_max))
    exact = problem.exact(x, sigma_max, sigma_min)
    steps = [48, 96, 192] if order == 3 else [16, 32, 64]  # in the asymptotic range of each order
    errors = []
    for n in steps:
        out = sample_dpmpp_singlestep(
            problem, x, lambda_uniform(p, sigma_max, sigma_min, n), disable=True, parameterization=p,
            order=order, solver_type=solver_type, algorithm=algorithm, final_step="sigma_min",
        )
        errors.append(float((out - exact).abs().max() / exact.abs().max()))
    # least-squares slope of log(error) against log(steps)
    lx = [math.log(n) for n in steps]
    ly = [math.log(e) for e in errors]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    slope = -sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)
    assert abs(slope - order) < 0.2, (errors, slope)


# ---------------------------------------------------------------------------------------------
# Independent transcription of the papers' formulas (plain float64 Python, one element at a time)


def lam(kind: str, s: float) -> float:
    return -math.log(s) if kind == "ve" else math.log((1.0 - s) / s)


def inv_lam(kind: str, lam_: float) -> float:
    return math.exp(-lam_) if kind == "ve" else 1.0 / (1.0 + math.exp(lam_))


def alpha_of(kind: str, s: float) -> float:
    return 1.0 if kind == "ve" else 1.0 - s


def nonlinear_d(kind: str, x: float, s: float) -> float:
    """A smooth nonlinear 'denoiser' so that the difference terms matter."""
    a = alpha_of(kind, s)
    return a * C * C / (a * a * C * C + s * s) * x + 0.3 * math.tanh(x) * s / (1.0 + s)


def reference_step(kind, algorithm, solver_type, order, x, s, t, r1, r2):
    """One singlestep update written from arXiv 2211.01095 Alg. 1 / arXiv 2206.00927 Alg. 1-2."""
    a = lambda u: alpha_of(kind, u)  # noqa: E731
    h = lam(kind, t) - lam(kind, s)
    s1 = inv_lam(kind, lam(kind, s) + r1 * h)
    s2 = inv_lam(kind, lam(kind, s) + r2 * h)
    if algorithm == "dpmsolver++":
        m = lambda xx, ss: nonlinear_d(kind, xx, ss)  # noqa: E731
        m0 = m(x, s)
        if order == 1:
            return (t / s) * x - a(t) * math.expm1(-h) * m0
        x1 = (s1 / s) * x - a(s1) * math.expm1(-r1 * h) * m0
        m1 = m(x1, s1)
        phi_1 = math.expm1(-h)
        if order == 2:
            if solver_type == "midpoint":
                return (t / s) * x - a(t) * phi_1 * m0 - (0.5 / r1) * a(t) * phi_1 * (m1 - m0)
            return (t / s) * x - a(t) * phi_1 * m0 + (1.0 / r1) * a(t) * (phi_1 / h + 1.0) * (m1 - m0)
        phi_22 = math.expm1(-r2 * h) / (r2 * h) + 1.0
        x2 = (s2 / s) * x - a(s2) * math.expm1(-r2 * h) * m0 + (r2 / r1) * a(s2) * phi_22 * (m1 - m0)
        m2 = m(x2, s2)
        phi_2 = phi_1 / h + 1.0
        if solver_type == "midpoint":
            return (t / s) * x - a(t) * phi_1 * m0 + (1.0 / r2) * a(t) * phi_2 * (m2 - m0)
        phi_3 = phi_2 / h - 0.5
        d1_0, d1_1 = (m1 - m0) / r1, (m2 - m0) / r2
        d1 = (r2 * d1_0 - r1 * d1_1) / (r2 - r1)
        d2 = 2.0 * (d1_1 - d1_0) / (r2 - r1)
        return (t / s) * x - a(t) * phi_1 * m0 + a(t) * phi_2 * d1 - a(t) * phi_3 * d2
    # noise prediction: eps = (x - alpha D) / sigma
    e = lambda xx, ss: (xx - a(ss) * nonlinear_d(kind, xx, ss)) / ss  # noqa: E731
    e0 = e(x, s)
    phi_1 = math.expm1(h)
    if order == 1:
        return (a(t) / a(s)) * x - t * phi_1 * e0
    u1 = (a(s1) / a(s)) * x - s1 * math.expm1(r1 * h) * e0
    e1 = e(u1, s1)
    if order == 2:
        if solver_type == "midpoint":
            return (a(t) / a(s)) * x - t * phi_1 * e0 - (0.5 / r1) * t * phi_1 * (e1 - e0)
        return (a(t) / a(s)) * x - t * phi_1 * e0 - (1.0 / r1) * t * (phi_1 / h - 1.0) * (e1 - e0)
    u2 = (
        (a(s2) / a(s)) * x
        - s2 * math.expm1(r2 * h) * e0
        - s2 * (r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1.0) * (e1 - e0)
    )
    e2 = e(u2, s2)
    phi_2 = phi_1 / h - 1.0
    if solver_type == "midpoint":
        return (a(t) / a(s)) * x - t * phi_1 * e0 - (1.0 / r2) * t * phi_2 * (e2 - e0)
    phi_3 = phi_2 / h - 0.5
    d1_0, d1_1 = (e1 - e0) / r1, (e2 - e0) / r2
    d1 = (r2 * d1_0 - r1 * d1_1) / (r2 - r1)
    d2 = 2.0 * (d1_1 - d1_0) / (r2 - r1)
    return (a(t) / a(s)) * x - t * phi_1 * e0 - t * phi_2 * d1 - t * phi_3 * d2


def nonlinear_model(kind):
    def model(x, sigma):
        s = float(sigma[0])
        return x.clone().apply_(lambda v: nonlinear_d(kind, v, s))

    return model


@pytest.mark.parametrize("kind", ["ve", "flow"])
@pytest.mark.parametrize("algorithm", ["dpmsolver++", "dpmsolver"])
@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
@pytest.mark.parametrize(("order", "r1", "r2"), [(1, None, None), (2, None, None), (2, 0.4, None),
                                                  (3, None, None), (3, 0.25, 0.6)])
def test_step_matches_paper_transcription(kind, algorithm, solver_type, order, r1, r2):
    p = for_family("edm") if kind == "ve" else for_family("flow")
    s, t = (9.0, 1.3) if kind == "ve" else (0.93, 0.35)
    x = torch.tensor([[-2.5, -0.7, 0.0, 0.4, 1.9]], dtype=torch.float64) * (s + 0.5)
    out = sample_dpmpp_singlestep(
        nonlinear_model(kind), x, torch.tensor([s, t], dtype=torch.float64), disable=True, parameterization=p,
        order=order, r1=r1, r2=r2, solver_type=solver_type, algorithm=algorithm,
    )
    dr1 = (0.5 if order == 2 else 1.0 / 3.0) if r1 is None else r1
    dr2 = 2.0 / 3.0 if r2 is None else r2
    for got, x_i in zip(out.flatten().tolist(), x.flatten().tolist()):
        want = reference_step(kind, algorithm, solver_type, order, x_i, s, t, dr1, dr2)
        assert got == pytest.approx(want, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("algorithm", ["dpmsolver++", "dpmsolver"])
def test_mixed_orders_and_final_step_match_transcription(algorithm):
    """Orders [3, 2, 1] over [s0, s1, s2, 0]: 3S, 2S, then the data prediction at s2."""
    kind, sig = "ve", [12.0, 2.0, 0.3, 0.0]
    x = torch.tensor([[-3.0, 0.5, 7.0]], dtype=torch.float64)
    model = nonlinear_model(kind)
    out = sample_dpmpp_singlestep(
        model, x, torch.tensor(sig, dtype=torch.float64), disable=True, order=3, orders=[3, 2, 1],
        algorithm=algorithm,
    )
    for got, x_i in zip(out.flatten().tolist(), x.flatten().tolist()):
        v = reference_step(kind, algorithm, "midpoint", 3, x_i, sig[0], sig[1], 1 / 3, 2 / 3)
        v = reference_step(kind, algorithm, "midpoint", 2, v, sig[1], sig[2], 0.5, 1.0)
        assert got == pytest.approx(nonlinear_d(kind, v, sig[2]), rel=1e-12)


# ---------------------------------------------------------------------------------------------
# NFE accounting and order allocation


def test_singlestep_orders_rule():
    assert singlestep_orders(6, 3) == [3, 2, 1]
    assert singlestep_orders(7, 3) == [3, 3, 1]
    assert singlestep_orders(8, 3) == [3, 3, 2]
    assert singlestep_orders(2, 3) == [2]
    assert singlestep_orders(5, 2) == [2, 2, 1]
    assert singlestep_orders(4, 1) == [1, 1, 1, 1]
    for order in (1, 2, 3):
        for nfe in range(1, 40):
            orders = singlestep_orders(nfe, order)
            assert sum(orders) == nfe and all(1 <= k <= order for k in orders)
            if order == 3:
                assert len(orders) == nfe // 3 + 1
    with pytest.raises(ValueError, match="nfe"):
        singlestep_orders(0, 3)
    with pytest.raises(ValueError, match="order"):
        singlestep_orders(5, 4)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_nfe_equals_sum_of_orders(order):
    p = for_family("edm")
    problem = Gaussian("ve")
    x = torch.ones(2, 3, dtype=torch.float64)
    for nfe in range(1, 13):
        orders = singlestep_orders(nfe, order)
        sigmas = lambda_uniform(p, 80.0, 0.002, len(orders))[:-1]  # ends at sigma_min
        problem.calls = 0
        sample_dpmpp_singlestep(problem, x, sigmas, disable=True, orders=orders, order=order)
        assert problem.calls == nfe
    sigmas = lambda_uniform(p, 80.0, 0.002, 5)  # 6 intervals, the last one to 0
    problem.calls = 0
    sample_dpmpp_singlestep(problem, x, sigmas, disable=True, order=order)
    assert problem.calls == order * 5 + 1
    problem.calls = 0
    sample_dpmpp_singlestep(problem, x, sigmas, disable=True, order=order, final_step="sigma_min")
    assert problem.calls == order * 5


def test_callback_once_per_outer_step():
    problem = Gaussian("ve")
    sigmas = lambda_uniform(for_family("eps"), 14.6, 0.03, 4)
    seen = []
    sample_dpmpp_singlestep(problem, torch.ones(1, 2, dtype=torch.float64), sigmas, callback=seen.append,
                            disable=True, order=3)
    assert [d["i"] for d in seen] == [0, 1, 2, 3, 4]
    assert all(float(d["sigma"]) == float(sigmas[d["i"]]) for d in seen)
    assert all(d["denoised"].shape == (1, 2) for d in seen)


@pytest.mark.parametrize("solver", ["singlestep", "multistep"])
def test_progress_reaches_the_end_when_stopping_at_sigma_min(solver):
    """ComfyUI's bar has len(sigmas) - 1 steps: stopping at sigma_min skips the step to 0, and
    one closing callback (the last prediction, at the last sigma) fills the bar."""
    from comfyui_fewstep.samplers.multistep import sample_dpmpp_multistep

    run = sample_dpmpp_singlestep if solver == "singlestep" else sample_dpmpp_multistep
    sigmas = lambda_uniform(for_family("eps"), 14.6, 0.03, 4)
    seen = []
    out = run(Gaussian("ve"), torch.ones(1, 2, dtype=torch.float64), sigmas, callback=seen.append,
              disable=True, order=2, final_step="sigma_min")
    total = len(sigmas) - 1
    assert [d["i"] for d in seen] == list(range(total))
    assert float(seen[-1]["sigma"]) == float(sigmas[-2])
    # no model call: SamplerCustom's x0 output is unchanged
    assert seen[-1]["denoised"] is seen[-2]["denoised"]
    if solver == "multistep":
        assert torch.equal(seen[-1]["x"], out)


def test_option_validation():
    problem, x = Gaussian("ve"), torch.ones(1, 2)
    sigmas = torch.tensor([10.0, 1.0, 0.1, 0.0])
    with pytest.raises(ValueError, match="one entry per step"):
        sample_dpmpp_singlestep(problem, x, sigmas, orders=[2, 1], disable=True)
    with pytest.raises(ValueError, match="must be first order"):
        sample_dpmpp_singlestep(problem, x, sigmas, orders=[2, 2, 2], disable=True)
    with pytest.raises(ValueError, match=r"orders\[1\]"):
        sample_dpmpp_singlestep(problem, x, sigmas, orders=[2, 4, 1], disable=True)
    with pytest.raises(ValueError, match="r1"):
        sample_dpmpp_singlestep(problem, x, sigmas, order=2, r1=1.5, disable=True)
    with pytest.raises(ValueError, match="r2"):
        sample_dpmpp_singlestep(problem, x, sigmas, order=3, r1=0.5, r2=0.4, disable=True)
    with pytest.raises(ValueError, match="algorithm"):
        sample_dpmpp_singlestep(problem, x, sigmas, algorithm="ddim", disable=True)
    with pytest.raises(ValueError, match="solver_type"):
        sample_dpmpp_singlestep(problem, x, sigmas, solver_type="taylor", disable=True)
    # with final_step="sigma_min" the interval to 0 is skipped: a shorter list is accepted
    out = sample_dpmpp_singlestep(problem, x, sigmas, orders=[2, 3], final_step="sigma_min", disable=True)
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------
# End points: one step, sigma = 0, flow sigma = 1


@pytest.mark.parametrize("algorithm", ["dpmsolver++", "dpmsolver"])
@pytest.mark.parametrize("kind", ["ve", "flow"])
def test_single_step_to_zero_returns_data_prediction(kind, algorithm):
    p = for_family("edm") if kind == "ve" else for_family("flow")
    s = 5.0 if kind == "ve" else 1.0
    problem = Gaussian(kind)
    x = torch.tensor([[1.5, -0.5]], dtype=torch.float64)
    out = sample_dpmpp_singlestep(problem, x, torch.tensor([s, 0.0]), disable=True, parameterization=p,
                                  order=3, algorithm=algorithm)
    sigma_eval = s if kind == "ve" else 1.0 - 1e-4  # flow sigma = 1 is evaluated just below 1
    expected = problem(x, torch.tensor([sigma_eval], dtype=torch.float64))
    assert torch.allclose(out, expected, rtol=1e-12, atol=1e-15)
    assert problem.calls == 2  # the sampler's call and ours


@pytest.mark.parametrize("algorithm", ["dpmsolver++", "dpmsolver"])
@pytest.mark.parametrize("order", [2, 3])
def test_flow_from_sigma_one(order, algorithm):
    """Starting at lambda = -inf: finite and close to the exact ODE solution (offset 1e-4 at the start)."""
    p = for_family("flow")
    problem = Gaussian("flow")
    x = torch.tensor([[1.0, -0.3, 2.2]], dtype=torch.float64)
    n = 40 if order == 3 else 160  # discretisation error well below the 1e-3 bound
    lam = torch.linspace(p.lambda_(0.999), p.lambda_(p.sigma_min), n, dtype=torch.float64)
    sigmas = torch.cat([torch.ones(1, dtype=torch.float64), p.sigma_from_lambda_tensor(lam), torch.zeros(1)])
    sigmas[-2] = p.sigma_min
    out = sample_dpmpp_singlestep(problem, x, sigmas, disable=True, parameterization=p, order=order,
                                  algorithm=algorithm, final_step="sigma_min")
    exact = problem.exact(x, 1.0, p.sigma_min)
    assert torch.isfinite(out).all()
    assert float((out - exact).abs().max() / exact.abs().max()) < 1e-3
    out0 = sample_dpmpp_singlestep(problem, x, sigmas, disable=True, parameterization=p, order=order,
                                   algorithm=algorithm)
    expected0 = problem(out, torch.tensor([p.sigma_min]))
    assert torch.allclose(out0, expected0, rtol=1e-12)


@pytest.mark.parametrize("algorithm", ["dpmsolver++", "dpmsolver"])
@pytest.mark.parametrize("order", [2, 3])
def test_flow_from_sigma_one_does_not_hang_on_the_start_offset(order, algorithm, monkeypatch):
    """A 2S/3S step from a flow model's sigma = 1 places its stages where the denoiser changes and
    integrates the data prediction: the result hardly moves when the (arbitrary) start offset
    shrinks 100x, and noise prediction stays as accurate as data prediction. Before, the stages sat
    at near-pure noise (log-SNR -9.2 + r h), and noise prediction scaled the change of eps by
    1 / offset: on this mixture 3S went from 0.074 to 0.100 (data) and 0.19 to 1.96 (noise), 2S
    had 0.105 (data); now 0.059 and 0.069-0.072."""
    import comfyui_fewstep.samplers.singlestep as singlestep
    from comfyui_fewstep.samplers import analytic

    problem = analytic.make_problem("flow_shift3", "gmm16", n_samples=128)
    p = problem.range.parameterization()
    sigmas = torch.tensor([1.0, 0.5, 0.2, 0.0], dtype=torch.float64)
    errors, outs = [], []
    for offset in (1e-4, 1e-6):
        monkeypatch.setattr(singlestep, "FLOW_START_OFFSET", offset)
        out = sample_dpmpp_singlestep(problem.denoiser(), problem.x_start.clone(), sigmas, disable=True,
                                      parameterization=p, order=order, algorithm=algorithm)
        outs.append(out)
        errors.append(float(analytic.per_sample_rms(out, problem.reference).median()))
    assert float((outs[0] - outs[1]).abs().median()) < 1e-3
    assert max(errors) < (0.065 if order == 3 else 0.075)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_flow_from_sigma_one_with_the_next_sigma_within_the_offset(order):
    """A large shift at many steps puts the second sigma within 1e-4 of 1 (shift 12 at 1000 steps:
    0.99992): the start moves half-way to it instead, and the result stays near the exact solution."""
    p = for_family("flow")
    problem = Gaussian("flow")
    x = torch.tensor([[1.0, -0.3, 2.2]], dtype=torch.float64)
    n = 40 if order == 3 else 160
    lam = torch.linspace(p.lambda_(0.99), p.lambda_(p.sigma_min), n, dtype=torch.float64)
    start = torch.tensor([1.0, 1.0 - 8.3e-5], dtype=torch.float64)
    sigmas = torch.cat([start, p.sigma_from_lambda_tensor(lam)])
    sigmas[-1] = p.sigma_min
    out = sample_dpmpp_singlestep(problem, x, sigmas, disable=True, parameterization=p, order=order,
                                  final_step="sigma_min")
    exact = problem.exact(x, 1.0, p.sigma_min)
    assert float((out - exact).abs().max() / exact.abs().max()) < (3e-2 if order == 1 else 1e-3)


def test_no_steps_and_float32():
    problem = Gaussian("ve")
    x = torch.randn(2, 4)
    assert torch.equal(sample_dpmpp_singlestep(problem, x, torch.tensor([3.0]), disable=True), x)
    out = sample_dpmpp_singlestep(problem, x, torch.tensor([14.6, 3.0, 0.5, 0.0]), disable=True, order=3)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
