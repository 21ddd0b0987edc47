"""KSampler dropdown presets: append-only, in place, idempotent, never shadowing."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.comfy


@pytest.fixture(scope="module")
def env(comfy):
    import comfy.k_diffusion.sampling as kds
    import comfy.samplers
    from comfyui_fewstep.nodes import ksampler_presets

    return comfy.samplers, kds, ksampler_presets


def test_registration_is_in_place_append_only_and_idempotent(env):
    samplers, kds, presets = env
    lists = (samplers.KSAMPLER_NAMES, samplers.SAMPLER_NAMES, samplers.SCHEDULER_NAMES)
    ids = [id(names) for names in lists]
    before = [list(names) for names in lists]
    handlers_before = dict(samplers.SCHEDULER_HANDLERS)
    builtin_fns = {name: getattr(kds, "sample_" + name) for name in before[0]}

    presets.register_ksampler_presets()
    after = [list(names) for names in lists]
    assert [id(names) for names in lists] == ids  # never rebound
    assert samplers.KSampler.SAMPLERS is samplers.SAMPLER_NAMES
    assert samplers.KSampler.SCHEDULERS is samplers.SCHEDULER_NAMES
    for old, new in zip(before, after, strict=True):
        assert new[: len(old)] == old  # built-ins untouched, in their order
        assert all(name.startswith(presets.PREFIX) for name in new[len(old) :])
    for name, fn in builtin_fns.items():
        assert getattr(kds, "sample_" + name) is fn
    for name, handler in handlers_before.items():
        assert samplers.SCHEDULER_HANDLERS[name] is handler

    assert set(presets.SAMPLER_PRESETS) <= set(samplers.SAMPLER_NAMES) & set(samplers.KSAMPLER_NAMES)
    assert set(presets.SCHEDULER_PRESETS) <= set(samplers.SCHEDULER_NAMES) & set(samplers.SCHEDULER_HANDLERS)
    for name in presets.SAMPLER_PRESETS:
        fn = getattr(kds, "sample_" + name)
        assert fn.__name__ == "sample_" + name
        assert samplers.ksampler(name).sampler_function is fn

    assert presets.register_ksampler_presets() == []  # second call adds nothing
    assert [list(names) for names in lists] == after
    assert len(set(samplers.SAMPLER_NAMES)) == len(samplers.SAMPLER_NAMES)


def test_scheduler_presets_compute_our_schedules(env):
    samplers, _, presets = env
    import comfy.model_sampling as cms
    from comfyui_fewstep.nodes._comfy_sampling import parameterization_from_model_sampling
    from comfyui_fewstep.samplers.schedules import get_sigmas

    presets.register_ksampler_presets()
    ms = type("EpsSampling", (cms.ModelSamplingDiscrete, cms.EPS), {})()
    for name, schedule in presets.SCHEDULER_PRESETS.items():
        sigmas = samplers.calculate_sigmas(ms, name, 6)
        options = presets.SCHEDULER_OPTIONS.get(name, {})
        expected = get_sigmas(schedule, 6, parameterization_from_model_sampling(ms), **options)
        torch.testing.assert_close(sigmas, expected, rtol=0, atol=0)
        assert sigmas.shape == (7,) and sigmas[-1] == 0


def test_window_preset_is_the_few_step_window(env):
    """fewstep_window and fewstep_skip_window are logsnr_window with the few-step presets' options, not
    its defaults."""
    samplers, _, presets = env
    import comfy.model_sampling as cms
    from comfyui_fewstep.nodes._comfy_sampling import parameterization_from_model_sampling
    from comfyui_fewstep.samplers.schedules import FEWSTEP_WINDOW, SKIP_WINDOW, get_sigmas_logsnr_window

    presets.register_ksampler_presets()
    ms = type("EpsSampling", (cms.ModelSamplingDiscrete, cms.EPS), {})()
    p = parameterization_from_model_sampling(ms)
    sigmas = samplers.calculate_sigmas(ms, presets.PREFIX + "window", 6)
    torch.testing.assert_close(sigmas, get_sigmas_logsnr_window(6, p, **FEWSTEP_WINDOW), rtol=0, atol=0)
    skip = samplers.calculate_sigmas(ms, presets.PREFIX + "skip_window", 6)
    torch.testing.assert_close(skip, get_sigmas_logsnr_window(6, p, **SKIP_WINDOW), rtol=0, atol=0)
    assert not torch.equal(sigmas, get_sigmas_logsnr_window(6, p))


def test_a_foreign_name_is_never_shadowed(env, monkeypatch):
    samplers, kds, presets = env

    def foreign(model, x, sigmas, extra_args=None, callback=None, disable=None):
        return x

    monkeypatch.setitem(presets.SAMPLER_PRESETS, "fewstep_taken", "dpmpp_2m")
    monkeypatch.setattr(kds, "sample_fewstep_taken", foreign, raising=False)
    monkeypatch.setitem(presets.SCHEDULER_PRESETS, "fewstep_taken_schedule", "karras")
    handler = samplers.SchedulerHandler(lambda ms, steps: torch.zeros(steps + 1))
    monkeypatch.setitem(samplers.SCHEDULER_HANDLERS, "fewstep_taken_schedule", handler)
    added = presets.register_ksampler_presets()
    assert "fewstep_taken" not in added and "fewstep_taken_schedule" not in added
    assert kds.sample_fewstep_taken is foreign
    assert samplers.SCHEDULER_HANDLERS["fewstep_taken_schedule"] is handler
    assert "fewstep_taken" not in samplers.SAMPLER_NAMES


def test_environment_switch_turns_registration_off(env, monkeypatch):
    _, _, presets = env
    monkeypatch.setenv(presets.ENV_SWITCH, "0")
    monkeypatch.setitem(presets.SAMPLER_PRESETS, "fewstep_switched_off", "dpmpp_2m")
    assert presets.register_ksampler_presets() == []
    import comfy.samplers

    assert "fewstep_switched_off" not in comfy.samplers.SAMPLER_NAMES
