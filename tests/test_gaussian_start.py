"""The first step exact for Gaussian data (``first_step="gaussian"``, :mod:`samplers.gaussian_start`).

Closed-form checks: for data ``N(mu, sigma_data^2 I)`` (any mean) with its exact denoiser, the
sampler's state after the first step equals the exact ODE solution in VE, flow and discrete (SD)
coordinates, for ``sigma_data`` 1 and 0.5, while the DDIM step does not; ``sigma_data -> 0`` gives
the DDIM step. Only the first step of a run from ``sigma_max`` changes (img2img, the resumed part of a
split schedule and a one-step run are untouched; a split run equals the unsplit one). Clear refusals,
for this option and ``second_step="flow"``.
On held-out Gaussian mixtures the few-step preset changes the mode of fewer samples with it, and
under strong guidance it stays as accurate as the DDIM step.

``first_step="skip"`` (no call at ``sigma_max``): the states at the grid's second and third points
are exact for the same Gaussian data after one call, made at neither ``sigma_max`` nor the state;
the prediction handed on is the model's at the state; it applies only to a run from ``sigma_max``
with two or more steps (a split run equals the whole); at the same calls it changes the mode of
fewer held-out samples than the gaussian first step and is more accurate under moderate guidance.
"""

from __future__ import annotations

import pytest
import torch

from comfyui_fewstep.samplers import analytic, schedules
from comfyui_fewstep.samplers._coefficients import plan_multistep
from comfyui_fewstep.samplers.gaussian_start import gaussian_step, with_gaussian_first_step
from comfyui_fewstep.samplers.multistep import sample_dpmpp_multistep
from comfyui_fewstep.samplers.parameterization import Parameterization

RANGES = ("edm", "flow_shift1", "sd15")


class _ShiftedGaussian:
    """Data ``N(mu, c^2 I)``: :class:`analytic.GaussianData` moved to the mean ``mu`` (the state
    ``x = alpha x0 + sigma_t eps`` moves by ``alpha mu``)."""

    def __init__(self, c: float, mu: torch.Tensor, form: str) -> None:
        self.data, self.mu, self.form = analytic.GaussianData(c, mu.numel()), mu, form

    def _alpha(self, sigma: float) -> float:
        return 1.0 if self.form == "ve" else 1.0 - sigma

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = float(sigma[0])
        return self.mu + self.data.denoise(x - self._alpha(s) * self.mu, s, self.form)

    def ode(self, x: torch.Tensor, s: float, t: float) -> torch.Tensor:
        start = x - self._alpha(s) * self.mu
        return self._alpha(t) * self.mu + self.data.ode_solution(start, s, t, self.form)


def _first_state(model, p: Parameterization, x: torch.Tensor, sigmas: list[float], **options) -> torch.Tensor:
    states: list[torch.Tensor] = []
    sample_dpmpp_multistep(model, x, torch.tensor(sigmas, dtype=torch.float64), parameterization=p,
                           disable=True, resume_history=False,
                           callback=lambda d: states.append(d["x"].clone()), **options)
    return states[1]


def _gaussian_run(range_name: str, sigma_data: float, steps: int, window: dict[str, float]):
    """``(p, model, sigmas, x)``: the range's coordinates with ``sigma_data``, data ``N(mu, sigma_data^2
    I)`` with a random mean, ``logsnr_window`` sigmas and noise at ``sigma_max``."""
    rng = analytic.RANGE_PRESETS[range_name]
    base = rng.parameterization()
    p = Parameterization(base.kind, base.sigma_min, base.sigma_max, base.family, base.timestep_sigmas,
                         sigma_data)
    torch.manual_seed(0)
    mu = torch.randn(16, dtype=torch.float64)
    model = _ShiftedGaussian(sigma_data, mu, rng.form)
    sigmas = [float(s) for s in schedules.get_sigmas("logsnr_window", steps, p, **window)]
    x = p.sigma_t(sigmas[0]) * torch.randn(4, 16, dtype=torch.float64) + p.alpha(sigmas[0]) * mu
    return p, model, sigmas, x


@pytest.mark.parametrize("sigma_data", [1.0, 0.5])
@pytest.mark.parametrize("range_name", RANGES)
def test_first_step_is_exact_for_gaussian_data_of_the_models_sigma_data(range_name, sigma_data):
    p, model, sigmas, x = _gaussian_run(range_name, sigma_data, 5, schedules.FEWSTEP_WINDOW)
    exact = model.ode(x, sigmas[0], sigmas[1])
    scale = float(exact.abs().max())
    gaussian = _first_state(model, p, x, sigmas, order=2, first_step="gaussian")
    ddim = _first_state(model, p, x, sigmas, order=2, first_step="ddim")
    assert float((gaussian - exact).abs().max()) < 1e-12 * max(scale, 1.0)
    assert float((ddim - exact).abs().max()) > 1e-2 * sigma_data


@pytest.mark.parametrize("range_name", RANGES)
def test_vanishing_sigma_data_gives_the_ddim_step(range_name):
    base = analytic.RANGE_PRESETS[range_name].parameterization()
    p = Parameterization(base.kind, base.sigma_min, base.sigma_max, base.family, base.timestep_sigmas, 1e-9)
    s, t = p.sigma_max, p.sigma_max / 7.0
    c_x, c_d = gaussian_step(p, s, t)
    ratio = p.sigma_t(t) / p.sigma_t(s)
    assert (c_x, c_d) == pytest.approx((ratio, p.alpha(t) - ratio * p.alpha(s)), rel=1e-9, abs=1e-12)


def test_only_the_first_step_of_a_run_from_noise_changes():
    p = analytic.RANGE_PRESETS["edm"].parameterization()
    sigmas = [80.0, 6.0, 1.5, 0.4, 0.1, 0.0]
    plan = plan_multistep(sigmas, p, order=2, corrector="bh2")
    gaussian = with_gaussian_first_step(plan, sigmas, p)
    assert gaussian[1:] == plan[1:] and gaussian[0].c_x > plan[0].c_x
    # a one-step run ends at 0: the first step is the last, and returns the prediction as before
    one = plan_multistep([80.0, 0.0], p, order=2)
    assert with_gaussian_first_step(one, [80.0, 0.0], p) == one


class _Recording:
    """A model that records the sigma of every call."""

    def __init__(self, model) -> None:
        self.model, self.sigmas = model, []

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        self.sigmas.append(float(sigma[0]))
        return self.model(x, sigma)


@pytest.mark.parametrize("sigma_data", [1.0, 0.5])
@pytest.mark.parametrize("range_name", RANGES)
def test_skip_start_is_exact_for_gaussian_data_without_a_call_at_sigma_max(range_name, sigma_data):
    p, gaussian, sigmas, x = _gaussian_run(range_name, sigma_data, 6, schedules.SKIP_WINDOW)
    model = _Recording(gaussian)
    seen: list[dict] = []
    sample_dpmpp_multistep(model, x, torch.tensor(sigmas, dtype=torch.float64), parameterization=p, order=2,
                           first_step="skip", disable=True, resume_history=False,
                           callback=lambda d: seen.append({k: v.clone() if torch.is_tensor(v) else v
                                                           for k, v in d.items()}))
    # five calls for six steps, none at sigma_max; the first at the second point, off the state
    assert model.sigmas == pytest.approx(sigmas[1:-1], rel=1e-12)
    assert [d["i"] for d in seen] == list(range(6))
    assert torch.equal(seen[0]["x"], x)
    for i in (1, 2):  # the start, and the gaussian step from its point
        exact = gaussian.ode(x, sigmas[0], sigmas[i])
        assert float((seen[i]["x"] - exact).abs().max()) < 1e-11 * max(float(exact.abs().max()), 1.0)
    # the prediction at the start's state is the model's there (carried with the Gaussian's slope)
    torch.testing.assert_close(seen[1]["denoised"], gaussian(seen[1]["x"], torch.tensor([sigmas[1]])),
                               rtol=0, atol=1e-11)
    torch.testing.assert_close(seen[0]["denoised"], seen[1]["denoised"], rtol=0, atol=0)


def test_skip_start_needs_a_step_after_its_call():
    """A one-step run from sigma_max has no point to move the call to; a two-step run makes its one
    call at the middle point and ends there."""
    p = analytic.RANGE_PRESETS["edm"].parameterization()
    mixture = analytic.GaussianMixture.random(16, 8, (0.05, 0.30), 3)
    x = mixture.sample(8, p.sigma_max, "ve", generator=torch.Generator().manual_seed(0))
    outs = {}
    for first_step in ("ddim", "skip"):
        model = _Recording(analytic.CountingDenoiser(mixture, "ve"))
        outs[first_step] = sample_dpmpp_multistep(model, x, torch.tensor([80.0, 0.0]), parameterization=p,
                                                  first_step=first_step, disable=True, resume_history=False)
        assert model.sigmas == [80.0]
    torch.testing.assert_close(outs["skip"], outs["ddim"], rtol=0, atol=0)
    model = _Recording(analytic.CountingDenoiser(mixture, "ve"))
    sample_dpmpp_multistep(model, x, torch.tensor([80.0, 3.0, 0.0]), parameterization=p, first_step="skip",
                           disable=True, resume_history=False)
    assert model.sigmas == [3.0]


@pytest.mark.parametrize("first_step", ["gaussian", "skip"])
def test_img2img_and_a_resumed_split_part_are_unchanged_and_a_split_run_equals_the_whole(first_step):
    rng = analytic.RANGE_PRESETS["edm"]
    mixture = analytic.GaussianMixture.random(16, 8, (0.05, 0.30), 3)
    p = rng.parameterization()
    sigmas = schedules.get_sigmas("logsnr_window", 8, p, **schedules.FEWSTEP_WINDOW)
    options = {"parameterization": p, "order": 2, "corrector": "bh2", "disable": True}

    def run(sigmas, x, first_step, **extra):
        return sample_dpmpp_multistep(analytic.CountingDenoiser(mixture, rng.form), x, sigmas,
                                      first_step=first_step, **options, **extra)

    low = mixture.sample(32, float(sigmas[2]), rng.form, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(run(sigmas[2:], low, first_step, resume_history=False),
                               run(sigmas[2:], low, "ddim", resume_history=False), rtol=0, atol=0)
    x = mixture.sample(64, rng.sigma_max, rng.form, generator=torch.Generator().manual_seed(2))
    whole = run(sigmas, x, first_step, history_source=f"{first_step}-split")
    assert not torch.equal(whole, run(sigmas, x, "ddim", resume_history=False))
    model = analytic.CountingDenoiser(mixture, rng.form)
    split = dict(first_step=first_step, history_source=f"{first_step}-split", **options)
    first = sample_dpmpp_multistep(model, x, sigmas[:5], **split)
    second = sample_dpmpp_multistep(model, first, sigmas[4:], **split)
    torch.testing.assert_close(second, whole, rtol=0, atol=1e-12)
    assert model.nfe == (7 if first_step == "skip" else 8)


@pytest.mark.parametrize(("option", "value"), [("first_step", "gaussian"), ("first_step", "skip"),
                                             ("second_step", "flow")])
@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"eta": 0.5}, "deterministic data-prediction solver only"),
        ({"algorithm": "dpmsolver"}, "deterministic data-prediction solver only"),
    ],
)
def test_the_start_options_refuse_other_solvers(option, value, options, match):
    """Both options that change a run's first steps (this one and ``second_step="flow"``)."""
    with pytest.raises(ValueError, match=f"{option} '{value}'.*{match}"):
        sample_dpmpp_multistep(lambda x, s: x, torch.zeros(1, 4), torch.tensor([80.0, 1.0, 0.1, 0.0]),
                               parameterization=analytic.RANGE_PRESETS["edm"].parameterization(),
                               disable=True, **{option: value, **options})


@pytest.mark.parametrize(("option", "value"), [("first_step", "exact"), ("second_step", "tau")])
def test_unknown_start_options_are_named(option, value):
    with pytest.raises(ValueError, match=f"{option} must be one of"):
        sample_dpmpp_multistep(lambda x, s: x, torch.zeros(1, 4), torch.tensor([80.0, 1.0, 0.1, 0.0]),
                               disable=True, **{option: value})


def test_sigma_data_must_be_positive():
    with pytest.raises(ValueError, match="sigma_data"):
        Parameterization("ve", 0.002, 80.0, "edm", None, 0.0)


def _held_out_flips(range_name: str, mixture_seed: int, starts: dict[str, dict[str, float]],
                    nfes: tuple[int, ...]) -> dict[tuple[str, int], int]:
    """Samples of a held-out mixture (256) that the few-step preset's solver puts in another component
    than the exact ODE does, per ``first_step`` (on its ``logsnr_window`` window) and NFE; the skip
    start spends the calls on one step more."""
    rng = analytic.RANGE_PRESETS[range_name]
    mixture = analytic.GaussianMixture.random(16, 8, (0.05, 0.30), mixture_seed)
    x = mixture.sample(256, rng.sigma_max, rng.form, generator=torch.Generator().manual_seed(1))
    reference = mixture.nearest_component(mixture.ode_solution(x, rng.sigma_max, 0.0, rng.form))
    p = rng.parameterization()
    flips = {}
    for first_step, window in starts.items():
        for nfe in nfes:
            sigmas = schedules.get_sigmas("logsnr_window", nfe + (first_step == "skip"), p, **window)
            model = analytic.CountingDenoiser(mixture, rng.form)
            out = sample_dpmpp_multistep(model, x.float(), sigmas, parameterization=p, order=2,
                                         corrector="bh2", final_order=4, final_weights="gaussian",
                                         first_step=first_step, disable=True, resume_history=False)
            assert model.nfe == nfe
            flips[first_step, nfe] = int((mixture.nearest_component(out) != reference).sum())
    return flips


@pytest.mark.parametrize("mixture_seed", [11, 12])
@pytest.mark.parametrize("range_name", ["sd15", "edm", "flow_shift1"])
def test_gaussian_first_step_changes_the_mode_of_fewer_samples(range_name, mixture_seed):
    """Held-out mixtures (not the benchmark's; per-dimension variance 0.7-0.95, the parameterization's
    sigma_data is 1): the few-step preset's solver on the few-step window at 5, 6 and 8 calls. With the
    gaussian first step fewer samples end in another mixture component than the exact ODE's over the
    three, and the calls are the same."""
    window = schedules.FEWSTEP_WINDOW
    flips = _held_out_flips(range_name, mixture_seed, {"ddim": window, "gaussian": window}, (5, 6, 8))
    assert all(flips["gaussian", n] <= flips["ddim", n] for n in (5, 6, 8)), flips
    assert sum(flips["gaussian", n] for n in (5, 6, 8)) < sum(flips["ddim", n] for n in (5, 6, 8)), flips


@pytest.mark.parametrize("cfg", [3.0, 12.0])
def test_gaussian_first_step_is_safe_under_guidance(cfg, guided_preset_errors):
    """A guided mixture (``D_u + cfg (D_c - D_u)``, as ``bench/guidance_check.py``) at 5 and 6 calls: the
    step is taken around the guided prediction as DDIM's is, and is no less accurate."""
    errors = guided_preset_errors("edm", cfg, (5, 6), "first_step", ("ddim", "gaussian"))
    for nfe in (5, 6):
        assert errors[nfe, "gaussian"] <= 1.02 * errors[nfe, "ddim"], errors


@pytest.mark.parametrize("mixture_seed", [11, 12])
@pytest.mark.parametrize("range_name", ["sd15", "edm", "flow_shift1"])
def test_skip_start_changes_the_mode_of_fewer_samples_at_the_same_calls(range_name, mixture_seed):
    """The held-out mixtures of the test above, at 4, 5, 6 and 8 calls: the few-step preset with the
    skip start on its window (one step more) against the same preset with the gaussian first step on
    the few-step window. Fewer samples end in another component over the four, and none more at 4-6
    calls (at 8, where both change few, one of the mixtures has 8 against 5 on flow)."""
    starts = {"gaussian": schedules.FEWSTEP_WINDOW, "skip": schedules.SKIP_WINDOW}
    flips = _held_out_flips(range_name, mixture_seed, starts, (4, 5, 6, 8))
    assert all(flips["skip", n] <= flips["gaussian", n] for n in (4, 5, 6)), flips
    total = {start: sum(flips[start, n] for n in (4, 5, 6, 8)) for start in ("gaussian", "skip")}
    assert total["skip"] < total["gaussian"], flips


@pytest.mark.parametrize("cfg", [3.0, 5.0])
def test_skip_start_is_more_accurate_under_moderate_guidance(cfg, guided_preset_errors):
    """The guided mixture at 5 and 6 calls, cfg 3 and 5 (``bench/guidance_check.py`` shows where it
    stops: 4 calls, and cfg 7 or more, on some problems)."""
    errors = guided_preset_errors("edm", cfg, (5, 6), "first_step", ("gaussian", "skip"))
    for nfe in (5, 6):
        assert errors[nfe, "skip"] < errors[nfe, "gaussian"], errors
