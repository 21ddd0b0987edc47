"""Baseline samplers the demo compares against, reproduced without ComfyUI.

These are the two first-choice samplers of ComfyUI's KSampler, written from the
papers with k-diffusion's contract ``fn(model, x, sigmas, extra_args=None,
callback=None, disable=None)`` (``model(x, sigma_batch)`` returns ``denoised``):

* :func:`sample_euler`: Euler's method on the probability-flow ODE
  ``dx/dsigma = (x - D(x; sigma)) / sigma`` (Karras et al. 2022, arXiv 2206.00364,
  eq. 4 with ``sigma(t) = t``). In the VE form this step equals DDIM (Song et al.
  2021) and first-order DPM-Solver++.
* :func:`sample_heun`: Heun's second-order method, Algorithm 1 of Karras et al.
  (deterministic, no churn), with an Euler step into ``sigma = 0``; ``2 * steps - 1``
  model calls when the schedule ends in zero.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["heun_steps_for_nfe", "sample_euler", "sample_heun"]


def heun_steps_for_nfe(nfe: int) -> int:
    """Largest step count whose Heun run (``2 * steps - 1`` calls) fits in ``nfe`` calls."""
    return max(1, (nfe + 1) // 2)


def _emit(callback: Callable | None, x: Tensor, i: int, sigma: Tensor, denoised: Tensor) -> None:
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})


@torch.no_grad()
def sample_euler(model, x: Tensor, sigmas: Tensor, extra_args=None, callback=None, disable=None) -> Tensor:
    """Euler steps on the probability-flow ODE (Karras et al. 2022, eq. 4; = DDIM in VE form)."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)
        _emit(callback, x, i, sigma, denoised)
        d = (x - denoised) / sigma
        x = x + d * (sigma_next - sigma)
    return x


@torch.no_grad()
def sample_heun(model, x: Tensor, sigmas: Tensor, extra_args=None, callback=None, disable=None) -> Tensor:
    """Heun's method, Karras et al. 2022 Algorithm 1 (no churn); Euler into sigma = 0."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)
        _emit(callback, x, i, sigma, denoised)
        d = (x - denoised) / sigma
        x_euler = x + d * (sigma_next - sigma)
        if float(sigma_next) == 0.0:
            x = x_euler
            continue
        d_next = (x_euler - model(x_euler, sigma_next * s_in, **extra_args)) / sigma_next
        x = x + (d + d_next) / 2 * (sigma_next - sigma)
    return x
