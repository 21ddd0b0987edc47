"""ComfyUI model_sampling -> Parameterization, checked against ComfyUI's own objects."""

from __future__ import annotations

import logging
import math

import pytest
import torch

pytestmark = pytest.mark.comfy


@pytest.fixture(scope="module")
def cms(comfy):
    import comfy.model_sampling as cms

    return cms


@pytest.fixture(scope="module")
def adapter(comfy):
    from comfyui_fewstep.nodes import _comfy_sampling

    return _comfy_sampling


def _make(cms, schedule, prediction, **params):
    cls = type("ModelSamplingTest", (schedule, prediction), {})
    if schedule is cms.ModelSamplingDiscrete:
        return cls(zsnr=params.pop("zsnr", None))
    ms = cls()
    if params:
        ms.set_parameters(**params)
    return ms


def _core_cases(cms):
    return {
        "eps": (_make(cms, cms.ModelSamplingDiscrete, cms.EPS), "ve", "eps"),
        "v_zsnr": (_make(cms, cms.ModelSamplingDiscrete, cms.V_PREDICTION, zsnr=True), "ve", "v"),
        "x0": (_make(cms, cms.ModelSamplingDiscrete, cms.X0), "ve", "x0"),
        "img_to_img": (_make(cms, cms.ModelSamplingDiscrete, cms.IMG_TO_IMG), "ve", "x0"),
        "edm": (
            _make(
                cms, cms.ModelSamplingContinuousEDM, cms.EDM, sigma_min=0.002, sigma_max=80.0, sigma_data=0.5
            ),
            "ve",
            "edm",
        ),
        "v_continuous": (
            _make(
                cms,
                cms.ModelSamplingContinuousV,
                cms.V_PREDICTION,
                sigma_min=0.03,
                sigma_max=500.0,
                sigma_data=1.0,
            ),
            "ve",
            "v",
        ),
        "cosmos": (
            _make(
                cms,
                cms.ModelSamplingCosmosRFlow,
                cms.COSMOS_RFLOW,
                sigma_min=0.002,
                sigma_max=80.0,
                sigma_data=1.0,
            ),
            "ve",
            "edm",
        ),
        "flow_shift3": (_make(cms, cms.ModelSamplingDiscreteFlow, cms.CONST, shift=3.0), "flow", "flow"),
        "flux": (_make(cms, cms.ModelSamplingFlux, cms.CONST, shift=1.15), "flow", "flow"),
    }


def test_kind_family_and_range_for_every_core_prediction_type(cms, adapter):
    for name, (ms, kind, family) in _core_cases(cms).items():
        p = adapter.parameterization_from_model_sampling(ms)
        assert (p.kind, p.family) == (kind, family), name
        assert p.sigma_min == pytest.approx(float(ms.sigma_min), rel=1e-7), name
        assert p.sigma_max == pytest.approx(min(float(ms.sigma_max), 1.0 if kind == "flow" else math.inf)), (
            name
        )


def test_sigma_data_is_the_models(cms, adapter):
    """EDM-style models carry their data scale (0.5 here, as EDM's pixel models and Playground v2.5);
    discrete and flow models have unit-variance latents (ComfyUI's flow objects have no attribute)."""
    expected = {"edm": 0.5, "v_continuous": 1.0, "cosmos": 1.0, "eps": 1.0, "flow_shift3": 1.0, "flux": 1.0}
    cases = _core_cases(cms)
    for name, sigma_data in expected.items():
        assert adapter.parameterization_from_model_sampling(cases[name][0]).sigma_data == sigma_data, name
    odd = _make(cms, cms.ModelSamplingDiscreteFlow, cms.CONST, shift=3.0)
    odd.sigma_data = float("nan")
    assert adapter.parameterization_from_model_sampling(odd).sigma_data == 1.0


def test_a_collapsed_sigma_range_is_named(cms, adapter):
    """Flux's shift from an extreme max_shift and image size puts every sigma at 1.0: the message
    says what to change (it was the internal "needs 0 < sigma_min < sigma_max")."""
    ms = _make(cms, cms.ModelSamplingFlux, cms.CONST, shift=60.0)
    assert float(ms.sigma_min) == float(ms.sigma_max) == 1.0
    with pytest.raises(ValueError, match="noise levels collapse to one value.*Lower the shift"):
        adapter.parameterization_from_model_sampling(ms)


def test_noise_scaling_agrees_with_alpha_and_sigma(cms, adapter):
    """The coordinates ComfyUI builds x in are x = alpha(sigma) x0 + sigma eps for our kind."""
    x0 = torch.randn(2, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    eps = torch.randn(2, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for name, (ms, _, _) in _core_cases(cms).items():
        p = adapter.parameterization_from_model_sampling(ms)
        for sigma in (0.05, 0.4, 0.9):
            s = torch.full((2,), sigma, dtype=torch.float64)
            x = ms.noise_scaling(s, eps.clone(), x0.clone(), max_denoise=False)
            expected = p.alpha(sigma) * x0 + p.sigma_t(sigma) * eps
            torch.testing.assert_close(x, expected, msg=f"{name} at sigma={sigma}")


def test_lambda_matches_comfy_half_log_snr(cms, adapter):
    from comfy.k_diffusion.sampling import sigma_to_half_log_snr

    for name, (ms, _, _) in _core_cases(cms).items():
        p = adapter.parameterization_from_model_sampling(ms)
        for sigma in (0.01, 0.3, 0.7):
            core = float(sigma_to_half_log_snr(torch.tensor(sigma, dtype=torch.float64), ms))
            assert p.lambda_(sigma) == pytest.approx(core, rel=1e-12, abs=1e-12), name


def test_discrete_tables_are_passed_on_and_match_our_closed_forms(cms, adapter):
    from comfyui_fewstep.samplers.parameterization import discrete_vp_sigmas, flow_sigmas

    cases = _core_cases(cms)
    eps = adapter.parameterization_from_model_sampling(cases["eps"][0])
    assert len(eps.timestep_sigmas) == 1000
    torch.testing.assert_close(
        torch.tensor(eps.timestep_sigmas, dtype=torch.float64), discrete_vp_sigmas(), rtol=1e-6, atol=0
    )
    flow = adapter.parameterization_from_model_sampling(cases["flow_shift3"][0])
    torch.testing.assert_close(
        torch.tensor(flow.timestep_sigmas, dtype=torch.float64),
        flow_sigmas(1000, shift=3.0),
        rtol=1e-6,
        atol=0,
    )
    zsnr = adapter.parameterization_from_model_sampling(cases["v_zsnr"][0])
    assert zsnr.sigma_max > 1000.0 and zsnr.timestep_sigmas[-1] == zsnr.sigma_max
    for name in ("edm", "v_continuous", "cosmos"):
        assert adapter.parameterization_from_model_sampling(cases[name][0]).timestep_sigmas is None, name


def test_a_timestep_table_with_flat_stretches_counts_as_continuous_time(cms, adapter):
    """Stable Cascade's sigma table repeats values: it is no one-to-one timestep table, and the
    time-based schedules use continuous time instead of failing."""
    from comfyui_fewstep.samplers import schedules

    cascade = _make(cms, cms.StableCascadeSampling, cms.EPS, shift=2.0)  # ModelSamplingStableCascade node
    table = cascade.sigmas.detach().double()
    assert bool((table[1:] >= table[:-1]).all()) and not bool((table[1:] > table[:-1]).all())
    p = adapter.parameterization_from_model_sampling(cascade)
    assert p.timestep_sigmas is None
    for name in ("time_uniform", "time_quadratic"):
        sigmas = schedules.get_sigmas(name, 8, p)
        assert len(sigmas) == 9 and bool((sigmas[:-1] > sigmas[1:]).all()) and sigmas[-1] == 0


def test_table_schedules_follow_discrete_or_continuous_time(cms, adapter):
    """SVD is ModelSamplingContinuousEDM with v-prediction: AYS 'auto' gives it the SVD table and
    refuses SD tables, although its prediction is 'v' like SD2's discrete model."""
    from comfyui_fewstep.samplers import schedules
    from comfyui_fewstep.samplers.schedule_tables import AYS_TABLES

    svd = adapter.parameterization_from_model_sampling(
        _make(cms, cms.ModelSamplingContinuousEDM, cms.V_PREDICTION, sigma_min=0.002, sigma_max=700.0,
              sigma_data=1.0)
    )
    got = schedules.get_sigmas("ays", 10, svd)
    torch.testing.assert_close(got[:-1], torch.tensor(AYS_TABLES["svd"][:-1], dtype=got.dtype))
    with pytest.raises(ValueError, match="discrete-time"):
        schedules.get_sigmas("gits", 10, svd)
    sd2_sampling = _make(cms, cms.ModelSamplingDiscrete, cms.V_PREDICTION)
    sd2 = adapter.parameterization_from_model_sampling(sd2_sampling)
    got = schedules.get_sigmas("ays", 10, sd2)
    torch.testing.assert_close(got[:-1], torch.tensor(AYS_TABLES["sd15"][:-1], dtype=got.dtype))


def test_object_patched_model_sampling_is_respected(cms, adapter):
    class Patcher:  # the two ModelPatcher methods the adapter uses
        def __init__(self, ms):
            self.ms = ms

        def get_model_object(self, name):
            assert name == "model_sampling"
            return self.ms

    flow = _core_cases(cms)["flow_shift3"][0]
    assert adapter.parameterization_for_model(Patcher(flow)).kind == "flow"

    class Guider:
        model_patcher = Patcher(flow)

    class Denoiser:
        inner_model = Guider()

    assert adapter.parameterization_for_denoiser(Denoiser()).kind == "flow"
    with pytest.raises(TypeError, match="parameterization="):
        adapter.parameterization_for_denoiser(lambda x, s: x)


def test_unknown_prediction_types_are_probed_or_rejected(cms, adapter, caplog):
    class FlowLike:
        sigma_min, sigma_max = 0.01, 1.0

        def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
            return sigma * noise + (1.0 - sigma) * latent_image

    class Odd(FlowLike):
        def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
            return 2.0 * sigma * noise + latent_image

    with caplog.at_level(logging.WARNING):
        p = adapter.parameterization_from_model_sampling(FlowLike())
    assert p.kind == "flow" and "FlowLike" in caplog.text
    with pytest.raises(ValueError, match="VE.*flow"):
        adapter.parameterization_from_model_sampling(Odd())
    with pytest.raises(ValueError, match="noise_scaling"):
        adapter.parameterization_from_model_sampling(object())
