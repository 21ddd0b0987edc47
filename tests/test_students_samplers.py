"""TCD and re-noising samplers against the diffusers-form (DDPM coordinates) formulas."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from comfyui_fewstep.distill_loaders.recipes import (
    alphas_cumprod,
    ddpm_sigma,
    recipe_sigmas,
    recipe_timesteps,
    timestep_from_sigma,
)
from comfyui_fewstep.distill_loaders.student_samplers import sample_renoise, sample_tcd


def _model(x, sigma, **kwargs):  # a fixed, non-trivial x0 predictor
    return torch.tanh(0.3 * x) * (1.0 / (1.0 + sigma.view(-1, 1)))


def _noises(n, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(n)]


def _tcd_ddpm_reference(z0, timesteps, gamma, noises):
    """diffusers TCDScheduler.step written in DDPM coordinates (x_t = sqrt(abar) x0 + sqrt(1-abar) eps).

    After the last timestep diffusers sets ``prev_timestep = 0`` (not -1), so the final jump goes to
    ``s = floor((1 - gamma) 0) = 0`` and returns ``sqrt(abar_0) x0 + sqrt(1 - abar_0) eps`` without
    noise (huggingface/diffusers: src/diffusers/schedulers/scheduling_tcd.py, ``TCDScheduler.step``)."""
    x = z0  # unit-variance start (TCD's init_noise_sigma = 1)
    for i, t in enumerate(timesteps):
        a_t = alphas_cumprod(t)
        sigma_ve = math.sqrt((1 - a_t) / a_t)
        x0 = _model(x / math.sqrt(a_t), torch.tensor([sigma_ve], dtype=torch.float64))
        eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
        last = i == len(timesteps) - 1
        t_prev = 0 if last else timesteps[i + 1]
        s = math.floor((1 - gamma) * t_prev)
        a_s = alphas_cumprod(s)
        x = math.sqrt(a_s) * x0 + math.sqrt(1 - a_s) * eps
        a_prev = alphas_cumprod(t_prev)
        if gamma > 0 and not last:
            x = math.sqrt(a_prev / a_s) * x + math.sqrt(1 - a_prev / a_s) * noises[i]
    return x


@pytest.mark.parametrize("gamma", [0.0, 0.3, 1.0])
def test_tcd_matches_ddpm_form(gamma):
    sigmas = recipe_sigmas("tcd_lora", 4)
    timesteps = [timestep_from_sigma(float(s)) for s in sigmas[:-1]]
    assert timesteps == [999, 759, 499, 259]
    z = _noises(1, (2, 6), seed=3)[0]
    noises = _noises(4, (2, 6), seed=4)
    ref = _tcd_ddpm_reference(z, timesteps, gamma, noises)
    it = iter(noises)
    x_init = z * math.sqrt(1 + float(sigmas[0]) ** 2)  # unit-variance model input
    ours = sample_tcd(_model, x_init, sigmas, eta=gamma, disable=True, noise_sampler=lambda s, sn: next(it))
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)


def test_tcd_keeps_the_inpainting_latent_exactly():
    """With ComfyUI's denoise_mask, the model wrapper returns the kept latent as the prediction
    there; TCD's last jump to t = 0 added sigma_0 eps (about 0.03 of grain) on top of it."""
    latent = _noises(1, (2, 6), seed=5)[0]
    mask = torch.zeros(2, 6, dtype=torch.float64)
    mask[:, :3] = 1.0  # regenerate the left half, keep the right

    def inpaint_model(x, sigma, denoise_mask=None, **kwargs):  # as comfy.samplers.KSamplerX0Inpaint
        return _model(x, sigma) * denoise_mask + latent * (1.0 - denoise_mask)

    sigmas = recipe_sigmas("tcd_lora", 4)
    x = _noises(1, (2, 6), seed=6)[0] * float(sigmas[0])
    it = iter(_noises(4, (2, 6), seed=8))
    out = sample_tcd(inpaint_model, x, sigmas, extra_args={"denoise_mask": mask}, eta=0.3, disable=True,
                     noise_sampler=lambda s, sn: next(it))
    assert torch.equal(out[:, 3:], latent[:, 3:])
    it = iter(_noises(4, (2, 6), seed=8))
    free = sample_tcd(inpaint_model, x, sigmas, extra_args={"denoise_mask": torch.ones_like(mask)}, eta=0.3,
                      disable=True, noise_sampler=lambda s, sn: next(it))
    torch.testing.assert_close(out[:, :3], free[:, :3], rtol=0, atol=0)  # the regenerated half: TCD's output


def test_tcd_gamma_zero_is_euler():
    """gamma 0 is DDIM, i.e. Euler in VE coordinates, down to t = 0 (sigma_0 = 0.0292), where the
    result is read in DDPM scale: ``x / sqrt(1 + sigma_0^2)``."""
    sigmas = recipe_sigmas("pcm_smallcfg_4step")
    assert [timestep_from_sigma(float(s)) for s in sigmas[:-1]] == [999, 759, 499, 259]
    x = _noises(1, (3, 5), seed=7)[0] * float(sigmas[0])
    y = x.clone()
    s_in = torch.ones(3, dtype=torch.float64)
    euler_sigmas = [*sigmas[:-1].tolist(), ddpm_sigma(0)]
    for i in range(len(euler_sigmas) - 1):  # k-diffusion Euler
        d = (y - _model(y, euler_sigmas[i] * s_in)) / euler_sigmas[i]
        y = y + d * (euler_sigmas[i + 1] - euler_sigmas[i])
    y = y / math.sqrt(1 + ddpm_sigma(0) ** 2)
    torch.testing.assert_close(
        sample_tcd(_model, x, sigmas, eta=0.0, disable=True), y, rtol=1e-12, atol=1e-12
    )


def test_renoise_matches_lcm_scheduler_step():
    sigmas = recipe_sigmas("dmd2_sdxl_4step")
    z = _noises(1, (2, 4), seed=1)[0]
    noises = _noises(3, (2, 4), seed=2)
    # DDPM form: x0 = model; prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev) z  (LCMScheduler.step / DMD2)
    ts = [999, 749, 499, 249]
    x = z
    for i, t in enumerate(ts):
        a = alphas_cumprod(t)
        x0 = _model(x / math.sqrt(a), torch.tensor([math.sqrt((1 - a) / a)], dtype=torch.float64))
        if i + 1 < len(ts):
            ap = alphas_cumprod(ts[i + 1])
            x = math.sqrt(ap) * x0 + math.sqrt(1 - ap) * noises[i]
    it = iter(noises)
    ours = sample_renoise(
        _model,
        z * math.sqrt(1 + float(sigmas[0]) ** 2),
        sigmas,
        disable=True,
        noise_sampler=lambda s, sn: next(it),
    )
    torch.testing.assert_close(ours, x0, rtol=1e-10, atol=1e-10)


def test_callback_and_seeded_noise():
    sigmas = recipe_sigmas("lcm_lora", 4)
    x = torch.randn(1, 3, dtype=torch.float64) * 15
    seen = []
    a = sample_tcd(
        _model, x, sigmas, extra_args={"seed": 5}, callback=lambda d: seen.append(d["i"]), disable=True
    )
    b = sample_tcd(_model, x, sigmas, extra_args={"seed": 5}, disable=True)
    assert seen == [0, 1, 2, 3] and torch.equal(a, b)
    # per-sample noise: a sample gets the same noise alone as in a batch, and a schedule split in
    # two gives the unsplit result (each part draws the noise of its sigmas)
    batch = torch.cat([x, torch.randn(2, 3, dtype=torch.float64) * 15])
    seeded = {"extra_args": {"seed": 5}, "disable": True}
    for sampler in (sample_tcd, sample_renoise):
        full = sampler(_model, batch, sigmas, **seeded)
        torch.testing.assert_close(full[:1], sampler(_model, x, sigmas, **seeded), rtol=1e-12, atol=1e-12)
        mid = sampler(_model, batch, sigmas[:3], **seeded)
        torch.testing.assert_close(sampler(_model, mid, sigmas[2:], **seeded), full, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="gamma"):
        sample_tcd(_model, x, sigmas, eta=1.5)


@pytest.mark.parametrize(
    "recipe, gamma", [("tcd_lora", 0.3), ("pcm_smallcfg_4step", 0.0), ("hyper_1step_lora_tcd", 1.0)]
)
def test_tcd_matches_diffusers_scheduler(recipe, gamma, monkeypatch):
    """Our timesteps and sample_tcd against diffusers' own TCDScheduler, built as PCM's demo builds it
    (G-U-N/Phased-Consistency-Model: demo/app.py), with the same noise injected."""
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.TCDScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="trailing",  # stored, never read by TCDScheduler.set_timesteps
    )
    steps = len(recipe_timesteps(recipe))
    sched.set_timesteps(steps)
    assert recipe_timesteps(recipe) == [float(t) for t in sched.timesteps.tolist()]

    def eps_model(x_ddpm, t):  # a fixed non-linear eps predictor in DDPM coordinates
        return torch.tanh(0.5 * x_ddpm) + 0.01 * t / 1000

    g = torch.Generator().manual_seed(11)
    z = torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64)
    noises = [torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64) for _ in range(steps)]
    theirs_noise, our_noise = iter(noises), iter(noises)
    module = sys.modules[type(sched).__module__]
    monkeypatch.setattr(module, "randn_tensor", lambda *a, **k: next(theirs_noise).float())
    x = z.float()
    for t in sched.timesteps:
        x = sched.step(eps_model(x.double(), int(t)).float(), t, x, eta=gamma).prev_sample

    def denoiser(x_ve, sigma, **kwargs):
        s = float(sigma[0])
        t = timestep_from_sigma(s)
        a = alphas_cumprod(t)
        x_ddpm = x_ve / math.sqrt(1 + s * s)
        return (x_ddpm - math.sqrt(1 - a) * eps_model(x_ddpm, t)) / math.sqrt(a)

    sigmas = recipe_sigmas(recipe)
    ours = sample_tcd(
        denoiser,
        z * math.sqrt(1 + float(sigmas[0]) ** 2),
        sigmas,
        eta=gamma,
        disable=True,
        noise_sampler=lambda s, sn: next(our_noise),
    )
    torch.testing.assert_close(ours.float(), x, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tcd_gamma_zero_is_ddim_without_noise(dtype):
    # PCM samples with gamma 0: every step is a deterministic DDIM jump to sigma_next, however the
    # float32 sigmas round, and no noise is drawn.
    sigmas = recipe_sigmas("pcm_smallcfg_4step").to(dtype)
    x = torch.randn(2, 3, dtype=torch.float64) * float(sigmas[0])

    def no_noise(s, sn):
        raise AssertionError("gamma 0 drew noise")

    ours = sample_tcd(_model, x, sigmas, eta=0.0, disable=True, noise_sampler=no_noise)
    ddim = x
    for i in range(len(sigmas) - 2):
        s, sn = float(sigmas[i]), float(sigmas[i + 1])
        d = _model(ddim, sigmas[i] * ddim.new_ones(2))
        ddim = d + sn * (ddim - d) / s
    d = _model(ddim, sigmas[-2] * ddim.new_ones(2))
    eps = (ddim - d) / float(sigmas[-2])
    s0 = ddpm_sigma(0)
    ddim = (d + s0 * eps) / math.sqrt(1 + s0 * s0)
    torch.testing.assert_close(ours, ddim, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sampler", [sample_renoise, sample_tcd])
def test_nan_from_the_student_stops_with_the_step(sampler):
    """A broken LoRA or an fp16 overflow in a student gives a message naming the step, not a NaN
    image (the student samplers called the model directly)."""
    from comfyui_fewstep.samplers._loop import NonFiniteModelOutputError

    calls = []

    def model(x, sigma, **kwargs):
        calls.append(float(sigma[0]))
        out = _model(x, sigma)
        return out * math.nan if len(calls) == 3 else out

    sigmas = torch.tensor([14.6, 3.0, 1.0, 0.3, 0.0])
    with pytest.raises(NonFiniteModelOutputError) as caught:
        sampler(model, torch.randn(2, 16) * 14.6, sigmas, extra_args={"seed": 1}, disable=True)
    assert (caught.value.step, caught.value.total_steps) == (2, 4)
    assert caught.value.sigma == pytest.approx(1.0)
