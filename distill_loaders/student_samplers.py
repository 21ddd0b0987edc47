"""Samplers the students need that ComfyUI lacks, in k-diffusion's contract.

``fn(model, x, sigmas, extra_args=None, callback=None, disable=None, **options)``; ``model(x, sigma)``
returns the denoised x0; VE coordinates ``x = x0 + sigma eps`` (eps/x0/LCM students).

* :func:`sample_renoise` — predict x0, then fresh noise to the next level (LCM, Luo et al. 2023
  Alg. 3; DMD2's few-step loop; SiD-LSG multi-step).
* :func:`sample_tcd` — Trajectory Consistency Distillation's strategic stochastic sampling
  (Zheng et al. 2024, eq. 17; diffusers ``TCDScheduler.step``) with gamma (``eta``).
"""

from __future__ import annotations

import math

import torch

from ..samplers._loop import ModelEvaluator
from ..samplers.noise import PerSampleNoiseSampler
from .recipes import ddpm_sigma, timestep_from_sigma

__all__ = ["sample_renoise", "sample_tcd", "tcd_intermediate_sigma"]


def _noise_sampler(x: torch.Tensor, extra_args: dict, noise_sampler):
    """The given noise sampler or, by default, the pack's per-sample one seeded with the run's
    seed (the same noise for a sample in any batch size, on any device, and at a given sigma in
    a split schedule)."""
    if noise_sampler is not None:
        return noise_sampler
    return PerSampleNoiseSampler(x, extra_args.get("seed"))


def _trange(n: int, disable):
    try:
        from tqdm.auto import trange

        return trange(n, disable=disable)
    except ImportError:  # pragma: no cover
        return range(n)


@torch.no_grad()
def sample_renoise(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None):
    """x0 prediction, then ``x = x0 + sigma_next z`` with fresh ``z`` (LCM multistep sampling)."""
    extra_args = {} if extra_args is None else extra_args
    noise = _noise_sampler(x, extra_args, noise_sampler)
    evaluator = ModelEvaluator(model, extra_args, total_steps=len(sigmas) - 1)  # stops on NaN/inf
    for i in _trange(len(sigmas) - 1, disable):
        denoised = evaluator(x, float(sigmas[i]), i)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        x = denoised
        if sigmas[i + 1] > 0:
            x = x + sigmas[i + 1] * noise(sigmas[i], sigmas[i + 1])
    return x


def tcd_intermediate_sigma(sigma_next: float, gamma: float) -> float:
    """TCD's jump target ``s = floor((1 - gamma) t_prev)`` as a sigma (DDPM SD schedule).

    Where ``s = t_prev`` (gamma 0, or gamma too small to move ``t_prev`` by one timestep) the step
    has no stochastic part and the target is ``sigma_next`` itself, not the float64 table value of
    the same timestep: ComfyUI's float32 sigmas differ from it by ~1e-7, and that difference must
    not turn into fresh noise.
    """
    if sigma_next <= 0:
        return 0.0
    t_prev = timestep_from_sigma(sigma_next)
    s = math.floor((1.0 - gamma) * t_prev)
    return sigma_next if s >= t_prev else ddpm_sigma(s)


@torch.no_grad()
def sample_tcd(
    model, x, sigmas, extra_args=None, callback=None, disable=None, eta: float = 0.3, noise_sampler=None
):
    """TCD sampling with gamma = ``eta``.

    Each step (Zheng et al. 2024, eq. 17) jumps deterministically (DDIM with the model's x0 and eps)
    to ``s = floor((1 - gamma) t_next)`` and then forward-diffuses from ``s`` to ``t_next`` with
    fresh noise. In VE coordinates: ``x_s = x0 + sigma_s eps`` and
    ``x_next = x_s + sqrt(sigma_next^2 - sigma_s^2) z``. ``gamma = 0`` is DDIM (= Euler);
    ``gamma = 1`` re-noises from (almost) x0 like LCM. As in diffusers' ``TCDScheduler`` (which
    PCM and Hyper-SD also sample with), the last step ends at DDPM timestep 0, not at the clean
    x0: the output is ``sqrt(abar_0) x0 + sqrt(1 - abar_0) eps`` with ``abar_0 = 1 - 0.00085``;
    where ComfyUI's ``denoise_mask`` keeps the input (inpainting), the output is the kept latent.
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"TCD gamma (eta) must lie in [0, 1], got {eta}")
    extra_args = {} if extra_args is None else extra_args
    noise = _noise_sampler(x, extra_args, noise_sampler)
    evaluator = ModelEvaluator(model, extra_args, total_steps=len(sigmas) - 1)  # stops on NaN/inf
    for i in _trange(len(sigmas) - 1, disable):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = evaluator(x, sigma, i)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        eps = (x - denoised) / sigma
        if sigma_next <= 0:
            # diffusers TCDScheduler.step: after the last timestep prev_timestep is 0 (not -1), so
            # the final jump lands on abar_0 = 1 - beta_0 without noise, sqrt(abar_0) x0 +
            # sqrt(1 - abar_0) eps, i.e. (x0 + sigma_0 eps) / sqrt(1 + sigma_0^2) in VE terms.
            sigma_0 = ddpm_sigma(0)
            x = (denoised + sigma_0 * eps) / math.sqrt(1.0 + sigma_0 * sigma_0)
            mask = extra_args.get("denoise_mask")
            if mask is not None:  # inpainting: the kept region is ComfyUI's latent exactly, unnoised
                x = x * mask + denoised * (1.0 - mask)
            continue
        sigma_s = tcd_intermediate_sigma(sigma_next, eta)
        x = denoised + sigma_s * eps
        if sigma_s < sigma_next:
            x = x + math.sqrt(sigma_next**2 - sigma_s**2) * noise(sigmas[i], sigmas[i + 1])
    return x
