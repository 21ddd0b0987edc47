"""Parity with ComfyUI's own DPM-Solver++ samplers (comfy.k_diffusion.sampling), in float64.

Where the definitions coincide (checked here):

* ours ``order=2, solver_type="midpoint", lower_order_final=False`` in VE form is ``dpmpp_2m``;
* ours ``order=2`` (midpoint or heun) with ``eta`` is ``dpmpp_2m_sde`` (``solver_type`` alike), in
  VE and flow form (ComfyUI's SDE samplers use the true half log-SNR for CONST models);
* ours ``order=3, solver_type="heun", lower_order_final=False, third_order="official"`` with ``eta``
  is ``dpmpp_3m_sde``
  (its second-order warm-up step uses the ``phi_2`` weight, i.e. heun), in VE and flow form.

Documented divergences (also checked):

* ``dpmpp_2m`` is not CONST-aware (it steps in ``-log sigma``), so on a flow model it differs
  from ours, which uses ``lambda = log((1 - sigma) / sigma)``;
* ComfyUI moves a flow schedule's first sigma of 1 to ``1 - 1e-4`` for ``dpmpp_*_sde``; ours takes
  the exact first-order step from ``sigma = 1``, a difference of order 1e-4;
* our default ``lower_order_final=True`` lowers the order of the last steps of short runs
  (``order`` capped at ``steps - i``); ComfyUI's samplers have no such policy (only the step to
  0 is first order). For 2M that cap only touches the step to 0, so 2M still equals ``dpmpp_2m``.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.comfy

SHAPE = (2, 3, 4, 4)


@pytest.fixture(scope="module")
def env(comfy):
    import comfy.k_diffusion.sampling as kds
    import comfy.model_sampling as cms
    from comfyui_fewstep.nodes._comfy_sampling import parameterization_from_model_sampling
    from comfyui_fewstep.samplers.multistep import sample_dpmpp_multistep

    eps_ms = type("EpsSampling", (cms.ModelSamplingDiscrete, cms.EPS), {})()
    flow_ms = type("FlowSampling", (cms.ModelSamplingDiscreteFlow, cms.CONST), {})()
    flow_ms.set_parameters(shift=3.0)
    return {
        "kds": kds,
        "ms": {"ve": eps_ms, "flow": flow_ms},
        "param": parameterization_from_model_sampling,
        "ours": sample_dpmpp_multistep,
    }


class GaussianDenoiser:
    """Exact denoiser of N(mu, s^2) data, plus a smooth non-linear term so that the test is not
    limited to linear models. Exposes ``inner_model.model_patcher`` like ComfyUI's wrapper."""

    def __init__(self, model_sampling, kind: str, nonlinear: float = 0.2):
        self.kind, self.nonlinear = kind, nonlinear
        self.mu, self.s2 = 0.3, 0.8
        patcher = type("Patcher", (), {"get_model_object": lambda _self, name: model_sampling})()
        self.inner_model = type("Guider", (), {"model_patcher": patcher})()
        self.calls = 0

    def __call__(self, x, sigma, **extra_args):
        self.calls += 1
        s = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        alpha = torch.ones_like(s) if self.kind == "ve" else 1.0 - s
        gain = alpha * self.s2 / (alpha * alpha * self.s2 + s * s)
        return self.mu + gain * (x - alpha * self.mu) + self.nonlinear * torch.sin(x) / (1.0 + s)


def _noise(seed=0):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _start(kind, sigmas):
    sigma0 = float(sigmas[0])
    noise = _noise(0)
    return noise * sigma0 if kind == "ve" else noise * sigma0 + (1.0 - sigma0) * 0.3


class TableNoise:
    """The same fresh noise for a given (sigma, sigma_next) in both samplers."""

    def __init__(self, sigmas):
        self.table = {round(float(s), 12): _noise(100 + i) for i, s in enumerate(sigmas)}

    def __call__(self, sigma, sigma_next):
        return self.table[round(float(sigma), 12)]


def _schedules(env, kind, n):
    kds = env["kds"]
    if kind == "ve":
        ms = env["ms"]["ve"]
        return kds.get_sigmas_karras(n, float(ms.sigma_min), float(ms.sigma_max), device="cpu").double()
    # flow: shift-3 time-uniform grid starting just below 1 (see the module docstring for sigma = 1)
    t = torch.linspace(0.97, 0.0, n + 1, dtype=torch.float64)
    return 3.0 * t / (1.0 + 2.0 * t)


def _run_pair(env, kind, sigmas, core_name, core_kwargs, our_kwargs):
    ms = env["ms"][kind]
    x = _start(kind, sigmas)
    core_model, our_model = GaussianDenoiser(ms, kind), GaussianDenoiser(ms, kind)
    core_steps, our_steps = [], []
    core = getattr(env["kds"], core_name)(
        core_model,
        x.clone(),
        sigmas.clone(),
        disable=True,
        callback=lambda d: core_steps.append(d["i"]),
        **core_kwargs,
    )
    ours = env["ours"](
        our_model,
        x.clone(),
        sigmas.clone(),
        disable=True,
        callback=lambda d: our_steps.append(d["i"]),
        parameterization=env["param"](ms),
        resume_history=False,
        **our_kwargs,
    )
    assert core_steps == our_steps == list(range(len(sigmas) - 1))
    assert core_model.calls == our_model.calls
    return core, ours


def _assert_parity(core, ours, tol=1e-6):
    scale = max(1.0, float(core.abs().max()))
    err = float((core - ours).abs().max())
    assert err <= tol * scale, f"max |core - ours| = {err:.3e}"


@pytest.mark.parametrize("n", [3, 6, 12])
def test_2m_matches_dpmpp_2m_in_ve_form(env, n):
    sigmas = _schedules(env, "ve", n)
    core, ours = _run_pair(
        env,
        "ve",
        sigmas,
        "sample_dpmpp_2m",
        {},
        {"order": 2, "solver_type": "midpoint", "lower_order_final": False},
    )
    _assert_parity(core, ours)


@pytest.mark.parametrize("kind", ["ve", "flow"])
@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_2m_sde_matches_dpmpp_2m_sde(env, kind, solver_type, eta):
    sigmas = _schedules(env, kind, 8)
    noise = TableNoise(sigmas)
    core, ours = _run_pair(
        env,
        kind,
        sigmas,
        "sample_dpmpp_2m_sde",
        {"eta": eta, "s_noise": 1.0, "noise_sampler": noise, "solver_type": solver_type},
        {
            "order": 2,
            "solver_type": solver_type,
            "lower_order_final": False,
            "eta": eta,
            "noise_sampler": noise,
        },
    )
    _assert_parity(core, ours)


@pytest.mark.parametrize("kind", ["ve", "flow"])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("n", [4, 10])
def test_3m_matches_dpmpp_3m_sde(env, kind, eta, n):
    sigmas = _schedules(env, kind, n)
    noise = TableNoise(sigmas)
    core, ours = _run_pair(
        env,
        kind,
        sigmas,
        "sample_dpmpp_3m_sde",
        {"eta": eta, "s_noise": 1.0, "noise_sampler": noise},
        {"order": 3, "solver_type": "heun", "lower_order_final": False, "third_order": "official",
         "eta": eta, "noise_sampler": noise},
    )
    _assert_parity(core, ours)


def test_dpmpp_2m_is_not_const_aware_and_differs_on_flow(env):
    sigmas = _schedules(env, "flow", 8)
    core, ours = _run_pair(
        env,
        "flow",
        sigmas,
        "sample_dpmpp_2m",
        {},
        {"order": 2, "solver_type": "midpoint", "lower_order_final": False},
    )
    assert float((core - ours).abs().max()) > 1e-4
    # ... while ComfyUI's CONST-aware dpmpp_2m_sde at eta 0 is our 2M (the test above)


def test_flow_schedule_starting_at_one(env):
    """ComfyUI nudges sigma 1 to 1 - 1e-4; ours steps exactly from 1: close, not identical."""
    t = torch.linspace(1.0, 0.0, 9, dtype=torch.float64)
    sigmas = 3.0 * t / (1.0 + 2.0 * t)
    core, ours = _run_pair(
        env,
        "flow",
        sigmas,
        "sample_dpmpp_3m_sde",
        {"eta": 0.0, "noise_sampler": TableNoise(sigmas)},
        {"order": 3, "solver_type": "heun", "lower_order_final": False, "third_order": "official"},
    )
    err = float((core - ours).abs().max())
    assert 0.0 < err < 1e-2 * max(1.0, float(core.abs().max()))
    assert torch.isfinite(ours).all()


def test_lower_order_final_is_our_own_policy(env):
    """For 2M the step to 0 is first order anyway, so lower_order_final changes nothing; for 3M
    it lowers the second-to-last step to order 2, which dpmpp_3m_sde does not do."""
    sigmas = _schedules(env, "ve", 5)
    core, ours = _run_pair(
        env,
        "ve",
        sigmas,
        "sample_dpmpp_2m",
        {},
        {"order": 2, "solver_type": "midpoint", "lower_order_final": True},
    )
    _assert_parity(core, ours)
    core, ours = _run_pair(
        env,
        "ve",
        sigmas,
        "sample_dpmpp_3m_sde",
        {"eta": 0.0, "noise_sampler": TableNoise(sigmas)},
        {"order": 3, "solver_type": "heun", "lower_order_final": True, "third_order": "official"},
    )
    assert float((core - ours).abs().max()) > 1e-4
